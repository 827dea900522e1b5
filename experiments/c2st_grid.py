"""A compare grid's classifier two-sample tests again, with today's random halves.

Commit 78f52a0 changed ``twosample.classifier_two_sample``: it trained on the first half of
each point set and scored the second, and MNIST's test set is not in random order (its first
5,000 images are NIST SD-3, its last 5,000 SD-1), so that split biased the AUC (the N(0, I)
prior of the full protocol at 0.48 instead of 0.58); it now uses seeded random halves. Every
evaluation written before holds the old ``latent_c2st_*`` and ``feature_c2st_*`` values. A
full re-evaluation costs hours per grid; this script redoes only the classifier tests.

For every evaluated cell of ``OUT`` and every prior source it was evaluated with (the VAE's
own prior and each ``prior_sources`` entry: ex-post priors, q(z)), as ``measure._diagnose``
does them:

- latent: ``diagnostic_points`` (metrics.json) prior samples against one posterior draw of
  each held-out test image (several draws per image, kept on one side of the halves, where
  the test split is smaller than ``measure.HELDOUT_CODES``);
- feature: the quality classifier's features of the prior samples decoded as the likelihood
  says (``feature_draws``) against the held-out images, with the classifier the cell was
  evaluated with (metrics.json ``quality_classifier``; a source evaluated with another
  classifier than the one this machine has keeps its feature values and is named so).

The draws are fresh (``torch.manual_seed`` of ``--seed`` plus the run's seed, for each cell
and source, so that a second call gives the same numbers), not the evaluation's: a new value
differs from what a full re-evaluation would give by Monte-Carlo noise, about its standard
error (Hanley-McNeil, ``*_stderr``), and the old and new values differ by that noise as well
as by the split. Results of another best.pt than today's are left alone (skipped).

It reads the cells (shared lock) and writes ``OUT/c2st/c2st.csv`` and ``c2st.md`` (old vs new
per cell and source, and the mean ± standard deviation over seeds per row). With ``--save``
it also writes the new values (and their ``_stderr``) into each cell's metrics.json and its
``prior_sources`` entries (exclusive lock), with a ``c2st_recomputed`` record of how (the old
values under ``replaced``; a second ``--save`` keeps them, so it is idempotent); then
``priorvae compare CONFIG --out OUT --report-only`` writes the grid's tables again.

    PRIORVAE_DATA=../shared/data OMP_NUM_THREADS=1 python experiments/c2st_grid.py \\
        experiments/results/mnist_remedies_e100 --save
"""

from __future__ import annotations

import argparse
import csv
import fnmatch
import math
import re
import statistics
import time
from pathlib import Path

import torch

from priorvae.aggregate import encode_split
from priorvae.data import load_splits
from priorvae.datasets import check_same_data
from priorvae.errors import PriorVAEError
from priorvae.expost import load_prior_source
from priorvae.likelihoods import prepare_splits
from priorvae.measure import HELDOUT_CODES, decode_samples
from priorvae.quality import classifier_cache_dir, classifier_digest, features, get_classifier
from priorvae.runs import TRAINED, Run, file_sha256, resolve_device
from priorvae.twosample import classifier_two_sample

CELL = re.compile(r"(?P<prior>[A-Za-z0-9_.+-]+)-seed(?P<seed>\d+)")
C2ST_KEYS = ("latent_c2st_auc", "latent_c2st_acc", "feature_c2st_auc", "feature_c2st_acc")
RECORD = "c2st_recomputed"
SPLIT = "random halves"


def record_of(metrics: dict, label: str) -> dict | None:
    """The saved results of source ``label`` (the run's own: metrics.json itself)."""
    if label == TRAINED:
        return metrics
    sources = metrics.get("prior_sources")
    saved = sources.get(label) if isinstance(sources, dict) else None
    return saved if isinstance(saved, dict) else None


def sources_of(metrics: dict) -> list[str]:
    """The sources with saved classifier tests: the run's own prior and each prior source."""
    sources = metrics.get("prior_sources")
    labels = [TRAINED, *(sorted(sources) if isinstance(sources, dict) else ())]
    return [lb for lb in labels if isinstance(record_of(metrics, lb), dict)
            and record_of(metrics, lb).get("latent_c2st_auc") is not None]


