"""The Prior contract and the prior registry.

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
- ``spec_arguments``: arguments that name another prior (``resampled``: ``{"base":
  "base_args"}``), so that a spec there is pinned, recorded and checked like ``[prior] name``.
- ``sampler_report()``: numbers about its sampler that its density does not show (the LARS
  prior's truncation share), recorded by ``evaluate`` beside the metrics; {} by default.
- ``evaluation_limits``: the largest K / number of test images whose IWAE bound is affordable
  and the number of points at which the diagnostics may evaluate its log-density (keys
  ``iw_samples``, ``test_images``, ``log_prob_points``; None: no limit); ``evaluate`` falls back
  to them and records that it did. Sample-based measures always use every sample.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from priorvae import trust
from priorvae.errors import PriorError
from priorvae.registry import Registry

__all__ = [
    "Prior",
    "PriorContext",
    "PRIORS",
    "register_prior",
    "build_prior",
    "list_priors",
    "get_prior_class",
    "prior_arguments",
    "pin_prior_spec",
    "CONTEXT_FIELDS",
    "ENTRY_POINT_GROUP",
]

ENTRY_POINT_GROUP = "priorvae.priors"
CONTEXT_FIELDS = ("encoder", "input_shape", "data", "likelihood")


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
    # arguments whose value names another prior (a registered name or a spec), each mapped to
    # the argument holding that prior's own arguments: such names are pinned, recorded and
    # put to the gate (priorvae.trust) like [prior] name itself
    spec_arguments: dict[str, str | None] = {}

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
        # log_prob(z) when nothing is left out: a prior may override the public log_prob(z)
        return -(self.log_prob(z) if index is None else self.log_prob(z, exclude=index)).mean()

    def log_normalizer_stderr(self) -> float | None:
        """Monte-Carlo standard error (nats) of the log-normaliser estimate that ``log_prob``
        uses outside training, for priors with ``estimated_normalizer``; None otherwise."""
        return None

    def sampler_report(self) -> dict[str, float]:
        """Numbers about ``sample`` for metrics.json (e.g. ``truncation_share``); {} here."""
        return {}

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
    likelihood: nn.Module | None = None  # the VAE's (prepares data as the model sees them)


PRIORS = Registry("prior", Prior, ENTRY_POINT_GROUP, reserved=("latent_dim", *CONTEXT_FIELDS),
                  error=PriorError, name_attr="prior_name")


def register_prior(name: str):
    """Class decorator registering a prior under ``name``; a duplicate name is an error."""
    return PRIORS.register(name)


def list_priors(pattern: str = "*") -> list[str]:
    """Sorted names of the registered priors matching the glob ``pattern``."""
    return PRIORS.list(pattern)


def get_prior_class(name: str, sha256: str | None = None) -> type:
    """The class behind a registered name or an import spec ``file.py:Class``/``module:Class``
    (a file spec with ``sha256`` is imported only if the file still has that hash)."""
    return PRIORS.get(name, sha256)


def prior_arguments(cls: type) -> dict[str, Any]:
    """Keyword arguments a prior class accepts (besides latent_dim and context), with defaults."""
    return PRIORS.arguments(cls)


def pin_prior_spec(name: str) -> tuple[str, str | None]:
    """A prior the user chose, pinned for a run folder (see :func:`priorvae.trust.pin`)."""
    return trust.pin(name, "prior", PriorError)


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
                f"(3, {latent_dim}), sample(2)): {trust.describe_exception(exc)}"
            ) from exc


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
    PRIORS.check_arguments(name, cls, kwargs)
    params = inspect.signature(cls.__init__).parameters
    accepts_var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
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
        raise PriorError(f"prior class {cls.__module__}.{cls.__qualname__} must accept a "
                         f"latent_dim argument")
    try:
        prior = cls(latent_dim=latent_dim, **ctx_kwargs, **kwargs)
    except PriorError:
        raise
    except (Exception, SystemExit) as exc:  # a prior's __init__ must not end the program
        raise PriorError(f"could not build prior {name!r}: "
                         f"{trust.describe_exception(exc)}") from exc
    _check_built(prior, name, latent_dim)
    return prior
