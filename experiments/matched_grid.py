"""A compare grid's test NLLs at one K on the same test images, with paired standard errors.

``compare`` evaluates each row at its own protocol: K = 5,000 on all test images for most,
less where a density is costly (diffusion: K = 50 on 500 images; q(z) and the exemplar
prior: K = 1,000 on 2,000). Rows at different K and images do not compare. This script
scores every source of every evaluated cell of ``OUT`` (the VAE's own prior and each ex-post
source it was evaluated with) at one K on the first ``--limit`` test images:

- within a cell, all sources share one decoder pass (the same images and draws), as
  ``experiments/matched_nll.py`` does;
- each row is compared with the reference cell of the same seed (``--reference``, default
  the ``standard_normal`` VAE with its own prior) by the mean of the per-image differences
  and its standard error over images (a different VAE draws its own codes; the pairing is
  by image);
- over seeds: the mean, the standard deviation over seeds, and the paired standard error of
  the mean difference over images of the per-image differences averaged over seeds (the
  seeds share the test images, so their per-image differences are correlated and
  sqrt(sum se_s^2) / n_seeds would understate it).

It reads the cells (shared lock) and writes only ``OUT/matched/``: one JSON per cell with its
per-image values (reused when the cell's best.pt, K and images are unchanged, so an
interrupted run goes on where it stopped), ``matched.csv`` and ``matched.md``. With ``--save``
it also records each cell's ``matched`` entries in its metrics.json (exclusive lock), as
``evaluate`` does for the sources it evaluates together, so that ``compare``'s tables show
the "Δ NLL vs own prior, matched" column for cells evaluated before it existed.

    PRIORVAE_DATA=../shared/data OMP_NUM_THREADS=1 python experiments/matched_grid.py \\
        experiments/results/mnist_remedies_e100 --iw-samples 50 --limit 500
"""

from __future__ import annotations

import argparse
import csv
import fnmatch
import json
import math
import os
import re
import statistics
import time
from pathlib import Path

import torch

from priorvae.data import load_splits
from priorvae.evaluate import paired_difference, save_matched
from priorvae.expost import load_prior_source
from priorvae.likelihoods import prepare_splits
from priorvae.measure import mean_iwae_nlls
from priorvae.runs import Run, file_sha256, resolve_device

CELL = re.compile(r"(?P<prior>[A-Za-z0-9_.+-]+)-seed(?P<seed>\d+)")


def sources_of(metrics: dict) -> list[str]:
    """The run's own prior and each prior source it was evaluated with."""
    return ["trained", *sorted((metrics.get("prior_sources") or {}).keys())]


def score_cell(run: Run, k: int, limit: int, cache: Path) -> dict:
    """Per-image -IWAE_k of each source of ``cell`` on the first ``limit`` test images, one
    decoder pass; cached in ``cache`` under the cell's best.pt digest, K and images."""
    sources = sources_of(run.metrics())
    weights = {s: run.prior_source_files(s)[1] for s in sources if s not in ("trained",
                                                                             "aggregate")}
    key = {"best_sha256": file_sha256(run.checkpoint_path("best")), "iw_samples": k,
           "limit": limit, "sources": sources,
           # an ex-post prior fitted again under its label is another prior: scored again
           "priors_sha256": {s: file_sha256(w) if w.is_file() else None
                             for s, w in weights.items()}}
    if cache.is_file() and not cache.is_symlink():
        old = json.loads(cache.read_text())
        if {name: old.get(name) for name in key} == key:
            return old
    t0 = time.perf_counter()
    with run.lock("matched-grid", exclusive=False):
        dev = resolve_device(run.config.train.device)
        model = run.load_model("best", dev)
        splits = prepare_splits(load_splits(run.config.data, device=dev), model.likelihood)
        x = splits.x_test[:limit]
        priors = [load_prior_source(run, model, source, splits) for source in key["sources"]]
        torch.manual_seed(run.config.train.seed)
        rows: list[torch.Tensor] = []
        mean_iwae_nlls(model, x, k, priors, run.config.eval.batch_size, rows=rows)
    nll = torch.cat(rows, dim=1).double()
    if not torch.isfinite(nll).all():
        raise SystemExit(f"{run.path}: a non-finite per-image NLL; nothing written for it")
    out = {**key, "test_images": len(x), "seconds": round(time.perf_counter() - t0, 1),
           "rows": {source: row.tolist() for source, row in zip(key["sources"], nll,
                                                                 strict=True)}}
    tmp = cache.with_suffix(".tmp")
    tmp.write_text(json.dumps(out))
    os.replace(tmp, cache)
    return out


def seed_mean_stderr(diffs: list[torch.Tensor]) -> float:
    """Standard error over images of the per-image differences averaged over seeds: the
    seeds score the same images, so their differences are not independent."""
    mean = torch.stack(diffs).mean(0)
    return mean.std().item() / len(mean) ** 0.5


