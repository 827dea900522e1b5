"""The aggregated posterior q(z) = 1/N sum_n q(z | x_n), a mixture of N diagonal Gaussians.

    log q(z) = logsumexp_n log N(z; mu_n, diag(exp(logvar_n))) - log N

``log_prob`` runs in memory-bounded chunks with the Gaussian exponent expanded into one
matrix product per chunk (:func:`priorvae.gaussian.mixture_log_prob`), so 10,000 points
against 50,000 components at D = 40 take seconds on a CPU. ``sample(n)`` picks n data indices
uniformly, then samples their posteriors.

References:
    | ELBO surgery: yet another way to carve up the variational evidence lower bound
    | (Hoffman & Johnson, 2016)
    | https://approximateinference.org/2016/accepted/HoffmanJohnson2016.pdf
"""

from __future__ import annotations

import torch
from torch import nn

from .data import iterate_batches
from .gaussian import mixture_log_prob
from .likelihoods import Likelihood, prepare_once
from .registry import Prior

__all__ = ["AggregatedPosterior", "encode_split", "mixture_evaluation_limits"]


def mixture_evaluation_limits(components: int) -> dict | None:
    """``evaluation_limits`` of a mixture with one component per training image."""
    return None if components <= 10_000 else {"iw_samples": 1000, "test_images": 2000}


class AggregatedPosterior(Prior):
    """q(z) from the posterior parameters of N images, usable wherever a prior is.

    Args:
        mu, logvar: (N, D) posterior means and log-variances.
        max_elements: largest (chunk, N) block of log-densities held at once (memory bound:
            about ``3 * 4 * max_elements`` bytes in float32).
    """

    def __init__(self, mu: torch.Tensor, logvar: torch.Tensor, max_elements: int = 2**24):
        if mu.dim() != 2 or mu.shape != logvar.shape:
            raise ValueError(f"mu and logvar must both be (N, D), got {tuple(mu.shape)} and "
                             f"{tuple(logvar.shape)}")
        super().__init__(mu.shape[1])
        self._anchor = self._anchor.to(mu.device, mu.dtype)  # device/dtype are the codes'
        self.register_buffer("mu", mu.detach())
        self.register_buffer("logvar", logvar.detach())
        self.max_elements = max_elements

    def __len__(self) -> int:
        return self.mu.shape[0]

    @property
    def evaluation_limits(self) -> dict | None:
        """Beyond 10,000 components the IWAE bound with K = 5,000 on every test image is hours
        of CPU: ``evaluate`` falls back to K = 1,000 on 2,000 test images (and says so)."""
        return mixture_evaluation_limits(len(self))

    @torch.no_grad()
    def _log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """log q(z): (B, D) -> (B,)."""
        return mixture_log_prob(z.to(self.mu.dtype), self.mu, self.logvar,
                                max_elements=self.max_elements)

    @torch.no_grad()
    def _sample(self, n: int) -> torch.Tensor:
        """n draws: uniform data index, then z ~ q(z | x_index): (n, D)."""
        idx = torch.randint(len(self), (n,), device=self.mu.device)
        eps = torch.randn(n, self.latent_dim, device=self.mu.device, dtype=self.mu.dtype)
        return self.mu[idx] + torch.exp(0.5 * self.logvar[idx]) * eps


@torch.no_grad()
def encode_split(encoder: nn.Module, x: torch.Tensor, batch_size: int = 1000,
                 likelihood: Likelihood | None = None, seed: int = 0
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior parameters (mu, logvar), each (N, D), of the items ``x`` (N, ...).

    ``x`` is encoded as it is (prepared held-out data), or, given the model's ``likelihood``,
    first prepared once by it with a generator seeded ``seed`` (the training split's grey
    levels, binarized reproducibly by the Bernoulli likelihood).
    """
    if likelihood is not None:
        x = prepare_once(likelihood, x, seed)
    mus, logvars = [], []
    was_training = encoder.training
    encoder.eval()
    for batch in iterate_batches(x, batch_size, shuffle=False, dynamic_binarization=False):
        mu, logvar = encoder(batch)
        mus.append(mu)
        logvars.append(logvar)
    encoder.train(was_training)
    return torch.cat(mus), torch.cat(logvars)
