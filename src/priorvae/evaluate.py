"""Test-set evaluation of a run: ELBO, IWAE NLL, and every prior-vs-aggregate diagnostic.

``test_elbo`` is the mean single-sample ELBO per test image (nats, negative).
``test_nll`` is the mean over test images of -IWAE_K(x), the importance-weighted estimate of
-log p(x) with K samples (positive nats; an upper bound on the true NLL in expectation).
``test_bits_per_dim`` (likelihoods with ``bits_per_dim``: a probability mass over the 256
levels of 8-bit data) is test_nll / (D ln 2), D values per item.
The diagnostics are those of :func:`priorvae.measure.diagnose` (names in
:data:`priorvae.measure.DIAGNOSTIC_KEYS`).
"""

from __future__ import annotations

import contextlib
import io
import sys
import time
from pathlib import Path

import torch

from .data import load_splits
from .datasets import check_same_data
from .errors import PriorVAEError, RunError
from .likelihoods import prepare_splits
from .measure import diagnose, mean_elbo, mean_iwae_nlls
from .metrics_schema import SUMMARY_KEYS
from .quality import (
    classifier_cache_dir,
    classifier_digest,
    classifier_unavailable,
    get_classifier,
)
from .runs import EVALUATION_KEYS, FINISHED, TRAINED, Run, file_sha256, resolve_device
from .sanity import absurd, non_finite, warn

__all__ = ["write_figures", "evaluate_run", "evaluate_sources", "hparam_keys", "projector_points",
           "MAX_IWAE_DECODES", "paired_difference", "save_matched"]

# the most decoder evaluations (test images x K) an evaluation may cost unless the caller
# allows more: 5 times the full MNIST evaluation (10,000 images x K = 5,000)
MAX_IWAE_DECODES = 250_000_000


def write_figures(extras: dict, prior, run: Run, folder: str, title: str = "", writer=None,
                  step: int = 0) -> list[Path]:
    """Save the pictures as PNG in ``run``'s ``folder`` (atomically; to TensorBoard too when
    ``writer`` is given)."""
    import matplotlib.pyplot as plt

    from .figures import hole_score_figure, latent_atlas, log_q_histogram, samples_figure

    figs = {
        "samples": samples_figure(extras["x_prior"], extras["x_agg"], extras["x_orig"],
                                  extras["x_recon"], title),
        "latent_atlas": latent_atlas(extras["mu_heldout"][:5000],
                                     None if extras["labels"] is None else extras["labels"][:5000],
                                     extras["z_prior"][:2000], prior, extras["agg"],
                                     extras["threshold"], title),
        "log_q_histogram": log_q_histogram(extras["log_q_prior"], extras["log_q_posterior"],
                                           extras["threshold"], extras.get("hole_rate"), title),
        "hole_scores": hole_score_figure(extras["hole_best"], extras["hole_best_scores"],
                                         extras["hole_worst"], extras["hole_worst_scores"],
                                         extras.get("latent_c2st_auc"), title,
                                         extras.get("c2st_heldout")),
    }
    paths = []
    for name, fig in figs.items():
        paths.append(run.save_figure(Path(folder) / f"{name}.png", fig))
        if writer is not None:
            writer.add_figure(f"diagnostics/{name}", fig, step, close=False)
        plt.close(fig)
    return paths


def _flat_config(cfg) -> dict:
    """``{"table.key": value}`` of a config's tables ([compare] and other extras left out)."""
    out = {}
    for table, body in cfg.to_dict().items():
        if table in cfg.extra:
            continue
        for key, value in body.items():
            out[f"{table}.{key}"] = value
    return out


DEFAULT_HPARAM_KEYS = ("prior.name", "model.latent_dim", "train.seed")


def hparam_keys(configs) -> list[str]:
    """The config keys worth a column in TensorBoard's HParams for these runs: ``prior.name``
    always, and every other key whose value differs between them (what a comparison grid
    varies; no constants)."""
    flats = [_flat_config(cfg) for cfg in configs]
    keys = list(dict.fromkeys(k for flat in flats for k in flat))
    varying = [k for k in keys if len({repr(flat.get(k)) for flat in flats}) > 1]
    return ["prior.name", *(k for k in varying if k != "prior.name")]


