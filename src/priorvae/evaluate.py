"""Test-set evaluation of a run: mean ELBO and the IWAE estimate of -log p(x).

``test_elbo`` is the mean single-sample ELBO per test image (nats, negative).
``test_nll`` is the mean over test images of -IWAE_K(x), the importance-weighted estimate of
-log p(x) with K samples (positive nats; an upper bound on the true NLL in expectation).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .data import iterate_batches, load_splits
from .runs import load_run, read_run_config, resolve_device, update_metrics
from .train import mean_elbo
from .vae import VAE

__all__ = ["mean_iwae_nll", "evaluate_run"]


@torch.no_grad()
def mean_iwae_nll(model: VAE, x: torch.Tensor, k: int, batch_size: int = 100,
                  progress: bool = False) -> float:
    """Mean of -IWAE_k(x) over the binary images ``x`` (N, ...), in nats."""
    total = 0.0
    batches = tqdm(iterate_batches(x, batch_size, shuffle=False, dynamic_binarization=False),
                   total=-(-len(x) // batch_size), desc=f"test NLL (K={k})", disable=not progress,
                   dynamic_ncols=True)
    for batch in batches:
        total += -model.iwae(batch, k).sum().item()
    return total / len(x)


def evaluate_run(run_dir: str | Path, iw_samples: int | None = None, device: str | None = None,
                 progress: bool = True, limit: int | None = None) -> dict:
    """Evaluate the best model of a run on its test split; merge the results into metrics.json.

    Args:
        iw_samples: K for the IWAE estimate (default: the run's ``[eval] iw_samples``).
        limit: evaluate only the first ``limit`` test images (for quick looks; recorded).
    """
    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir)
    dev = resolve_device(device or cfg.train.device)
    k = iw_samples or cfg.eval.iw_samples
    model = load_run(run_dir, device=str(dev))
    splits = load_splits(cfg.data.name, cfg.data.root, cfg.data.download, device=dev)
    x = splits.x_test if limit is None else splits.x_test[:limit]
    torch.manual_seed(cfg.train.seed)
    t0 = time.perf_counter()
    elbo = mean_elbo(model, x, cfg.train.val_batch_size)
    nll = mean_iwae_nll(model, x, k, cfg.eval.batch_size, progress=progress)
    return update_metrics(
        run_dir, test_elbo=elbo["elbo"], test_recon=elbo["recon"], test_kl=elbo["kl"],
        test_nll=nll, iw_samples=k, test_images=len(x),
        eval_seconds=time.perf_counter() - t0)
