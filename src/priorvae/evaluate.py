"""Test-set evaluation of a run: ELBO, IWAE NLL, and every prior-vs-aggregate diagnostic.

``test_elbo`` is the mean single-sample ELBO per test image (nats, negative).
``test_nll`` is the mean over test images of -IWAE_K(x), the importance-weighted estimate of
-log p(x) with K samples (positive nats; an upper bound on the true NLL in expectation).
The diagnostics are those of :func:`priorvae.measure.diagnose` (names in
:data:`priorvae.measure.DIAGNOSTIC_KEYS`).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from .data import load_splits
from .errors import RunError
from .measure import DIAGNOSTIC_KEYS, diagnose, mean_elbo, mean_iwae_nll
from .quality import classifier_cache_dir, get_classifier
from .runs import FINISHED, TRAINED, Run, resolve_device

__all__ = ["write_figures", "evaluate_run"]


def write_figures(extras: dict, prior, run: Run, folder: str, title: str = "", writer=None,
                  step: int = 0) -> list[Path]:
    """Save the pictures as PNG in ``run``'s ``folder`` (atomically; to TensorBoard too when
    ``writer`` is given)."""
    import matplotlib.pyplot as plt

    from .figures import hole_score_figure, latent_atlas, log_q_histogram, samples_figure

    figs = {
        "samples": samples_figure(extras["x_prior"], extras["x_agg"], extras["x_orig"],
                                  extras["x_recon"], title),
        "latent_atlas": latent_atlas(extras["mu_heldout"][:5000], extras["labels"][:5000],
                                     extras["z_prior"][:2000], prior, extras["agg"],
                                     extras["threshold"], title),
        "log_q_histogram": log_q_histogram(extras["log_q_prior"], extras["log_q_posterior"],
                                           extras["threshold"], extras.get("hole_rate"), title),
        "hole_scores": hole_score_figure(extras["hole_best"], extras["hole_best_scores"],
                                         extras["hole_worst"], extras["hole_worst_scores"],
                                         extras.get("latent_c2st_auc"), title),
    }
    paths = []
    for name, fig in figs.items():
        paths.append(run.save_figure(Path(folder) / f"{name}.png", fig))
        if writer is not None:
            writer.add_figure(f"diagnostics/{name}", fig, step, close=False)
        plt.close(fig)
    return paths


def _flat_hparams(cfg) -> dict:
    out = {}
    for table, body in cfg.to_dict().items():
        if table in cfg.extra:
            continue
        for key, value in body.items():
            out[f"{table}.{key}"] = str(value) if isinstance(value, list) else value
    return out


def evaluate_run(run_dir: str | Path, iw_samples: int | None = None, device: str | None = None,
                 progress: bool = True, limit: int | None = None, diagnostics: bool = True,
                 n_diagnostic: int = 10_000, prior_source: str = TRAINED,
                 trust_remote_code: bool = False) -> dict:
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
    """
    for name, value in (("iw_samples", iw_samples), ("limit", limit)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < 1):
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    run = Run.open(run_dir, trust_remote_code)
    cfg = run.config
    with run.lock("evaluate"):
        status = run.status
        if status not in (*FINISHED, "interrupted", "failed"):
            raise RunError(f"{run.path} has not been trained (status {status!r}); train it first")
        dev = resolve_device(device or cfg.train.device)
        k = iw_samples or cfg.eval.iw_samples
        best = run.load_checkpoint("best", dev)
        model = run.load_model("best", dev, best)
        splits = load_splits(cfg.data, device=dev)
        fit_seconds = None
        if prior_source != TRAINED:
            from .expost import fit_record, load_prior_source

            model.prior = load_prior_source(run, model, prior_source, splits)
            fit_seconds = fit_record(run, prior_source).get("seconds")
        k, limit, n_log_prob, fallback = _fallback(model.prior, prior_source, k, iw_samples,
                                                   limit, len(splits.x_test), n_diagnostic)
        x = splits.x_test if limit is None else splits.x_test[:limit]
        torch.manual_seed(cfg.train.seed)
        t0 = time.perf_counter()
        elbo = mean_elbo(model, x, cfg.train.val_batch_size)
        nll = mean_iwae_nll(model, x, k, cfg.eval.batch_size, progress=progress)
        results = {"test_elbo": elbo["elbo"], "test_recon": elbo["recon"], "test_kl": elbo["kl"],
                   "test_nll": nll, "iw_samples": k, "test_images": len(x),
                   "evaluated_epoch": best.get("epoch"), "evaluation_fallback": fallback}
        if fit_seconds is not None:  # an ex-post source: what fitting it cost
            results["fit_seconds"] = fit_seconds
        if getattr(model.prior, "estimated_normalizer", False):
            # the NLL includes a Monte-Carlo log Z: its standard error goes next to it
            results["log_normalizer_stderr"] = model.prior.log_normalizer_stderr()
        if diagnostics:
            clf = get_classifier(splits, classifier_cache_dir(), progress=progress)
            metrics, extras = diagnose(model, splits, clf, n=n_diagnostic, n_log_prob=n_log_prob)
            results.update(metrics, diagnostic_points=n_diagnostic, log_prob_points=n_log_prob)
            extras["hole_rate"] = metrics["hole_rate"]
            _figures_and_tensorboard(run, model, splits, extras, results, prior_source)
        results["eval_seconds"] = time.perf_counter() - t0
        if prior_source == TRAINED:
            return run.update_metrics(**results)
        sources = run.metrics().get("prior_sources", {})
        sources[prior_source] = results
        run.update_metrics(prior_sources=sources)
        return results


LIMIT_KEYS = ("iw_samples", "test_images", "log_prob_points")


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


def _figures_and_tensorboard(run: Run, model, splits, extras, results, prior_source) -> None:
    from torch.utils.tensorboard import SummaryWriter

    cfg = run.config
    step = run.metrics().get("epochs_trained", 0)
    trained = prior_source == TRAINED
    title = f"{cfg.prior.name.rpartition(':')[2]} ({cfg.data.name})"
    if not trained:
        title = f"{title}, prior: {prior_source}"
    with SummaryWriter(log_dir=str(run.path)) as writer:
        write_figures(extras, model.prior, run, "figures" if trained else f"figures/{prior_source}",
                      title, writer if trained else None, step)
        if trained:
            n_emb = min(2000, len(splits.x_test))
            writer.add_embedding(extras["mu_heldout"][:n_emb].cpu(),
                                 metadata=splits.y_test[:n_emb].cpu().tolist(),
                                 label_img=splits.x_test[:n_emb].cpu(), global_step=step,
                                 tag="test_posterior_means")
            writer.add_hparams(_flat_hparams(cfg),
                               {f"hparams/{key}": results[key] for key in
                                ("test_nll", "test_elbo", *DIAGNOSTIC_KEYS) if key in results},
                               run_name=".")
