"""Diagnostics comparing the prior p(z) with the aggregated posterior q(z), in nats.

All functions are pure functions of tensors (posterior parameters, samples) and of objects
with ``log_prob``/``sample`` (a prior, an :class:`~priorvae.aggregate.AggregatedPosterior`).

- :func:`elbo_surgery` (Hoffman & Johnson, 2016). With the empirical data distribution over N
  images and q(z) = 1/N sum_n q(z|x_n), the average KL term splits exactly:

      E_n KL(q(z|x_n) || p(z))  =  I(n; z)  +  KL(q(z) || p(z))
      kl                         =  mutual_info + marginal_kl

  where I(n; z) = E_n E_{q(z|x_n)}[log q(z|x_n) - log q(z)] lies in [0, log N]. All three are
  Monte-Carlo averages over z_n ~ q(z|x_n), with log q(z) exact over all N components.
- :func:`kl_prior_to_agg`: KL(p || q) = E_p[log p(z) - log q(z)], the direction that sees
  holes: prior mass where q(z) is tiny.
- :func:`hole_rate`: the share of prior samples whose log q(z) falls below the ``quantile``
  (1st percentile) of log q(z) over posterior samples of held-out images. If p = q it is
  about ``quantile``; a prior that puts mass where no image encodes scores high.
- :func:`mmd`: unbiased MMD^2 with a Gaussian kernel k(a, b) = exp(-|a - b|^2 / (2 h^2)), h the
  median pairwise distance of the pooled samples (median heuristic).
- Monte-Carlo errors: every Monte-Carlo mean above comes with ``NAME_stderr`` (std / sqrt(n)
  of its terms); the hole rate with a bootstrap over both of its samples
  (:func:`hole_rate_stderr`); the MMD over disjoint chunks of its samples (:func:`mmd_stderr`).
- :func:`active_units`: number of latent units u with Var_x(E_q[z_u | x]) > 0.01
  (Burda et al., 2016).

References:
    | ELBO surgery (Hoffman & Johnson, 2016)
    | https://approximateinference.org/2016/accepted/HoffmanJohnson2016.pdf
    | A Kernel Two-Sample Test (Gretton et al., 2012) https://jmlr.org/papers/v13/gretton12a.html
    | Importance Weighted Autoencoders (Burda et al., 2016) https://arxiv.org/abs/1509.00519
"""

from __future__ import annotations

import torch

from .aggregate import AggregatedPosterior
from .gaussian import LOG_2PI

__all__ = ["elbo_surgery", "kl_prior_to_agg", "hole_rate", "hole_rate_stderr", "mmd",
           "mmd_stderr", "active_units"]


@torch.no_grad()
def elbo_surgery(mu: torch.Tensor, logvar: torch.Tensor, prior, n_points: int | None = 10_000,
                 generator: torch.Generator | None = None) -> dict[str, float]:
    """Average KL, mutual information and marginal KL (nats) of posteriors (N, D) vs ``prior``.

    The aggregate uses all N posteriors; the outer average uses ``n_points`` of them drawn
    without replacement (all when None or >= N).
    """
    agg = AggregatedPosterior(mu, logvar)
    n = mu.shape[0]
    if n_points is not None and n_points < n:
        idx = torch.randperm(n, device=mu.device, generator=generator)[:n_points]
    else:
        idx = torch.arange(n, device=mu.device)
    m, lv = mu[idx], logvar[idx]
    eps = torch.randn(m.shape, device=m.device, dtype=m.dtype, generator=generator)
    z = m + torch.exp(0.5 * lv) * eps
    log_q_cond = -0.5 * (LOG_2PI + lv + eps**2).sum(-1)
    log_q = agg.log_prob(z)
    log_p = prior.log_prob(z)
    kl = (log_q_cond - log_p).mean().item()
    mi = (log_q_cond - log_q).mean().item()
    return {"kl": kl, "mutual_info": mi, "marginal_kl": kl - mi,
            "kl_stderr": _stderr(log_q_cond - log_p), "mutual_info_stderr":
            _stderr(log_q_cond - log_q), "marginal_kl_stderr": _stderr(log_q - log_p)}


def _stderr(terms: torch.Tensor) -> float:
    """Monte-Carlo standard error of the mean of i.i.d. ``terms`` (N,): std / sqrt(N)."""
    terms = terms.double()
    return (terms.std() / len(terms) ** 0.5).item() if len(terms) > 1 else float("nan")


@torch.no_grad()
def kl_prior_to_agg(prior, agg, n: int = 10_000, stderr: bool = False):
    """KL(p || q) = E_{z ~ p}[log p(z) - log q(z)], Monte Carlo with n prior samples (nats);
    with ``stderr``: (value, its Monte-Carlo standard error)."""
    z = prior.sample(n)
    terms = prior.log_prob(z) - agg.log_prob(z)
    value = terms.mean().item()
    return (value, _stderr(terms)) if stderr else value


