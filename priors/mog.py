"""Mixture-of-Gaussians prior, a joint mixture over all latent dimensions.

    p(z) = sum_k pi_k N(z; m_k, diag(sigma_k^2)),   pi = softmax(a)

with learnable means m_k, log-variances log sigma_k^2 and weight logits a (K components).
The log-density is a logsumexp over components of the *summed* per-dimension Gaussian
log-densities (one mixture over R^D, not a product of per-dimension mixtures), computed with
matrix products (:func:`priorvae.gaussian.mixture_log_prob`).

References:
    | Deep Unsupervised Clustering with Gaussian Mixture Variational Autoencoders
    | (Dilokthanakul et al., 2016) https://arxiv.org/abs/1611.02648
    | VAE with a VampPrior (Tomczak & Welling, 2018), section on the MoG prior
    | https://arxiv.org/abs/1705.07120
"""

import torch
from torch import nn

from priorvae.errors import PriorError
from priorvae.gaussian import mixture_log_prob
from priorvae.priors.base import Prior, register_prior

__all__ = ["MixtureOfGaussians"]


@register_prior("mog")
class MixtureOfGaussians(Prior):
    """K-component diagonal Gaussian mixture over R^D.

    Args:
        latent_dim: D.
        n_components: K.
        init_scale: component means start as N(0, init_scale^2) draws.
        init_logvar: component log-variances start at this value.
        learn_weights: learn the mixture weights (else fixed uniform).
    """

    def __init__(self, latent_dim: int, n_components: int = 10, init_scale: float = 1.0,
                 init_logvar: float = 0.0, learn_weights: bool = True):
        super().__init__(latent_dim)
        if n_components < 1:
            raise PriorError(f"mog: n_components must be positive, got {n_components}")
        self.means = nn.Parameter(torch.randn(n_components, latent_dim) * init_scale)
        self.logvars = nn.Parameter(torch.full((n_components, latent_dim), float(init_logvar)))
        logits = torch.zeros(n_components)
        if learn_weights:
            self.logits = nn.Parameter(logits)
        else:
            self.register_buffer("logits", logits)

    @property
    def n_components(self) -> int:
        return self.means.shape[0]

    def _log_prob(self, z: torch.Tensor) -> torch.Tensor:
        return mixture_log_prob(z, self.means, self.logvars, torch.log_softmax(self.logits, -1))

    def _sample(self, n: int) -> torch.Tensor:
        k = torch.multinomial(torch.softmax(self.logits, -1), n, replacement=True)  # (n,)
        eps = torch.randn(n, self.latent_dim, device=self.means.device, dtype=self.means.dtype)
        return self.means[k] + torch.exp(0.5 * self.logvars[k]) * eps

    def extra_repr(self) -> str:
        return f"latent_dim={self.latent_dim}, n_components={self.n_components}"
