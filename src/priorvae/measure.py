"""Measurements of a trained VAE: pure functions of a model and tensors, and the metric names.

``mean_elbo`` (single-sample ELBO), ``mean_iwae_nll`` (-IWAE_K, an upper bound on -log p(x)
in expectation; ``mean_iwae_nlls``: under several priors with one decoder pass),
``decode_samples``, and ``diagnose``: every prior-vs-aggregated-posterior diagnostic (see
:mod:`priorvae.diagnostics`, :mod:`priorvae.twosample`, :mod:`priorvae.quality`). The metric
names below are the one list that ``evaluate``, ``compare``, the command line and TensorBoard
read.

The two-sample measures come in two spaces: ``latent_*`` (prior samples against one posterior
draw of each held-out image) and ``feature_*`` (decoded prior samples, drawn from the
likelihood where it says ``feature_draws``, against
held-out images, in the quality classifier's features): ``precision``, ``recall`` (k = 3),
``density``, ``coverage`` (k = 5), ``c2st_auc`` and ``c2st_acc`` (classifier two-sample test;
0.5 = indistinguishable).
"""

from __future__ import annotations

import contextlib

import torch
from tqdm.auto import tqdm

from .aggregate import AggregatedPosterior, encode_split
from .data import Splits, iterate_batches
from .diagnostics import (
    active_units,
    elbo_surgery,
    hole_rate,
    kl_prior_to_agg,
    mmd,
    mmd_stderr,
)
from .quality import class_entropy, features, frechet_distance
from .stop import check_stop
from .twosample import classifier_two_sample, knn_two_sample
from .vae import VAE

__all__ = ["TEST_KEYS", "TWO_SAMPLE_KEYS", "DIAGNOSTIC_KEYS", "STDERR_KEYS", "mean_elbo",
           "mean_iwae_nll", "mean_iwae_nlls", "decode_samples", "diagnose", "two_sample"]

TEST_KEYS = ("test_nll", "test_elbo", "test_recon", "test_kl", "iw_samples", "test_images")
TWO_SAMPLE_KEYS = ("precision", "recall", "density", "coverage", "c2st_auc", "c2st_acc")
DIAGNOSTIC_KEYS = ("kl", "mutual_info", "marginal_kl", "kl_prior_to_agg", "hole_rate", "mmd",
                   "active_units", "fd_prior", "fd_aggregate", "class_entropy_prior",
                   "class_entropy_aggregate", *(f"latent_{k}" for k in TWO_SAMPLE_KEYS),
                   *(f"feature_{k}" for k in TWO_SAMPLE_KEYS))


HELDOUT_CODES = 2000  # codes of held-out images a diagnosis wants at least (see _diagnose)


def two_sample(real: torch.Tensor, fake: torch.Tensor, prefix: str, real_block: int = 1
               ) -> tuple[dict, dict]:
    """k-NN measures and the classifier test of ``fake`` (prior side) against ``real``, named
    ``PREFIX_precision`` ...; also the classifier's raw output (hole scores). ``real_block``:
    ``real`` holds runs of that many codes of one image, which the classifier's random
    halves keep together."""
    metrics = knn_two_sample(real, fake)
    c2st = classifier_two_sample(fake, real, q_block=real_block)
    metrics["c2st_auc"], metrics["c2st_acc"] = c2st["auc"], c2st["accuracy"]
    metrics["c2st_auc_stderr"], metrics["c2st_acc_stderr"] = (c2st["auc_stderr"],
                                                              c2st["accuracy_stderr"])
    out = {}
    for k in TWO_SAMPLE_KEYS:
        out[f"{prefix}_{k}"], out[f"{prefix}_{k}_stderr"] = metrics[k], metrics[f"{k}_stderr"]
    return out, c2st




# the metrics that carry a Monte-Carlo standard error, as NAME_stderr beside NAME
STDERR_KEYS = ("kl", "mutual_info", "marginal_kl", "kl_prior_to_agg", "hole_rate", "mmd",
               "fd_prior", "fd_aggregate", *(f"{side}_{k}" for side in ("latent", "feature")
                                 for k in TWO_SAMPLE_KEYS))


def _bootstrap_fd(fake: torch.Tensor, real: torch.Tensor, rounds: int = 20,
                  seed: int = 0) -> float:
    """Bootstrap standard error of a Fréchet distance (both feature sets resampled; a private
    generator, the caller's random stream untouched)."""
    gen = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(rounds):
        i = torch.randint(len(fake), (len(fake),), generator=gen).to(fake.device)
        j = torch.randint(len(real), (len(real),), generator=gen).to(real.device)
        values.append(frechet_distance(fake[i], real[j]))
    return torch.tensor(values, dtype=torch.float64).std().item()


