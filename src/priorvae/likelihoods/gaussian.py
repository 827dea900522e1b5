"""Gaussian likelihood, for real-valued data (and grey levels read as real numbers).

    log p(x | m, s) = sum_j -1/2 [log 2 pi + log s_j^2 + (x_j - m_j)^2 / s_j^2]

The decoder outputs the means m (B, C, ...); the variance s^2 is, by ``variance``:

- ``"fixed"``: sigma^2 for every value (``sigma``, not learned; sigma = 1 makes the ELBO a
  squared error plus a constant),
- ``"shared"``: one learned log s^2 for all values, started at log sigma^2,
- ``"per_pixel"``: one learned log s_j^2 per value (position and channel), shared by all items,
- ``"decoder"``: the decoder outputs log s^2 too (two outputs per value), bounded below by
  ``logvar_min`` (a variance that collapses onto a pixel makes the likelihood unbounded).

With ``dequantize = true`` every preparation adds U[0, 1/255) noise to the data (8-bit data
k/255 made continuous): then E log p(x + u) - D log 255 bounds log P(k) from below. The
density is not a probability mass, so no bits/dim is reported.

References:
    | Auto-Encoding Variational Bayes (Kingma & Welling, 2014) https://arxiv.org/abs/1312.6114
    | (appendix C.2, Gaussian MLP decoder)
    | A note on the evaluation of generative models (Theis et al., 2016)
    | https://arxiv.org/abs/1511.01844 (uniform dequantization)
"""

from __future__ import annotations

import math

import torch
from einops import rearrange
from torch import nn

from ..errors import ConfigError
from . import Likelihood, check_number, register_likelihood

__all__ = ["Gaussian"]

LOG_2PI = math.log(2 * math.pi)
VARIANCES = ("fixed", "shared", "per_pixel", "decoder")


@register_likelihood("gaussian")
class Gaussian(Likelihood):
    """N(x; m, s^2) per value; see the module docstring for ``variance``."""

    value_types = frozenset({"binary", "intensity", "8bit", "real"})
    feature_draws = False  # a draw is the mean plus pixel noise: compare means

    def __init__(self, input_shape, variance: str = "fixed", sigma: float = 1.0,
                 logvar_min: float = -10.0, dequantize: bool = False):
        super().__init__(input_shape)
        if variance not in VARIANCES:
            raise ConfigError(f"gaussian: variance must be one of {', '.join(VARIANCES)}, "
                              f"got {variance!r}")
        sigma = check_number("gaussian", "sigma", sigma, 1e-6, 1e6)
        logvar_min = check_number("gaussian", "logvar_min", logvar_min, -30.0, 30.0)
        if not isinstance(dequantize, bool):
            raise ConfigError(f"[likelihood] dequantize of 'gaussian' must be true or false, "
                              f"got {dequantize!r}")
        self.variance, self.logvar_min, self.dequantize = variance, float(logvar_min), dequantize
        self.params_per_value = 2 if variance == "decoder" else 1
        logvar = torch.full(() if variance in ("fixed", "shared") else self.input_shape,
                            2 * math.log(sigma))
        if variance in ("shared", "per_pixel"):
            self.logvar = nn.Parameter(logvar)
        else:
            self.register_buffer("logvar", logvar)

    def _split(self, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, log-variance), each (B, *input_shape)."""
        if self.variance == "decoder":
            m, lv = rearrange(out, "b (p c) ... -> p b c ...", p=2)
            return m, lv.clamp_min(self.logvar_min)
        return out, self.logvar.expand_as(out)

    def prepare(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if not self.dequantize:
            return x
        return x + torch.rand(x.shape, device=x.device, dtype=x.dtype, generator=generator) / 255

    def log_prob(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        m, lv = self._split(out)
        ll = -0.5 * (LOG_2PI + lv + (x - m) ** 2 * torch.exp(-lv))
        return rearrange(ll, "b ... -> b (...)").sum(-1)

    def mean(self, out: torch.Tensor) -> torch.Tensor:
        return self._split(out)[0]

    def sample(self, out: torch.Tensor, generator: torch.Generator | None = None
               ) -> torch.Tensor:
        m, lv = self._split(out)
        eps = torch.randn(m.shape, device=m.device, dtype=m.dtype, generator=generator)
        return m + torch.exp(0.5 * lv) * eps
