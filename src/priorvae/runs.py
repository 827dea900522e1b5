"""Run folders: the resolved config, checkpoints, metrics, and :func:`load_run`.

A run folder holds::

    config.toml        the resolved configuration (all defaults written out)
    last.pt            model, optimizer, epoch, RNG states, history (for resuming)
    best.pt            the model with the best validation ELBO (what is evaluated)
    metrics.json       summary: status, best epoch, validation and test metrics
    events.out.tfevents.*   TensorBoard

Checkpoints are written atomically (temporary file + rename) and read with
``weights_only=True``.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from .config import Config, config_from_dict, dump_toml, load_config
from .data import input_shape
from .errors import RunError
from .vae import VAE, build_vae

__all__ = [
    "CONFIG_FILE",
    "METRICS_FILE",
    "LAST_CKPT",
    "BEST_CKPT",
    "atomic_write_bytes",
    "save_checkpoint",
    "load_checkpoint",
    "read_metrics",
    "update_metrics",
    "read_run_config",
    "run_config_dict",
    "resolve_device",
    "load_run",
]

CONFIG_FILE = "config.toml"
METRICS_FILE = "metrics.json"
LAST_CKPT = "last.pt"
BEST_CKPT = "best.pt"


def _atomic(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; a run folder is shared
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    _atomic(Path(path), lambda f: f.write(data))


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename over ``path``."""
    _atomic(Path(path), lambda f: torch.save(payload, f))


def load_checkpoint(path: Path, map_location="cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise RunError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise RunError(f"could not read checkpoint {path}: {exc}") from exc


def read_metrics(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / METRICS_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def update_metrics(run_dir: Path, **values: Any) -> dict[str, Any]:
    """Merge ``values`` into metrics.json (atomically) and return the result."""
    metrics = read_metrics(run_dir)
    metrics.update(values)
    text = json.dumps(metrics, indent=2) + "\n"
    atomic_write_bytes(Path(run_dir) / METRICS_FILE, text.encode())
    return metrics


def run_config_dict(cfg: Config) -> dict[str, Any]:
    """The part of a config that defines a run (passive tables such as [compare] left out)."""
    return {k: v for k, v in cfg.to_dict().items() if k not in cfg.extra}


def read_run_config(run_dir: Path) -> Config:
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise RunError(f"{run_dir} is not a priorvae run folder (no {CONFIG_FILE})")
    return load_config(path)


def write_run_config(run_dir: Path, cfg: Config) -> None:
    atomic_write_bytes(Path(run_dir) / CONFIG_FILE, dump_toml(run_config_dict(cfg)).encode())


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise RunError(f"[train] device: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RunError(f"[train] device = {name!r} but CUDA is not available here; use 'auto'")
    return device


def load_run(run_dir: str | os.PathLike, checkpoint: str = "best", device: str = "cpu") -> VAE:
    """The trained VAE of a run folder, in eval mode.

    Args:
        run_dir: the folder ``priorvae train`` wrote.
        checkpoint: ``"best"`` (best validation ELBO, the default) or ``"last"``.
        device: where to put the model.
    """
    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir)
    name = {"best": BEST_CKPT, "last": LAST_CKPT}.get(checkpoint)
    if name is None:
        raise RunError(f"checkpoint must be 'best' or 'last', got {checkpoint!r}")
    ckpt = load_checkpoint(run_dir / name, map_location=device)
    model = build_vae(config_from_dict(ckpt["config"]) if "config" in ckpt else cfg,
                      input_shape(cfg.data.name))
    missing, unexpected = _compare_keys(model.state_dict(), ckpt["model"])
    if missing or unexpected:
        raise RunError(
            f"{run_dir / name} does not match the model built from its {CONFIG_FILE}: "
            f"{len(missing)} missing key(s) (e.g. {', '.join(missing[:2]) or '-'}), "
            f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:2]) or '-'}). Was it "
            f"written by another version of priorvae or of the prior's code?")
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval()


def _compare_keys(expected: dict, found: dict) -> tuple[list[str], list[str]]:
    return sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
