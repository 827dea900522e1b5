"""Time the full test NLL of an MNIST run: all 10,000 test images, K = 5,000 (or --k).

Loads RUN_DIR's best model (a trained run, e.g. from ``priorvae train experiments/mnist.toml``),
or with ``--fresh`` builds an untrained model from experiments/mnist.toml. Prints one JSON line:
seconds, the NLL, and where the time goes: the decoder's matrix products (timed alone on the
same number of latent codes) against the rest (likelihood, prior, sampling, logsumexp).
Never downloads: MNIST from $PRIORVAE_DATA or ../shared/data.

    python benchmarks/full_test_nll.py RUN_DIR [--k 5000] [--images 10000]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from priorvae.config import load_config
from priorvae.data import load_splits
from priorvae.likelihoods import prepare_splits
from priorvae.measure import mean_iwae_nll
from priorvae.runs import Run
from priorvae.vae import build_vae

REPO = Path(__file__).resolve().parents[1]


@torch.no_grad()
def decoder_matmul_seconds(model, n_codes: int, latent_dim: int, rows: int = 2048) -> float:
    """Seconds for the decoder's Linear layers alone on ``n_codes`` codes, in chunks of rows."""
    linears = [m for m in model.decoder.modules() if isinstance(m, torch.nn.Linear)]
    inputs = [torch.randn(rows, m.in_features) for m in linears]
    for m, x in zip(linears, inputs, strict=True):
        m(x)
    t0 = time.perf_counter()
    for _ in range(n_codes // rows):
        for m, x in zip(linears, inputs, strict=True):
            m(x)
    return (time.perf_counter() - t0) * n_codes / (rows * (n_codes // rows))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", nargs="?")
    p.add_argument("--fresh", action="store_true", help="untrained model from mnist.toml")
    p.add_argument("--k", type=int, default=5000)
    p.add_argument("--images", type=int, default=10_000)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    if not args.run_dir and not args.fresh:
        p.error("give a RUN_DIR or --fresh")
    torch.set_num_threads(args.threads)
    root = os.environ.get("PRIORVAE_DATA", str(REPO.parent / "shared" / "data"))
    if args.run_dir:
        run = Run.open(args.run_dir)
        cfg, model = run.config, run.load_model()
    else:
        cfg = load_config(REPO / "experiments" / "mnist.toml")
        torch.manual_seed(0)
        model = build_vae(cfg, (1, 28, 28))
    model.eval()
    splits = prepare_splits(load_splits(cfg.data.name, root, False), model.likelihood)
    x = splits.x_test[:args.images]
    torch.manual_seed(0)
    t0 = time.perf_counter()
    nll = mean_iwae_nll(model, x, args.k, batch_size=args.batch_size, progress=True)
    seconds = time.perf_counter() - t0
    codes = len(x) * args.k
    dec = decoder_matmul_seconds(model, min(codes, 2_000_000), cfg.model.latent_dim)
    dec *= codes / min(codes, 2_000_000)
    print(json.dumps({
        "bench": "full_test_nll", "run": args.run_dir or "fresh", "prior": cfg.prior.name,
        "activation": cfg.network.kwargs.get("activation", "gated"), "images": len(x), "k": args.k,
        "threads": torch.get_num_threads(), "seconds": round(seconds, 1),
        "nll": round(nll, 3), "latent_codes_decoded": codes,
        "decoder_matmul_s": round(dec, 1), "decoder_matmul_share": round(dec / seconds, 3),
        "us_per_code": round(1e6 * seconds / codes, 2)}), flush=True)


if __name__ == "__main__":
    main()
