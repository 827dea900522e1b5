"""Shared fixtures. MNIST comes from ../shared/data (never downloaded in tests)."""

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("PRIORVAE_TEST_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """Caches (the sample-quality classifier) and the user's trust record (code chosen for run
    folders) go to temporary folders, for subprocesses too."""
    mp = pytest.MonkeyPatch()
    mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))
    mp.setenv("XDG_CONFIG_HOME", str(tmp_path_factory.mktemp("config")))
    mp.delenv("PRIORVAE_TRUST_REMOTE_CODE", raising=False)
    mp.delenv("PRIORVAE_DATA", raising=False)
    mp.delenv("PRIORVAE_DEBUG", raising=False)  # errors are one line, not a traceback
    yield
    mp.undo()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def mnist_root() -> Path:
    raw = SHARED_DATA / "MNIST" / "raw"
    if not (raw / "train-images-idx3-ubyte").is_file():
        pytest.skip(f"official MNIST files not found in {raw} (tests never download)")
    return SHARED_DATA


def tiny_toml(path: Path, **tables) -> Path:
    """Write a small digits config; keyword tables override/extend the defaults below."""
    from priorvae.config import dump_toml

    base = {
        "data": {"name": "digits"},
        "model": {"hidden": [32, 32], "latent_dim": 2},
        "prior": {"name": "standard_normal"},
        "train": {"epochs": 3, "batch_size": 100, "lr": 1e-3, "image_every": 2,
                  "diagnostics_every": 10},
        "eval": {"iw_samples": 20},
    }
    for table, body in tables.items():
        base.setdefault(table, {}).update(body)
    path.write_text(dump_toml(base))
    return path


def read_metrics(run_dir: Path) -> dict:
    """metrics.json as the test sees it on disk ({} before the first write)."""
    import json

    path = Path(run_dir) / "metrics.json"
    return json.loads(path.read_text()) if path.is_file() else {}
