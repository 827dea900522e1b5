"""Training throughput (images/second) of the one-layer MNIST VAE, per prior.

Measures the real training step (dynamic binarization, ELBO, backward, Adam) on the MNIST
training split held on the device, after a warm-up. Prints one JSON line per prior. Never
downloads: reads MNIST from $PRIORVAE_DATA or ../shared/data.

    python benchmarks/train_throughput.py [--priors standard_normal vampprior] [--steps 200]
        [--device cuda] [--compile] [--bf16]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from priorvae.config import load_config
from priorvae.data import iterate_batches, load_splits
from priorvae.runs import resolve_device
from priorvae.train import make_optimizer, train_step
from priorvae.vae import build_vae

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(REPO / "experiments" / "mnist.toml"))
    p.add_argument("--priors", nargs="+", default=["standard_normal", "mog", "vampprior", "flow"])
    p.add_argument("--steps", type=int, default=200, help="timed steps per prior")
    p.add_argument("--warmup", type=int, default=20, help="untimed steps first")
    p.add_argument("--device", default="auto")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--compile", action="store_true", help="torch.compile the step's forward "
                   "(CUDA: with CUDA graphs), as [train] compile = true")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast, as [train] precision")
    args = p.parse_args()

    root = os.environ.get("PRIORVAE_DATA", str(REPO.parent / "shared" / "data"))
    device = resolve_device(args.device)
    cfg0 = load_config(args.config, [f"data.root={json.dumps(root)}", "data.download=false",
                                     *args.set])
    splits = load_splits(cfg0.data, device=device)
    for prior in args.priors:
        cfg = load_config(args.config, [f"data.root={json.dumps(root)}", "data.download=false",
                                        f"prior.name={prior}", *args.set])
        torch.manual_seed(0)
        model = build_vae(cfg, splits.input_shape, data=splits.x_train).to(device).train()
        opt = make_optimizer(model.parameters(), cfg.train.lr)
        forward = model
        if args.compile:
            from priorvae.train import compile_forward

            forward = compile_forward(model, device)
        batches = iterate_batches(splits.x_train, cfg.train.batch_size)
        times = []
        for i in range(args.warmup + args.steps):
            try:
                x = next(batches)
            except StopIteration:
                batches = iterate_batches(splits.x_train, cfg.train.batch_size)
                x = next(batches)
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            sums = train_step(model, opt, x, 1.0, autocast=args.bf16, forward=forward)
            sums.tolist()  # wait for the step (the loop itself reads sums once an epoch)
            if i >= args.warmup:
                times.append(time.perf_counter() - t0)
        times.sort()
        median = times[len(times) // 2]
        print(json.dumps({
            "bench": "train_throughput", "prior": prior, "device": str(device),
            "threads": torch.get_num_threads(), "batch_size": cfg.train.batch_size,
            "steps": args.steps, "compile": args.compile, "bf16": args.bf16,
            "median_step_ms": round(1e3 * median, 3),
            "images_per_s": round(cfg.train.batch_size / median, 1),
            "epoch_s_estimate": round(median * len(splits.x_train) / cfg.train.batch_size, 2),
        }), flush=True)


if __name__ == "__main__":
    main()