def _hparams(cfg, keys) -> dict:
    """The values of ``keys`` for TensorBoard (lists and booleans as text, missing as '–')."""
    flat = _flat_config(cfg)
    out = {}
    for key in keys:
        value = flat.get(key, "–")
        out[key] = (str(value) if isinstance(value, (list, bool, dict)) or value is None
                    else value)
    return out


def evaluate_run(run_dir: str | Path, iw_samples: int | None = None, device: str | None = None,
                 progress: bool = True, limit: int | None = None, diagnostics: bool = True,
                 n_diagnostic: int = 10_000, prior_source: str = TRAINED,
                 trust_remote_code: bool = False, hparam_keys: list[str] | None = None,
                 allow_expensive: bool = False) -> dict:
    """Evaluate the best model of a run on its test split; merge the results into metrics.json,
    save the pictures under ``RUN_DIR/figures`` and log them to the run's TensorBoard.

    Args:
        iw_samples: K for the IWAE estimate (default: the run's ``[eval] iw_samples``, or the
            prior's ``evaluation_limits`` where its log-density is too costly for that; the
            fallback is printed and recorded as ``evaluation_fallback``).
        limit: evaluate only the first ``limit`` test images (for quick looks; recorded;
            default: all, or the prior's ``evaluation_limits``).
        diagnostics: also compute the prior-vs-aggregated-posterior diagnostics.
        prior_source: ``trained`` (the run's own prior), ``aggregate`` (q(z) itself) or the
            label of an ex-post prior (``priorvae fit-prior``). The VAE with that prior is still
            a valid bound; results of other sources go under ``prior_sources.SOURCE`` in
            metrics.json, their pictures under ``figures/SOURCE``.
        trust_remote_code: allow prior code that the run folder names but you did not choose.
        hparam_keys: the config keys TensorBoard's HParams shows for this run (default
            prior.name, model.latent_dim, train.seed; ``compare`` passes what its grid
            varies, :func:`hparam_keys`).
        allow_expensive: allow more than :data:`MAX_IWAE_DECODES` decoder evaluations
            (test images x K), which is refused otherwise before any work.

    A non-finite test ELBO or NLL stops with one line (nothing is written); a non-finite
    diagnostic is written as null and named under ``non_finite``, with a warning.

    Returns the run's metrics (``trained``) or the source's results.
    """
    return evaluate_sources(run_dir, [prior_source], iw_samples, device, progress, limit,
                            diagnostics, n_diagnostic, trust_remote_code,
                            hparam_keys, allow_expensive)[prior_source]


