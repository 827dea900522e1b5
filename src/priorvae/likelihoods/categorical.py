"""Categorical likelihood over the 256 levels of 8-bit data ("categorical256").

Each value x = k/255 gets its own softmax over the 256 levels; the decoder outputs 256 logits
l_{j,0..255} per value (256 per channel):

    log P(x) = sum_j log softmax(l_j)[k_j],   k_j = round(255 x_j)

A probability mass over the levels, so bits/dim = NLL / (D ln 2) with D = C H W and the data in
k/255 form, as for the discretized logistic. No order between levels is assumed: the most
flexible and the most costly decoder output (256 numbers per value).

References:
    | Pixel Recurrent Neural Networks (van den Oord et al., 2016)
    | https://arxiv.org/abs/1601.06759 (the 256-way softmax over pixel values)
"""

from __future__ import annotations

import torch
from einops import rearrange

from . import Likelihood, register_likelihood

__all__ = ["Categorical256"]

LEVELS = 256


@register_likelihood("categorical256")
class Categorical256(Likelihood):
    """Softmax over the 256 levels of each value."""

    value_types = frozenset({"binary", "8bit"})
    bits_per_dim = True
    params_per_value = LEVELS

    def _log_p(self, out: torch.Tensor) -> torch.Tensor:
        """Log probabilities of the levels: (B, 256, *input_shape)."""
        return torch.log_softmax(rearrange(out, "b (l c) ... -> b l c ...", l=LEVELS), 1)

    def log_prob(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        k = torch.round(x * (LEVELS - 1)).long().clamp(0, LEVELS - 1).unsqueeze(1)
        per_value = self._log_p(out).gather(1, k).squeeze(1)
        return rearrange(per_value, "b ... -> b (...)").sum(-1)

    def mean(self, out: torch.Tensor) -> torch.Tensor:
        levels = torch.arange(LEVELS, device=out.device, dtype=out.dtype) / (LEVELS - 1)
        p = self._log_p(out).exp()
        return torch.einsum("bl...,l->b...", p, levels)

    def sample(self, out: torch.Tensor, generator: torch.Generator | None = None
               ) -> torch.Tensor:
        p = rearrange(self._log_p(out).exp(), "b l ... -> b ... l")
        k = torch.multinomial(p.reshape(-1, LEVELS), 1, generator=generator)
        return k.reshape(p.shape[:-1]).to(out.dtype) / (LEVELS - 1)