@torch.no_grad()
def mean_elbo(model: VAE, x: torch.Tensor, batch_size: int = 1000) -> dict[str, float]:
    """Mean single-sample ELBO, reconstruction and KL over the binary images ``x`` (N, ...)."""
    sums = {"elbo": 0.0, "recon": 0.0, "kl": 0.0}
    with model.prior.frozen():  # work that depends on the prior's parameters alone: once
        for batch in iterate_batches(x, batch_size, shuffle=False, dynamic_binarization=False):
            check_stop()  # SIGTERM: stop between batches
            terms = model(batch)
            for k in sums:
                sums[k] += terms[k].sum().item()
    return {k: v / len(x) for k, v in sums.items()}


@torch.no_grad()
def mean_iwae_nll(model: VAE, x: torch.Tensor, k: int, batch_size: int = 100,
                  progress: bool = False) -> float:
    """Mean of -IWAE_k(x) over the binary images ``x`` (N, ...), in nats."""
    return mean_iwae_nlls(model, x, k, [model.prior], batch_size, progress)[0]


@torch.no_grad()
def mean_iwae_nlls(model: VAE, x: torch.Tensor, k: int, priors: list, batch_size: int = 100,
                   progress: bool = False, rows: list | None = None) -> list[float]:
    """Mean -IWAE_k(x) over ``x`` (N, ...) under each of ``priors`` with one decoder pass
    (:meth:`VAE.iwae_priors`): element s equals ``mean_iwae_nll`` of the model with
    ``priors[s]`` from the same random state. ``rows``: a list that receives each batch's
    per-image values, (S, batch) tensors of -IWAE_k (for paired differences)."""
    totals = [0.0] * len(priors)
    batches = tqdm(iterate_batches(x, batch_size, shuffle=False, dynamic_binarization=False),
                   total=-(-len(x) // batch_size), disable=not progress, dynamic_ncols=True,
                   desc=f"test NLL (K={k}" + (f", {len(priors)} priors)" if len(priors) > 1
                                               else ")"))
    with contextlib.ExitStack() as stack:
        for prior in priors:  # the VampPrior encodes its pseudo-inputs once, not per batch
            stack.enter_context(prior.frozen())
        for batch in batches:
            check_stop()  # SIGTERM: stop between batches
            values = model.iwae_priors(batch, k, priors)
            if rows is not None:
                rows.append(-values)
            for s, row in enumerate(values):
                totals[s] += -row.sum().item()
    return [total / len(x) for total in totals]


@torch.no_grad()
def decode_samples(model: VAE, z: torch.Tensor, sample: bool = False,
                   batch_size: int = 1000) -> torch.Tensor:
    """Items decoded from latent codes z (N, D): the likelihood's means (pixel probabilities
    for Bernoulli), or one draw from it (``sample``)."""
    out = []
    lik = model.likelihood
    for start in range(0, len(z), batch_size):
        params = model.decode(z[start:start + batch_size])
        out.append(lik.sample(params) if sample else lik.mean(params))
    return torch.cat(out)


@torch.no_grad()
def diagnose(model: VAE, splits: Splits, classifier=None, n: int = 10_000,
             train_subset: int | None = None, heldout: torch.Tensor | None = None,
             heldout_labels: torch.Tensor | None = None,
             n_log_prob: int | None = None) -> tuple[dict, dict]:
    """All prior-vs-aggregated-posterior diagnostics of a trained model.

    q(z) is built from the training split (all of it, or its first ``train_subset`` images);
    held-out images (default: the test split) give the hole threshold and the atlas (labels:
    ``heldout_labels``, default the test split's; None for data without labels). ``n``
    prior samples feed every measure; the two that need the prior's log-density (marginal KL,
    KL(p||q): Monte-Carlo means, so fewer points only add noise) use ``n_log_prob`` of them
    where that density is costly (default ``n``). The sample-based measures (Fréchet distance,
    k-NN precision/recall/coverage, classifier AUC) keep ``n``: they depend on the sample size,
    and rows evaluated with different sizes would not compare.

    ``classifier`` None (data without labels, or not asked for): no fd_*, class_entropy_* or
    feature_* measures.

    Returns:
        (metrics, extras): metrics are floats named as in metrics.json; extras hold what the
        pictures need (log q histograms, posterior means, samples, the aggregate).
    """
    model.eval()
    with model.prior.frozen():  # e.g. an estimated normaliser: estimated once for all of it
        return _diagnose(model, splits, classifier, n, train_subset, heldout, heldout_labels,
                         n if n_log_prob is None else min(n, n_log_prob))


def _diagnose(model, splits, classifier, n, train_subset, heldout, heldout_labels, n_log_prob):
    x_train = splits.x_train if train_subset is None else splits.x_train[:train_subset]
    held = splits.x_test if heldout is None else heldout
    labels = splits.y_test if heldout_labels is None else heldout_labels
    # the training split prepared once (seed 0) as the model sees data; held-out: prepared
    mu_tr, lv_tr = encode_split(model.encoder, x_train, likelihood=model.likelihood)
    mu_te, lv_te = encode_split(model.encoder, held)
    agg = AggregatedPosterior(mu_tr, lv_tr)
    metrics: dict = dict(elbo_surgery(mu_tr, lv_tr, model.prior, n_points=n_log_prob))
    metrics["kl_prior_to_agg"], metrics["kl_prior_to_agg_stderr"] = kl_prior_to_agg(
        model.prior, agg, n_log_prob, stderr=True)
    # a held-out set smaller than HELDOUT_CODES (the 300 test digits) gives each image several
    # codes, image by image, so the hole threshold and the two-sample tests see about that many
    # codes and the classifier's halves split by image; MNIST's 10,000 keep one code each
    draws = max(1, min(n, HELDOUT_CODES) // len(held))
    mu_codes, lv_codes = ((mu_te, lv_te) if draws == 1 else
                          (mu_te.repeat_interleave(draws, 0), lv_te.repeat_interleave(draws, 0)))
    holes = hole_rate(model.prior, agg, mu_codes, lv_codes, n)
    metrics["hole_rate"], metrics["hole_rate_stderr"] = holes["hole_rate"], \
        holes["hole_rate_stderr"]
    m = min(n, 2000)
    z_prior, z_agg = model.prior.sample(n), agg.sample(n)
    metrics["mmd"] = mmd(z_prior[:m], z_agg[:m])
    se = mmd_stderr(z_prior, z_agg, m)  # over the other chunks of the n samples (none: n < 2m)
    if se is not None:
        metrics["mmd_stderr"] = se
    metrics["active_units"] = active_units(mu_te)
    # two-sample measures in latent space: the real side is one code of each held-out image
    m_two = min(n, len(mu_codes))
    z_held = mu_codes[:m_two] + torch.exp(0.5 * lv_codes[:m_two]) * torch.randn_like(
        mu_codes[:m_two])
    latent, c2st = two_sample(z_held, z_prior[:m_two], "latent", real_block=draws)
    metrics.update(latent)
    extras = {"agg": agg, "mu_heldout": mu_te, "labels": labels, "z_prior": z_prior,
              "threshold": holes["threshold"], "log_q_prior": holes["log_q_prior"],
              "log_q_posterior": holes["log_q_posterior"]}
    k = min(n, len(held))
    extras["x_prior"] = decode_samples(model, z_prior[:min(k, 64)])
    extras["x_agg"] = decode_samples(model, z_agg[:min(k, 64)])
    extras["x_orig"], extras["x_recon"] = held[:32], decode_samples(model, mu_te[:32])
    order = c2st["hole_score"].argsort()  # held-out prior samples, most q-like first
    pick = {"best": order[:32], "worst": order[-32:].flip(0)}
    for key, idx in pick.items():
        extras[f"hole_{key}"] = decode_samples(model, z_prior[c2st["p_index"][idx]])
        extras[f"hole_{key}_scores"] = c2st["hole_score"][idx].cpu()
    extras["latent_c2st_auc"] = c2st["auc"]
    extras["c2st_heldout"] = (len(c2st["hole_score"]), m_two - m_two // 2)  # (p, q) points
    if classifier is not None:
        f_ref, _ = features(classifier, held[:k])
        # decoded like the held-out data they are compared with: draws (Bernoulli: binary)
        draws = model.likelihood.feature_draws
        f_prior, p_prior = features(classifier, decode_samples(model, z_prior[:k], draws))
        f_agg, p_agg = features(classifier, decode_samples(model, z_agg[:k], draws))
        metrics["fd_prior"] = frechet_distance(f_prior, f_ref)
        metrics["fd_aggregate"] = frechet_distance(f_agg, f_ref)
        metrics["fd_prior_stderr"] = _bootstrap_fd(f_prior, f_ref)
        metrics["fd_aggregate_stderr"] = _bootstrap_fd(f_agg, f_ref)
        metrics["class_entropy_prior"] = class_entropy(p_prior)
        metrics["class_entropy_aggregate"] = class_entropy(p_agg)
        metrics.update(two_sample(f_ref, f_prior, "feature")[0])
    return metrics, extras