def evaluate_sources(run_dir: str | Path, prior_sources: list[str] | tuple[str, ...] = (TRAINED,),
                     iw_samples: int | None = None, device: str | None = None,
                     progress: bool = True, limit: int | None = None, diagnostics: bool = True,
                     n_diagnostic: int = 10_000, trust_remote_code: bool = False,
                     hparam_keys: list[str] | None = None,
                     allow_expensive: bool = False,
                     match_with: list[str] | tuple[str, ...] = ()) -> dict[str, dict]:
    """:func:`evaluate_run` for several prior sources of one run under one lock, with one
    decoder pass for the test NLL of all sources evaluated at the same K on the same images.

    The decoder is nearly all of an IWAE estimate's cost, and log p(x|z) - log q(z|x) does not
    depend on the prior, so the sources share the K draws per image
    (:func:`~priorvae.measure.mean_iwae_nlls`). Each source's numbers are exactly those a
    separate ``evaluate_run`` gives (the same seed, noise and arithmetic); sources that fall
    back to other limits (a costly density) are evaluated in their own pass. Each source's
    results are saved as soon as they are complete.

    The pass with the fewest decoder evaluations also scores every other source, the run's own
    prior and the sources ``match_with`` (evaluated before, e.g. by a compare that was
    interrupted) within their evaluation limits: their ``matched`` records (test NLL on the
    same images with the same draws, paired difference from the own prior) are of one pass.

    Returns {source: what ``evaluate_run`` returns for it}.
    """
    for name, value in (("iw_samples", iw_samples), ("limit", limit)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < 1):
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    sources = list(prior_sources)
    if not sources or len(set(sources)) != len(sources):
        raise ValueError(f"prior_sources must name each source once, got {sources!r}")
    run = Run.open(run_dir, trust_remote_code)
    cfg = run.config
    with run.lock("evaluate"):
        status = run.status
        if status not in (*FINISHED, "interrupted", "failed"):
            raise RunError(f"{run.path} has not been trained (status {status!r}); train it first")
        dev = resolve_device(device or cfg.train.device)
        best = run.load_checkpoint("best", dev)
        # every result names the checkpoint it came from (sha256 of best.pt's bytes)
        best["_sha256"] = file_sha256(run.checkpoint_path("best"))
        # no result of another best.pt stays beside this one's (the run's own, or a source's)
        run.drop_other_checkpoints()
        model = run.load_model("best", dev, best)
        splits = load_splits(cfg.data, device=dev)
        check_same_data(best.get("data_sha256"), splits.digest(), run.checkpoint_path("best"))
        splits = prepare_splits(splits, model.likelihood)
        trained_prior = model.prior
        # every source's prior and limits first: a missing or damaged one stops us before work
        plans: dict[tuple, list[dict]] = {}
        for label in sources:
            plan = {"label": label, "prior": trained_prior, "fit_seconds": None}
            if label != TRAINED:
                from .expost import fit_record, load_prior_source

                plan["prior"] = load_prior_source(run, model, label, splits)
                record = fit_record(run, label)
                plan["fit_seconds"], plan["fit_improved"] = (record.get("seconds"),
                                                             record.get("improved"))
            k, lim, plan["n_log_prob"], plan["fallback"] = _fallback(
                plan["prior"], label, iw_samples or cfg.eval.iw_samples, iw_samples, limit,
                len(splits.x_test), n_diagnostic)
            lim = None if lim is not None and lim >= len(splits.x_test) else lim  # all of them
            plans.setdefault((k, lim), []).append(plan)
        n_test = len(splits.x_test)
        cost = sum(k * min(lim or n_test, n_test) for k, lim in plans)
        if cost > MAX_IWAE_DECODES and not allow_expensive:
            raise RunError(f"K = {max(k for k, _ in plans)} importance samples on "
                           f"{min(lim or n_test for _, lim in plans)} test images is {cost:.3g} "
                           f"decoder evaluations, more than the {MAX_IWAE_DECODES:.3g} this "
                           f"command allows without --allow-expensive (hours to days); pass a "
                           f"smaller --iw-samples or --limit")
        # one classifier for every source's fd_* and feature_* (loaded or trained once; it
        # draws from its own generator, so the sources' random states are untouched)
        # (none for data without labels: the feature measures are skipped, with the reason)
        classifier = (get_classifier(splits, classifier_cache_dir(), progress=progress,
                                     likelihood=model.likelihood) if diagnostics else None)
        # the matched comparison: the group with the fewest (K x images) carries every other
        # source (and the run's own prior) in its decoder pass as passengers, so that all are
        # also scored on the same images with the same draws (paired differences)
        matched = min(plans, key=lambda key: key[0] * (key[1] or n_test))
        passengers = [p for key, group in plans.items() if key != matched for p in group]

        def within(prior) -> bool:  # another prior joins the pass within its limits
            own = prior.evaluation_limits or {}
            return own.get("iw_samples", matched[0]) >= matched[0] and \
                own.get("test_images", n_test) >= (matched[1] or n_test)

        if TRAINED not in sources and within(trained_prior):
            passengers.append({"label": TRAINED, "prior": trained_prior})
        for label in dict.fromkeys(match_with):
            if label in sources or label == TRAINED:
                continue
            from .expost import load_prior_source

            try:
                prior = load_prior_source(run, model, label, splits)
            except PriorVAEError as exc:  # gone or stale: it is not matched, nothing else
                warn("evaluate", f"prior source {label!r} is not matched: {exc}")
                continue
            if within(prior):
                passengers.append({"label": label, "prior": prior})
        out, rows = {}, []
        try:
            for key, group in plans.items():
                k, lim = key
                x = splits.x_test if lim is None else splits.x_test[:lim]
                _evaluate_group(run, model, splits, best, group, x, k, classifier,
                                n_diagnostic, progress, dev, out, hparam_keys, diagnostics,
                                passengers if key == matched else [],
                                rows if key == matched else None)
        finally:
            model.prior = trained_prior
        labels = [p["label"] for p in plans[matched]] + [p["label"] for p in passengers]
        if len(labels) > 1 and TRAINED in labels:
            save_matched(run, out, labels, rows[0], matched[0])
        return out


