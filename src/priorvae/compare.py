"""Comparison experiments: a grid of runs (priors x seeds [x latent sizes]) from one config.

The config's ``[compare]`` table (ignored by ``train``) declares the grid::

    [compare]
    priors = ["standard_normal", "mog", "vampprior", "flow"]
    seeds = [0, 1]
    latent_dims = [2, 8]          # optional
    [compare.prior_seeds]         # optional: other seeds for some priors
    vampprior = [0, 1, 2]
    expost = ["mog", "flow"]      # optional: ex-post priors fitted to each run (+ "aggregate")
    expost_on = ["standard_normal"]  # optional: only these priors' runs get them (default all)
    [compare.args.mog]            # optional: arguments for one prior of the grid
    n_components = 20

Every run shares the ``[data] [model] [train] [eval]`` tables and lives in its own folder under
the experiment folder; finished and evaluated runs are skipped, so an interrupted comparison
resumes where it stopped. Cells run seed by seed (every prior's first seed, then every prior's
second...), so a comparison stopped halfway has the same seeds for every prior. A cell that
another process holds (a second ``compare`` on the same folder, a ``train`` or ``evaluate``) is
skipped, so two processes can share one grid; the tables are read from every cell's
metrics.json at the end and name the cells that are not finished. At the end: ``results.csv``
(one row per run), ``results.md`` (mean ± std over seeds) and ``comparison.png`` (sample grids
per table row, key metrics as bars with error bars where a row has two or more seeds).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from .config import Config, PriorConfig, load_config, pin_plugins, validate
from .errors import ConfigError, PriorVAEError, RunBusyError, RunError
from .measure import DIAGNOSTIC_KEYS, STDERR_KEYS
from .metrics_schema import HEADLINE_KEYS, metric
from .priors import PRIORS, pin_prior_spec
from .runs import (
    AGGREGATE,
    EXPOST_PREFIX,
    FINISHED,
    TRAINED,
    Run,
    atomic_write_bytes,
    check_inside,
)
from .sanity import warn
from .stop import check_stop

__all__ = ["grid", "execution_order", "check_grid", "run_compare", "write_results",
           "unmatched_evaluations", "RESULT_COLUMNS"]

# the matched comparison (evaluate's ``matched`` record): NLL at the common (K, images) of the
# sources of one VAE, and the paired difference from its own prior with its standard error
MATCHED_COLUMNS = ["matched_nll", "matched_diff", "matched_diff_stderr", "matched_iw_samples",
                   "matched_test_images"]
TRUNCATION_WARNING = 0.05  # as evaluate: a LARS prior whose samples skip the filter this often
RESULT_COLUMNS = ["prior", "seed", "latent_dim", "test_elbo", "test_nll", "test_bits_per_dim",
                  *(k for k in DIAGNOSTIC_KEYS if k != "class_entropy_aggregate"),
                  "train_seconds", "fit_seconds", "epochs_trained", "device", "iw_samples",
                  "test_images",
                  "log_normalizer_stderr", "evaluation_fallback", "quality_classifier",
                  "truncation_share", "fit_improved", *MATCHED_COLUMNS,
                  *(f"{k}_stderr" for k in STDERR_KEYS)]
_COMPARE_KEYS = {"priors", "seeds", "prior_seeds", "latent_dims", "args", "expost", "expost_on"}


def _unique_list(key: str, value, kind: str, low: int | None = None) -> list:
    ok = isinstance(value, list) and value and all(
        (isinstance(v, str) and v.strip()) if kind == "str" else
        (isinstance(v, int) and not isinstance(v, bool) and (low is None or v >= low))
        for v in value)
    what = ("names" if kind == "str" else f"integers >= {low}")
    if not ok:
        raise ConfigError(f"[compare] {key} must be a non-empty list of {what}, got {value!r}")
    if len(set(value)) != len(value):
        raise ConfigError(f"[compare] {key} lists a value twice: {value!r}")
    return value


def grid(cfg: Config) -> list[tuple[str, Config]]:
    """(run name, config) for every cell of the ``[compare]`` grid, every value checked, in
    table order (prior, latent size, seed)."""
    spec = cfg.extra.get("compare")
    if not spec:
        raise ConfigError("the config has no [compare] table; add e.g.\n[compare]\n"
                          'priors = ["standard_normal", "mog"]\nseeds = [0, 1]')
    unknown = set(spec) - _COMPARE_KEYS
    if unknown:
        raise ConfigError(f"unknown key(s) {sorted(unknown)} in [compare]; valid keys: "
                          f"{', '.join(sorted(_COMPARE_KEYS))}")
    priors = _unique_list("priors", spec.get("priors", [cfg.prior.name]), "str")
    seeds = _unique_list("seeds", spec.get("seeds", [cfg.train.seed]), "int", 0)
    dims = spec.get("latent_dims")
    if dims is not None:
        _unique_list("latent_dims", dims, "int", 1)
    args = spec.get("args", {})
    if not isinstance(args, dict) or not all(isinstance(v, dict) for v in args.values()):
        raise ConfigError("[compare.args.PRIOR] must be tables of a prior's arguments")
    shorts = {p.rpartition(":")[2] for p in priors} | set(priors)
    stray = [k for k in args if k not in shorts]
    if stray:
        raise ConfigError(f"[compare.args.{stray[0]}] names a prior that is not in [compare] "
                          f"priors ({', '.join(priors)})")
    prior_seeds = spec.get("prior_seeds", {})
    if not isinstance(prior_seeds, dict):
        raise ConfigError("[compare.prior_seeds] must be a table of PRIOR = [seeds], e.g. "
                          "vampprior = [0, 1, 2]")
    stray = [k for k in prior_seeds if k not in shorts]
    if stray:
        raise ConfigError(f"[compare.prior_seeds] names {stray[0]!r}, which is not in "
                          f"[compare] priors ({', '.join(priors)})")
    for key, value in prior_seeds.items():
        _unique_list(f"prior_seeds.{key}", value, "int", 0)
    runs = []
    for prior in priors:
        short = prior.rpartition(":")[2]
        kwargs = dict(args.get(prior, args.get(short, cfg.prior.kwargs
                                                if prior == cfg.prior.name else {})))
        pinned, sha, kwargs = PRIORS.pin(prior, kwargs)  # the user's choice: recorded
        own_seeds = prior_seeds.get(prior, prior_seeds.get(short, seeds))
        for dim in dims or [cfg.model.latent_dim]:
            for seed in own_seeds:
                run_cfg = replace(cfg, prior=PriorConfig(pinned, kwargs, sha),
                                  model=replace(cfg.model, latent_dim=dim),
                                  train=replace(cfg.train, seed=seed), extra={})
                name = f"{short}-d{dim}-seed{seed}" if dims else f"{short}-seed{seed}"
                try:
                    validate(run_cfg)
                except ConfigError as exc:
                    raise ConfigError(f"grid cell {name}: {exc}") from None
                runs.append((name, run_cfg))
    return runs


def execution_order(runs: list[tuple[str, Config]]) -> list[tuple[str, Config]]:
    """The grid's cells seed by seed (stable: priors and sizes keep their order within a
    seed), so that stopping early leaves every prior with the same seeds."""
    rank: dict[int, int] = {}
    for _, cfg in runs:
        rank.setdefault(cfg.train.seed, len(rank))
    return sorted(runs, key=lambda run: rank[run[1].train.seed])


def _expost_plan(cfg: Config, runs: list[tuple[str, Config]]) -> tuple[list[str], set | None]:
    spec = cfg.extra["compare"]
    expost = spec.get("expost", [])
    if expost:
        _unique_list("expost", expost, "str")
    expost_on = spec.get("expost_on")
    if expost_on is not None:
        _unique_list("expost_on", expost_on, "str")
        names = {c.prior.name for _, c in runs} | {c.prior.name.rpartition(":")[2]
                                                   for _, c in runs}
        missing = [p for p in expost_on if p not in names]
        if missing:
            raise ConfigError(f"[compare] expost_on names {missing[0]!r}, which is not in "
                              f"[compare] priors")
        expost_on = {pin_prior_spec(p)[0] for p in expost_on}
    return expost, expost_on


def check_grid(runs: list[tuple[str, Config]], expost: list[str]) -> None:
    """Build every cell's networks and prior (and every ex-post prior) once, so that a bad
    argument anywhere in the grid is refused before the first run starts."""
    from .data import input_shape, load_splits
    from .registry import PriorContext, build_prior, get_prior_class
    from .train import check_joint
    from .vae import build_vae

    checked_dims = set()  # an ex-post prior depends on the latent size alone: build it once
    train_images = {}  # priors made of training images are checked on the real ones

    def data_for(name, sha, run_cfg, shape):
        if not get_prior_class(name, sha).needs_data:
            return torch.zeros(1, *shape)
        key = repr(run_cfg.data)
        if key not in train_images:
            train_images[key] = load_splits(run_cfg.data).x_train
        return train_images[key]

    for name, run_cfg in runs:
        try:
            check_joint(run_cfg)
            shape = input_shape(run_cfg.data)
            pc = run_cfg.prior
            model = build_vae(run_cfg, shape, data=data_for(pc.name, pc.file_sha256, run_cfg,
                                                            shape))
            dim = run_cfg.model.latent_dim
            for label in expost if dim not in checked_dims else []:
                if label != AGGREGATE:
                    pinned, sha = pin_prior_spec(label)
                    ctx = PriorContext(encoder=model.encoder, input_shape=shape,
                                       data=data_for(pinned, sha, run_cfg, shape),
                                       likelihood=model.likelihood)
                    build_prior(pinned, latent_dim=dim, context=ctx, file_sha256=sha)
            checked_dims.add(dim)
        except PriorVAEError as exc:
            raise ConfigError(f"grid cell {name}: {exc}") from None


_TEXT_COLUMNS = ("device", "evaluation_fallback", "quality_classifier")


def _cell_value(col: str, value: Any) -> Any:
    """A metrics.json value as the tables take it: a finite number (text in the text columns,
    true/false in ``fit_improved``); anything else None. metrics.json is data: a crafted or
    damaged one (a string, a list, 1e999) must not end the tables in a traceback."""
    if value is None:
        return None
    if col in _TEXT_COLUMNS:
        return value if isinstance(value, str) and len(value) <= 1000 else None
    if col == "fit_improved":
        return value if isinstance(value, bool) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            not math.isfinite(value):
        return None
    return value


def _row(name: str, cfg: Config, metrics: dict, source: str = TRAINED) -> dict[str, Any]:
    prior = cfg.prior.name.rpartition(":")[2]
    row = {"prior": prior if source == TRAINED else f"{prior}+{source}", "seed": cfg.train.seed,
           "latent_dim": cfg.model.latent_dim, "run": name}
    matched = metrics.get("matched")
    matched = matched if isinstance(matched, dict) else {}
    values = {**{col: metrics.get(col) for col in RESULT_COLUMNS[3:]},
              **{col: matched.get(key) for col, key in zip(
                  MATCHED_COLUMNS, ("test_nll", "diff", "diff_stderr", "iw_samples",
                                    "test_images"), strict=True)}}
    for col, value in values.items():
        row[col] = _cell_value(col, value)
        if row[col] is None and value is not None:
            warn("compare", f"{name}{'' if source == TRAINED else ' ' + source}: metrics.json "
                 f"{col} = {str(value)[:40]!r} is not a value of that column; left out")
    return row


def _stats(values: list) -> tuple[float, float, int]:
    """Mean, sample standard deviation (0 for one value) and count of the non-None values."""
    values = [float(v) for v in values if v is not None]
    if not values:
        return float("nan"), 0.0, 0
    mean = sum(values) / len(values)
    std = (math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
           if len(values) > 1 else 0.0)
    return mean, std, len(values)


def _mean_std(values: list) -> str:
    mean, std, n = _stats(values)
    if n == 0:
        return "–"
    # nats of large images (thousands): every unit, not 1.08e+04
    text = f"{mean:.0f}" if abs(mean) >= 1000 else f"{mean:.3g}" if n == 1 else f"{mean:.4g}"
    return text if n == 1 else f"{text} ± {std:.2g}"


def _span(values: list) -> str:
    """'100' or '80–100': the epochs the runs of a row trained."""
    values = [int(v) for v in values if v is not None]
    if not values:
        return "–"
    low, high = min(values), max(values)
    return str(low) if low == high else f"{low}–{high}"


def _quality_key(key: str) -> bool:
    """Whether a column depends on the quality classifier (fd_*, feature_*, class_entropy_*)."""
    return key.startswith(("fd_", "feature_", "class_entropy_"))


def _main_classifier(rows: list[dict]) -> str | None:
    """The quality classifier most rows were evaluated with, when rows name more than one
    (None when they agree): fd_* / feature_* numbers of different classifiers are on different
    scales, so a mean over seeds must not mix them."""
    counts = Counter(str(row.get("quality_classifier")) for row in rows)
    if len(counts) < 2:
        return None
    return max(sorted(counts), key=counts.__getitem__)  # ties: the first in sorted order


def _values(group: list[dict], key: str, main: str | None, div: float = 1) -> list:
    """The group's values of ``key`` (divided by ``div``); a classifier-dependent column keeps
    only the rows of classifier ``main`` (None: every row)."""
    keep = [r for r in group if main is None or not _quality_key(key)
            or str(r.get("quality_classifier")) == main]
    return [None if r[key] in (None, "") else float(r[key]) / div for r in keep]


def _error_note(group: list[dict], key: str, main: str | None = None) -> str:
    """' [se]' after a column whose rows carry a Monte-Carlo standard error (``KEY_stderr``
    or, for the matched difference, its paired standard error): of the mean over the rows,
    sqrt(sum se^2) / n, to set beside the spread over seeds. The rows are those the mean
    averages (:func:`_values`: with a value, of classifier ``main``); none when one of them
    has no error (evaluated before priorvae recorded it)."""
    keep = [r for r in group if main is None or not _quality_key(key)
            or str(r.get("quality_classifier")) == main]
    errors = [r.get(f"{key}_stderr") for r in keep if r.get(key) not in (None, "")]
    if not errors or any(e in (None, "") for e in errors):
        return ""
    errors = [float(e) for e in errors]
    return f" [{math.sqrt(sum(e * e for e in errors)) / len(errors):.2g}]"


def _table(groups: dict[tuple, list[dict]], cols: list[tuple[str, str, float]],
           main: str | None = None) -> list[str]:
    """Markdown rows: prior, D, seeds, epochs, device, then mean ± std of each (header, key,
    divisor) column over the group's seeds; classifier-dependent columns over the seeds of
    classifier ``main`` only, marked † where that leaves seeds out."""
    lines = ["| prior | D | seeds | epochs | device | " + " | ".join(c[0] for c in cols) + " |",
             "|---" * (len(cols) + 5) + "|"]
    for (prior, dim), group in groups.items():
        cells = []
        for _, key, div in cols:
            values = _values(group, key, main, div)
            short = _quality_key(key) and len(values) < len(group)
            cells.append(_mean_std(values) + (" †" if short else "")
                         + _error_note(group, key, main))
        seeds = ", ".join(str(r["seed"]) for r in group)
        lines.append(f"| {prior} | {dim} | {seeds} | {_span([r['epochs_trained'] for r in group])}"
                     f" | {', '.join(sorted({str(r.get('device')) for r in group}))} | "
                     + " | ".join(cells) + " |")
    return lines


def _most_common(rows: list[dict], keys: tuple[str, str]) -> tuple | None:
    """The most common (K, test images) of ``keys`` among the rows that have them."""
    pairs = Counter(tuple(r.get(k) for k in keys) for r in rows
                    if all(r.get(k) not in (None, "") for k in keys))
    return max(sorted(pairs, key=str), key=pairs.__getitem__) if pairs else None


_EVAL, _MATCHED = ("iw_samples", "test_images"), ("matched_iw_samples", "matched_test_images")


def _row_notes(r: dict, common: dict | None = None) -> list[str]:
    """What a reader must know about how one row was evaluated (``common``: the most common
    (K, test images) of the test NLL and of the matched column, which the header names)."""
    notes = []
    if r.get("log_normalizer_stderr") not in (None, ""):
        notes.append(f"test_nll includes an estimated log Z, standard error "
                     f"{float(r['log_normalizer_stderr']):.2g} nats")
    if r.get("evaluation_fallback"):
        notes.append(r["evaluation_fallback"])
    for keys, what in ((_EVAL, "test NLL"), (_MATCHED, "Δ NLL, matched,")):
        pair = tuple(r.get(k) for k in keys)
        if (common or {}).get(keys) not in (None, pair) and None not in pair and not (
                keys == _EVAL and r.get("evaluation_fallback")):
            notes.append(f"{what} at K = {pair[0]} on {pair[1]} test images")
    share = r.get("truncation_share")
    if share not in (None, "") and float(share) > TRUNCATION_WARNING:
        notes.append(f"{float(share):.0%} of its samples are the last, unfiltered proposal of "
                     f"the truncated sampler (LARS truncation share): its sample-based measures "
                     f"describe that mixture")
    if r.get("fit_improved") in (False, "False"):
        notes.append("its ex-post fit did not improve on its starting point")
    return notes


def _has_bits(rows: list[dict]) -> bool:
    """Whether some row has a test NLL in bits/dim (its likelihood is a mass over 8-bit
    values); the tables and the figure show that column only then."""
    return any(r.get("test_bits_per_dim") not in (None, "") for r in rows)


def write_results(out: Path, rows: list[dict[str, Any]], title: str = "") -> None:
    """results.csv (one row per run) and results.md (mean ± std over seeds per prior/dim: the
    headline columns, then every column)."""
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=[*RESULT_COLUMNS, "run"])
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(out / "results.csv", buffer.getvalue().encode())
    bits = _has_bits(rows)  # 8-bit data under a probability mass: NLL in bits/dim too
    cols = ["test_nll", *(["test_bits_per_dim"] * bits), "test_elbo", "kl", "mutual_info",
            "marginal_kl", "kl_prior_to_agg",
            "hole_rate", "latent_precision", "latent_recall", "latent_coverage",
            "latent_c2st_auc", "mmd", "active_units", "fd_prior", "fd_aggregate",
            "feature_precision", "feature_recall", "truncation_share", "matched_nll",
            "matched_diff", "train_seconds", "fit_seconds"]
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["prior"], row["latent_dim"]), []).append(row)
    main = _main_classifier(rows)
    headline = [(metric(k).header, k, metric(k).column_div) for k in HEADLINE_KEYS
                if bits or k != "test_bits_per_dim"]  # headers from the schema
    common = {keys: _most_common(rows, keys) for keys in (_EVAL, _MATCHED)}
    at = {keys: "" if common[keys] is None else f" (K = {common[keys][0]} on "
          f"{common[keys][1]} test images unless noted below)" for keys in common}
    lines = [f"# {title or 'Comparison'}", "",
             "Mean ± standard deviation over seeds; nats except hole_rate (share), "
             "active_units (count), fd_* (Fréchet distance in classifier features), "
             "latent_*/feature_* two-sample measures of prior samples against held-out codes/"
             "images (precision, recall, coverage in [0, 1]; c2st_auc 0.5 = indistinguishable), "
             "train (the VAE's training) and fit (an ex-post prior's fit) in seconds or minutes; "
             "seeds: the seeds averaged, epochs: the epochs they trained. "
             f"test NLL: IWAE bound{at[_EVAL]}. "
             "Δ NLL vs own prior, matched: every source of one VAE scored on the same test "
             "images with the same draws at the smallest (K, images) among them"
             f"{at[_MATCHED]}, minus the VAE's own "
             "prior; [x]: the Monte-Carlo (paired) standard error of the mean over the "
             "seeds, beside their spread (of the k-NN precision, recall, density and "
             "coverage a lower bound: the noise of their own points only; of the matched "
             "difference it treats the seeds as independent, but they score the same test "
             "images, so it can understate: experiments/matched_grid.py gives the paired "
             "error over images of the seeds' mean).", "",
             *_table(groups, headline, main), "", "Every column:", "",
             *_table(groups, [(c, c, 1) for c in cols], main)]
    notes = [f"- {r['prior']} (seed {r['seed']}): " + "; ".join(_row_notes(r, common))
             for r in rows if _row_notes(r, common)]
    if notes:
        lines += ["", "Evaluated differently (see metrics.json):", "", *notes]
    if main is not None:  # fd_* / feature_* of different classifiers are not comparable
        classifiers = sorted({str(r.get("quality_classifier")) for r in rows})
        left = sorted({f"{r['prior']} seed {r['seed']}" for r in rows
                       if str(r.get("quality_classifier")) != main})
        lines += ["", f"† fd_* and feature_* come from {len(classifiers)} quality classifiers "
                  f"({', '.join(classifiers)}; None: evaluated before the classifier was "
                  f"recorded), each trained once per machine. Their means average only the "
                  f"rows of {main}, the most common; a † marks a row whose other seeds are "
                  f"left out ({'; '.join(left)}). results.csv has every row's numbers and "
                  f"its classifier (column quality_classifier)."]
    atomic_write_bytes(out / "results.md", ("\n".join(lines) + "\n").encode())


_EVAL_KEYS = ("test_nll", "test_elbo", "test_bits_per_dim")  # estimated at (K, test images)


def unmatched_evaluations(rows: list[dict], labels: list[str]) -> dict[str, tuple]:
    """The figure's rows (``labels``: "prior d<latent_dim>") whose test NLL was estimated at
    another (K, test images) than the most common one, each with its own pair (the first of
    its seeds that differs): their bars must not be read against the others."""
    common = _most_common(rows, _EVAL)
    found: dict[str, tuple] = {}
    for r in rows:
        label, pair = f"{r['prior']} d{r['latent_dim']}", tuple(r.get(k) for k in _EVAL)
        if label in labels and common is not None and None not in pair and "" not in pair \
                and pair != common:
            found.setdefault(label, pair)
    return found


def comparison_figure(out: Path, rows: list[dict]) -> Path:
    """Prior-sample grids per table row (its first seed; ex-post rows sample their fitted
    prior) above bars of the key metrics in two rows (mean over seeds, error bars: the
    standard deviation where a row has 2 or more seeds). Each panel's title says which way is
    better and a dashed line marks the value when p = q (from :mod:`priorvae.metrics_schema`);
    a row's colour is the same in its sample grid's title and in every panel. A test-NLL bar
    estimated at another (K, test images) than most rows is hatched and labelled with its own
    (:func:`unmatched_evaluations`): its height is not comparable with the others'."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from .expost import load_prior_source
    from .figures import grid_image
    from .measure import decode_samples
    from .metrics_schema import FIGURE_KEYS

    main = _main_classifier(rows)  # FD bars of one classifier only, as in results.md
    firsts: dict[str, dict] = {}
    for row in rows:
        firsts.setdefault(f"{row['prior']} d{row['latent_dim']}", row)
    labels = list(firsts)
    dims = {r["latent_dim"] for r in rows}
    names = [lb if len(dims) > 1 else lb.rpartition(" d")[0] for lb in labels]
    colors = [f"C{i % 10}" for i in range(len(labels))]
    per_line = 4  # sample grids per line: large enough to see the digits at README width
    lines = math.ceil(len(labels) / per_line)
    bar_cols = 4
    keys = [("test_bits_per_dim" if k == "test_nll" and _has_bits(rows) else k)
            for k in FIGURE_KEYS]  # 8-bit images: their NLL in bits/dim, the usual unit
    bar_lines = math.ceil(len(keys) / bar_cols)
    unmatched = unmatched_evaluations(rows, labels)
    fig = plt.figure(figsize=(12, 3.3 * lines + 3.0 * bar_lines + 0.4))
    grid_spec = fig.add_gridspec(2, 1, height_ratios=[3.3 * lines, 3.0 * bar_lines])
    top = grid_spec[0].subgridspec(lines, per_line, hspace=0.3)  # room for 2-line titles
    for i, label in enumerate(labels):
        row = firsts[label]
        run = Run.open(_cell(out, row["run"]))
        model = run.load_model()
        source = row["prior"].partition("+")[2] or TRAINED
        prior = load_prior_source(run, model, source)
        torch.manual_seed(0)
        with prior.frozen():
            images = decode_samples(model, prior.sample(36))
        ax = fig.add_subplot(top[i // per_line, i % per_line])
        ax.imshow(grid_image(images, 6), cmap="gray", vmin=0, vmax=1)
        ax.set_title(names[i].replace("+", "\n+ "), fontsize=11, color=colors[i],
                     fontweight="bold")
        ax.axis("off")
    bottom = grid_spec[1].subgridspec(bar_lines, bar_cols, hspace=0.55, wspace=0.35)
    for j, key in enumerate(keys):
        m = metric(key)
        scale = 100.0 if m.unit == "%" else 1.0
        ax = fig.add_subplot(bottom[j // bar_cols, j % bar_cols])
        means, errs = [], []
        for label in labels:
            mean, std, count = _stats(_values(
                [r for r in rows if f"{r['prior']} d{r['latent_dim']}" == label], key, main))
            means.append(mean * scale)
            errs.append(std * scale if count >= 2 else float("nan"))  # none from one seed
        bars = ax.bar(range(len(labels)), means, yerr=errs, color=colors, capsize=4,
                      error_kw={"elinewidth": 1.5})
        if key in _EVAL_KEYS:  # a bar at another K / test images is not comparable: say so
            for bar, label in zip(bars, labels, strict=True):
                if label in unmatched:
                    bar.set_hatch("//")
                    bar.set_alpha(0.45)
                    iw, images = unmatched[label]
                    ax.annotate(f"K={iw}, {images} im.",
                                (bar.get_x() + bar.get_width() / 2, 0),
                                xycoords=("data", "axes fraction"), xytext=(0, 3),
                                textcoords="offset points", ha="center", va="bottom",
                                rotation=90, fontsize=7, zorder=5,
                                bbox={"facecolor": "white", "edgecolor": "none",
                                      "alpha": 0.9, "pad": 0.5})
        finite = [v for v in means if math.isfinite(v)]
        if key in ("test_nll", "test_elbo", "test_bits_per_dim") and finite:
            low, high = min(finite), max(finite)  # far from 0: show the differences
            pad = max(0.01 if key == "test_bits_per_dim" else 0.5, high - low)
            ax.set_ylim(low - 0.6 * pad, high + 0.6 * pad)
        if m.reference is not None:
            ref = m.reference * scale
            ax.axhline(ref, color="k", linestyle="--", linewidth=1.2)
            ax.annotate(f"p = q: {m.format(m.reference)}", (0.0, ref),
                        xycoords=("axes fraction", "data"), xytext=(3, 3),
                        textcoords="offset points", ha="left", va="bottom", fontsize=9,
                        bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.85,
                              "pad": 1}, zorder=5)
            if key.endswith("c2st_auc") and finite:  # AUC: 0.5 is the floor that matters
                ax.set_ylim(0.4, max(0.65, max(finite) + 0.05))
        ax.set_xticks([])
        unit = " (%)" if m.unit == "%" else f" ({m.unit})" if m.unit else ""
        ax.set_title(f"{m.title}{unit}\n{m.arrow} {m.cue}".rstrip(), fontsize=11)
        ax.tick_params(axis="y", labelsize=9)
    from matplotlib.patches import Patch

    handles = [Patch(color=c, label=n) for c, n in zip(colors, names,
                                                                           strict=True)]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(names), 4), fontsize=10,
               frameon=False)
    seeds = sorted({len([r for r in rows if f"{r['prior']} d{r['latent_dim']}" == lb])
                    for lb in labels})
    common = _most_common(rows, _EVAL)
    hatched = (f"\nhatched test-NLL bars: another K / test images than the others' K = "
               f"{common[0]} on {common[1]} (not comparable; results.md has the matched column)"
               if unmatched and common else "")
    fig.suptitle(f"above: decoded samples of each row's prior (its first seed)\nbars: mean over "
                 f"{'/'.join(map(str, seeds))} seed(s), error bars: standard deviation; "
                 f"dashed: the value when the prior matches q(z){hatched}", fontsize=11,
                 y=0.995)
    fig.tight_layout(rect=(0, 0.05, 1, 0.97))
    path = out / "comparison.png"
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def _evaluated(metrics: dict) -> bool:
    """Finished, evaluated on its best model, with every diagnostic of this version."""
    return (metrics.get("status") in FINISHED and "latent_c2st_auc" in metrics
            and metrics.get("evaluated_epoch", metrics.get("best_epoch")) == metrics.get(
                "best_epoch"))


def _expost_labels(expost_names: list[str]) -> list[str]:
    """The prior-source label of each ex-post name (``aggregate`` stays itself)."""
    return [AGGREGATE if e == AGGREGATE else f"{EXPOST_PREFIX}{e}" for e in expost_names]


def _cell(out: Path, name: str) -> Path:
    """A cell's folder inside the experiment folder (never through a symbolic link)."""
    return check_inside(out, name, kind="dir")


def _cell_metrics(run_dir: Path) -> dict:
    """A cell's metrics.json ({} before its training wrote config.toml), without results of
    another best.pt than the cell's (:meth:`Run.current_metrics`): those are done again."""
    return Run.open(run_dir).current_metrics() if os.path.lexists(run_dir / "config.toml") \
        else {}


def _source_metrics(metrics: dict, label: str) -> dict:
    """A cell's saved results of prior source ``label`` ({} when none, or not an object)."""
    sources = metrics.get("prior_sources")
    saved = sources.get(label) if isinstance(sources, dict) else None
    return saved if isinstance(saved, dict) else {}


def _source_evaluated(metrics: dict, label: str) -> bool:
    return "latent_c2st_auc" in _source_metrics(metrics, label)


def _run_cell(run_dir: Path, run_cfg: Config, step: str, expost_names: list[str],
              progress: bool, hparams: list[str] | None = None) -> None:
    """Train one cell unless it is done, fit its missing ex-post priors, then evaluate every
    source not yet evaluated in one go (one decoder pass for the test NLLs that share K)."""
    from .evaluate import evaluate_sources
    from .expost import fit_prior
    from .train import train

    metrics = _cell_metrics(run_dir)
    done = _evaluated(metrics)
    labels = _expost_labels(expost_names)
    missing = [lb for lb in labels if not _source_evaluated(metrics, lb)]
    print(f"{step}: " + ("training" if not done else "done, skipped" if not missing else
                         f"done; to fit and evaluate: {', '.join(missing)}"), flush=True)
    if done and not missing:
        return
    t0 = time.perf_counter()
    if not done:
        train(run_cfg, run_dir, progress=progress)
    run = Run.open(run_dir)
    for expost, label in zip(expost_names, labels, strict=True):
        # a fit saved before an interruption is kept: its spec is written after its weights
        if label in missing and label != AGGREGATE and \
                not run.prior_source_files(label)[0].is_file():
            fit_prior(run_dir, expost, progress=progress)
    sources = ([] if done else [TRAINED]) + missing
    # the sources evaluated before (an interrupted compare) join the matched pass again
    for label, saved in evaluate_sources(run_dir, sources, progress=progress,
                                         hparam_keys=hparams, match_with=[
                                             lb for lb in labels if lb not in missing]).items():
        name = step if label == TRAINED else f"{step} with {label}"
        print(f"{name}: test NLL {saved['test_nll']:.2f}, hole rate {saved['hole_rate']:.3f}",
              flush=True)
    print(f"{step}: done ({time.perf_counter() - t0:.0f} s)", flush=True)


def _collect_rows(out: Path, runs: list[tuple[str, Config]], expost_names: list[str],
                  expost_on: set | None) -> tuple[list[dict], list[str]]:
    """Table rows (grid order) from every cell's metrics.json, and the unfinished cells."""
    rows, unfinished = [], []
    for name, run_cfg in runs:
        metrics = _cell_metrics(_cell(out, name))
        if not _evaluated(metrics):
            unfinished.append(name)
            continue
        rows.append(_row(name, run_cfg, metrics))
        if expost_on is not None and run_cfg.prior.name not in expost_on:
            continue
        for label in _expost_labels(expost_names):
            if not _source_evaluated(metrics, label):
                unfinished.append(f"{name}+{label}")
                continue
            saved = _source_metrics(metrics, label)
            rows.append(_row(name, run_cfg, {**saved, **{k: metrics.get(k) for k in (
                "train_seconds", "epochs_trained", "device")}}, label))
    return rows, unfinished


def run_compare(config_path: str | Path, overrides: list[str] | None = None,
                out: str | Path | None = None, progress: bool = True,
                report_only: bool = False) -> Path:
    """Train and evaluate every run of the grid (skipping finished ones); write the results.
    The whole grid is checked (every cell built) before anything is written. With
    ``report_only`` nothing is trained: the tables and figure are written from the cells
    finished so far (a grid in progress, or one whose processes are still running)."""
    # the user's choice: specs in [data] [likelihood] [network] pinned now, the priors by grid()
    cfg = pin_plugins(load_config(config_path, overrides), tables=("data", "likelihood",
                                                                     "network"))
    out = Path(out) if out else Path("runs") / f"{Path(config_path).stem}-compare"
    runs = grid(cfg)
    expost_names, expost_on = _expost_plan(cfg, runs)
    if out.exists() and not out.is_dir():
        raise RunError(f"--out {out} is a file, not a folder; choose another --out")
    if report_only:
        if not out.is_dir():
            raise RunError(f"--report-only: {out} does not exist; run compare without "
                           f"--report-only first, or pass the grid's folder with --out")
    else:
        check_grid(runs, expost_names)
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RunError(f"could not create {out}: {exc.strerror}") from None
        header = "".join(f"# --set {o}\n" for o in overrides or [])
        atomic_write_bytes(out / "compare.toml",
                           (header + Path(config_path).read_text(encoding="utf-8")).encode())
        order = execution_order(runs)
        from .evaluate import hparam_keys

        hparams = hparam_keys([run_cfg for _, run_cfg in runs])  # what the grid varies
        for i, (name, run_cfg) in enumerate(order, start=1):
            step = f"[{i}/{len(order)}] {name}"
            check_stop()  # SIGTERM: no new cell (a cell in progress stops at its own point)
            try:
                _run_cell(_cell(out, name), run_cfg, step, expost_names if expost_on is None
                          or run_cfg.prior.name in expost_on else [], progress, hparams)
            except RunBusyError as exc:  # another process works in this cell: leave it to it
                print(f"{step}: skipped, {exc}", flush=True)
    rows, unfinished = _collect_rows(out, runs, expost_names, expost_on)
    if not rows:
        raise RunError(f"no cell of {out} is finished yet ({', '.join(unfinished)}); run "
                       f"compare again when the processes working in them end")
    title = f"{Path(config_path).name}: {cfg.data.name}"
    if unfinished:
        title += f" (partial: {', '.join(unfinished)} not finished)"
        print(f"tables without {len(unfinished)} unfinished cell(s): {', '.join(unfinished)}; "
              f"run compare again when they end", flush=True)
    write_results(out, rows, title=title)
    comparison_figure(out, rows)
    atomic_write_bytes(out / "results.json", (json.dumps(rows, indent=1) + "\n").encode())
    print(f"wrote {out / 'results.csv'}, {out / 'results.md'}, {out / 'comparison.png'}")
    return out
