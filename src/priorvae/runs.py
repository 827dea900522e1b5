"""Run folders and the one object that owns each: :class:`Run`.

A run folder holds::

    config.toml        the resolved configuration: the single source of truth for the model
    last.pt            model, optimizer, epoch, RNG states, history (for resuming)
    best.pt            the model with the best validation ELBO (what is evaluated)
    metrics.json       summary: status, best epoch, validation and test metrics
    figures/           pictures written by evaluate
    priors/LABEL.toml  an ex-post prior's name and arguments (fit-prior) ...
    priors/LABEL.pt    ... and its weights
    .lock              held (flock) by the process that works in the folder; never written
    .lock.info         who holds it ("priorvae train (pid 123, since ...)"), while held
    events.out.tfevents.*   TensorBoard (and the projector's NNNNN/ and projector_config.pbtxt)

A run folder is data, never code. The model is built from ``config.toml`` alone; checkpoints
are read with ``weights_only=True`` and no checkpoint field ever picks code. Every class that
``config.toml`` or ``priors/LABEL.toml`` names is looked up through the one gate,
:mod:`priorvae.trust`, when the folder is opened and while its model is built: a registered name
is built from its registry; code named by a file or module is imported only if the user chose
it on this machine (it is in their trust record, which the folder cannot write) or the user
opts in: ``trust_remote_code=True`` (``--trust-remote-code``, or
``PRIORVAE_TRUST_REMOTE_CODE=1``).

Every file is written atomically (temporary file in the same folder, then rename), and write
errors (read-only folder, full disk) become one-line :class:`RunError` messages.

Nothing priorvae reads or writes in a run folder may lead outside it: :class:`Run` gives out
every path (:meth:`Run.file`), refuses a folder that holds a symbolic link or anything but
folders and regular files (a FIFO, a device) with one line naming the entry, and opens files
with ``O_NOFOLLOW``. The lock file is opened read-only and never written or truncated.
metrics.json is always valid JSON: a non-finite number never reaches it (see
:meth:`Run.update_metrics`).
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import math
import os
import shutil
import stat
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .config import (
    Config,
    comparable,
    config_from_dict,
    dump_toml,
    load_config,
    resolve_plugins,
)
from .errors import ConfigError, PluginError, PriorVAEError, RunBusyError, RunError
from .trust import TRUST_ENV, check_folder_spec, file_sha256, reading_folder, trust_from_env

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no locking
    fcntl = None

__all__ = [
    "CONFIG_FILE", "METRICS_FILE", "LAST_CKPT", "BEST_CKPT", "LOCK_FILE", "LOCK_INFO",
    "PRIORS_DIR", "EVALUATION_KEYS", "current_results", "open_regular", "read_regular",
    "check_inside",
    "TRAINED", "AGGREGATE", "EXPOST_PREFIX", "FINISHED", "TRUST_ENV",
    "Run", "atomic_write_bytes", "save_checkpoint", "load_checkpoint", "resolve_device",
    "load_run", "load_weights", "run_config_dict", "config_diff", "file_sha256",
    "trust_from_env", "check_prior_code", "check_config_code",
]

CONFIG_FILE = "config.toml"
METRICS_FILE = "metrics.json"
LAST_CKPT = "last.pt"
BEST_CKPT = "best.pt"
LOCK_FILE = ".lock"
LOCK_INFO = ".lock.info"
PRIORS_DIR = "priors"
CHECKPOINTS = {"best": BEST_CKPT, "last": LAST_CKPT}
# the prior-source vocabulary: the run's own prior, q(z) itself, and fitted ex-post priors
TRAINED, AGGREGATE, EXPOST_PREFIX = "trained", "aggregate", "expost-"
FINISHED = ("finished", "early_stopped")
MIN_FREE_BYTES = 32 * 2**20  # refuse to start writing a run with less free disk than this
# keys that may differ between a checkpoint's recorded config and config.toml
_RUNTIME_KEYS = (("train", "device"), ("train", "compile"))
# what an evaluation writes into metrics.json: dropped whole when a new evaluation is of another
# best.pt (or training changes it), so no result outlives the checkpoint it came from
EVALUATION_KEYS = ("test_elbo", "test_recon", "test_kl", "test_nll", "iw_samples", "test_images",
                   "evaluated_epoch", "evaluated_checkpoint", "evaluation_fallback",
                   "test_nll_shared_with",
                   "fit_seconds", "log_normalizer_stderr", "diagnostic_points",
                   "log_prob_points", "quality_classifier", "eval_seconds", "hole_rate",
                   "kl", "mutual_info", "marginal_kl", "kl_prior_to_agg", "mmd", "active_units",
                   "fd_prior", "fd_aggregate", "class_entropy_prior", "class_entropy_aggregate",
                   *(f"{space}_{k}" for space in ("latent", "feature") for k in (
                       "precision", "recall", "density", "coverage", "c2st_auc", "c2st_acc")),
                   "non_finite", "matched", "truncation_share", "truncation", "fit_improved",
                   # the classifier tests redone after the evaluation (experiments/c2st_grid.py)
                   "c2st_recomputed",
                   # Monte-Carlo errors (priorvae.measure.STDERR_KEYS)
                   *(f"{k}_stderr" for k in (
                       "kl", "mutual_info", "marginal_kl", "kl_prior_to_agg", "hole_rate", "mmd",
                       "fd_prior", "fd_aggregate", *(f"{space}_{k}" for space in (
                           "latent", "feature") for k in ("precision", "recall", "density",
                                                          "coverage", "c2st_auc", "c2st_acc")))))
_KINDS = {stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket", stat.S_IFCHR: "a device",
          stat.S_IFBLK: "a device", stat.S_IFLNK: "a symbolic link"}


def _link_error(path: Path, what: str = "a symbolic link") -> RunError:
    """One line for an entry a run folder may not hold, naming it."""
    if what != "a symbolic link":
        return RunError(f"{path} is {what}, not a regular file; priorvae reads and writes only "
                        f"folders and regular files in a run folder: remove it")
    target = ""
    with contextlib.suppress(OSError):
        target = f" (to {os.readlink(path)})"
    return RunError(f"{path} is a symbolic link{target}; priorvae follows no link in a run "
                    f"folder (it could lead outside the folder): remove it")


def check_inside(root: Path, relative: str | os.PathLike, kind: str = "file") -> Path:
    """``root / relative`` after checking every component below ``root``: none is a symbolic
    link, those above the last are folders, and the last (when it exists) is a regular file
    (``kind="file"``) or a folder (``kind="dir"``). ``relative`` may not climb out (``..``)
    or be absolute. Raises :class:`RunError` naming the offending entry."""
    rel = Path(relative)
    if rel.is_absolute() or ".." in rel.parts:
        raise RunError(f"{relative!s} is not a path inside {root}")
    path = Path(root)
    for i, part in enumerate(rel.parts):
        path = path / part
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            break  # the rest does not exist yet: it is created inside
        except OSError as exc:
            raise RunError(f"cannot read {path}: {exc.strerror}") from None
        last = i == len(rel.parts) - 1
        want_dir = not last or kind == "dir"
        if stat.S_ISLNK(mode):
            raise _link_error(path)
        if want_dir and not stat.S_ISDIR(mode):
            raise RunError(f"{path} should be a folder, but it is "
                           f"{_KINDS.get(stat.S_IFMT(mode), 'a file')}; remove it")
        if not want_dir and not stat.S_ISREG(mode):
            raise _link_error(path, _KINDS.get(stat.S_IFMT(mode), "a folder"))
    return Path(root) / rel


def open_regular(path: str | os.PathLike):
    """A regular file opened for reading with ``O_NOFOLLOW``: a symbolic link, a FIFO or a
    device is refused with one line (:class:`RunError`), never followed or blocked on."""
    path = Path(path)
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) \
        | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _link_error(path) from None
        if exc.errno == errno.ENOENT:
            raise RunError(f"{path} not found") from None
        raise RunError(f"cannot read {path}: {exc.strerror}") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise _link_error(path, _KINDS.get(stat.S_IFMT(mode), "a folder"))
    return os.fdopen(fd, "rb")


def read_regular(path: str | os.PathLike, limit: int | None = None) -> bytes:
    """The bytes (at most ``limit``) of a regular file, opened as :func:`open_regular` does."""
    with open_regular(path) as f:
        try:
            return f.read() if limit is None else f.read(limit)
        except OSError as exc:
            raise RunError(f"cannot read {path}: {exc.strerror}") from None


def _finite_or_none(value: Any, key: str, bad: dict) -> Any:
    """``value`` with every non-finite float replaced by None (its key and text in ``bad``)."""
    if isinstance(value, float) and not math.isfinite(value):
        bad[key] = str(value)  # 'nan', 'inf', '-inf'
        return None
    if isinstance(value, dict):
        return {k: _finite_or_none(v, f"{key}.{k}" if key else str(k), bad)
                for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v, f"{key}[{i}]", bad) for i, v in enumerate(value)]
    return value


def current_results(metrics: dict, digest: Callable[[], str | None]) -> dict:
    """``metrics`` without the results of another best.pt than the one whose sha256
    ``digest()`` gives (None: there is none), which is computed only when a result records
    its checkpoint: the run's own evaluation (:data:`EVALUATION_KEYS`) when its
    ``evaluated_checkpoint`` differs, and each ``prior_sources`` entry whose own differs.
    Results written before priorvae recorded the checkpoint name none and are kept as they
    are. Training drops them all (a new best.pt); this keeps them from outliving a best.pt
    changed any other way (a folder copied over, a version that did not drop them)."""
    sources = metrics.get("prior_sources")
    records = [metrics, *(sources.values() if isinstance(sources, dict) else ())]
    if not any(isinstance(r, dict) and "evaluated_checkpoint" in r for r in records):
        return metrics
    today = digest()

    def stale(record) -> bool:
        return isinstance(record, dict) and "evaluated_checkpoint" in record and \
            record["evaluated_checkpoint"] != today

    out = {k: v for k, v in metrics.items() if not (stale(metrics) and k in EVALUATION_KEYS)}
    if isinstance(sources, dict) and any(stale(r) for r in sources.values()):
        out["prior_sources"] = {k: v for k, v in sources.items() if not stale(v)}
        if not out["prior_sources"]:
            del out["prior_sources"]
    return out


def _null_at(metrics: dict, path: str) -> bool:
    """Whether ``path``, as :func:`_finite_or_none` names a value ('a.b[1].c'), leads to a null
    in ``metrics`` (a key holding '.' or '[' is matched whole, the longest first)."""
    node: Any = metrics
    rest = path
    while rest or node is metrics:
        if isinstance(node, list):
            close = rest.find("]")
            index = rest[1:close] if rest.startswith("[") and close > 1 else ""
            if not index.isdigit() or int(index) >= len(node):
                return False
            node, rest = node[int(index)], rest[close + 1:]
        elif isinstance(node, dict):
            if node is not metrics:
                if not rest.startswith("."):
                    return False
                rest = rest[1:]
            keys = [k for k in node if isinstance(k, str) and (
                rest == k or rest.startswith((f"{k}.", f"{k}[")))]
            if not keys:
                return False
            key = max(keys, key=len)
            node, rest = node[key], rest[len(key):]
        else:
            return False
    return node is None


def _constant_as_null(name: str) -> None:
    """NaN / Infinity, which older versions wrote into metrics.json (not JSON): read as null."""
    return None


def _finite_float_or_null(text: str) -> float | None:
    """A JSON number beyond a float (1e999, which Python reads as inf): null, like NaN, so
    that metrics.json stays valid JSON when it is written back."""
    value = float(text)
    return value if math.isfinite(value) else None


def _write_error(path: Path, exc: OSError) -> RunError:
    """One line for a failed write: 'No space left on device', 'Read-only file system'..."""
    return RunError(f"could not write {path}: {exc.strerror or exc}")


def _atomic(path: Path, write, fsync: bool = True) -> None:
    """Write through ``write(file)`` to a temporary file beside ``path``, then rename it over
    ``path``: readers see the old or the new file, never a torn one."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; a run folder is shared
        os.replace(tmp, path)
    except OSError as exc:
        raise _write_error(path, exc) from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    _atomic(Path(path), lambda f: f.write(data))


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename over ``path``."""
    _atomic(Path(path), lambda f: torch.save(payload, f))


def load_checkpoint(path: Path, map_location="cpu") -> dict[str, Any]:
    """A checkpoint's contents, read with ``weights_only=True`` (tensors and plain data only:
    a file that holds anything else is refused, never unpickled)."""
    path = Path(path)
    if not os.path.lexists(path):
        raise RunError(f"checkpoint not found: {path}")
    try:
        with open_regular(path) as f:
            ckpt = torch.load(f, map_location=map_location, weights_only=True)
    except RunError:
        raise
    except OSError as exc:
        raise RunError(f"could not read checkpoint {path}: {exc.strerror or exc}") from None
    except Exception as exc:
        if "weights_only" in str(exc) or "Unsupported global" in str(exc):
            raise RunError(f"refused to read {path}: it holds objects other than tensors and "
                           f"plain data, which priorvae never unpickles") from None
        raise RunError(f"could not read checkpoint {path}: it is damaged or not a checkpoint "
                       f"({type(exc).__name__})") from None
    if not isinstance(ckpt, dict):
        raise RunError(f"{path} is not a priorvae checkpoint (no dict inside)")
    return ckpt


def resolve_device(name: str) -> torch.device:
    """The device called ``name`` ("auto": CUDA if available, else the CPU), checked to be
    usable here: an unknown or absent device is one line, not a damaged-checkpoint error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as exc:
        raise RunError(f"device {name!r}: {str(exc).splitlines()[0]}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RunError(f"device {name!r} but CUDA is not available here; use 'auto' or 'cpu'")
    if device.type == "meta":
        raise RunError("device 'meta' holds no numbers; use 'auto', 'cpu' or 'cuda'")
    try:
        torch.empty(1, device=device)
    except Exception as exc:  # mps on Linux, a missing backend module, a wrong index...
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise RunError(f"device {name!r} is not available on this machine ({text[:120]}); "
                       f"use 'auto' or 'cpu'") from None
    return device


def run_config_dict(cfg: Config) -> dict[str, Any]:
    """The part of a config that defines a run (passive tables such as [compare] left out)."""
    return {k: v for k, v in cfg.to_dict().items() if k not in cfg.extra}


def config_diff(old: dict, new: dict, old_name: str = "the run",
                new_name: str = "now") -> list[str]:
    """``[table] key: OLD in OLD_NAME, NEW NEW_NAME`` for every key that differs (runtime
    keys such as the device excepted)."""
    out = []
    for table in sorted(set(old) | set(new)):
        a, b = old.get(table, {}), new.get(table, {})
        for key in sorted(set(a) | set(b)):
            if (table, key) not in _RUNTIME_KEYS and a.get(key) != b.get(key):
                out.append(f"[{table}] {key}: {a.get(key)!r} in {old_name}, {b.get(key)!r} "
                           f"{new_name}")
    return out


def check_config_code(cfg: Config, source: Path, run_dir: Path, trust: bool) -> None:
    """Every class a run folder's config names, looked up through the gate now
    (:mod:`priorvae.trust`): code the user did not choose is refused with one line before any
    of it runs. ``source`` is the file that names it (for messages)."""
    with reading_folder(run_dir, source, trust):
        try:
            resolve_plugins(cfg)
        except PluginError as exc:  # named once: the gate's own messages start with it
            text = str(exc)
            raise RunError(text if text.startswith(str(source)) else f"{source}: {text}") \
                from None


def check_prior_code(name: str, sha: str | None, source: Path, run_dir: Path,
                     trust: bool) -> None:
    """Refuse a prior named by a file or module unless the user chose it (see
    :mod:`priorvae.trust`) or opted in. ``source`` is the file that names it."""
    check_folder_spec(name, sha, source, run_dir, trust)


class Run:
    """The owner of one run folder: its config, checkpoints, metrics, figures, prior sources
    and lock, and the one giver of paths inside it (:meth:`file`). Open an existing folder
    with :meth:`open`; ``train`` makes new ones with :meth:`create`.
    """

    def __init__(self, path: Path, config: Config, trust_remote_code: bool = False):
        self.path = Path(path)
        self.config = config
        self.trust_remote_code = trust_remote_code
        self._lock_fd: int | None = None

    # -- paths -----------------------------------------------------------------------------
    def file(self, relative: str | os.PathLike, kind: str = "file") -> Path:
        """The path of ``relative`` inside the folder, checked (:func:`check_inside`): no
        component is a symbolic link, the last is a regular file (or a folder, ``kind="dir"``)
        where it exists. Every path priorvae reads or writes in a run comes from here."""
        return check_inside(self.path, relative, kind)

    def check_tree(self) -> None:
        """Refuse a folder that holds, anywhere below it, a symbolic link or anything but
        folders and regular files (one line naming the first such entry)."""
        for top, dirs, files in os.walk(self.path, followlinks=False):
            for name in sorted(dirs) + sorted(files):
                path = Path(top) / name
                try:
                    mode = os.lstat(path).st_mode
                except OSError:
                    continue  # removed meanwhile
                if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
                    raise _link_error(path, _KINDS.get(stat.S_IFMT(mode), "not a regular file"))

    # -- opening ---------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike, trust_remote_code: bool = False) -> Run:
        """An existing run folder; its config.toml validated and its prior code allowed."""
        path = Path(path)
        if not path.is_dir():
            raise RunError(f"{path} is not a run folder (" + (
                "it is a file)" if path.exists() else "it does not exist)"))
        run = cls(path, None, False)  # type: ignore[arg-type]
        run.check_tree()
        if not os.path.lexists(run.file(CONFIG_FILE)):
            raise RunError(f"{path} is not a priorvae run folder (no {CONFIG_FILE})")
        cfg = run._read_config()
        trust = trust_remote_code or trust_from_env()
        check_config_code(cfg, path / CONFIG_FILE, path, trust)
        run.config, run.trust_remote_code = cfg, trust
        run.metrics()  # a damaged metrics.json is named now, not after an evaluation
        return run

    def _read_config(self) -> Config:
        path = self.file(CONFIG_FILE)
        read_regular(path, 0)  # a link, a FIFO...: refused before load_config opens it
        try:
            return load_config(path)
        except ConfigError as exc:
            raise RunError(f"{path}: {exc}") from None
        except RecursionError:
            raise RunError(f"{path} is nested too deeply to be a priorvae config (a crafted "
                           f"file?)") from None

    @classmethod
    def create(cls, path: str | os.PathLike, cfg: Config) -> Run:
        """The folder for training ``cfg``: a new one, or one that holds this configuration's
        run. Call :meth:`adopt_config` once the lock is held (an empty folder is checked
        then: another process may be writing its config.toml now)."""
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise RunError(f"--out {path} is a file, not a folder; choose another --out")
        if path.is_dir() and os.path.lexists(path / CONFIG_FILE):
            run = cls.open(path, trust_remote_code=True)  # compared with the user's config next
        else:
            try:
                path.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise _write_error(path, exc) from None
            run = cls(path, cfg, True)
            run.check_tree()
            run._check_empty()  # again under the lock: another process may be writing it
        run._check_same_config(cfg)
        return run

    def adopt_config(self, cfg: Config) -> None:
        """Under the lock: write config.toml for a new run, or check that the run's is ``cfg``
        (another process may have written it meanwhile)."""
        if os.path.lexists(self.file(CONFIG_FILE)):
            self.config = self._read_config()
            self._check_same_config(cfg)
            return
        self._check_empty()
        atomic_write_bytes(self.file(CONFIG_FILE), dump_toml(run_config_dict(cfg)).encode())
        self.config = cfg

    def _check_empty(self) -> None:
        """A folder without config.toml must be empty but for the lock and a temporary file of
        a process writing config.toml now (or killed while it did)."""
        others = [p.name for p in self.path.iterdir() if p.name not in (LOCK_FILE, LOCK_INFO)
                  and not (p.name.startswith(f".{CONFIG_FILE}.") and p.name.endswith(".tmp"))]
        if others:
            raise RunError(f"{self.path} exists, is not empty and holds no {CONFIG_FILE}; "
                           f"choose another --out")

    def _check_same_config(self, cfg: Config) -> None:
        diff = config_diff(comparable(self.config), comparable(cfg))
        if diff:
            raise RunError(f"{self.path} holds a run with a different configuration: "
                           + "; ".join(diff) + ". Refusing to overwrite it; choose another --out")

    # -- the lock --------------------------------------------------------------------------
    def _open_lock(self, create: bool) -> int:
        """The lock file, read-only (it is never written: a lock file planted as a hard link
        to a file elsewhere loses nothing), never through a link, never a FIFO."""
        path = self.file(LOCK_FILE)
        flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) \
            | getattr(os, "O_CLOEXEC", 0) | (os.O_CREAT if create else 0)
        try:
            fd = os.open(path, flags, 0o666)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise _link_error(path) from None
            raise
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            os.close(fd)
            raise _link_error(path, _KINDS.get(stat.S_IFMT(mode), "a folder"))
        return fd

    def _holder(self) -> str:
        with contextlib.suppress(PriorVAEError, OSError):
            return read_regular(self.file(LOCK_INFO), 200).decode(errors="replace").strip()
        return ""

    @contextlib.contextmanager
    def lock(self, command: str, exclusive: bool = True):
        """Hold the folder for ``command``: exclusively (train, evaluate, fit-prior) or shared
        (sample). The kernel drops the lock when the process dies, kill -9 included, so a
        stale lock is simply free. A second holder is refused with one line."""
        if fcntl is None:
            yield self
            return
        try:
            fd = self._open_lock(create=True)
        except OSError as exc:
            if not exclusive:  # a read-only folder: nobody can be training in it
                yield self
                return
            raise RunError(f"cannot write in {self.path} ({exc.strerror}); {command} writes "
                           f"its results there") from None
        try:
            fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise RunBusyError(f"{self.path} is in use by "
                               f"{self._holder() or 'another priorvae process'}; {command} "
                               f"must wait until it ends") from None
        try:
            if exclusive:
                self._check_free_space(command)
                since = datetime.datetime.now().isoformat(timespec="seconds")
                info = f"priorvae {command} (pid {os.getpid()}, since {since})".encode()
                try:
                    _atomic(self.file(LOCK_INFO), lambda f: f.write(info), fsync=False)
                except RunError as exc:  # a read-only folder: said before any work
                    raise RunError(f"cannot write in {self.path} ("
                                   f"{str(exc).rpartition(': ')[2]}); {command} writes its "
                                   f"results there") from None
            self._lock_fd = fd
            yield self
        finally:
            self._lock_fd = None
            if exclusive:
                with contextlib.suppress(OSError, PriorVAEError):
                    os.unlink(self.file(LOCK_INFO))
            os.close(fd)

    def _check_free_space(self, command: str) -> None:
        free = shutil.disk_usage(self.path).free
        if free < MIN_FREE_BYTES:
            raise RunError(f"only {free / 2**20:.1f} MB free on the disk of {self.path}; "
                           f"{command} needs room for checkpoints, metrics and figures")

    def is_busy(self) -> bool:
        """Whether another process holds the folder's lock now."""
        if fcntl is None or self._lock_fd is not None:
            return False
        try:
            fd = self._open_lock(create=False)
        except (OSError, PriorVAEError):
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return False
        except OSError:
            return True
        finally:
            os.close(fd)

    # -- metrics ---------------------------------------------------------------------------
    def metrics(self) -> dict[str, Any]:
        path = self.file(METRICS_FILE)
        if not os.path.lexists(path):
            return {}
        try:
            metrics = json.loads(read_regular(path), parse_constant=_constant_as_null,
                                 parse_float=_finite_float_or_null)
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            what = "nested too deeply" if isinstance(exc, RecursionError) else exc
            raise RunError(f"{path} is damaged ({what}); delete it to start its summary "
                           f"afresh (the checkpoints are unaffected)") from None
        if not isinstance(metrics, dict):
            raise RunError(f"{path} is damaged (not a JSON object); delete it to start its "
                           f"summary afresh (the checkpoints are unaffected)")
        return metrics

    def update_metrics(self, drop: tuple[str, ...] = (), **values: Any) -> dict[str, Any]:
        """Merge ``values`` into metrics.json (atomically; the keys ``drop`` removed first)
        and return the result.

        metrics.json is always valid JSON: a non-finite number (NaN, +-Infinity), which the
        commands refuse before they get here, would be written as null and named under
        ``non_finite`` (key: 'nan' / 'inf' / '-inf'), never as a bare NaN."""
        metrics = {k: v for k, v in self.metrics().items() if k not in drop}
        bad: dict[str, str] = {}
        metrics.update(_finite_or_none(values, "", bad))
        # non_finite names the current values only: an entry whose value is null no more
        # (a later finite value, or dropped) goes; the new non-finite values join
        before = metrics.pop("non_finite", None)
        kept = {k: v for k, v in before.items() if _null_at(metrics, k)} \
            if isinstance(before, dict) else {}
        if kept or bad:
            metrics["non_finite"] = {**kept, **bad}
        atomic_write_bytes(self.file(METRICS_FILE),
                           (json.dumps(metrics, indent=2, allow_nan=False) + "\n").encode())
        return metrics

    def best_digest(self) -> str | None:
        """sha256 of best.pt's bytes (what ``evaluated_checkpoint`` records; None: no best.pt)."""
        path = self.checkpoint_path("best")
        return file_sha256(path) if path.is_file() else None

    def current_metrics(self) -> dict[str, Any]:
        """metrics.json without the results of another best.pt than today's
        (:func:`current_results`): what a reader may show as this run's."""
        return current_results(self.metrics(), self.best_digest)

    def drop_other_checkpoints(self) -> dict[str, Any]:
        """Under the lock: remove from metrics.json the results of another best.pt than
        today's (:func:`current_results`), and return what stays."""
        metrics = self.metrics()
        current = current_results(metrics, self.best_digest)
        if current == metrics:
            return metrics
        sources = {"prior_sources": current["prior_sources"]} \
            if "prior_sources" in current and current["prior_sources"] != metrics.get(
                "prior_sources") else {}
        return self.update_metrics(drop=tuple(k for k in metrics if k not in current),
                                   **sources)

    @property
    def status(self) -> str | None:
        """metrics.json's status, except that a "running" run nobody holds was interrupted."""
        status = self.metrics().get("status")
        return "interrupted" if status == "running" and not self.is_busy() else status

    # -- checkpoints and the model ---------------------------------------------------------
    def checkpoint_path(self, which: str) -> Path:
        if which not in CHECKPOINTS:
            raise RunError(f"checkpoint must be 'best' or 'last', got {which!r}")
        return self.file(CHECKPOINTS[which])

    def save_checkpoint(self, which: str, payload: dict[str, Any]) -> None:
        save_checkpoint(self.checkpoint_path(which), payload)

    def load_checkpoint(self, which: str, device: str | torch.device = "cpu") -> dict[str, Any]:
        """A checkpoint, refused unless the configuration it records is config.toml's."""
        path = self.checkpoint_path(which)
        ckpt = load_checkpoint(path, map_location=device)
        if not isinstance(ckpt.get("model"), dict):
            raise RunError(f"{path} is not a priorvae checkpoint (no model weights)")
        recorded = ckpt.get("config")
        if isinstance(recorded, dict):
            try:  # written by any priorvae version: compared in today's shape
                recorded = comparable(config_from_dict(recorded))
            except (ConfigError, RecursionError) as exc:
                raise RunError(f"{path} records a configuration this priorvae cannot read "
                               f"({exc if isinstance(exc, ConfigError) else 'nested too deeply'})"
                               ) from None
            diff = config_diff(recorded, comparable(self.config), path.name,
                               f"in {CONFIG_FILE}")
            if diff:
                raise RunError(f"{path} belongs to another run than {self.path / CONFIG_FILE}: "
                               + "; ".join(diff[:3]))
        return ckpt

    def build_model(self, data: torch.Tensor | None = None):
        """The VAE that config.toml describes, freshly initialised (a prior made of the
        training images, ``needs_data``, gets the training split loaded again)."""
        from .data import input_shape, load_splits
        from .registry import get_prior_class
        from .vae import build_vae

        cfg = self.config
        with reading_folder(self.path, self.path / CONFIG_FILE, self.trust_remote_code):
            if data is None and get_prior_class(cfg.prior.name,
                                                cfg.prior.file_sha256).needs_data:
                data = load_splits(cfg.data).x_train
            return build_vae(cfg, input_shape(cfg.data), data=data)

    def load_model(self, which: str = "best", device: str | torch.device = "cpu",
                   checkpoint: dict | None = None):
        """The trained VAE in eval mode, built from config.toml, weights from ``which``
        (``checkpoint``: its contents, when the caller has read them already)."""
        ckpt = checkpoint if checkpoint is not None else self.load_checkpoint(which, device)
        model = self.build_model()
        load_weights(model, ckpt["model"], self.checkpoint_path(which))
        return model.to(device).eval()

    # -- files -----------------------------------------------------------------------------
    def save_figure(self, relative: str | Path, fig) -> Path:
        path = self.file(relative)
        self.file(Path(relative).parent, kind="dir")
        _atomic(path, lambda f: fig.savefig(f, format="png", dpi=110))
        return path

    def prior_source_files(self, label: str) -> tuple[Path, Path]:
        """(LABEL.toml, LABEL.pt) of an ex-post prior."""
        return self.file(f"{PRIORS_DIR}/{label}.toml"), self.file(f"{PRIORS_DIR}/{label}.pt")

    @contextlib.contextmanager
    def tensorboard(self, subdir: str | Path = ".", **kwargs):
        """A TensorBoard ``SummaryWriter`` logging to ``subdir`` of the run (checked like every
        path; event files get fresh names), whose write errors (a full disk) become one line."""
        from torch.utils.tensorboard import SummaryWriter

        folder = self.file(subdir, kind="dir") if str(subdir) != "." else self.path
        self.check_tree()  # no link among the files the writers may open by a fixed name
        hook = threading.excepthook

        def quiet_writer_thread(args):  # its error is raised again in this thread: one line
            if not (issubclass(args.exc_type, OSError)
                    and type(args.thread).__name__ == "_AsyncWriterThread"):
                hook(args)

        threading.excepthook = quiet_writer_thread
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with SummaryWriter(log_dir=str(folder), **kwargs) as writer:
                yield writer
        except OSError as exc:
            raise _write_error(folder, exc) from None
        finally:
            threading.excepthook = hook

    def add_embedding(self, writer, mat: torch.Tensor, tag: str, step: int, **kwargs) -> None:
        """``writer.add_embedding`` for a writer of the run's own folder, once every path the
        projector writes by a fixed name (``NNNNN/TAG/*.tsv``, ``sprite.png``,
        ``projector_config.pbtxt``) is checked not to lead outside it."""
        encode = getattr(writer, "_encode", lambda t: t.replace("/", "%2f"))
        sub = f"{str(step).zfill(5)}/{encode(tag)}"  # the folder TensorBoard names
        self.file(sub, kind="dir")
        for name in ("tensors.tsv", "metadata.tsv", "sprite.png"):
            self.file(f"{sub}/{name}")
        self.file("projector_config.pbtxt")
        try:
            writer.add_embedding(mat, tag=tag, global_step=step, **kwargs)
        except OSError as exc:
            raise _write_error(self.path / sub, exc) from None


