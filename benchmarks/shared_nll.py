"""Test NLL of several prior sources of one run: one pass each against one shared pass.

``priorvae evaluate --prior-source A --prior-source B`` and ``compare`` score every source of a
VAE with one decoder pass (:func:`priorvae.measure.mean_iwae_nlls`). This times both ways on
the same images, K and seed, alternating rounds, and checks that the numbers are identical.
Never downloads: MNIST from $PRIORVAE_DATA or ../shared/data.

    python benchmarks/shared_nll.py RUN_DIR --sources trained expost-mog expost-flow \\
        [--images 500] [--k 1000] [--reps 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from priorvae.data import load_splits
from priorvae.expost import load_prior_source
from priorvae.likelihoods import prepare_splits
from priorvae.measure import mean_iwae_nll, mean_iwae_nlls
from priorvae.runs import Run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir")
    p.add_argument("--sources", nargs="+", default=["trained", "expost-mog", "expost-flow"])
    p.add_argument("--images", type=int, default=500)
    p.add_argument("--k", type=int, default=1000)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    run = Run.open(args.run_dir)
    model = run.load_model()
    splits = prepare_splits(load_splits(run.config.data), model.likelihood)
    priors = [load_prior_source(run, model, s, splits) for s in args.sources]
    x = splits.x_test[:args.images]
    batch = run.config.eval.batch_size

    def separate() -> list[float]:
        out = []
        for prior in priors:
            model.prior = prior
            torch.manual_seed(0)
            out.append(mean_iwae_nll(model, x, args.k, batch))
        return out

    def shared() -> list[float]:
        torch.manual_seed(0)
        return mean_iwae_nlls(model, x, args.k, priors, batch)

    times: dict[str, list[float]] = {"separate": [], "shared": []}
    values = {}
    for rep in range(args.reps + 1):  # round 0 warms up and is not counted
        for name, fn in (("separate", separate), ("shared", shared)):
            t0 = time.perf_counter()
            values[name] = fn()
            if rep:
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(json.dumps({
        "bench": "shared_nll", "run": args.run_dir, "sources": args.sources,
        "images": len(x), "k": args.k, "threads": torch.get_num_threads(),
        "separate_s": round(med["separate"], 2), "shared_s": round(med["shared"], 2),
        "speedup": round(med["separate"] / med["shared"], 2),
        "separate_runs_s": [round(t, 2) for t in times["separate"]],
        "shared_runs_s": [round(t, 2) for t in times["shared"]],
        "nll": dict(zip(args.sources, (round(v, 4) for v in values["shared"]), strict=True)),
        "identical": values["separate"] == values["shared"]}), flush=True)


if __name__ == "__main__":
    main()