def paired_difference(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """Mean of a - b over paired per-image values (N,), and its standard error (nats)."""
    d = (a - b).double()
    se = d.std().item() / len(d) ** 0.5 if len(d) > 1 else float("nan")
    return d.mean().item(), se


def save_matched(run: Run, out: dict, labels: list[str], nll: torch.Tensor, k: int) -> None:
    """Each source's ``matched`` record: its test NLL at the common (K, images) with the same
    draws as every other source of the pass, and its paired difference from the run's own
    prior (``trained``) with the standard error over images. ``nll``: (sources, images)."""
    ref = nll[labels.index(TRAINED)]
    records = {}
    for label, row in zip(labels, nll, strict=True):
        diff, se = paired_difference(row, ref)
        records[label] = {"iw_samples": k, "test_images": nll.shape[1],
                          "test_nll": row.double().mean().item(), "reference": TRAINED,
                          "diff": diff, "diff_stderr": se, "shared_with": labels}
    metrics = run.metrics()
    saved = metrics.get("prior_sources")
    saved = saved if isinstance(saved, dict) else {}  # metrics.json is data
    for label, record in records.items():
        if label == TRAINED or not isinstance(saved.setdefault(label, {}), dict):
            continue
        saved[label]["matched"] = record
        if label in out:
            out[label]["matched"] = record
    out_trained = run.update_metrics(matched=records[TRAINED], prior_sources=saved) \
        if saved else run.update_metrics(matched=records[TRAINED])
    if TRAINED in out:
        out[TRAINED] = out_trained


def _rng_state(dev: torch.device) -> tuple:
    return (torch.get_rng_state(),
            torch.cuda.get_rng_state(dev) if dev.type == "cuda" else None)


def _set_rng_state(state: tuple, dev: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], dev)


