"""Test NLL of several prior sources of one run at the same K and on the same test images.

``evaluate`` falls back to a smaller K / test subset for priors whose density is costly (the
diffusion prior) and records it; this script puts the other sources on the same footing so
the numbers compare: one decoder pass for all sources (the same images and draws), each
source's NLL and its paired difference from the first source with the standard error over
images. It only reads the run (shared lock) and writes nothing. (``evaluate`` now records the
same as ``matched`` in metrics.json whenever it evaluates sources at different K; this script
is for runs evaluated before.)

    PRIORVAE_DATA=../shared/data python experiments/matched_nll.py RUN_DIR \\
        --sources trained expost-flow expost-diffusion --iw-samples 50 --limit 500
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from priorvae.data import load_splits
from priorvae.datasets import check_same_data
from priorvae.errors import PriorVAEError
from priorvae.evaluate import paired_difference
from priorvae.expost import load_prior_source
from priorvae.likelihoods import prepare_splits
from priorvae.measure import mean_iwae_nlls
from priorvae.runs import Run, resolve_device


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return int(text)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir")
    ap.add_argument("--sources", nargs="+", default=["trained"])
    ap.add_argument("--iw-samples", type=_positive, default=50)
    ap.add_argument("--limit", type=_positive, default=500)
    ap.add_argument("--device")
    args = ap.parse_args()
    try:
        _matched(args)
    except PriorVAEError as exc:
        print(f"matched_nll: error: {exc}", file=sys.stderr)
        return 2
    return 0


def _matched(args) -> None:
    run = Run.open(args.run_dir)
    with run.lock("matched-nll", exclusive=False):
        dev = resolve_device(args.device or run.config.train.device)
        best = run.load_checkpoint("best", dev)
        model = run.load_model("best", dev, best)
        splits = load_splits(run.config.data, device=dev)
        check_same_data(best.get("data_sha256"), splits.digest(), run.checkpoint_path("best"))
        splits = prepare_splits(splits, model.likelihood)
        x = splits.x_test[:args.limit]
        priors = [model.prior if source == "trained" else load_prior_source(
            run, model, source, splits) for source in args.sources]
        torch.manual_seed(run.config.train.seed)
        t0 = time.perf_counter()
        rows: list[torch.Tensor] = []
        mean_iwae_nlls(model, x, args.iw_samples, priors, run.config.eval.batch_size,
                       rows=rows)
        nll = torch.cat(rows, dim=1)
        for source, row in zip(args.sources, nll, strict=True):
            diff, se = paired_difference(row, nll[0])
            print(json.dumps({"source": source, "test_nll": round(row.double().mean().item(), 3),
                              f"diff_vs_{args.sources[0]}": round(diff, 3),
                              "diff_stderr": round(se, 3) if len(x) > 1 else None,
                              "iw_samples": args.iw_samples,
                              "test_images": len(x),
                              "seconds": round(time.perf_counter() - t0, 1)}), flush=True)


if __name__ == "__main__":
    sys.exit(main())
