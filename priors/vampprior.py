"""VampPrior: a mixture of the encoder's posteriors at K learnable pseudo-inputs.

    p(z) = 1/K sum_k q(z | u_k),    log p(z) = logsumexp_k log q(z | u_k) - log K

The pseudo-inputs are parametrised as in the paper's code, u_k = hardtanh(W e_k) into the data
range [0, 1], with W initialised N(0.05, 0.01) (``init = "paper"``) or from random training
images (``init = "data"``). Real-valued data have no range: ``clamp = false`` makes
u_k = W e_k, unclamped (building with training data outside [0, 1] and ``clamp = true``
warns). The prior shares the VAE's encoder (it is given at build time), so its parameters are
W and the encoder's. The pseudo-inputs are encoded once per ``log_prob``
call, so one training step encodes them once. ``sample(n)`` picks components uniformly at
random (not the first n pseudo-inputs), then samples their posteriors.

References:
    | VAE with a VampPrior (Tomczak & Welling, 2018)
    | https://arxiv.org/abs/1705.07120
"""

import warnings

import torch
from torch import nn

from priorvae.errors import PriorError
from priorvae.gaussian import mixture_log_prob
from priorvae.priors.base import Prior, register_prior

__all__ = ["VampPrior"]


@register_prior("vampprior")
class VampPrior(Prior):
    """Variational mixture of posteriors with K pseudo-inputs of shape ``input_shape``.

    Args:
        latent_dim: D.
        encoder: module mapping x (K, C, H, W) to (mu, logvar), each (K, D) (build context).
        input_shape: (C, H, W) (build context).
        data: training images (N, C, H, W) in [0, 1], used by ``init = "data"`` (context).
        clamp: pseudo-inputs in [0, 1] (hardtanh, the paper); ``False`` for real-valued data.
        n_components: K, the number of pseudo-inputs.
        init: ``"paper"`` (W ~ N(init_mean, init_std)) or ``"data"`` (random training images).
    """

    def __init__(self, latent_dim: int, encoder: nn.Module, input_shape: tuple,
                 data: torch.Tensor | None = None, n_components: int = 500,
                 init: str = "paper", init_mean: float = 0.05, init_std: float = 0.01,
                 clamp: bool = True):
        super().__init__(latent_dim)
        if n_components < 1:
            raise PriorError(f"vampprior: n_components must be positive, got {n_components}")
        self.encoder = encoder
        if not isinstance(clamp, bool):
            raise PriorError(f"vampprior: clamp must be true or false, got {clamp!r}")
        self.clamped = clamp  # part of the density: config.toml keeps it, no new state
        if clamp and data is not None and data.numel() and (data.min() < 0 or data.max() > 1):
            warnings.warn("vampprior: the training data hold values outside [0, 1] but the "
                          "pseudo-inputs are clamped to [0, 1]; set [prior] clamp = false for "
                          "real-valued data", stacklevel=2)
        weight = torch.empty(n_components, *input_shape)
        if init == "paper":
            nn.init.normal_(weight, init_mean, init_std)
        elif init == "data":
            if data is None:
                raise PriorError("vampprior: init = 'data' needs the training data context")
            idx = torch.randint(len(data), (n_components,))
            images = data[idx].detach().float().cpu()
            # keep inside (0, 1) so that hardtanh passes gradients to every pixel
            weight.copy_(images.clamp(0.01, 0.99) if self.clamped else images)
        else:
            raise PriorError(f"vampprior: init must be 'paper' or 'data', got {init!r}")
        self.pseudo = nn.Parameter(weight)

    @property
    def n_components(self) -> int:
        return self.pseudo.shape[0]

    def pseudo_inputs(self) -> torch.Tensor:
        """u_k = hardtanh(W e_k) in [0, 1] (real-valued data: W e_k): (K, C, H, W)."""
        return nn.functional.hardtanh(self.pseudo, 0.0, 1.0) if self.clamped else self.pseudo

    def components(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior parameters at the pseudo-inputs: (mu, logvar), each (K, D); computed once
        inside ``with prior.frozen():`` (evaluation)."""
        cache = self.frozen_cache
        if cache is None:
            return self.encoder(self.pseudo_inputs())
        if "components" not in cache:
            cache["components"] = self.encoder(self.pseudo_inputs())
        return cache["components"]

    def _log_prob(self, z: torch.Tensor) -> torch.Tensor:
        mu, logvar = self.components()
        return mixture_log_prob(z, mu, logvar)

    def _sample(self, n: int) -> torch.Tensor:
        mu, logvar = self.components()
        k = torch.randint(self.n_components, (n,), device=mu.device)
        return mu[k] + torch.exp(0.5 * logvar[k]) * torch.randn_like(mu[k])

    def extra_repr(self) -> str:
        return (f"latent_dim={self.latent_dim}, n_components={self.n_components}, "
                f"clamped={self.clamped}")
