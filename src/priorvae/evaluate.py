"""Test-set evaluation of a run: ELBO, IWAE NLL, and every prior-vs-aggregate diagnostic.

``test_elbo`` is the mean single-sample ELBO per test image (nats, negative).
``test_nll`` is the mean over test images of -IWAE_K(x), the importance-weighted estimate of
-log p(x) with K samples (positive nats; an upper bound on the true NLL in expectation).
The diagnostics (:func:`diagnose`) compare the prior with the aggregated posterior of the
training split: ``kl``, ``mutual_info``, ``marginal_kl``, ``kl_prior_to_agg``, ``hole_rate``,
``mmd``, ``active_units``, ``fd_prior``, ``fd_aggregate``, ``class_entropy_prior``,
``class_entropy_aggregate`` (see :mod:`priorvae.diagnostics` and :mod:`priorvae.quality`),
and the two-sample measures of :mod:`priorvae.twosample` in two spaces: ``latent_*`` (prior
samples against one posterior draw of each held-out image) and ``feature_*`` (decoded,
binarized prior samples against held-out images, in the quality classifier's features):
``precision``, ``recall`` (k = 3), ``density``, ``coverage`` (k = 5), ``c2st_auc`` and
``c2st_acc`` (classifier two-sample test; 0.5 = indistinguishable).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .aggregate import AggregatedPosterior, encode_split
from .data import Splits, iterate_batches, load_splits
from .diagnostics import active_units, elbo_surgery, hole_rate, kl_prior_to_agg, mmd
from .quality import (
    class_entropy,
    classifier_cache_dir,
    features,
    frechet_distance,
    get_classifier,
)
from .runs import load_run, read_metrics, read_run_config, resolve_device, update_metrics
from .train import mean_elbo
from .twosample import classifier_two_sample, knn_two_sample
from .vae import VAE, frozen_prior

__all__ = ["mean_iwae_nll", "decode_samples", "diagnose", "write_figures", "evaluate_run"]

TWO_SAMPLE_KEYS = ("precision", "recall", "density", "coverage", "c2st_auc", "c2st_acc")
DIAGNOSTIC_KEYS = ("kl", "mutual_info", "marginal_kl", "kl_prior_to_agg", "hole_rate", "mmd",
                   "active_units", "fd_prior", "fd_aggregate", "class_entropy_prior",
                   "class_entropy_aggregate", *(f"latent_{k}" for k in TWO_SAMPLE_KEYS),
                   *(f"feature_{k}" for k in TWO_SAMPLE_KEYS))


def two_sample(real: torch.Tensor, fake: torch.Tensor, prefix: str) -> tuple[dict, dict]:
    """k-NN measures and the classifier test of ``fake`` (prior side) against ``real``, named
    ``PREFIX_precision`` ...; also the classifier's raw output (hole scores)."""
    metrics = knn_two_sample(real, fake)
    c2st = classifier_two_sample(fake, real)
    metrics["c2st_auc"], metrics["c2st_acc"] = c2st["auc"], c2st["accuracy"]
    return {f"{prefix}_{k}": metrics[k] for k in TWO_SAMPLE_KEYS}, c2st