def _evaluate_group(run: Run, model, splits, best: dict, group: list[dict], x: torch.Tensor,
                    k: int, classifier, n_diagnostic: int, progress: bool,
                    dev: torch.device, out: dict, hparam_keys=None,
                    diagnostics: bool = True, passengers: list[dict] = (),
                    rows: list | None = None) -> None:
    """The sources of ``group`` at K = ``k`` on the images ``x``: one shared IWAE pass; the
    random state each step starts from is the one a separate evaluation of each would have
    (seed, ELBO, IWAE, diagnostics), so sharing changes no number. ``passengers``: plans of
    other sources scored in the same pass (their per-image values go to ``rows``, after the
    group's; a prior's log-density draws no random numbers, so they change nothing)."""
    cfg = run.config
    elbos, seconds = {}, {}
    after_elbo = None
    for plan in group:
        t0 = time.perf_counter()
        torch.manual_seed(cfg.train.seed)
        model.prior = plan["prior"]
        elbos[plan["label"]] = mean_elbo(model, x, cfg.train.val_batch_size)
        after_elbo = after_elbo or _rng_state(dev)  # the VAE's noise: priors draw none here
        seconds[plan["label"]] = time.perf_counter() - t0
    _set_rng_state(after_elbo, dev)
    t0 = time.perf_counter()
    batches: list[torch.Tensor] = []
    nlls = mean_iwae_nlls(model, x, k, [plan["prior"] for plan in (*group, *passengers)],
                          cfg.eval.batch_size, progress=progress, rows=batches)[:len(group)]
    if rows is not None:
        rows.append(torch.cat(batches, dim=1).cpu())
    shared = time.perf_counter() - t0
    after_iwae = _rng_state(dev)
    for plan, nll in zip(group, nlls, strict=True):
        label, prior = plan["label"], plan["prior"]
        t0 = time.perf_counter()
        _set_rng_state(after_iwae, dev)
        model.prior = prior
        elbo = elbos[label]
        results = {"test_elbo": elbo["elbo"], "test_recon": elbo["recon"], "test_kl": elbo["kl"],
                   "test_nll": nll, "iw_samples": k, "test_images": len(x),
                   "evaluated_epoch": best.get("epoch") if type(best.get("epoch")) is int
                   else None, "evaluated_checkpoint": best["_sha256"],
                   "evaluation_fallback": plan["fallback"]}
        if model.likelihood.bits_per_dim:  # 8-bit data under a probability mass: NLL/(D ln 2)
            results["test_bits_per_dim"] = model.likelihood.nll_bits_per_dim(nll)
        bad = non_finite(results)
        if bad:  # the model's own numbers: refused, nothing of this source is written
            raise RunError(f"prior source {label!r}: non-finite {bad[0]} ({results[bad[0]]}) "
                           f"on the test images; the model or prior diverged, nothing was "
                           f"written")
        # the sources whose test NLL came from the same decoder pass (None: alone)
        results["test_nll_shared_with"] = [p["label"] for p in group if p is not plan] or None
        if plan["fit_seconds"] is not None:  # an ex-post source: what fitting it cost
            results["fit_seconds"] = plan["fit_seconds"]
            if plan.get("fit_improved") is not None:  # False: the fit never beat its start
                results["fit_improved"] = plan["fit_improved"]
        if getattr(prior, "estimated_normalizer", False):
            # the NLL includes a Monte-Carlo log Z: its standard error goes next to it
            results["log_normalizer_stderr"] = prior.log_normalizer_stderr()
        report = prior.sampler_report()
        results.update(report)  # e.g. the LARS prior's truncation share
        if report.get("truncation_share", 0.0) > TRUNCATION_WARNING:
            print(f"evaluate: prior source {label!r}: {report['truncation_share']:.0%} of its "
                  f"samples are the last, unfiltered proposal of its truncated sampler "
                  f"(T = {report.get('truncation', float('nan')):.0f}); its sample-based "
                  f"measures describe that mixture (see priors/resampled.py)",
                  file=sys.stderr, flush=True)
        if diagnostics:
            metrics, extras = diagnose(model, splits, classifier, n=n_diagnostic,
                                       n_log_prob=plan["n_log_prob"])
            results.update(metrics, diagnostic_points=n_diagnostic,
                           log_prob_points=plan["n_log_prob"])
            if classifier is not None:  # which classifier: "shipped" weights compare anywhere
                results.update(quality_classifier=classifier_digest(classifier),
                               quality_classifier_origin=classifier.origin)
            else:
                results["feature_measures_skipped"] = classifier_unavailable(splits)
            extras["hole_rate"] = metrics["hole_rate"]
            _figures_and_tensorboard(run, model, splits, extras, results, label, hparam_keys)
        # this source's own work plus the whole shared pass: what it costs evaluated alone
        results["eval_seconds"] = seconds[label] + shared + time.perf_counter() - t0
        for line in absurd({k: results[k] for k in ("test_elbo", "test_nll")},
                           x[0].numel()):
            warn("evaluate", f"prior source {label!r}: {line} nats per image is absurd for "
                 f"these images; the model probably diverged")
        for key in non_finite(results):
            warn("evaluate", f"prior source {label!r}: diagnostic {key} is {results[key]}; "
                 f"written as null (named under non_finite in metrics.json)")
        # results of another checkpoint are dropped whole: none outlives its model
        if label == TRAINED:
            same = run.metrics().get("evaluated_checkpoint") == best["_sha256"]
            # its own classifier tests replace any redone later (experiments/c2st_grid.py)
            redone = ("c2st_recomputed",) if diagnostics else ()
            out[label] = run.update_metrics(drop=redone if same else EVALUATION_KEYS,
                                            **results)
        else:
            saved = run.metrics().get("prior_sources", {})
            saved = saved if isinstance(saved, dict) else {}
            saved[label] = results
            out[label] = run.update_metrics(prior_sources=saved)["prior_sources"][label]


