"""The one gate through which a spec string becomes code, and the trust model behind it.

A *spec* names a class by code instead of by registered name: ``path/to/file.py:Class`` or
``package.module:Class``. Every registry (priors, data sets, likelihoods, networks) resolves
specs here and nowhere else (:meth:`priorvae.registry.Registry.get`), so the rules below hold
for every kind and every place a spec can come from: a table's ``name``, a plug-in's own
arguments that name another plug-in (``resampled``'s ``base``), ``priors/LABEL.toml``.

Trust model: *who chose the code is recorded where a run folder cannot write*.

- The user chooses code by passing a spec to ``train`` / ``compare`` (their config, ``--set``)
  or ``fit-prior --prior`` (:func:`pin`): the spec is made absolute, the file's sha256 goes
  into the run folder (to notice later edits), and the file's absolute path and sha256 go into
  the user's **trust record**, ``$XDG_CONFIG_HOME/priorvae/trusted.json`` (default
  ``~/.config/priorvae/trusted.json``). A module spec records every file its import runs
  (the package ``__init__.py`` files and the module's file).
- Code named by a run folder (:func:`reading_folder`: opening, building its model, its ex-post
  priors) is imported only when the file, with the bytes it has now, is in the user's trust
  record (a module: all its files), or the module is imported in this program already (nothing
  new runs). A relative path, a file inside the run folder, a missing file, a file whose hash
  differs from the one the folder recorded, or anything not in the trust record is refused with
  one line, **before any of its code runs**. The folder's own hash is never a reason to trust.
- ``--trust-remote-code`` (``PRIORVAE_TRUST_REMOTE_CODE=1``, ``trust_remote_code=True``) lifts
  the refusal for that command: only for folders whose author you trust.

A file is read once: the bytes that are hashed are the bytes that run.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import importlib
import importlib.util
import json
import os
import sys
import tempfile
import warnings
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path

from .errors import DEBUG_ENV, PluginError, UntrustedCodeError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no locking
    fcntl = None

__all__ = [
    "TRUST_ENV",
    "trust_from_env",
    "trust_record_path",
    "is_spec",
    "is_file_target",
    "module_file",
    "module_files",
    "file_sha256",
    "pin",
    "import_class",
    "reading_folder",
    "check_folder_spec",
    "describe_exception",
]

TRUST_ENV = "PRIORVAE_TRUST_REMOTE_CODE"
_CHOSEN: set[tuple[str, str]] = set()  # (path, sha256) chosen in this process


def trust_from_env() -> bool:
    """True when ``PRIORVAE_TRUST_REMOTE_CODE`` is 1 / true / yes."""
    return os.environ.get(TRUST_ENV, "").strip().lower() in ("1", "true", "yes")


def trust_record_path() -> Path:
    """The user's trust record: ``$XDG_CONFIG_HOME/priorvae/trusted.json`` (default
    ``~/.config``)."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "priorvae" / "trusted.json"


def is_spec(name: str) -> bool:
    """A spec names code (``target:Class``); a registered name has no ':'."""
    return isinstance(name, str) and ":" in name


def is_file_target(target: str) -> bool:
    """The part before ':' names a file (``.py`` or a path), not a module."""
    return target.endswith(".py") or "/" in target or "\\" in target


