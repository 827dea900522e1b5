"""Cost of the exemplar, resampled and diffusion priors against N(0, I), timed in one run.

MNIST's shapes: the paper's gated MLP 300-300, latent D = 40, batch 100, 50,000 training
images (random binary images of MNIST's size stand in: the cost does not depend on them).
Per prior, with its default arguments:

- ``step``: one training step. Joint priors: a VAE step (forward, backward, Adam) with the
  prior in the ELBO. The diffusion prior is ex-post only: one ``fit_loss`` step on a batch of
  1,000 codes (fit-prior's default batch), with the VAE step of N(0, I) as the reference.
- ``sample``: 10,000 prior samples.
- ``log_prob``: the density of 1,000 points in evaluation (inside ``frozen()``, where work
  that depends on the parameters alone, such as Z or the exemplar encodings, is done once and
  counted here).

The contenders alternate for ``--reps`` rounds after one warm-up round; medians are printed,
with the ratio to standard_normal, and appended as one JSON line to
``results_prior_cost.jsonl``.

    python benchmarks/prior_cost.py [--reps 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from priorvae.config import load_config
from priorvae.train import make_optimizer, train_step
from priorvae.vae import build_vae

PRIORS = ("standard_normal", "exemplar", "resampled", "diffusion")
SHAPE = (1, 28, 28)


def build(name: str, data: torch.Tensor):
    cfg = load_config(None, [f"prior.name={name}", "model.hidden=[300, 300]",
                             "model.latent_dim=40", "model.activation=gated"])
    torch.manual_seed(0)
    return build_vae(cfg, SHAPE, data=data)


def timers(name: str, model, data: torch.Tensor) -> dict:
    opt = make_optimizer(model.parameters(), 1e-3)
    x = torch.bernoulli(data[:100])
    index = torch.arange(100)
    prior = model.prior
    codes = torch.randn(1000, 40)

    def step():
        if prior.joint:
            train_step(model, opt, x, 1.0, index=index if prior.needs_data else None)
        else:
            opt.zero_grad()
            prior.fit_loss(codes).backward()
            opt.step()

    def sample():
        with torch.no_grad():
            prior.sample(10_000)

    def log_prob():
        with prior.frozen():
            prior.log_prob(codes)

    return {"step": step, "sample": sample, "log_prob": log_prob}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(1)
    data = torch.bernoulli(torch.full((50_000, *SHAPE), 0.13), generator=gen)
    jobs = {name: timers(name, build(name, data), data) for name in PRIORS}
    times = {name: {k: [] for k in jobs[name]} for name in PRIORS}
    for rep in range(args.reps + 1):  # round 0 warms up
        for name in PRIORS:
            for what, fn in jobs[name].items():
                t0 = time.perf_counter()
                fn()
                if rep:
                    times[name][what].append(time.perf_counter() - t0)
    result = {name: {k: statistics.median(v) for k, v in d.items()} for name, d in times.items()}
    ref = result["standard_normal"]
    print(f"{'prior':16s} {'step s':>16s} {'10k samples s':>18s} {'log_prob 1k s':>18s}")
    for name, r in result.items():
        cells = [f"{r[k]:8.4f} ({r[k] / ref[k]:6.1f}x)" for k in ("step", "sample", "log_prob")]
        print(f"{name:16s} " + " ".join(f"{c:>18s}" for c in cells))
    line = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "threads": args.threads,
            "reps": args.reps, "torch": torch.__version__, "median_seconds": result}
    with open(Path(__file__).with_name("results_prior_cost.jsonl"), "a") as f:
        f.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
