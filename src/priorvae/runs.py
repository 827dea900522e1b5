"""Run folders and the one object that owns each: :class:`Run`.

A run folder holds::

    config.toml        the resolved configuration: the single source of truth for the model
    last.pt            model, optimizer, epoch, RNG states, history (for resuming)
    best.pt            the model with the best validation ELBO (what is evaluated)
    metrics.json       summary: status, best epoch, validation and test metrics
    figures/           pictures written by evaluate
    priors/LABEL.toml  an ex-post prior's name and arguments (fit-prior) ...
    priors/LABEL.pt    ... and its weights
    .lock              held (flock) by the process that writes in the folder
    events.out.tfevents.*   TensorBoard

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
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from .config import Config, dump_toml, load_config, resolve_plugins
from .errors import ConfigError, PluginError, RunBusyError, RunError
from .trust import TRUST_ENV, check_folder_spec, file_sha256, reading_folder, trust_from_env

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no locking
    fcntl = None

__all__ = [
    "CONFIG_FILE", "METRICS_FILE", "LAST_CKPT", "BEST_CKPT", "LOCK_FILE", "PRIORS_DIR",
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
PRIORS_DIR = "priors"
CHECKPOINTS = {"best": BEST_CKPT, "last": LAST_CKPT}
# the prior-source vocabulary: the run's own prior, q(z) itself, and fitted ex-post priors
TRAINED, AGGREGATE, EXPOST_PREFIX = "trained", "aggregate", "expost-"
FINISHED = ("finished", "early_stopped")
MIN_FREE_BYTES = 32 * 2**20  # refuse to start writing a run with less free disk than this
# keys that may differ between a checkpoint's recorded config and config.toml
_RUNTIME_KEYS = (("train", "device"), ("train", "compile"))


def _write_error(path: Path, exc: OSError) -> RunError:
    """One line for a failed write: 'No space left on device', 'Read-only file system'..."""
    return RunError(f"could not write {path}: {exc.strerror or exc}")


def _atomic(path: Path, write) -> None:
    """Write through ``write(file)`` to a temporary file beside ``path``, then rename it over
    ``path``: readers see the old or the new file, never a torn one."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
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
    if not path.is_file():
        raise RunError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
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
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise RunError(f"device {name!r}: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RunError(f"device {name!r} but CUDA is not available here; use 'auto' or 'cpu'")
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
        except PluginError as exc:
            raise RunError(f"{source}: {exc}") from None


def check_prior_code(name: str, sha: str | None, source: Path, run_dir: Path,
                     trust: bool) -> None:
    """Refuse a prior named by a file or module unless the user chose it (see
    :mod:`priorvae.trust`) or opted in. ``source`` is the file that names it."""
    check_folder_spec(name, sha, source, run_dir, trust)


class Run:
    """The owner of one run folder: its config, checkpoints, metrics, figures, prior sources
    and lock. Open an existing folder with :meth:`open`; ``train`` makes new ones with
    :meth:`create`.
    """

    def __init__(self, path: Path, config: Config, trust_remote_code: bool = False):
        self.path = Path(path)
        self.config = config
        self.trust_remote_code = trust_remote_code
        self._lock_fd: int | None = None

    # -- opening ---------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike, trust_remote_code: bool = False) -> Run:
        """An existing run folder; its config.toml validated and its prior code allowed."""
        path = Path(path)
        if not path.is_dir():
            raise RunError(f"{path} is not a run folder (" + (
                "it is a file)" if path.exists() else "it does not exist)"))
        if not (path / CONFIG_FILE).is_file():
            raise RunError(f"{path} is not a priorvae run folder (no {CONFIG_FILE})")
        try:
            cfg = load_config(path / CONFIG_FILE)
        except ConfigError as exc:
            raise RunError(f"{path / CONFIG_FILE}: {exc}") from None
        trust = trust_remote_code or trust_from_env()
        check_config_code(cfg, path / CONFIG_FILE, path, trust)
        run = cls(path, cfg, trust)
        run.metrics()  # a damaged metrics.json is named now, not after an evaluation
        return run

    @classmethod
    def create(cls, path: str | os.PathLike, cfg: Config) -> Run:
        """The folder for training ``cfg``: a new one, or one that holds this configuration's
        run. Call :meth:`adopt_config` once the lock is held."""
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise RunError(f"--out {path} is a file, not a folder; choose another --out")
        if (path / CONFIG_FILE).is_file():
            run = cls.open(path, trust_remote_code=True)  # compared with the user's config next
        else:
            if path.is_dir() and any(p.name != LOCK_FILE for p in path.iterdir()):
                raise RunError(f"{path} exists, is not empty and holds no {CONFIG_FILE}; "
                               f"choose another --out")
            try:
                path.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise _write_error(path, exc) from None
            run = cls(path, cfg, True)
        run._check_same_config(cfg)
        return run

    def adopt_config(self, cfg: Config) -> None:
        """Under the lock: write config.toml for a new run, or check that the run's is ``cfg``
        (another process may have written it meanwhile)."""
        if (self.path / CONFIG_FILE).is_file():
            self.config = load_config(self.path / CONFIG_FILE)
            self._check_same_config(cfg)
        else:
            atomic_write_bytes(self.path / CONFIG_FILE, dump_toml(run_config_dict(cfg)).encode())
            self.config = cfg

    def _check_same_config(self, cfg: Config) -> None:
        diff = config_diff(run_config_dict(self.config), run_config_dict(cfg))
        if diff:
            raise RunError(f"{self.path} holds a run with a different configuration: "
                           + "; ".join(diff) + ". Refusing to overwrite it; choose another --out")

    # -- the lock --------------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self, command: str, exclusive: bool = True):
        """Hold the folder for ``command``: exclusively (train, evaluate, fit-prior) or shared
        (sample). The kernel drops the lock when the process dies, kill -9 included, so a
        stale lock is simply free. A second holder is refused with one line."""
        if fcntl is None:
            yield self
            return
        path = self.path / LOCK_FILE
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            if not exclusive:  # a read-only folder: nobody can be training in it
                yield self
                return
            raise RunError(f"cannot write in {self.path} ({exc.strerror}); {command} writes "
                           f"its results there") from None
        try:
            fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
            os.close(fd)
            raise RunBusyError(f"{self.path} is in use by {holder or 'another priorvae process'}"
                               f"; {command} must wait until it ends") from None
        try:
            if exclusive:
                self._check_free_space(command)
                since = datetime.datetime.now().isoformat(timespec="seconds")
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"priorvae {command} (pid {os.getpid()}, since {since})".encode(),
                          0)
            self._lock_fd = fd
            yield self
        finally:
            self._lock_fd = None
            if exclusive:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, 0)
            os.close(fd)

    def _check_free_space(self, command: str) -> None:
        free = shutil.disk_usage(self.path).free
        if free < MIN_FREE_BYTES:
            raise RunError(f"only {free / 2**20:.1f} MB free on the disk of {self.path}; "
                           f"{command} needs room for checkpoints, metrics and figures")

    def is_busy(self) -> bool:
        """Whether another process holds the folder's lock now."""
        if fcntl is None or not (self.path / LOCK_FILE).is_file() or self._lock_fd is not None:
            return False
        try:
            fd = os.open(self.path / LOCK_FILE, os.O_RDONLY)
        except OSError:
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
        path = self.path / METRICS_FILE
        if not path.is_file():
            return {}
        try:
            metrics = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise RunError(f"{path} is damaged ({exc}); delete it to start its summary "
                           f"afresh (the checkpoints are unaffected)") from None
        if not isinstance(metrics, dict):
            raise RunError(f"{path} is damaged (not a JSON object); delete it to start its "
                           f"summary afresh (the checkpoints are unaffected)")
        return metrics

    def update_metrics(self, **values: Any) -> dict[str, Any]:
        """Merge ``values`` into metrics.json (atomically) and return the result."""
        metrics = self.metrics()
        metrics.update(values)
        atomic_write_bytes(self.path / METRICS_FILE,
                           (json.dumps(metrics, indent=2) + "\n").encode())
        return metrics

    @property
    def status(self) -> str | None:
        """metrics.json's status, except that a "running" run nobody holds was interrupted."""
        status = self.metrics().get("status")
        return "interrupted" if status == "running" and not self.is_busy() else status

    # -- checkpoints and the model ---------------------------------------------------------
    def checkpoint_path(self, which: str) -> Path:
        if which not in CHECKPOINTS:
            raise RunError(f"checkpoint must be 'best' or 'last', got {which!r}")
        return self.path / CHECKPOINTS[which]

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
            diff = config_diff(recorded, run_config_dict(self.config), path.name,
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
            return build_vae(cfg, input_shape(cfg.data.name), data=data)

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
        path = self.path / relative
        _atomic(path, lambda f: fig.savefig(f, format="png", dpi=110))
        return path

    def prior_source_files(self, label: str) -> tuple[Path, Path]:
        """(LABEL.toml, LABEL.pt) of an ex-post prior."""
        folder = self.path / PRIORS_DIR
        return folder / f"{label}.toml", folder / f"{label}.pt"


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