def label(prior: str, source: str) -> str:
    return prior if source == "trained" else f"{prior}+{source}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="a compare output folder")
    ap.add_argument("--iw-samples", type=int, default=50)
    ap.add_argument("--limit", type=int, default=500, help="the first N test images")
    ap.add_argument("--reference", default="standard_normal")
    ap.add_argument("--only", nargs="+", metavar="GLOB",
                    help="score only these cells (e.g. two processes on two cores); the table "
                         "then holds the cells scored so far")
    ap.add_argument("--save", action="store_true",
                    help="also record each cell's matched entries in its metrics.json")
    args = ap.parse_args()
    if args.iw_samples < 1 or args.limit < 2:
        raise SystemExit("--iw-samples must be >= 1 and --limit >= 2")
    folder = args.out / "matched"
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        raise SystemExit(f"{folder} is not a plain folder")
    folder.mkdir(exist_ok=True)
    cells = sorted((p for p in args.out.iterdir() if p.is_dir() and not p.is_symlink()
                    and CELL.fullmatch(p.name) and (p / "best.pt").is_file()
                    and (not args.only or any(fnmatch.fnmatch(p.name, g) for g in args.only))),
                   key=lambda p: (int(CELL.fullmatch(p.name)["seed"]), p.name))
    scored: dict[tuple[str, int], dict[str, torch.Tensor]] = {}
    images: set[int] = set()  # the test images scored (fewer than --limit on a small split)
    for cell in cells:
        m = CELL.fullmatch(cell.name)
        run = Run.open(cell)
        if run.metrics().get("test_nll") is None:
            print(f"{cell.name}: not evaluated, skipped", flush=True)
            continue
        res = score_cell(run, args.iw_samples, args.limit, folder / f"{cell.name}.json")
        scored[(m["prior"], int(m["seed"]))] = {s: torch.tensor(r) for s, r in
                                                 res["rows"].items()}
        if args.save and len(res["rows"]) > 1:  # the own prior and at least one source
            with run.lock("matched-grid"):
                labels = list(res["rows"])
                save_matched(run, {}, labels, torch.tensor([res["rows"][s] for s in labels]),
                             args.iw_samples)
        images.add(res["test_images"])
        print(f"{cell.name}: {res['seconds']} s, "
              + ", ".join(f"{s} {torch.tensor(r).mean():.3f}" for s, r in res["rows"].items()),
              flush=True)
    # every (row label) -> per seed (nll, diff vs the same seed's reference, se)
    table: dict[str, dict[int, tuple[float, float, float]]] = {}
    per_image: dict[str, list[torch.Tensor]] = {}  # each seed's per-image differences
    for (prior, seed), rows in scored.items():
        ref = scored.get((args.reference, seed), {}).get("trained")
        for source, row in rows.items():
            d = (row - ref) if ref is not None else None
            if d is not None:
                per_image.setdefault(label(prior, source), []).append(d)
            table.setdefault(label(prior, source), {})[seed] = (
                row.mean().item(), *(paired_difference(row, ref) if ref is not None
                                     else (math.nan, math.nan)))
    # the reference first, then its own sources, then the other priors
    table = dict(sorted(table.items(), key=lambda kv: (
        kv[0] != args.reference, not kv[0].startswith(args.reference + "+"), kv[0])))
    n_images = "/".join(map(str, sorted(images))) or args.limit
    with open(folder / "matched.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["row", "seed", "iw_samples", "test_images", "test_nll",
                    f"diff_vs_{args.reference}", "diff_stderr"])
        for name, seeds in table.items():
            for seed, (nll, diff, se) in sorted(seeds.items()):
                w.writerow([name, seed, args.iw_samples, n_images, f"{nll:.4f}",
                            f"{diff:.4f}", f"{se:.4f}"])
    lines = [f"Test NLL at K = {args.iw_samples} on the first {n_images} test images, every "
             f"row ({args.out.name}); Δ: mean per-image difference from the {args.reference} "
             "VAE of the same seed, mean over seeds; [paired se]: the standard error over images "
             "of the per-image differences averaged over seeds (the seeds share the images); "
             "± the standard deviation over seeds.", "",
             f"| row | seeds | test NLL (K = {args.iw_samples}, {n_images} images) | "
             f"Δ vs {args.reference} [paired se] |", "|---|---|---|---|"]
    for name, seeds in table.items():
        nlls = [nll for nll, _, _ in seeds.values()]
        paired = [(d, se) for _, d, se in seeds.values() if math.isfinite(d)]  # has a reference
        spread = lambda xs: f" ± {statistics.stdev(xs):.2f}" if len(xs) > 1 else ""  # noqa: E731
        diffs = [d for d, _ in paired]
        diff = ("0 (reference)" if name == args.reference else "– (no reference)" if not paired
                else f"{statistics.mean(diffs):+.2f}{spread(diffs)} "
                     f"[{seed_mean_stderr(per_image[name]):.2f}]"
                     + ("" if len(paired) == len(seeds) else f" ({len(paired)} seeds)"))
        lines.append(f"| {name} | {', '.join(str(s) for s in sorted(seeds))} | "
                     f"{statistics.mean(nlls):.2f}{spread(nlls)} | {diff} |")
    (folder / "matched.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