def file_sha256(path: str | os.PathLike) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def describe_exception(exc: BaseException) -> str:
    """One line for an exception raised by user code, saying how to see its traceback (the
    error raised for it chains it: ``raise ... from exc``)."""
    what = (f"it called sys.exit({exc.code!r})" if isinstance(exc, SystemExit) else
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    return f"{what} ({DEBUG_ENV}=1 shows the traceback)"


# -- finding a module's files without running code ---------------------------------------------
def module_files(module: str, include_loaded: bool = False) -> list[Path] | None:
    """The files that ``import module`` would run, found as an import would find them (the
    working folder last) without running any code: each package's ``__init__.py``, then the
    module's own file (last). Modules imported already run nothing again and are left out,
    unless ``include_loaded`` (then their ``__file__`` is listed). None when not found this
    way (a namespace package spread over several folders, a zip, an extension module)."""
    parts = module.split(".")
    if not all(p.isidentifier() for p in parts):
        return None
    for folder in [*sys.path, str(Path.cwd())]:
        files: list[Path] = []
        here = Path(folder or ".")
        for i, part in enumerate(parts):
            name, last = ".".join(parts[: i + 1]), i == len(parts) - 1
            loaded = sys.modules.get(name)
            if loaded is not None:
                if include_loaded and getattr(loaded, "__file__", None):
                    files.append(Path(loaded.__file__).resolve())
                if last:
                    return files or None
                if getattr(loaded, "__path__", None):
                    here = Path(list(loaded.__path__)[0])
                    continue
            init, single = here / part / "__init__.py", here / f"{part}.py"
            if init.is_file():
                files.append(init.resolve())
                here = here / part
            elif last and single.is_file():
                files.append(single.resolve())
            elif not last and (here / part).is_dir():
                here = here / part  # a namespace package: no code of its own
            else:
                files = []
                break
        if files:
            return files
    return None


def module_file(module: str) -> Path | None:
    """The source file of a module (see :func:`module_files`), or None."""
    files = module_files(module)
    return files[-1] if files else None


# -- the trust record ---------------------------------------------------------------------------
def _read_record(path: Path) -> list[dict]:
    """The record's entries; [] when there is none. Raises OSError / ValueError if damaged."""
    if not path.is_file():
        return []
    data = json.loads(path.read_text(encoding="utf-8"))
    entries = data.get("trusted") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not all(
            isinstance(e, dict) and isinstance(e.get("path"), str)
            and isinstance(e.get("sha256"), str) for e in entries):
        raise ValueError("not a priorvae trust record")
    return entries


def _trusted(path: Path, digest: str) -> tuple[bool, str]:
    """(whether the user chose ``path`` with these bytes, a note on a damaged record)."""
    if (str(path), digest) in _CHOSEN:
        return True, ""
    record = trust_record_path()
    try:
        entries = _read_record(record)
    except (OSError, ValueError) as exc:
        return False, f" (your trust record {record} is unreadable: {exc})"
    return any(e["path"] == str(path) and e["sha256"] == digest for e in entries), ""


def _record(files: list[tuple[Path, str]], spec: str) -> None:
    """Add (path, sha256) pairs the user chose to the trust record (atomically, under a lock);
    a record that cannot be written is a warning: this program still trusts them."""
    _CHOSEN.update((str(p), d) for p, d in files)
    record = trust_record_path()
    try:
        record.parent.mkdir(parents=True, exist_ok=True)
        with open(record.parent / ".trusted.lock", "a") as lock:
            if fcntl is not None:
                fcntl.flock(lock, fcntl.LOCK_EX)
            entries = _read_record(record)
            known = {(e["path"], e["sha256"]) for e in entries}
            now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
            new = [{"path": str(p), "sha256": d, "spec": spec, "chosen": now}
                   for p, d in files if (str(p), d) not in known]
            if not new:
                return
            text = json.dumps({"trusted": entries + new}, indent=1) + "\n"
            fd, tmp = tempfile.mkstemp(dir=record.parent, prefix=".trusted.", suffix=".tmp")
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    f.write(text)
                os.replace(tmp, record)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
    except (OSError, ValueError) as exc:
        warnings.warn(f"could not record {spec!r} in your trust record {record} ({exc}); "
                      f"run folders naming it will need --trust-remote-code", stacklevel=3)


# -- the user's choice --------------------------------------------------------------------------
def _split(spec: str, kind: str, error: type[Exception]) -> tuple[str, str]:
    target, _, attr = spec.rpartition(":")
    if not target or not attr:
        raise error(f"expected 'path/to/file.py:ClassName' or 'module:ClassName' for a {kind}, "
                    f"got {spec!r}")
    return target, attr


def pin(spec: str, kind: str = "plug-in", error: type[Exception] = PluginError
        ) -> tuple[str, str | None]:
    """A spec **the user chose**, pinned for a run folder and recorded in the trust record: a
    ``file.py:Class`` spec made absolute (against the working folder) with the file's sha256;
    a ``module:Class`` with its file's sha256 (its files recorded); registered names
    unchanged, no hash."""
    if not is_spec(spec):
        return spec, None
    target, attr = _split(spec, kind, error)
    if is_file_target(target):
        path = Path(target).expanduser().resolve()
        if not path.is_file():
            raise error(f"{kind} file not found: {path} (from {spec!r})")
        digest = file_sha256(path)
        _record([(path, digest)], f"{path}:{attr}")
        return f"{path}:{attr}", digest
    files = module_files(target, include_loaded=True)
    if not files:
        return spec, None
    hashed = [(p, file_sha256(p)) for p in files]
    _record(hashed, spec)
    return spec, hashed[-1][1]


# -- a run folder's code --------------------------------------------------------------------
@dataclass(frozen=True)
class _Folder:
    run_dir: Path
    source: Path
    trust: bool


_FOLDER: ContextVar[_Folder | None] = ContextVar("priorvae_run_folder", default=None)


@contextlib.contextmanager
def reading_folder(run_dir: str | os.PathLike, source: str | os.PathLike, trust: bool):
    """Within this block every spec is one the run folder ``run_dir`` named (in ``source``,
    for messages): :func:`import_class` imports it only under the rules of the module
    docstring, unless ``trust``."""
    token = _FOLDER.set(_Folder(Path(run_dir), Path(source), bool(trust)))
    try:
        yield
    finally:
        _FOLDER.reset(token)


def _refuse(name: str, reason: str, source: Path) -> UntrustedCodeError:
    return UntrustedCodeError(
        f"{source} names code {name!r}: {reason}. A run folder runs only code you chose "
        f"yourself (by training or fitting with it here: see 'Sharing runs safely'); pass "
        f"--trust-remote-code (or set {TRUST_ENV}=1) only if you trust whoever wrote it")


def check_folder_spec(name: str, sha: str | None, source: str | os.PathLike,
                      run_dir: str | os.PathLike, trust: bool) -> str | None:
    """Decide, before any of its code runs, whether the spec ``name`` that a run folder names
    (in ``source``, with its recorded ``sha``) may be imported; raises
    :class:`UntrustedCodeError` (one line) if not. Returns the sha256 of the file whose bytes
    may run (None for registered names, modules and ``trust``)."""
    if not is_spec(name) or trust:
        return None
    source, run_dir = Path(source), Path(run_dir).resolve()
    target = name.rpartition(":")[0]
    if is_file_target(target):
        path = Path(target)
        if not path.is_absolute():
            raise _refuse(name, "a relative path", source)
        path = path.resolve()
        if path.is_relative_to(run_dir):
            raise _refuse(name, "a file inside the run folder", source)
        if not path.is_file():
            raise _refuse(name, "a file that does not exist here", source)
        digest = file_sha256(path)
        if sha is not None and digest != sha:
            raise _refuse(name, "a file that changed since the run was made (sha256 differs)",
                          source)
        ok, note = _trusted(path, digest)
        if not ok:
            raise _refuse(name, f"a file you have not run priorvae with (it is not in your "
                                f"trust record {trust_record_path()}){note}", source)
        return digest
    if target in sys.modules:
        return None  # the user's program imported it already: nothing new runs
    files = module_files(target)
    if not files and "." not in target and importlib.util.find_spec(target) is None:
        # not importable from here: opting in would not help, so say what would
        raise PluginError(f"{source} names code {name!r}, but module {target!r} is not found "
                          f"from here (not on sys.path, not in {Path.cwd()}): run from the "
                          f"folder it was trained in, or put the folder that holds "
                          f"{target}.py on PYTHONPATH (PYTHONPATH=/that/folder priorvae ...)")
    if not files:
        raise _refuse(name, f"module {target!r}, which would be imported", source)
    inside = [p for p in files if p.is_relative_to(run_dir)]
    if inside:
        raise _refuse(name, f"module {target!r} from a file inside the run folder", source)
    if sha is not None and file_sha256(files[-1]) != sha:
        raise _refuse(name, f"module {target!r}, whose file {files[-1]} changed since the run "
                            f"was made", source)
    for path in files:
        ok, note = _trusted(path, file_sha256(path))
        if not ok:
            raise _refuse(name, f"module {target!r}, which would be imported (its file {path} "
                                f"is not in your trust record {trust_record_path()}){note}",
                          source)
    return None


# -- importing ------------------------------------------------------------------------------
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
            raise error(f"could not import {path}: {describe_exception(exc)}") from exc
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
            hint = ("; put the folder that holds it on PYTHONPATH (PYTHONPATH=/that/folder "
                    "priorvae ...) or run from that folder"
                    if isinstance(exc, ModuleNotFoundError) and exc.name
                    and target.split(".")[0] == exc.name.split(".")[0] else "")
            raise error(f"could not import module {target!r} (from {spec!r}): {exc}{hint}"
                        ) from exc
        finally:
            sys.path.remove(cwd)
    except (Exception, SystemExit) as exc:
        raise error(f"could not import module {target!r}: {describe_exception(exc)}") from exc


def import_class(spec: str, sha256: str | None = None, *, kind: str = "plug-in",
                 error: type[Exception] = PluginError) -> type:
    """``path/to/file.py:Class`` or ``package.module:Class`` -> the class. A file with
    ``sha256`` given is run only if its bytes have that hash. Inside
    :func:`reading_folder` the spec is first put to :func:`check_folder_spec`."""
    target, attr = _split(spec, kind, error)
    folder = _FOLDER.get()
    if folder is not None:
        approved = check_folder_spec(spec, sha256, folder.source, folder.run_dir, folder.trust)
        sha256 = approved or sha256
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
