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

A result that names no ``evaluated_checkpoint`` counts as today's best.pt's only when its
``evaluated_epoch`` is best.pt's epoch (else: skipped, checkpoint unknown).

It reads the cells (shared lock) and writes ``OUT/c2st/c2st.csv`` and ``c2st.md`` (old vs new
per cell and source, and the mean ± standard deviation over seeds per row). With ``--save``
it holds each cell exclusively while its tests are redone and writes the new values (and
their ``_stderr``) into its metrics.json and its ``prior_sources`` entries, with a
``c2st_recomputed`` record of how (the old values under ``replaced``; a second ``--save``
keeps them, so it is idempotent), and draws each redone source's ``figures/hole_scores.png``
(``figures/LABEL/hole_scores.png`` for a prior source) again from its new latent test, so
that the picture agrees with the saved AUC (a skipped source keeps its own); then
``priorvae compare CONFIG --out OUT --report-only`` writes the grid's tables again. A cell
that cannot be read or written is named in one line and left out; the tables hold the others.

    PRIORVAE_DATA=../shared/data OMP_NUM_THREADS=1 python experiments/c2st_grid.py \\
        experiments/results/mnist_remedies_e100 --save
"""

from __future__ import annotations

import argparse
import csv
import fnmatch
import io
import math
import os
import re
import stat
import statistics
import time
from pathlib import Path

import torch

from priorvae.aggregate import encode_split
from priorvae.data import load_splits
from priorvae.datasets import check_same_data
from priorvae.errors import PriorVAEError, RunError
from priorvae.expost import load_prior_source
from priorvae.figures import hole_score_figure
from priorvae.likelihoods import prepare_splits
from priorvae.measure import HELDOUT_CODES, decode_samples
from priorvae.quality import classifier_cache_dir, classifier_digest, features, get_classifier
from priorvae.runs import (
    TRAINED,
    Run,
    atomic_write_bytes,
    check_inside,
    file_sha256,
    resolve_device,
)
from priorvae.twosample import classifier_two_sample

CELL = re.compile(r"(?P<prior>[A-Za-z0-9_.+-]+)-seed(?P<seed>\d+)")
C2ST_KEYS = ("latent_c2st_auc", "latent_c2st_acc", "feature_c2st_auc", "feature_c2st_acc")
VALUE_KEYS = (*C2ST_KEYS, *(f"{k}_stderr" for k in C2ST_KEYS))
RECORD = "c2st_recomputed"
FIGURE = "hole_figure"  # the arguments of its hole_scores.png (not saved in metrics.json)
SPLIT = "random halves"
# diagnostic_points: at least 100 (50 per half: fewer gives AUCs of pure noise), at most ten
# times evaluate's default n_diagnostic (10,000)
MIN_POINTS, MAX_POINTS = 100, 100_000
TABLES = ("c2st.csv", "c2st.md")
KINDS = {stat.S_IFDIR: "a folder", stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket",
         stat.S_IFCHR: "a device", stat.S_IFBLK: "a device"}


def number(value) -> int | float | None:
    """``value`` when it is a finite int or float (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        return value if math.isfinite(float(value)) else None
    except OverflowError:  # an int beyond a float
        return None


def record_of(metrics: dict, label: str) -> dict | None:
    """The saved results of source ``label`` (the run's own: metrics.json itself)."""
    if label == TRAINED:
        return metrics
    sources = metrics.get("prior_sources")
    saved = sources.get(label) if isinstance(sources, dict) else None
    return saved if isinstance(saved, dict) else None


def sources_of(metrics: dict) -> list[str]:
    """The sources evaluated with classifier tests (``latent_c2st_auc`` saved, a number or
    not): the run's own prior and each prior source."""
    sources = metrics.get("prior_sources")
    labels = [TRAINED, *(sorted(sources) if isinstance(sources, dict) else ())]
    return [lb for lb in labels if isinstance(record_of(metrics, lb), dict)
            and "latent_c2st_auc" in record_of(metrics, lb)]


def old_values(record: dict) -> tuple[dict, list[str]]:
    """The values before any recomputation (``c2st_recomputed.replaced`` once saved), each a
    finite number or None, and the keys whose saved value was something else."""
    saved = record.get(RECORD)
    raw = saved["replaced"] if isinstance(saved, dict) and isinstance(
        saved.get("replaced"), dict) else record
    old = {k: number(raw.get(k)) for k in VALUE_KEYS}
    return old, [k for k in VALUE_KEYS if raw.get(k) is not None and old[k] is None]


def stale(record: dict, digest: str, epoch) -> str | None:
    """Why ``record`` is not known to be of today's best.pt (None: it is). Without an
    ``evaluated_checkpoint`` only an ``evaluated_epoch`` equal to best.pt's ties it."""
    if "evaluated_checkpoint" in record and record["evaluated_checkpoint"] != digest:
        return "evaluated with another best.pt"
    recorded = record.get("evaluated_epoch")
    if type(recorded) is int and type(epoch) is int:
        if recorded != epoch:
            return f"evaluated at epoch {recorded}, best.pt is of epoch {epoch}"
    elif "evaluated_checkpoint" not in record:
        return "checkpoint unknown: no evaluated_checkpoint, no evaluated_epoch of best.pt's"
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
           "latent_points": m_two, "block": draws, "z_prior": z_prior}
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