@torch.no_grad()
def hole_rate(prior, agg, heldout_mu: torch.Tensor, heldout_logvar: torch.Tensor,
              n: int = 10_000, quantile: float = 0.01,
              generator: torch.Generator | None = None) -> dict:
    """Share of prior samples in the aggregated posterior's "holes".

    The threshold is the ``quantile`` of log q(z) over one posterior sample of each held-out
    image (held out, so no point scores against its own component).

    Returns:
        dict with ``hole_rate`` (float), ``threshold`` (float), and the two histograms'
        data: ``log_q_prior`` (n,) and ``log_q_posterior`` (M,).
    """
    eps = torch.randn(heldout_mu.shape, device=heldout_mu.device, dtype=heldout_mu.dtype,
                      generator=generator)
    z_post = heldout_mu + torch.exp(0.5 * heldout_logvar) * eps
    log_q_post = agg.log_prob(z_post)
    threshold = torch.quantile(log_q_post.double(), quantile).item()
    log_q_prior = agg.log_prob(prior.sample(n))
    return {
        "hole_rate": (log_q_prior < threshold).double().mean().item(),
        "hole_rate_stderr": hole_rate_stderr(log_q_prior, log_q_post, quantile),
        "threshold": threshold,
        "log_q_prior": log_q_prior.cpu(),
        "log_q_posterior": log_q_post.cpu(),
    }


@torch.no_grad()
def hole_rate_stderr(log_q_prior: torch.Tensor, log_q_post: torch.Tensor, quantile: float = 0.01,
                     rounds: int = 200, seed: int = 0) -> float:
    """Bootstrap standard error of the hole rate: both the prior samples and the held-out
    posterior samples that set the threshold are resampled (``rounds`` times, a private
    generator: the caller's random stream is untouched). The aggregate q(z) itself is held
    fixed, so this is the noise of the n prior draws and of the threshold's estimate."""
    gen = torch.Generator().manual_seed(seed)
    prior_side, post_side = log_q_prior.double().cpu(), log_q_post.double().cpu()
    rates = torch.empty(rounds, dtype=torch.float64)
    for b in range(rounds):
        post = post_side[torch.randint(len(post_side), (len(post_side),), generator=gen)]
        draw = prior_side[torch.randint(len(prior_side), (len(prior_side),), generator=gen)]
        rates[b] = (draw < torch.quantile(post, quantile)).double().mean()
    return rates.std().item()


@torch.no_grad()
def mmd(x: torch.Tensor, y: torch.Tensor, bandwidth: float | None = None) -> float:
    """Unbiased MMD^2 between samples x (m, D) and y (n, D), Gaussian kernel.

    ``bandwidth`` h defaults to the median pairwise distance of the pooled samples.
    """
    if x.shape[0] < 2 or y.shape[0] < 2:
        raise ValueError("mmd needs at least 2 samples on each side")
    x, y = x.double(), y.double()
    if bandwidth is None:
        pooled = torch.cat([x, y])
        if pooled.shape[0] > 2000:
            pooled = pooled[torch.randperm(pooled.shape[0], device=pooled.device)[:2000]]
        bandwidth = torch.pdist(pooled).median().item()
    gamma = 1.0 / (2 * bandwidth**2)
    m, n = x.shape[0], y.shape[0]
    kxx = torch.exp(-gamma * torch.cdist(x, x) ** 2)
    kyy = torch.exp(-gamma * torch.cdist(y, y) ** 2)
    kxy = torch.exp(-gamma * torch.cdist(x, y) ** 2)
    term_x = (kxx.sum() - kxx.diagonal().sum()) / (m * (m - 1))
    term_y = (kyy.sum() - kyy.diagonal().sum()) / (n * (n - 1))
    return (term_x + term_y - 2 * kxy.mean()).item()


@torch.no_grad()
def mmd_stderr(x: torch.Tensor, y: torch.Tensor, m: int) -> float | None:
    """Monte-Carlo standard error of :func:`mmd` of ``m`` samples a side: the standard deviation
    of MMD^2 over the disjoint m-point chunks of x (n, D) and y (n, D), independent repeated
    draws (None with fewer than two chunks). One bandwidth for all, the median distance of
    every second pooled point of the first chunks: no random number is drawn."""
    chunks = min(len(x), len(y)) // m
    if chunks < 2:
        return None
    pooled = torch.cat([x[:m], y[:m]]).double()[::2]
    h = torch.pdist(pooled).median().item()
    values = [mmd(x[i * m:(i + 1) * m], y[i * m:(i + 1) * m], bandwidth=h)
              for i in range(chunks)]
    return torch.tensor(values, dtype=torch.float64).std().item()


def active_units(mu: torch.Tensor, threshold: float = 0.01) -> int:
    """Number of units u with Var_x(mu_u) > threshold, from posterior means (N, D)."""
    if len(mu) < 2:  # one posterior mean varies in no unit (var() would be NaN and warn)
        return 0
    return int((mu.double().var(dim=0) > threshold).sum().item())
