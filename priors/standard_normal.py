"""Standard normal prior p(z) = N(0, I).

The prior of the original VAE:

    log p(z) = -1/2 sum_d (log 2 pi + z_d^2)

Nothing is learned. The VAE still uses the Monte-Carlo KL log q(z|x) - log p(z) with this
prior, so every prior is compared with the same estimator.

References:
    | Auto-Encoding Variational Bayes (Kingma & Welling, 2014)
    | https://arxiv.org/abs/1312.6114
"""

import torch

from priorvae.gaussian import log_standard_normal
from priorvae.priors.base import Prior, register_prior

__all__ = ["StandardNormal"]


@register_prior("standard_normal")
class StandardNormal(Prior):
    """N(0, I) over R^D. ``log_prob``: (B, D) -> (B,); ``sample(n)``: (n, D)."""

    def __init__(self, latent_dim: int):
        super().__init__(latent_dim)
        # a buffer, so the prior follows .to(device) and samples where it lives
        self.register_buffer("loc", torch.zeros(latent_dim))

    def _log_prob(self, z: torch.Tensor) -> torch.Tensor:
        return log_standard_normal(z)

    def _sample(self, n: int) -> torch.Tensor:
        return torch.randn(n, self.latent_dim, device=self.loc.device, dtype=self.loc.dtype)
