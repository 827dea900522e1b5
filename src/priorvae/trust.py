"""The one gate through which a spec string becomes code.

A *spec* names a class by code instead of by registered name: ``path/to/file.py:Class`` or
``package.module:Class``. Every registry (priors, data sets, likelihoods, networks) resolves such
specs here and nowhere else, so the rules below hold for every kind and every place a spec
can come from (a ``[prior]`` name, a prior's own arguments such as ``resampled``'s ``base``,
``priors/LABEL.toml``, ``[data]``/``[likelihood]``/``[network]`` names).

- :func:`import_class` imports a spec's class. A file is read once and its bytes are what is
  hashed and run (with ``sha256`` given, only if the hash matches).
- :func:`pin` turns a spec the user chose into the form a run folder records: an absolute file
  path (or the module name) plus the sha256 of the file.
- :func:`check_folder_spec` decides whether a spec that a run folder names may be imported,
  before any of its code runs.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
from pathlib import Path

from .errors import PluginError

__all__ = [
    "TRUST_ENV",
    "trust_from_env",
    "is_spec",
    "is_file_target",
    "module_file",
    "file_sha256",
    "pin",
    "import_class",
    "check_folder_spec",
    "describe_exception",
]

TRUST_ENV = "PRIORVAE_TRUST_REMOTE_CODE"


def trust_from_env() -> bool:
    """True when ``PRIORVAE_TRUST_REMOTE_CODE`` is 1 / true / yes."""
    return os.environ.get(TRUST_ENV, "").strip().lower() in ("1", "true", "yes")


def is_spec(name: str) -> bool:
    """A spec names code (``target:Class``); a registered name has no ':'."""
    return isinstance(name, str) and ":" in name


def is_file_target(target: str) -> bool:
    """The part before ':' names a file (``.py`` or a path), not a module."""
    return target.endswith(".py") or "/" in target or "\\" in target


def file_sha256(path: str | os.PathLike) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def describe_exception(exc: BaseException) -> str:
    """One line for an exception raised by user code."""
    if isinstance(exc, SystemExit):
        return f"it called sys.exit({exc.code!r})"
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


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


def _split(spec: str, kind: str, error: type[Exception]) -> tuple[str, str]:
    target, _, attr = spec.rpartition(":")
    if not target or not attr:
        raise error(f"expected 'path/to/file.py:ClassName' or 'module:ClassName' for a {kind}, "
                    f"got {spec!r}")
    return target, attr


def pin(spec: str, kind: str = "plug-in", error: type[Exception] = PluginError
        ) -> tuple[str, str | None]:
    """A spec the user chose, pinned for a run folder: a ``file.py:Class`` spec made absolute
    (against the working folder) with the file's sha256; a top-level ``module:Class`` with its
    file's sha256; registered names unchanged, no hash."""
    if not is_spec(spec):
        return spec, None
    target, attr = _split(spec, kind, error)
    if is_file_target(target):
        path = Path(target).expanduser().resolve()
        if not path.is_file():
            raise error(f"{kind} file not found: {path} (from {spec!r})")
        return f"{path}:{attr}", file_sha256(path)
    if (path := module_file(target)) is not None:
        return spec, file_sha256(path)
    return spec, None


def _import_file(path: Path, spec: str, sha256: str | None, kind: str,
                 error: type[Exception]):
    """Import a file from the bytes read once: the hash checked is the code run."""
    try:
        source = path.read_bytes()
    except OSError as exc:
        raise error(f"cannot read {kind} file {path} (from {spec!r}): {exc.strerror}") \
            from None
    digest = hashlib.sha256(source).hexdigest()
    if sha256 is not None and digest != sha256:
        raise error(f"{kind} file {path} changed since it was chosen (sha256 differs)")
    mod_name = f"priorvae_user_code_{digest[:16]}"
    module = sys.modules.get(mod_name)
    if module is None:
        module = importlib.util.module_from_spec(
            importlib.util.spec_from_loader(mod_name, loader=None, origin=str(path)))
        module.__file__ = str(path)
        sys.modules[mod_name] = module
        try:
            exec(compile(source, str(path), "exec"), module.__dict__)
        except (Exception, SystemExit) as exc:  # user code must not end the program
            del sys.modules[mod_name]
            raise error(f"could not import {path}: {describe_exception(exc)}") from None
    return module


def _import_module(target: str, spec: str, error: type[Exception]):
    try:
        return importlib.import_module(target)
    except ImportError as exc:
        # console scripts do not put the working folder on sys.path; `python -m` does
        cwd = str(Path.cwd())
        if cwd in sys.path:
            raise error(f"could not import module {target!r} (from {spec!r}): {exc}") from exc
        sys.path.insert(0, cwd)
        try:
            return importlib.import_module(target)
        except ImportError:
            raise error(f"could not import module {target!r} (from {spec!r}): {exc}") from exc
        finally:
            sys.path.remove(cwd)
    except (Exception, SystemExit) as exc:
        raise error(f"could not import module {target!r}: {describe_exception(exc)}") from None


def import_class(spec: str, sha256: str | None = None, *, kind: str = "plug-in",
                 error: type[Exception] = PluginError) -> type:
    """``path/to/file.py:Class`` or ``package.module:Class`` -> the class (a file with
    ``sha256`` given is run only if its bytes have that hash)."""
    target, attr = _split(spec, kind, error)
    if is_file_target(target):
        path = Path(target).expanduser().resolve()
        if not path.is_file():
            raise error(f"{kind} file not found: {path} (from {spec!r})")
        module = _import_file(path, spec, sha256, kind, error)
    else:
        module = _import_module(target, spec, error)
    cls = getattr(module, attr, None)
    if cls is None:
        names = [n for n, v in vars(module).items() if isinstance(v, type)]
        raise error(f"{target} has no class {attr!r}; classes there: {', '.join(names)}")
    if not isinstance(cls, type):
        raise error(f"{spec!r} is not a class")
    return cls


def check_folder_spec(name: str, sha: str | None, source: Path, run_dir: Path,
                      trust: bool, error: type[Exception] = PluginError) -> None:
    """Refuse code named by a run folder unless the user chose it or opted in (``trust``).
    ``source`` is the file that names it (for the message)."""
    if not is_spec(name) or trust:
        return  # a registered name (or the user trusts the folder)
    target = name.rpartition(":")[0]
    if is_file_target(target):
        path = Path(target)
        if not path.is_absolute():
            reason = "a relative path"
        elif path.resolve().is_relative_to(run_dir.resolve()):
            reason = "a file inside the run folder"
        elif not path.is_file():
            reason = "a file that does not exist here"
        elif sha is None:
            reason = "a file without a recorded sha256 (written by an older priorvae?)"
        elif file_sha256(path) != sha:
            reason = "a file that changed since the run was made (sha256 differs)"
        else:
            return
    elif target in sys.modules:
        return  # the user's program imported it already: nothing new runs
    else:
        path = module_file(target)
        if path is None or sha is None:
            reason = f"module {target!r}, which would be imported"
        elif path.is_relative_to(run_dir.resolve()):
            reason = f"module {target!r} from a file inside the run folder"
        elif file_sha256(path) != sha:
            reason = f"module {target!r}, whose file {path} changed since the run was made"
        else:
            return  # the module file the user chose, unchanged
    raise error(f"{source} names code {name!r}: {reason}. A run folder never runs code "
                f"unless you opt in: pass --trust-remote-code (or set {TRUST_ENV}=1) if you "
                f"trust whoever wrote it")
