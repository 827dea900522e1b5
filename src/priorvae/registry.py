"""The prior registry and the :class:`Prior` base class.

Like torchvision's ``register_model``/``get_model``/``list_models``::

    @register_prior("mog")
    class MixtureOfGaussians(Prior): ...

    build_prior("mog", latent_dim=40, n_components=10)
    list_priors("*flow*")

A prior is an ``nn.Module`` with ``log_prob(z) -> (B,)`` and ``sample(n) -> (n, D)``. Its
state lives in parameters and buffers, so ``.to(device)``, ``state_dict()`` and checkpoints
just work. Subclasses of :class:`Prior` implement ``_log_prob`` and ``_sample``; the public
methods check shapes and call them.

Names may also be ``"path/to/file.py:ClassName"`` or ``"package.module:ClassName"`` (the class
is imported, no registration needed), and installed packages can register priors through the
entry-point group ``priorvae.priors``.

Priors that need context get it at build time by naming it in ``__init__``: ``encoder`` (the
VAE's encoder module), ``input_shape`` (C, H, W) and ``data`` (training images (N, C, H, W),
grey levels in [0, 1]; a placeholder when a run is restored from a checkpoint, unless the class
sets ``needs_data = True``: then a restored run loads the training split again).

What a prior class may declare besides ``_log_prob``/``_sample`` (the trainer, ``fit-prior``,
``evaluate`` and the contract tests read these; the defaults suit an ordinary density):

- ``needs_data``: built from the training images themselves (exemplar); restoring needs them,
  and ``log_prob(z, exclude=index)`` leaves each training image's own part out.
- ``joint``: can be trained jointly with the VAE (False: ex-post only; ``train`` refuses it).
- ``estimated_normalizer``: ``log_prob`` uses a Monte-Carlo estimate of its normaliser, whose
  standard error ``log_normalizer_stderr()`` reports (nats).
- ``fit_loss(z, index)``: the ex-post objective (default: maximum likelihood), and
  ``fit_defaults``: fit-prior's epochs / batch_size / lr / patience where they differ.
- ``evaluation_limits``: the largest K / number of test images whose IWAE bound is affordable
  and the number of points at which the diagnostics may evaluate its log-density (keys
  ``iw_samples``, ``test_images``, ``log_prob_points``; None: no limit); ``evaluate`` falls back
  to them and records that it did. Sample-based measures always use every sample.
"""

from __future__ import annotations

import contextlib
import difflib
import fnmatch
import hashlib
import importlib
import importlib.util
import inspect
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import PriorError

__all__ = [
    "Prior",
    "PriorContext",
    "register_prior",
    "build_prior",
    "list_priors",
    "get_prior_class",
    "prior_arguments",
    "pin_prior_spec",
    "module_file",
    "CONTEXT_FIELDS",
    "ENTRY_POINT_GROUP",
]

ENTRY_POINT_GROUP = "priorvae.priors"
CONTEXT_FIELDS = ("encoder", "input_shape", "data")
_REGISTRY: dict[str, type] = {}
_loaded = {"builtins": False, "entry_points": False}


