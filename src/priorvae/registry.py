"""One registry mechanism for every plug-in kind (priors, data sets, likelihoods, networks).

Like torchvision's ``register_model``/``get_model``/``list_models``, a :class:`Registry` is a
name -> class map and nothing else::

    LIKELIHOODS = Registry("likelihood", Likelihood, "priorvae.likelihoods")
    register_likelihood, list_likelihoods = LIKELIHOODS.register, LIKELIHOODS.list
    build_likelihood = LIKELIHOODS.build

    @register_likelihood("bernoulli")
    class Bernoulli(Likelihood): ...

    build_likelihood("bernoulli", **args)      # unknown arguments refused, accepted ones listed
    list_likelihoods("b*")

- ``register(name)``: class decorator; a duplicate name is an error, a name has no ':'.
- the entry-point group (``priorvae.priors``, ``priorvae.likelihoods``, ...): installed
  packages register classes under the entry point's name.
- ``list(pattern)``: sorted names matching a glob.
- ``get(name_or_spec)``: the class; an unknown name lists the known ones and close matches. A
  spec ``path/to/file.py:Class`` or ``module:Class`` is imported through the one gate,
  :mod:`priorvae.trust` (pinning, run-folder rules), and must subclass the kind's base class.
- ``build(name, **kwargs)``: keyword arguments checked against the class's ``__init__`` (the
  ``reserved`` ones are the caller's: ``latent_dim``, context...).
- ``guard(doing)``: a context in which a plug-in's own code runs (its ``__init__`` in
  ``build``, a data set's ``load()``, a network's first forward): an exception from it becomes
  one line, ``DOING: Type: message``; ``PRIORVAE_DEBUG=1`` shows its traceback.

Each kind's contract (base class) and built-ins live beside its registry, e.g.
:mod:`priorvae.priors` for priors.
"""

from __future__ import annotations

import contextlib
import difflib
import fnmatch
import importlib
import inspect
import warnings
from typing import Any

from . import trust
from .errors import PluginError, PriorVAEError

__all__ = ["Registry", "REQUIRED", "KINDS", "kind_registry"]

REQUIRED = "<required>"  # an argument without a default, in Registry.arguments()

# names that moved to priorvae.priors (the Prior contract lives beside the priors); kept
# importable from here
_PRIOR_NAMES = ("Prior", "PriorContext", "register_prior", "build_prior", "list_priors",
                "get_prior_class", "prior_arguments", "pin_prior_spec", "CONTEXT_FIELDS",
                "ENTRY_POINT_GROUP", "PRIORS")


def __getattr__(name):
    if name in _PRIOR_NAMES:
        from .priors import base

        return getattr(base, name)
    if name == "module_file":
        return trust.module_file
    raise AttributeError(f"module 'priorvae.registry' has no attribute {name!r}")


# the plug-in kinds: config table -> entry-point group (= the package holding the kind's
# contract, registry and built-ins)
KINDS = {"data": "priorvae.datasets", "likelihood": "priorvae.likelihoods",
         "network": "priorvae.networks", "prior": "priorvae.priors"}
_BY_GROUP: dict[str, Registry] = {}


def kind_registry(table: str) -> Registry | None:
    """The registry of the plug-in kind configured by ``[table]`` (None if that kind's
    package is not installed)."""
    group = KINDS[table]
    if group not in _BY_GROUP:
        try:
            importlib.import_module(group)
        except ModuleNotFoundError as exc:
            if exc.name is None or not group.startswith(exc.name):
                raise
    return _BY_GROUP.get(group)


def _qualname(cls: Any) -> str:
    return f"{cls.__module__}.{cls.__qualname__}" if isinstance(cls, type) else repr(cls)