def old_values(record: dict) -> dict:
    """The values before any recomputation: ``c2st_recomputed.replaced`` once saved."""
    saved = record.get(RECORD)
    if isinstance(saved, dict) and isinstance(saved.get("replaced"), dict):
        return saved["replaced"]
    return {k: record.get(k) for k in (*C2ST_KEYS, *(f"{k}_stderr" for k in C2ST_KEYS))}


def stale(record: dict, digest: str, epoch) -> str | None:
    """Why ``record`` is not of today's best.pt (None: it is, or it does not say)."""
    if "evaluated_checkpoint" in record and record["evaluated_checkpoint"] != digest:
        return "evaluated with another best.pt"
    recorded = record.get("evaluated_epoch")
    if type(recorded) is int and type(epoch) is int and recorded != epoch:
        return f"evaluated at epoch {recorded}, best.pt is of epoch {epoch}"
    return None


@torch.no_grad()
def c2st_of(model, prior, held: torch.Tensor, mu_te, lv_te, classifier, n: int) -> dict:
    """The classifier tests of ``prior`` as ``measure._diagnose`` computes them (fresh draws
    from the current random state)."""
    draws = max(1, min(n, HELDOUT_CODES) // len(held))
    mu_codes, lv_codes = ((mu_te, lv_te) if draws == 1 else
                          (mu_te.repeat_interleave(draws, 0), lv_te.repeat_interleave(draws, 0)))
    model.prior = prior
    with prior.frozen():
        z_prior = prior.sample(n)
    m_two = min(n, len(mu_codes))
    z_held = mu_codes[:m_two] + torch.exp(0.5 * lv_codes[:m_two]) * torch.randn_like(
        mu_codes[:m_two])
    out = {"latent": classifier_two_sample(z_prior[:m_two], z_held, q_block=draws),
           "latent_points": m_two, "block": draws}
    if classifier is not None:
        k = min(n, len(held))
        f_ref, _ = features(classifier, held[:k])
        f_prior, _ = features(classifier, decode_samples(model, z_prior[:k],
                                                         model.likelihood.feature_draws))
        out["feature"], out["feature_points"] = classifier_two_sample(f_prior, f_ref), k
    return out


def values_of(result: dict) -> dict:
    out = {}
    for space in ("latent", "feature"):
        if space in result:
            c = result[space]
            out.update({f"{space}_c2st_auc": c["auc"], f"{space}_c2st_acc": c["accuracy"],
                        f"{space}_c2st_auc_stderr": c["auc_stderr"],
                        f"{space}_c2st_acc_stderr": c["accuracy_stderr"]})
    return out


def recompute_cell(run: Run, seed: int) -> tuple[str, dict[str, dict]]:
    """best.pt's digest and {source: new values, or {"skipped": why}} of one cell."""
    out: dict[str, dict] = {}
    with run.lock("c2st-grid", exclusive=False):
        metrics = run.metrics()
        dev = resolve_device(run.config.train.device)
        best = run.load_checkpoint("best", dev)
        digest = file_sha256(run.checkpoint_path("best"))
        model = run.load_model("best", dev, best)
        splits = load_splits(run.config.data, device=dev)
        check_same_data(best.get("data_sha256"), splits.digest(), run.checkpoint_path("best"))
        splits = prepare_splits(splits, model.likelihood)
        classifier = get_classifier(splits, classifier_cache_dir(), likelihood=model.likelihood)
        have = classifier_digest(classifier) if classifier is not None else None
        held = splits.x_test
        mu_te, lv_te = encode_split(model.encoder, held)
        trained_prior = model.prior
        for label in sources_of(metrics):
            record = record_of(metrics, label)
            why = stale(record, digest, best.get("epoch"))
            n = record.get("diagnostic_points")
            if why is None and (type(n) is not int or n < 4):
                why = f"diagnostic_points {n!r} not understood"
            if why is not None:
                out[label] = {"skipped": why}
                continue
            try:
                prior = load_prior_source(run, model, label, splits)
            except PriorVAEError as exc:
                out[label] = {"skipped": str(exc)}
                continue
            used = record.get("quality_classifier")
            same = classifier is not None and used == have
            t0 = time.perf_counter()
            torch.manual_seed(seed + run.config.train.seed)
            try:
                result = c2st_of(model, prior, held, mu_te, lv_te, classifier if same else None,
                                 n)
            finally:
                model.prior = trained_prior
            new = values_of(result)
            new[RECORD] = {"split": SPLIT, "seed": seed + run.config.train.seed, "points": n,
                           "latent_points": result["latent_points"],
                           "codes_per_image": result["block"],
                           "feature": "recomputed" if same else (
                               f"kept: evaluated with classifier {used}, this machine has "
                               f"{have}" if used is not None and classifier is not None
                               else "no quality classifier"),
                           "script": "experiments/c2st_grid.py",
                           "replaced": old_values(record)}
            new["seconds"] = round(time.perf_counter() - t0, 1)
            out[label] = new
    return digest, out


def save_cell(run: Run, digest: str, results: dict[str, dict]) -> None:
    """Write the new values into metrics.json under the run's lock (refused when best.pt
    changed since they were computed)."""
    with run.lock("c2st-grid"):
        if file_sha256(run.checkpoint_path("best")) != digest:
            raise SystemExit(f"{run.path}: best.pt changed while its tests ran; nothing saved")
        metrics = run.metrics()
        own: dict = {}
        sources = metrics.get("prior_sources")
        for label, new in results.items():
            if "skipped" in new:
                continue
            values = {k: v for k, v in new.items() if k != "seconds"}
            if label == TRAINED:
                own = values
            elif isinstance(sources, dict) and isinstance(sources.get(label), dict):
                sources[label].update(values)
        run.update_metrics(**own, **({"prior_sources": sources}
                                     if isinstance(sources, dict) else {}))


def row_label(prior: str, source: str) -> str:
    return prior if source == TRAINED else f"{prior}+{source}"


def fmt(value, digits: int = 4) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def spread(values: list[float]) -> str:
    if not values:
        return "–"
    mean = statistics.mean(values)
    return f"{mean:.3f}" + (f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="a compare output folder")
    ap.add_argument("--seed", type=int, default=0,
                    help="added to each run's seed for its draws (default 0)")
    ap.add_argument("--only", nargs="+", metavar="GLOB", help="only these cells")
    ap.add_argument("--save", action="store_true",
                    help="write the new values into each cell's metrics.json")
    args = ap.parse_args()
    if not args.out.is_dir() or args.out.is_symlink():
        raise SystemExit(f"{args.out} is not a compare output folder")
    if args.seed < 0:
        raise SystemExit(f"--seed must be >= 0, got {args.seed}")
    folder = args.out / "c2st"
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        raise SystemExit(f"{folder} is not a plain folder")
    cells = sorted((p for p in args.out.iterdir() if p.is_dir() and not p.is_symlink()
                    and CELL.fullmatch(p.name) and (p / "best.pt").is_file()
                    and (not args.only or any(fnmatch.fnmatch(p.name, g) for g in args.only))),
                   key=lambda p: (CELL.fullmatch(p.name)["prior"],
                                  int(CELL.fullmatch(p.name)["seed"])))
    if not cells:
        raise SystemExit(f"{args.out} holds no cell with a best.pt (PRIOR-seedN/)")
    folder.mkdir(exist_ok=True)
    rows = []
    t_all = time.perf_counter()
    for cell in cells:
        m = CELL.fullmatch(cell.name)
        run = Run.open(cell)
        metrics = run.metrics()
        if not sources_of(metrics):
            print(f"{cell.name}: no classifier tests saved (not evaluated), skipped", flush=True)
            continue
        t0 = time.perf_counter()
        try:
            digest, results = recompute_cell(run, args.seed)
        except PriorVAEError as exc:  # its data, checkpoint or classifier: one line
            raise SystemExit(f"{cell.name}: {exc}") from None
        if args.save:
            save_cell(run, digest, results)
        for label, new in results.items():
            old = old_values(record_of(metrics, label))
            rows.append({"cell": cell.name, "row": row_label(m["prior"], label),
                         "seed": int(m["seed"]), "source": label, "old": old, "new": new})
            if "skipped" in new:
                print(f"{cell.name} {label}: skipped ({new['skipped']})", flush=True)
                continue
            print(f"{cell.name} {label}: latent AUC {fmt(old['latent_c2st_auc'])} -> "
                  f"{fmt(new['latent_c2st_auc'])} (se {fmt(new['latent_c2st_auc_stderr'])}), "
                  f"feature AUC {fmt(old['feature_c2st_auc'])} -> "
                  f"{fmt(new.get('feature_c2st_auc'))}"
                  + ("" if "feature_c2st_auc" in new else f" ({new[RECORD]['feature']})")
                  + f"; {new['seconds']} s", flush=True)
        print(f"{cell.name}: {time.perf_counter() - t0:.0f} s"
              + (", saved" if args.save else ""), flush=True)
    write_tables(folder, args.out.name, rows, args.save, time.perf_counter() - t_all)


def write_tables(folder: Path, grid: str, rows: list[dict], saved: bool, seconds: float) -> None:
    keys = [*C2ST_KEYS, *(f"{k}_stderr" for k in C2ST_KEYS)]
    with open(folder / "c2st.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["cell", "row", "seed", "source", "points", "skipped",
                    *(f"old_{k}" for k in keys), *(f"new_{k}" for k in keys)])
        for r in rows:
            new, old = r["new"], r["old"]
            w.writerow([r["cell"], r["row"], r["seed"], r["source"],
                        new.get(RECORD, {}).get("points", ""), new.get("skipped", ""),
                        *("" if old.get(k) is None else old[k] for k in keys),
                        *("" if new.get(k) is None else new[k] for k in keys)])
    lines = [f"Classifier two-sample tests of {grid} again, with seeded random halves "
             f"(experiments/c2st_grid.py; {'saved into metrics.json' if saved else 'not saved'}"
             f"; {seconds / 60:.1f} min). Old: the evaluation's values (first and second "
             "halves); new: fresh draws, [se] Hanley-McNeil. A new value differs from a full "
             "re-evaluation's by Monte-Carlo noise (about its se).", "",
             "| cell | source | latent AUC old | latent AUC new [se] | latent acc old → new "
             "| feature AUC old | feature AUC new [se] | feature acc old → new |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        new, old = r["new"], r["old"]
        if "skipped" in new:
            lines.append(f"| {r['cell']} | {r['source']} | {fmt(old['latent_c2st_auc'])} | "
                         f"skipped: {new['skipped']} | | | | |")
            continue
        feat = ("kept" if "feature_c2st_auc" not in new else
                f"{fmt(new['feature_c2st_auc'])} [{fmt(new['feature_c2st_auc_stderr'])}]")
        lines.append(
            f"| {r['cell']} | {r['source']} | {fmt(old['latent_c2st_auc'])} | "
            f"{fmt(new['latent_c2st_auc'])} [{fmt(new['latent_c2st_auc_stderr'])}] | "
            f"{fmt(old['latent_c2st_acc'])} → {fmt(new['latent_c2st_acc'])} | "
            f"{fmt(old['feature_c2st_auc'])} | {feat} | {fmt(old['feature_c2st_acc'])} → "
            f"{fmt(new.get('feature_c2st_acc'))} |")
    lines += ["", "Per row, mean ± standard deviation over seeds (every seed recomputed; "
              "feature: the seeds whose classifier was available):", "",
              "| row | seeds | latent AUC old | latent AUC new | feature AUC old | "
              "feature AUC new |", "|---|---|---|---|---|---|"]
    by_row: dict[str, list[dict]] = {}
    for r in rows:
        by_row.setdefault(r["row"], []).append(r)
    for name, group in by_row.items():
        done = [r for r in group if "skipped" not in r["new"]]
        feat = [r for r in done if "feature_c2st_auc" in r["new"]]
        old_l = [r["old"]["latent_c2st_auc"] for r in done
                 if r["old"].get("latent_c2st_auc") is not None]
        old_f = [r["old"]["feature_c2st_auc"] for r in feat
                 if r["old"].get("feature_c2st_auc") is not None]
        lines.append(f"| {name} | {', '.join(str(r['seed']) for r in done)} | {spread(old_l)} | "
                     f"{spread([r['new']['latent_c2st_auc'] for r in done])} | {spread(old_f)} | "
                     f"{spread([r['new']['feature_c2st_auc'] for r in feat])}"
                     + (f" ({', '.join(str(r['seed']) for r in feat)})"
                        if len(feat) != len(done) else "") + " |")
    (folder / "c2st.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    bad = [r for r in rows if "skipped" not in r["new"]
           and not math.isfinite(r["new"]["latent_c2st_auc"])]
    if bad:
        raise SystemExit(f"non-finite AUC in {bad[0]['cell']} {bad[0]['source']}")


if __name__ == "__main__":
    main()