class Prior(nn.Module):
    """Base class of priors p(z) over R^D.

    Subclasses call ``super().__init__(latent_dim)`` and implement ``_log_prob(z)`` (B, D) ->
    (B,) and ``_sample(n)`` -> (n, D). The public ``log_prob``/``sample`` check the shapes.
    """

    prior_name: str = ""
    needs_data: bool = False  # built from the training images; restoring needs them again
    joint: bool = True  # can be the prior of the ELBO during training
    estimated_normalizer: bool = False  # log_prob includes a Monte-Carlo estimate of log Z
    evaluation_limits: dict | None = None  # e.g. {"iw_samples": 100, "test_images": 500}
    fit_defaults: dict = {}  # fit-prior's epochs / batch_size / lr / patience for this prior

    def __init__(self, latent_dim: int):
        super().__init__()
        if not isinstance(latent_dim, int) or latent_dim < 1:
            raise PriorError(f"latent_dim must be a positive integer, got {latent_dim!r}")
        self.latent_dim = latent_dim
        # follows .to(device/dtype) like any buffer, but is no part of the state_dict
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)

    def _name(self) -> str:
        return self.prior_name or type(self).__name__

    def log_prob(self, z: torch.Tensor, exclude: torch.Tensor | None = None) -> torch.Tensor:
        """log p(z): (B, D) -> (B,).

        ``exclude`` (B,) names the training images the codes z belong to (their indices into
        the ``data`` context); a prior built from the training images (``needs_data``) leaves
        each one's own part out (leave-one-out), others ignore it.
        """
        if z.dim() != 2 or z.shape[1] != self.latent_dim:
            raise PriorError(
                f"{self._name()}.log_prob expects z of shape (B, {self.latent_dim}), "
                f"got {tuple(z.shape)}"
            )
        if exclude is not None and self.needs_data:
            out = self._log_prob(z, exclude=exclude)
        else:
            out = self._log_prob(z)
        if out.shape != (z.shape[0],):
            raise PriorError(
                f"{self._name()}._log_prob returned shape {tuple(out.shape)}, "
                f"expected ({z.shape[0]},) for z of shape {tuple(z.shape)}"
            )
        return out

    def sample(self, n: int) -> torch.Tensor:
        """n draws z ~ p(z): (n, D)."""
        out = self._sample(int(n))
        if out.shape != (n, self.latent_dim):
            raise PriorError(
                f"{self._name()}._sample({n}) returned shape {tuple(out.shape)}, "
                f"expected ({n}, {self.latent_dim})"
            )
        return out

    def _log_prob(self, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _sample(self, n: int) -> torch.Tensor:
        raise NotImplementedError

    def fit_loss(self, z: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        """The scalar ``fit-prior`` minimises on codes z (B, D) of the training images
        ``index`` (B,): the mean negative log-likelihood unless a prior has its own objective
        (the diffusion prior: denoising score matching)."""
        return -self.log_prob(z, exclude=index).mean()

    def log_normalizer_stderr(self) -> float | None:
        """Monte-Carlo standard error (nats) of the log-normaliser estimate that ``log_prob``
        uses outside training, for priors with ``estimated_normalizer``; None otherwise."""
        return None

    def in_training_step(self) -> bool:
        """True inside an optimisation step (training mode, gradients on): where priors may use
        cheaper stochastic estimates (a subset of exemplars, a batch estimate of Z)."""
        return self.training and torch.is_grad_enabled()

    @contextlib.contextmanager
    def frozen(self):
        """Within this block the parameters are fixed and no gradient is taken (evaluation), so
        a prior may keep work that depends on its parameters alone in ``self.frozen_cache``
        (a dict; None outside) instead of redoing it per call: the VampPrior encodes its
        pseudo-inputs once for a whole test-set NLL instead of once per chunk of samples."""
        outer = self.frozen_cache
        self.frozen_cache = {} if outer is None else outer
        try:
            with torch.no_grad():
                yield self
        finally:
            self.frozen_cache = outer

    frozen_cache: dict | None = None

    @property
    def device(self) -> torch.device:
        return self._anchor.device

    @property
    def dtype(self) -> torch.dtype:
        return self._anchor.dtype

    def extra_repr(self) -> str:
        return f"latent_dim={self.latent_dim}"


@dataclass
class PriorContext:
    """What a prior may ask for at build time (by naming it in ``__init__``)."""

    encoder: nn.Module | None = None
    input_shape: tuple[int, ...] | None = None
    data: torch.Tensor | None = None


def register_prior(name: str):
    """Class decorator registering a prior under ``name``; a duplicate name is an error."""
    if not isinstance(name, str) or not name or ":" in name:
        raise PriorError(f"a prior name must be a non-empty string without ':', got {name!r}")

    def decorator(cls: type) -> type:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise PriorError(
                f"a prior named {name!r} is already registered ({_qualname(_REGISTRY[name])}); "
                f"choose another name for {_qualname(cls)}"
            )
        _require_prior_class(cls)
        cls.prior_name = name
        _REGISTRY[name] = cls
        return cls

    return decorator


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _require_prior_class(cls) -> None:
    if not (isinstance(cls, type) and issubclass(cls, Prior)):
        raise PriorError(f"{_qualname(cls) if isinstance(cls, type) else repr(cls)} is not a "
                         f"subclass of priorvae.Prior; subclass it and implement _log_prob(z) "
                         f"and _sample(n)")


def _load_builtins() -> None:
    if not _loaded["builtins"]:
        _loaded["builtins"] = True
        importlib.import_module("priorvae.priors")


def _load_entry_points() -> None:
    if _loaded["entry_points"]:
        return
    _loaded["entry_points"] = True
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in _REGISTRY:
            continue
        try:
            obj = ep.load()
        except Exception as exc:  # a broken plug-in must not break the registry
            warnings.warn(f"could not load prior plug-in {ep.name!r} ({ep.value}): {exc}",
                          stacklevel=2)
            continue
        if ep.name not in _REGISTRY and isinstance(obj, type):
            register_prior(ep.name)(obj)


def _ensure_loaded() -> None:
    _load_builtins()
    _load_entry_points()


def list_priors(pattern: str = "*") -> list[str]:
    """Sorted names of the registered priors matching the glob ``pattern``."""
    _ensure_loaded()
    return sorted(n for n in _REGISTRY if fnmatch.fnmatchcase(n, pattern))


def _describe(exc: BaseException) -> str:
    """One line for an exception raised by a user's prior code."""
    if isinstance(exc, SystemExit):
        return f"it called sys.exit({exc.code!r})"
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def _is_file_spec(target: str) -> bool:
    return target.endswith(".py") or "/" in target or "\\" in target


def _import_file(path: Path, spec: str, sha256: str | None):
    """Import a prior file from the bytes read once: the hash checked is the code run."""
    try:
        source = path.read_bytes()
    except OSError as exc:
        raise PriorError(f"cannot read prior file {path} (from {spec!r}): {exc.strerror}") \
            from None
    digest = hashlib.sha256(source).hexdigest()
    if sha256 is not None and digest != sha256:
        raise PriorError(f"prior file {path} changed since it was chosen (sha256 differs)")
    mod_name = f"priorvae_user_prior_{digest[:16]}"
    module = sys.modules.get(mod_name)
    if module is None:
        module = importlib.util.module_from_spec(
            importlib.util.spec_from_loader(mod_name, loader=None, origin=str(path)))
        module.__file__ = str(path)
        sys.modules[mod_name] = module
        try:
            exec(compile(source, str(path), "exec"), module.__dict__)
        except (Exception, SystemExit) as exc:  # a prior file must not end the program
            del sys.modules[mod_name]
            raise PriorError(f"could not import {path}: {_describe(exc)}") from None
    return module


def _import_from_spec(spec: str, sha256: str | None = None) -> type:
    """``path/to/file.py:Class`` or ``package.module:Class`` -> the class."""
    target, _, attr = spec.rpartition(":")
    if not target or not attr:
        raise PriorError(
            f"expected 'path/to/file.py:ClassName' or 'module:ClassName', got {spec!r}")
    if _is_file_spec(target):
        path = Path(target).expanduser().resolve()
        if not path.is_file():
            raise PriorError(f"prior file not found: {path} (from {spec!r})")
        module = _import_file(path, spec, sha256)
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as exc:
            # console scripts do not put the working folder on sys.path; `python -m` does
            cwd = str(Path.cwd())
            if cwd in sys.path:
                raise PriorError(
                    f"could not import module {target!r} (from {spec!r}): {exc}") from exc
            sys.path.insert(0, cwd)
            try:
                module = importlib.import_module(target)
            except ImportError:
                raise PriorError(
                    f"could not import module {target!r} (from {spec!r}): {exc}") from exc
            finally:
                sys.path.remove(cwd)
        except (Exception, SystemExit) as exc:
            raise PriorError(f"could not import module {target!r}: {_describe(exc)}") from None
    cls = getattr(module, attr, None)
    if cls is None:
        names = [n for n, v in vars(module).items() if isinstance(v, type)]
        raise PriorError(f"{target} has no class {attr!r}; classes there: {', '.join(names)}")
    if not isinstance(cls, type):
        raise PriorError(f"{spec!r} is not a class")
    return cls


def module_file(module: str) -> Path | None:
    """The source file of a top-level module, found as an import would find it (the working
    folder last), without running any code; None for dotted or unfound modules."""
    if "." in module:
        return None  # finding a submodule imports its package
    for folder in [*sys.path, str(Path.cwd())]:
        candidate = Path(folder or ".") / f"{module}.py"
        if candidate.is_file():
            return candidate.resolve()
        package = Path(folder or ".") / module / "__init__.py"
        if package.is_file():
            return package.resolve()
    return None


def pin_prior_spec(name: str) -> tuple[str, str | None]:
    """A prior the user chose, pinned for a run folder: a ``file.py:Class`` spec made absolute
    (against the working folder) with the file's sha256; a top-level ``module:Class`` with its
    file's sha256; registered names unchanged, no hash."""
    target, sep, attr = name.rpartition(":")
    if sep and _is_file_spec(target):
        path = Path(target).expanduser().resolve()
        if not path.is_file():
            raise PriorError(f"prior file not found: {path} (from {name!r})")
        return f"{path}:{attr}", hashlib.sha256(path.read_bytes()).hexdigest()
    if sep and (path := module_file(target)) is not None:
        return name, hashlib.sha256(path.read_bytes()).hexdigest()
    return name, None


def get_prior_class(name: str, sha256: str | None = None) -> type:
    """The class behind a registered name or an import spec ``file.py:Class``/``module:Class``
    (a file spec with ``sha256`` is imported only if the file still has that hash)."""
    if not isinstance(name, str):
        raise PriorError(f"a prior name must be a string, got {name!r}")
    if ":" in name:
        cls = _import_from_spec(name, sha256)
        _require_prior_class(cls)
        return cls
    _ensure_loaded()
    if name not in _REGISTRY:
        known = sorted(_REGISTRY)
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.4)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise PriorError(
            f"unknown prior {name!r}. Known priors: {', '.join(known)}.{hint} "
            f"A custom prior can be given as 'path/to/file.py:ClassName' or 'module:ClassName'."
        )
    return _REGISTRY[name]


def prior_arguments(cls: type) -> dict[str, Any]:
    """Keyword arguments a prior class accepts (besides latent_dim and context), with defaults."""
    params = inspect.signature(cls.__init__).parameters
    return {
        n: (p.default if p.default is not inspect.Parameter.empty else "<required>")
        for n, p in params.items()
        if n not in ("self", "latent_dim", *CONTEXT_FIELDS)
        and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    }


def _check_built(prior: Prior, name: str, latent_dim: int) -> None:
    """Probe log_prob and sample once so a wrong shape fails now, not deep inside training
    (the public methods check the shapes)."""
    z = torch.zeros(3, latent_dim, device=prior.device, dtype=prior.dtype)
    with torch.no_grad():
        try:
            prior.log_prob(z)
            prior.sample(2)
        except PriorError:
            raise
        except Exception as exc:
            raise PriorError(
                f"prior {name!r} failed its build-time check (log_prob on z of shape "
                f"(3, {latent_dim}), sample(2)): {type(exc).__name__}: {exc}"
            ) from None


def build_prior(
    name: str,
    *,
    latent_dim: int,
    context: PriorContext | None = None,
    file_sha256: str | None = None,
    **kwargs: Any,
) -> Prior:
    """Build a prior by registered name (or import spec) for latent dimension ``latent_dim``.

    Context (encoder, input shape, training data) is passed to the priors that name it in their
    ``__init__``. Unknown keyword arguments are rejected, listing the accepted ones.
    """
    cls = get_prior_class(name, file_sha256)
    params = inspect.signature(cls.__init__).parameters
    accepts_var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    accepted = prior_arguments(cls)
    unknown = [k for k in kwargs if k not in accepted]
    if unknown and not accepts_var_kw:
        listing = ", ".join(f"{k}={v!r}" for k, v in accepted.items()) or "(none)"
        raise PriorError(
            f"prior {name!r} got unknown argument(s) {', '.join(map(repr, unknown))}; "
            f"it accepts: {listing}"
        )
    missing = [k for k, v in accepted.items() if v == "<required>" and k not in kwargs]
    if missing:
        raise PriorError(f"prior {name!r} needs argument(s): {', '.join(missing)}")
    context = context or PriorContext()
    ctx_kwargs = {}
    for field_name in CONTEXT_FIELDS:
        if field_name in params:
            value = getattr(context, field_name)
            if value is None and params[field_name].default is inspect.Parameter.empty:
                raise PriorError(
                    f"prior {name!r} needs the {field_name!r} context, which the VAE gives at "
                    f"build time; build it through build_vae() or pass "
                    f"context=PriorContext({field_name}=...)"
                )
            if value is not None:
                ctx_kwargs[field_name] = value
    if "latent_dim" not in params and not accepts_var_kw:
        raise PriorError(f"prior class {_qualname(cls)} must accept a latent_dim argument")
    try:
        prior = cls(latent_dim=latent_dim, **ctx_kwargs, **kwargs)
    except PriorError:
        raise
    except (Exception, SystemExit) as exc:  # a prior's __init__ must not end the program
        raise PriorError(f"could not build prior {name!r}: {_describe(exc)}") from None
    _check_built(prior, name, latent_dim)
    return prior