def load_weights(module: torch.nn.Module, state: dict, source: Path) -> None:
    """``module.load_state_dict(state)`` after checking names and shapes, with one line naming
    the first difference."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [f"{k} is {tuple(state[k].shape)} there, {tuple(v.shape)} here"
              for k, v in expected.items()
              if k in state and isinstance(state[k], torch.Tensor) and state[k].shape != v.shape]
    if missing or unexpected or shapes:
        what = (shapes[:1] + [f"missing {', '.join(missing[:2])}"] * bool(missing)
                + [f"unexpected {', '.join(unexpected[:2])}"] * bool(unexpected))
        raise RunError(f"{source} does not fit the model its run describes: {'; '.join(what)}")
    odd = [k for k in expected if not isinstance(state[k], torch.Tensor)]
    if odd:
        raise RunError(f"{source} is damaged: {odd[0]} is a {type(state[odd[0]]).__name__}, "
                       f"not a tensor")
    params = {name for name, _ in module.named_parameters()}
    for key, value in state.items():  # a diverged model is refused, never used
        if value.is_floating_point() and (value.isnan().any() or (
                key in params and value.isinf().any())):
            raise RunError(f"{source} holds non-finite weights ({key}): the model diverged; "
                           f"it cannot be used (train again, e.g. with a lower [train] lr)")
    try:
        module.load_state_dict(state)
    except (RuntimeError, TypeError) as exc:
        raise RunError(f"{source} does not fit the model its run describes: "
                       f"{str(exc).splitlines()[0]}") from None


def load_run(run_dir: str | os.PathLike, checkpoint: str = "best", device: str = "cpu",
             trust_remote_code: bool = False):
    """The trained VAE of a run folder, in eval mode.

    Args:
        run_dir: the folder ``priorvae train`` wrote.
        checkpoint: ``"best"`` (best validation ELBO, the default) or ``"last"``.
        device: where to put the model.
        trust_remote_code: allow a prior named by a file or module that the run names but you
            did not choose (see :mod:`priorvae.runs`).
    """
    return Run.open(run_dir, trust_remote_code).load_model(checkpoint, device)