def recompute_cell(run: Run, seed: int) -> tuple[str, dict[str, dict], dict[str, tuple]] | None:
    """best.pt's digest, {source: new values, or {"skipped": why}} and {source: its old values
    and the keys not numbers} of one cell (None: no classifier tests saved). The caller holds
    the run's lock."""
    metrics = run.metrics()
    labels = sources_of(metrics)
    if not labels:
        return None
    out: dict[str, dict] = {}
    olds = {label: old_values(record_of(metrics, label)) for label in labels}
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
    for label in labels:
        record = record_of(metrics, label)
        why = ("no saved latent AUC" if number(record.get("latent_c2st_auc")) is None
               else stale(record, digest, best.get("epoch")))
        n = record.get("diagnostic_points")
        if why is None and (type(n) is not int or not MIN_POINTS <= n <= MAX_POINTS):
            why = (f"diagnostic_points {n!r} not understood (an integer from {MIN_POINTS} to "
                   f"{MAX_POINTS:,} expected)")
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
            result = c2st_of(model, prior, held, mu_te, lv_te, classifier if same else None, n)
        except ValueError as exc:  # too few points for the test
            out[label] = {"skipped": str(exc)}
            continue
        finally:
            model.prior = trained_prior
        new = values_of(result)
        bad = [k for k, v in new.items() if not math.isfinite(v)]
        if bad:
            out[label] = {"skipped": f"non-finite new {', '.join(bad)} (not saved)"}
            continue
        new[RECORD] = {"split": SPLIT, "seed": seed + run.config.train.seed, "points": n,
                       "latent_points": result["latent_points"],
                       "codes_per_image": result["block"],
                       "feature": "recomputed" if same else (
                           f"kept: evaluated with classifier {used}, this machine has "
                           f"{have}" if used is not None and classifier is not None
                           else "no quality classifier"),
                       "script": "experiments/c2st_grid.py",
                       "replaced": olds[label][0]}
        new["seconds"] = round(time.perf_counter() - t0, 1)
        new[FIGURE] = hole_images(model, result)
        out[label] = new
    return digest, out, olds