LIMIT_KEYS = ("iw_samples", "test_images", "log_prob_points")
TRUNCATION_WARNING = 0.05  # warn when more than this share of samples skips the filter


def _fallback(prior, source: str, k: int, iw_samples, limit, n_test: int, n_diagnostic: int):
    """K, test images and the diagnostics' log-density points within the prior's
    ``evaluation_limits`` (values the caller gave explicitly are kept), and one line saying
    what changed (None: nothing)."""
    limits = getattr(prior, "evaluation_limits", None) or {}
    bad = {key: v for key, v in limits.items() if key not in LIMIT_KEYS or isinstance(v, bool)
           or not isinstance(v, int) or v < 1}
    if bad:
        raise RunError(f"prior source {source!r} ({type(prior).__name__}): evaluation_limits "
                       f"{bad} not understood; keys are {', '.join(LIMIT_KEYS)}, each a "
                       f"positive integer")
    changes = []
    if iw_samples is None and k > limits.get("iw_samples", k):
        changes.append(f"K {k} -> {limits['iw_samples']}")
        k = limits["iw_samples"]
    if limit is None and n_test > limits.get("test_images", n_test):
        limit = limits["test_images"]
        changes.append(f"test images {n_test} -> {limit}")
    n_log_prob = n_diagnostic
    if n_diagnostic > limits.get("log_prob_points", n_diagnostic):
        n_log_prob = limits["log_prob_points"]
        changes.append(f"prior log-densities in the diagnostics {n_diagnostic} -> {n_log_prob}")
    if not changes:
        return k, limit, n_log_prob, None
    line = (f"prior source {source!r} ({type(prior).__name__}): its log-density is too costly "
            f"for the full evaluation, so {', '.join(changes)} (its evaluation_limits; pass "
            f"--iw-samples/--limit to choose)")
    print(f"evaluate: {line}", file=sys.stderr, flush=True)
    return k, limit, n_log_prob, line


def _figures_and_tensorboard(run: Run, model, splits, extras, results, prior_source,
                             hparam_keys=None) -> None:
    cfg = run.config
    step = run.metrics().get("epochs_trained", 0)
    step = step if type(step) is int and 0 <= step < 10**6 else 0  # metrics.json is data
    trained = prior_source == TRAINED
    title = f"{cfg.prior.name.rpartition(':')[2]} ({cfg.data.name})"
    if not trained:
        title = f"{title}, prior: {prior_source}"
    with run.tensorboard() as writer:
        write_figures(extras, model.prior, run, "figures" if trained else f"figures/{prior_source}",
                      title, writer if trained else None, step)
        if trained:
            n_emb = min(2000, len(splits.x_test))
            points, tag = projector_points(extras["mu_heldout"][:n_emb].cpu())
            # labels as metadata when there are any; thumbnails for grey or colour images
            x = splits.x_test[:n_emb].cpu()
            # evaluating again rewrites the same step's files: TensorBoard's warning about an
            # existing folder is expected then and says nothing wrong
            with contextlib.redirect_stdout(io.StringIO()):
                run.add_embedding(writer, points, tag=tag, step=step,
                                  metadata=None if splits.y_test is None
                                  else splits.y_test[:n_emb].cpu().tolist(),
                                  label_img=x if x.dim() == 4 and x.shape[1] in (1, 3) else None)
            writer.add_hparams(_hparams(cfg, hparam_keys or DEFAULT_HPARAM_KEYS),
                               {f"hparams/{key}": results[key] for key in SUMMARY_KEYS
                                if results.get(key) is not None},
                               run_name=".")


def projector_points(mu: torch.Tensor) -> tuple[torch.Tensor, str]:
    """Posterior means (N, D) for TensorBoard's Projector and their tag. Its PCA needs three
    dimensions (with two it shows no points and "Total variance described: NaN%"), so a 2-d
    latent gets a third column of zeros, named in the tag; D >= 3 is passed as it is."""
    if mu.shape[1] >= 3:
        return mu, "test_posterior_means"
    pad = torch.zeros(len(mu), 3 - mu.shape[1], dtype=mu.dtype)
    return torch.cat([mu, pad], 1), f"test_posterior_means_{mu.shape[1]}d_plus_zero_column"