@torch.no_grad()
def mean_iwae_nll(model: VAE, x: torch.Tensor, k: int, batch_size: int = 100,
                  progress: bool = False) -> float:
    """Mean of -IWAE_k(x) over the binary images ``x`` (N, ...), in nats."""
    total = 0.0
    batches = tqdm(iterate_batches(x, batch_size, shuffle=False, dynamic_binarization=False),
                   total=-(-len(x) // batch_size), desc=f"test NLL (K={k})", disable=not progress,
                   dynamic_ncols=True)
    with frozen_prior(model.prior):  # the VampPrior encodes its pseudo-inputs once, not per batch
        for batch in batches:
            total += -model.iwae(batch, k).sum().item()
    return total / len(x)


@torch.no_grad()
def decode_samples(model: VAE, z: torch.Tensor, binary: bool = False,
                   batch_size: int = 1000) -> torch.Tensor:
    """Images decoded from latent codes z (N, D): pixel probabilities, or one Bernoulli draw."""
    out = []
    for start in range(0, len(z), batch_size):
        probs = model.likelihood.mean(model.decode(z[start:start + batch_size]))
        out.append(torch.bernoulli(probs) if binary else probs)
    return torch.cat(out)


@torch.no_grad()
def diagnose(model: VAE, splits: Splits, classifier=None, n: int = 10_000,
             train_subset: int | None = None, heldout: torch.Tensor | None = None,
             heldout_labels: torch.Tensor | None = None) -> tuple[dict, dict]:
    """All prior-vs-aggregated-posterior diagnostics of a trained model.

    q(z) is built from the training split (all of it, or its first ``train_subset`` images);
    held-out images (default: the test split) give the hole threshold and the atlas.

    Returns:
        (metrics, extras): metrics are floats named as in metrics.json; extras hold what the
        pictures need (log q histograms, posterior means, samples, the aggregate).
    """
    model.eval()
    x_train = splits.x_train if train_subset is None else splits.x_train[:train_subset]
    held = splits.x_test if heldout is None else heldout
    labels = splits.y_test if heldout_labels is None else heldout_labels
    mu_tr, lv_tr = encode_split(model.encoder, x_train)
    mu_te, lv_te = encode_split(model.encoder, held)
    agg = AggregatedPosterior(mu_tr, lv_tr)
    metrics: dict = dict(elbo_surgery(mu_tr, lv_tr, model.prior, n_points=n))
    metrics["kl_prior_to_agg"] = kl_prior_to_agg(model.prior, agg, n)
    holes = hole_rate(model.prior, agg, mu_te, lv_te, n)
    metrics["hole_rate"] = holes["hole_rate"]
    m = min(n, 2000)
    z_prior, z_agg = model.prior.sample(n), agg.sample(n)
    metrics["mmd"] = mmd(z_prior[:m], z_agg[:m])
    metrics["active_units"] = active_units(mu_te)
    # two-sample measures in latent space: the real side is one code of each held-out image
    m_two = min(n, len(held))
    z_held = mu_te[:m_two] + torch.exp(0.5 * lv_te[:m_two]) * torch.randn_like(mu_te[:m_two])
    latent, c2st = two_sample(z_held, z_prior[:m_two], "latent")
    metrics.update(latent)
    extras = {"agg": agg, "mu_heldout": mu_te, "labels": labels, "z_prior": z_prior,
              "threshold": holes["threshold"], "log_q_prior": holes["log_q_prior"],
              "log_q_posterior": holes["log_q_posterior"]}
    k = min(n, len(held))
    x_prior = decode_samples(model, z_prior[:k])
    x_agg = decode_samples(model, z_agg[:k])
    extras["x_prior"], extras["x_agg"] = x_prior[:64], x_agg[:64]
    extras["x_orig"], extras["x_recon"] = held[:32], decode_samples(model, mu_te[:32])
    order = c2st["hole_score"].argsort()  # held-out prior samples, most q-like first
    pick = {"best": order[:32], "worst": order[-32:].flip(0)}
    for key, idx in pick.items():
        extras[f"hole_{key}"] = decode_samples(model, z_prior[c2st["p_index"][idx]])
        extras[f"hole_{key}_scores"] = c2st["hole_score"][idx].cpu()
    extras["latent_c2st_auc"] = c2st["auc"]
    if classifier is not None:
        f_ref, _ = features(classifier, held[:k])
        f_prior, p_prior = features(classifier, torch.bernoulli(x_prior))
        f_agg, p_agg = features(classifier, torch.bernoulli(x_agg))
        metrics["fd_prior"] = frechet_distance(f_prior, f_ref)
        metrics["fd_aggregate"] = frechet_distance(f_agg, f_ref)
        metrics["class_entropy_prior"] = class_entropy(p_prior)
        metrics["class_entropy_aggregate"] = class_entropy(p_agg)
        metrics.update(two_sample(f_ref, f_prior, "feature")[0])
    return metrics, extras


def write_figures(extras: dict, prior, out_dir: Path, title: str = "", writer=None,
                  step: int = 0) -> list[Path]:
    """Save the three pictures as PNG in ``out_dir`` (and to TensorBoard when given)."""
    import matplotlib.pyplot as plt

    from .figures import hole_score_figure, latent_atlas, log_q_histogram, samples_figure

    out_dir.mkdir(parents=True, exist_ok=True)
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
        path = out_dir / f"{name}.png"
        fig.savefig(path, dpi=110)
        paths.append(path)
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
                 n_diagnostic: int = 10_000, prior_source: str = "trained") -> dict:
    """Evaluate the best model of a run on its test split; merge the results into metrics.json,
    save the pictures under ``RUN_DIR/figures`` and log them to the run's TensorBoard.

    Args:
        iw_samples: K for the IWAE estimate (default: the run's ``[eval] iw_samples``).
        limit: evaluate only the first ``limit`` test images (for quick looks; recorded).
        diagnostics: also compute the prior-vs-aggregated-posterior diagnostics.
        prior_source: ``trained`` (the run's own prior), ``aggregate`` (q(z) itself) or the
            label of an ex-post prior (``priorvae fit-prior``). The VAE with that prior is still
            a valid bound; results of other sources go under ``prior_sources.SOURCE`` in
            metrics.json, their pictures under ``figures/SOURCE``.
    """
    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir)
    dev = resolve_device(device or cfg.train.device)
    k = iw_samples or cfg.eval.iw_samples
    model = load_run(run_dir, device=str(dev))
    splits = load_splits(cfg.data.name, cfg.data.root, cfg.data.download, device=dev)
    if prior_source != "trained":
        from .expost import load_prior_source

        model.prior = load_prior_source(run_dir, model, prior_source, splits)
    x = splits.x_test if limit is None else splits.x_test[:limit]
    torch.manual_seed(cfg.train.seed)
    t0 = time.perf_counter()
    elbo = mean_elbo(model, x, cfg.train.val_batch_size)
    nll = mean_iwae_nll(model, x, k, cfg.eval.batch_size, progress=progress)
    results = {"test_elbo": elbo["elbo"], "test_recon": elbo["recon"], "test_kl": elbo["kl"],
               "test_nll": nll, "iw_samples": k, "test_images": len(x)}
    if diagnostics:
        clf = get_classifier(splits, classifier_cache_dir(), progress=progress)
        metrics, extras = diagnose(model, splits, clf, n=n_diagnostic)
        results.update(metrics)
        extras["hole_rate"] = metrics["hole_rate"]
        from torch.utils.tensorboard import SummaryWriter

        step = read_metrics(run_dir).get("epochs_trained", 0)
        trained = prior_source == "trained"
        with SummaryWriter(log_dir=str(run_dir)) as writer:
            title = f"{cfg.prior.name.rpartition(':')[2]} ({cfg.data.name})"
            if not trained:
                title = f"{title}, prior: {prior_source}"
            folder = run_dir / "figures" / ("" if trained else prior_source)
            write_figures(extras, model.prior, folder, title, writer if trained else None, step)
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
    results["eval_seconds"] = time.perf_counter() - t0
    if prior_source == "trained":
        return update_metrics(run_dir, **results)
    sources = read_metrics(run_dir).get("prior_sources", {})
    sources[prior_source] = results
    update_metrics(run_dir, prior_sources=sources)
    return results