@torch.no_grad()
def hole_images(model, result: dict) -> tuple:
    """``figures.hole_score_figure``'s arguments after the title, as ``measure._diagnose`` and
    ``evaluate.write_figures`` make them: the decoded prior samples of the 32 lowest and the 32
    highest hole scores of the latent test, its AUC and its held-out (p, q) points."""
    c2st, m_two = result["latent"], result["latent_points"]
    order = c2st["hole_score"].argsort()
    picks = [(decode_samples(model, result["z_prior"][c2st["p_index"][idx]]),
              c2st["hole_score"][idx].cpu()) for idx in (order[:32], order[-32:].flip(0))]
    return (*picks[0], *picks[1], c2st["auc"], (len(c2st["hole_score"]), m_two - m_two // 2))


def save_cell(run: Run, digest: str, results: dict[str, dict]) -> None:
    """Write the new values into metrics.json and redraw each redone source's
    ``hole_scores.png`` from its new test, as evaluate does (the caller holds the run's
    exclusive lock; refused when best.pt changed since they were computed)."""
    import matplotlib.pyplot as plt  # after priorvae.figures: its Agg backend

    if file_sha256(run.checkpoint_path("best")) != digest:
        raise RunError(f"{run.path}: best.pt changed while its tests ran; nothing saved")
    metrics = run.metrics()
    own: dict = {}
    sources = metrics.get("prior_sources")
    for label, new in results.items():
        if "skipped" in new:
            continue
        values = {k: v for k, v in new.items() if k not in ("seconds", FIGURE)}
        if label == TRAINED:
            own = values
        elif isinstance(sources, dict) and isinstance(sources.get(label), dict):
            sources[label].update(values)
    run.update_metrics(**own, **({"prior_sources": sources}
                                 if isinstance(sources, dict) else {}))
    title = f"{run.config.prior.name.rpartition(':')[2]} ({run.config.data.name})"
    for label, new in results.items():  # evaluate._figures_and_tensorboard's titles and folders
        if "skipped" not in new:
            fig = hole_score_figure(*new[FIGURE][:5], title if label == TRAINED
                                    else f"{title}, prior: {label}", new[FIGURE][5])
            run.save_figure(f"figures/{'' if label == TRAINED else label + '/'}hole_scores.png",
                            fig)
            plt.close(fig)


def row_label(prior: str, source: str) -> str:
    return prior if source == TRAINED else f"{prior}+{source}"


def fmt(value, digits: int = 4) -> str:
    value = number(value)
    return "–" if value is None else f"{value:.{digits}f}"


def fmt_old(row: dict, key: str) -> str:
    return "(not a number)" if key in row["bad"] else fmt(row["old"][key])


def spread(values: list) -> str:
    values = [v for v in map(number, values) if v is not None]
    if not values:
        return "–"
    mean = statistics.mean(values)
    return f"{mean:.3f}" + (f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else "")


def check_tables(out: Path) -> Path:
    """``OUT/c2st``, made if need be, and checked: a plain folder we may write in, whose
    c2st.csv and c2st.md are regular files or links (replaced, never followed) where they
    exist. Anything else: one line."""
    try:
        folder = check_inside(out, "c2st", kind="dir")
        folder.mkdir(exist_ok=True)
        check_inside(out, "c2st", kind="dir")  # made meanwhile by another process?
    except RunError as exc:
        raise SystemExit(str(exc)) from None
    except OSError as exc:
        raise SystemExit(f"cannot make {folder}: {exc.strerror or exc}") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise SystemExit(f"cannot write in {folder} (permission denied)")
    for name in TABLES:
        try:
            mode = os.lstat(folder / name).st_mode
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise SystemExit(f"cannot read {folder / name}: {exc.strerror or exc}") from None
        if not (stat.S_ISREG(mode) or stat.S_ISLNK(mode)):
            raise SystemExit(f"{folder / name} is {KINDS.get(stat.S_IFMT(mode), 'not a file')}, "
                             f"not a regular file; remove it")
    return folder


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
    try:
        entries = sorted(p for p in args.out.iterdir() if CELL.fullmatch(p.name) and (
            not args.only or any(fnmatch.fnmatch(p.name, g) for g in args.only)))
    except OSError as exc:
        raise SystemExit(f"cannot read {args.out}: {exc.strerror or exc}") from None
    for p in entries:
        if p.is_symlink():
            print(f"{p.name}: a symbolic link, ignored (a cell is a folder of the grid)",
                  flush=True)
    cells = sorted((p for p in entries if p.is_dir() and not p.is_symlink()
                    and os.path.lexists(p / "best.pt")),
                   key=lambda p: (CELL.fullmatch(p.name)["prior"],
                                  int(CELL.fullmatch(p.name)["seed"])))
    if not cells:
        raise SystemExit(f"{args.out} holds no cell with a best.pt (PRIOR-seedN/)")
    folder = check_tables(args.out)
    rows, failed = [], []
    t_all = time.perf_counter()
    for cell in cells:
        m = CELL.fullmatch(cell.name)
        t0 = time.perf_counter()
        try:  # a cell is hostile input: anything wrong with it is one line, and the next
            run = Run.open(cell)
            with run.lock("c2st-grid", exclusive=args.save):  # --save: writable, not in use
                done = recompute_cell(run, args.seed)
                if done is not None and args.save:
                    save_cell(run, done[0], done[1])
        except PriorVAEError as exc:
            print(f"{cell.name}: {exc}; skipped", flush=True)
            failed.append(cell.name)
            continue
        except OSError as exc:
            print(f"{cell.name}: {exc.strerror or exc} ({exc.filename or cell}); skipped",
                  flush=True)
            failed.append(cell.name)
            continue
        if done is None:
            print(f"{cell.name}: no classifier tests saved (not evaluated), skipped", flush=True)
            continue
        _, results, olds = done
        for label, new in results.items():
            old, bad = olds[label]
            rows.append({"cell": cell.name, "row": row_label(m["prior"], label),
                         "seed": int(m["seed"]), "source": label, "old": old, "bad": bad,
                         "new": new})
            note = (f" (old {', '.join(bad)} not a number: taken as none)" if bad else "")
            if "skipped" in new:
                print(f"{cell.name} {label}: skipped ({new['skipped']}){note}", flush=True)
                continue
            print(f"{cell.name} {label}: latent AUC {fmt(old['latent_c2st_auc'])} -> "
                  f"{fmt(new['latent_c2st_auc'])} (se {fmt(new['latent_c2st_auc_stderr'])}), "
                  f"feature AUC {fmt(old['feature_c2st_auc'])} -> "
                  f"{fmt(new.get('feature_c2st_auc'))}"
                  + ("" if "feature_c2st_auc" in new else f" ({new[RECORD]['feature']})")
                  + f"; {new['seconds']} s{note}", flush=True)
        print(f"{cell.name}: {time.perf_counter() - t0:.0f} s"
              + (", saved" if args.save else ""), flush=True)
    try:
        write_tables(folder, args.out.name, rows, args.save, time.perf_counter() - t_all)
    except PriorVAEError as exc:
        raise SystemExit(str(exc)) from None
    if failed:
        raise SystemExit(f"{len(failed)} of {len(cells)} cells not done (named above): "
                         + ", ".join(failed))


def write_tables(folder: Path, grid: str, rows: list[dict], saved: bool, seconds: float) -> None:
    """c2st.csv and c2st.md, each written to a temporary file beside it and renamed over it
    (a link planted there is replaced, never followed)."""
    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow(["cell", "row", "seed", "source", "points", "skipped",
                *(f"old_{k}" for k in VALUE_KEYS), *(f"new_{k}" for k in VALUE_KEYS)])
    for r in rows:
        new, old = r["new"], r["old"]
        w.writerow([r["cell"], r["row"], r["seed"], r["source"],
                    new.get(RECORD, {}).get("points", ""), new.get("skipped", ""),
                    *("" if old.get(k) is None else old[k] for k in VALUE_KEYS),
                    *("" if new.get(k) is None else new[k] for k in VALUE_KEYS)])
    lines = [f"Classifier two-sample tests of {grid} again, with seeded random halves "
             f"(experiments/c2st_grid.py; {'saved into metrics.json' if saved else 'not saved'}"
             f"; {seconds / 60:.1f} min). Old: the evaluation's values (first and second "
             "halves); new: fresh draws, [se] Hanley-McNeil. A new value differs from a full "
             "re-evaluation's by Monte-Carlo noise (about its se).", "",
             "| cell | source | latent AUC old | latent AUC new [se] | latent acc old → new "
             "| feature AUC old | feature AUC new [se] | feature acc old → new |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        new = r["new"]
        if "skipped" in new:
            lines.append(f"| {r['cell']} | {r['source']} | {fmt_old(r, 'latent_c2st_auc')} | "
                         f"skipped: {new['skipped']} | | | | |")
            continue
        feat = ("kept" if "feature_c2st_auc" not in new else
                f"{fmt(new['feature_c2st_auc'])} [{fmt(new['feature_c2st_auc_stderr'])}]")
        lines.append(
            f"| {r['cell']} | {r['source']} | {fmt_old(r, 'latent_c2st_auc')} | "
            f"{fmt(new['latent_c2st_auc'])} [{fmt(new['latent_c2st_auc_stderr'])}] | "
            f"{fmt_old(r, 'latent_c2st_acc')} → {fmt(new['latent_c2st_acc'])} | "
            f"{fmt_old(r, 'feature_c2st_auc')} | {feat} | {fmt_old(r, 'feature_c2st_acc')} → "
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
        lines.append(f"| {name} | {', '.join(str(r['seed']) for r in done)} | "
                     f"{spread([r['old']['latent_c2st_auc'] for r in done])} | "
                     f"{spread([r['new']['latent_c2st_auc'] for r in done])} | "
                     f"{spread([r['old']['feature_c2st_auc'] for r in feat])} | "
                     f"{spread([r['new']['feature_c2st_auc'] for r in feat])}"
                     + (f" ({', '.join(str(r['seed']) for r in feat)})"
                        if feat and len(feat) != len(done) else "") + " |")
    check_tables(folder.parent)  # again: the entries may have changed while the cells ran
    atomic_write_bytes(folder / "c2st.csv", buf.getvalue().encode())
    atomic_write_bytes(folder / "c2st.md", ("\n".join(lines) + "\n").encode())
    print("\n".join(lines))


if __name__ == "__main__":
    main()