class Registry:
    """Name -> class map of one plug-in kind.

    Args:
        kind: the kind in words, for messages ("prior", "likelihood", "data set", ...).
        base: the contract every class must subclass.
        group: the entry-point group, e.g. ``"priorvae.likelihoods"``.
        builtins: module imported before the first look-up, so that the built-ins are
            registered (default: ``group``, the package of the kind).
        reserved: ``__init__`` arguments that the caller passes (not the user's).
        error: the exception class raised (a subclass of :class:`PluginError`).
        name_attr: class attribute set to the registered name (default ``KIND_name``).
    """

    def __init__(self, kind: str, base: type, group: str, *, builtins: str | None = None,
                 reserved: tuple[str, ...] = (), error: type[PluginError] = PluginError,
                 name_attr: str | None = None):
        self.kind, self.base, self.group = kind, base, group
        self.builtins = group if builtins is None else builtins
        self.reserved = tuple(reserved)
        self.error = error
        self.name_attr = name_attr or f"{kind.replace(' ', '_')}_name"
        self._classes: dict[str, type] = {}
        self._broken: dict[str, str] = {}  # entry-point name -> why it could not be loaded
        self._loaded = {"builtins": False, "entry_points": False}
        _BY_GROUP.setdefault(group, self)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.base.__name__}, {self.group!r})"

    # -- registering -------------------------------------------------------------------------
    def register(self, name: str):
        """Class decorator registering a class under ``name``; a duplicate name is an error."""
        if not isinstance(name, str) or not name or ":" in name:
            raise self.error(f"a {self.kind} name must be a non-empty string without ':', "
                             f"got {name!r}")

        def decorator(cls: type) -> type:
            if name in self._classes and self._classes[name] is not cls:
                raise self.error(
                    f"a {self.kind} named {name!r} is already registered "
                    f"({_qualname(self._classes[name])}); choose another name for "
                    f"{_qualname(cls)}")
            self.require_subclass(cls)
            setattr(cls, self.name_attr, name)
            self._classes[name] = cls
            return cls

        return decorator

    def require_subclass(self, cls: Any) -> None:
        if not (isinstance(cls, type) and issubclass(cls, self.base)):
            raise self.error(
                f"{_qualname(cls)} is not a subclass of {self.base.__module__.split('.')[0]}."
                f"{self.base.__name__}; subclass it (see its docstring for what to implement)")

    def _load(self) -> None:
        if not self._loaded["builtins"]:
            self._loaded["builtins"] = True
            if self.builtins:
                importlib.import_module(self.builtins)
        if not self._loaded["entry_points"]:
            self._loaded["entry_points"] = True
            from importlib.metadata import entry_points

            for ep in entry_points(group=self.group):
                if ep.name in self._classes:  # names are unique: the first one registered stays
                    if _qualname(self._classes[ep.name]) != ep.value.replace(":", "."):
                        warnings.warn(f"{self.kind} plug-in {ep.name!r} ({ep.value}) is not "
                                      f"loaded: the name is taken by "
                                      f"{_qualname(self._classes[ep.name])}", stacklevel=3)
                    continue
                try:
                    obj = ep.load()
                except Exception as exc:  # a broken plug-in must not break the registry
                    self._broken[ep.name] = f"{ep.value}: {type(exc).__name__}: {exc}"
                    warnings.warn(f"could not load {self.kind} plug-in {ep.name!r} "
                                  f"({ep.value}): {exc}", stacklevel=3)
                    continue
                if ep.name not in self._classes and isinstance(obj, type):
                    try:
                        self.register(ep.name)(obj)
                    except PluginError as exc:
                        self._broken[ep.name] = f"{ep.value}: {exc}"
                        warnings.warn(f"{self.kind} plug-in {ep.name!r} ({ep.value}): {exc}",
                                      stacklevel=3)
                elif ep.name not in self._classes:  # a function, a module, an instance...
                    self._broken[ep.name] = f"{ep.value} is a {type(obj).__name__}, not a class"
                    warnings.warn(f"{self.kind} plug-in {ep.name!r} ({ep.value}) is not a "
                                  f"class", stacklevel=3)

    # -- looking up --------------------------------------------------------------------------
    def list(self, pattern: str = "*") -> list[str]:
        """Sorted registered names matching the glob ``pattern``."""
        self._load()
        return sorted(n for n in self._classes if fnmatch.fnmatchcase(n, pattern))

    def __contains__(self, name: str) -> bool:
        self._load()
        return name in self._classes

    def get(self, name: str, sha256: str | None = None) -> type:
        """The class behind a registered name, or behind a spec ``file.py:Class`` /
        ``module:Class`` imported through :mod:`priorvae.trust` (a file with ``sha256`` only
        if it still has that hash)."""
        if not isinstance(name, str):
            raise self.error(f"a {self.kind} name must be a string, got {name!r}")
        if trust.is_spec(name):
            cls = trust.import_class(name, sha256, kind=self.kind, error=self.error)
            self.require_subclass(cls)
            return cls
        self._load()
        if name not in self._classes and name in self._broken:
            why = " ".join(self._broken[name].split())  # one line
            raise self.error(f"{self.kind} {name!r} is an installed plug-in (entry point in "
                             f"group {self.group!r}) that could not be loaded: {why[:300]}")
        if name not in self._classes:
            known = sorted(self._classes)
            close = difflib.get_close_matches(name, known, n=3, cutoff=0.4)
            hint = f" Did you mean: {', '.join(close)}?" if close else ""
            raise self.error(
                f"unknown {self.kind} {name!r}. Known {self.kind}s: {', '.join(known)}.{hint} "
                f"A custom {self.kind} can be given as 'path/to/file.py:ClassName' or "
                f"'module:ClassName'. If {name!r} was registered by a program (a register "
                f"decorator in a module it imported), the registration ended with that "
                f"program and no file, module or plug-in tells priorvae where it is: reopen "
                f"such runs in Python after the same import, or install the {self.kind} as a "
                f"plug-in (entry point {name!r} in group {self.group!r}); a new run given it "
                f"as a file or module path can be reopened from the command line.")
        return self._classes[name]

    def spec_arguments(self, cls: type) -> dict[str, str | None]:
        """The arguments of ``cls`` whose value names another class of this kind (a name or a
        spec), each mapped to the argument holding that one's own arguments (or None): the
        class attribute ``spec_arguments`` where the kind's contract declares it."""
        return dict(getattr(cls, "spec_arguments", None) or {})

    def resolve(self, name: str, sha256: str | None = None,
                kwargs: dict[str, Any] | None = None) -> type:
        """:meth:`get` for ``name`` and, recursively, for every argument in ``kwargs`` that
        names another class (:meth:`spec_arguments`): inside
        :func:`priorvae.trust.reading_folder` this puts every spec a table names to the gate
        at once. Returns the class of ``name``."""
        cls = self.get(name, sha256)
        kwargs = kwargs or {}
        for arg, args_arg in self.spec_arguments(cls).items():
            value = kwargs.get(arg)
            if isinstance(value, str):
                inner = kwargs.get(args_arg) if args_arg else None
                self.resolve(value, None, inner if isinstance(inner, dict) else None)
        return cls

    def pin(self, name: str, kwargs: dict[str, Any] | None = None
            ) -> tuple[str, str | None, dict[str, Any]]:
        """A table the user chose (``name`` and its arguments), pinned for a run folder: every
        spec in it, ``name`` and the arguments that name classes, made absolute and recorded
        in the user's trust record (:func:`priorvae.trust.pin`). Returns (name, the file's
        sha256 or None, arguments)."""
        pinned, sha = trust.pin(name, self.kind, self.error)
        kwargs = dict(kwargs or {})
        cls = self.get(pinned, sha)
        for arg, args_arg in self.spec_arguments(cls).items():
            value = kwargs.get(arg)
            if isinstance(value, str):
                inner = kwargs.get(args_arg) if args_arg else None
                kwargs[arg], _, pinned_inner = self.pin(
                    value, inner if isinstance(inner, dict) else None)
                if args_arg and isinstance(inner, dict):
                    kwargs[args_arg] = pinned_inner
        return pinned, sha, kwargs

    def describe(self, name: str) -> list[str]:
        """Lines for ``priorvae list``: the class's first docstring line, its arguments with
        defaults, and what the caller gives it (reserved arguments it takes)."""
        cls = self.get(name)
        doc = (inspect.getdoc(cls) or "").strip().splitlines()
        lines = [f"{name}: {doc[0] if doc else cls.__qualname__}"]
        args = self.arguments(cls)
        for arg, default in args.items():
            lines.append(f"  {arg} = {'(required)' if default == REQUIRED else repr(default)}")
        if not args:
            lines.append("  (no arguments)")
        given = [n for n in inspect.signature(cls.__init__).parameters if n in self.reserved]
        if given:
            lines.append(f"  given by priorvae: {', '.join(given)}")
        return lines

    # -- building ----------------------------------------------------------------------------
    def arguments(self, cls: type) -> dict[str, Any]:
        """The user's keyword arguments of ``cls`` (not the reserved ones), with defaults
        (``REQUIRED`` where there is none)."""
        params = inspect.signature(cls.__init__).parameters
        return {
            n: (p.default if p.default is not inspect.Parameter.empty else REQUIRED)
            for n, p in params.items()
            if n not in ("self", *self.reserved)
            and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
        }

    def check_arguments(self, name: str, cls: type, kwargs: dict[str, Any]) -> None:
        """Refuse unknown arguments (listing the accepted ones) and missing required ones."""
        params = inspect.signature(cls.__init__).parameters
        accepts_var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        accepted = self.arguments(cls)
        unknown = [k for k in kwargs if k not in accepted]
        if unknown and not accepts_var_kw:
            listing = ", ".join(f"{k}={v!r}" for k, v in accepted.items()) or "(none)"
            raise self.error(
                f"{self.kind} {name!r} got unknown argument(s) "
                f"{', '.join(map(repr, unknown))}; it accepts: {listing}")
        missing = [k for k, v in accepted.items() if v == REQUIRED and k not in kwargs]
        if missing:
            raise self.error(f"{self.kind} {name!r} needs argument(s): {', '.join(missing)}")

    def build(self, name: str, *args: Any, sha256: str | None = None, **kwargs: Any):
        """``get(name)(*args, **kwargs)``: the user's keyword arguments checked first, and an
        exception in the class's ``__init__`` turned into one line. Reserved arguments (the
        caller's) may be passed by keyword too."""
        cls = self.get(name, sha256)
        self.check_arguments(name, cls, {k: v for k, v in kwargs.items()
                                         if k not in self.reserved})
        with self.guard(f"could not build {self.kind} {name!r}"):
            return cls(*args, **kwargs)

    @contextlib.contextmanager
    def guard(self, doing: str):
        """Run a plug-in's own code: an exception from it (not one of priorvae's own, which
        are one line already) becomes one line, ``DOING: Type: message``, which says how to
        see its traceback (``PRIORVAE_DEBUG=1``: the original is chained)."""
        try:
            yield
        except PriorVAEError:
            raise
        except (Exception, SystemExit) as exc:  # user code must not end the program
            raise self.error(f"{doing}: {trust.describe_exception(exc)}") from exc
