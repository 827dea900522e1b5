"""Test NLL of several prior sources of one run at the same K and on the same test images.

``evaluate`` falls back to a smaller K / test subset for priors whose density is costly (the
diffusion prior) and records it; this script puts the other sources on the same footing so
the numbers compare. It only reads the run (shared lock) and writes nothing.

    PRIORVAE_DATA=../shared/data python experiments/matched_nll.py RUN_DIR \\
        --sources trained expost-flow expost-diffusion --iw-samples 50 --limit 500
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from priorvae.data import load_splits
from priorvae.expost import load_prior_source
from priorvae.measure import mean_iwae_nll
from priorvae.runs import Run, resolve_device


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir")
    ap.add_argument("--sources", nargs="+", default=["trained"])
    ap.add_argument("--iw-samples", type=int, default=50)
    ap.add_argument("--limit", type=int, default=500)
    ap.add_argument("--device")
    args = ap.parse_args()
    run = Run.open(args.run_dir)
    with run.lock("matched-nll", exclusive=False):
        dev = resolve_device(args.device or run.config.train.device)
        model = run.load_model("best", dev)
        splits = load_splits(run.config.data, device=dev)
        trained = model.prior
        x = splits.x_test[:args.limit]
        for source in args.sources:
            model.prior = trained if source == "trained" else load_prior_source(
                run, model, source, splits)
            torch.manual_seed(run.config.train.seed)
            t0 = time.perf_counter()
            nll = mean_iwae_nll(model, x, args.iw_samples, run.config.eval.batch_size)
            print(json.dumps({"source": source, "test_nll": round(nll, 3),
                              "iw_samples": args.iw_samples, "test_images": len(x),
                              "seconds": round(time.perf_counter() - t0, 1)}), flush=True)


if __name__ == "__main__":
    main()
