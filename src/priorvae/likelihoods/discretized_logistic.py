"""Mixture of discretized logistics, for 8-bit data (PixelCNN++ / NVAE decoders).

Data x = k/255, k in {0, ..., 255}, are mapped to y = 2x - 1 in [-1, 1]; the bin of y is
[y - 1/255, y + 1/255]. Per value, with K components, weights pi = softmax(a), means m_i and
scales s_i = exp(log s_i):

    P(k) = sum_i pi_i [sigma((y + 1/255 - m_i) / s_i) - sigma((y - 1/255 - m_i) / s_i)]

with the edge bins open: k = 0 takes everything below (the first sigma is kept), k = 255
everything above (1 - the second). The difference is computed stably as
sigma(a) - sigma(b) = sigma(a) sigma(-b) (1 - exp(b - a)). P sums to 1 over the 256 levels, so
log_prob is a log probability mass and

    bits/dim = NLL / (D ln 2)     (D = C H W values, NLL in nats, data in k/255 form)

with no further correction: the [0, 255] discretization is in the likelihood itself. The
channels are modelled independently given z (no autoregressive channel coupling as in
PixelCNN++): the decoder outputs 3K numbers per channel (a, m, log s).

References:
    | PixelCNN++ (Salimans et al., 2017) https://arxiv.org/abs/1701.05517
    | NVAE: A Deep Hierarchical VAE (Vahdat & Kautz, 2020) https://arxiv.org/abs/2007.03898
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch.nn.functional import logsigmoid

from . import Likelihood, check_number, register_likelihood

__all__ = ["DiscretizedLogistic"]

HALF_BIN = 1.0 / 255


def _log_sigmoid_diff(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """log(sigma(a) - sigma(b)) for a > b, stable in both tails."""
    return logsigmoid(a) + logsigmoid(-b) + torch.log(-torch.expm1(b - a))


@register_likelihood("discretized_logistic")
class DiscretizedLogistic(Likelihood):
    """Mixture of ``n_mixtures`` discretized logistics per value; log s >= ``log_scale_min``."""

    value_types = frozenset({"binary", "8bit"})
    bits_per_dim = True

    def __init__(self, input_shape, n_mixtures: int = 5, log_scale_min: float = -7.0):
        super().__init__(input_shape)
        name = "discretized_logistic"
        n_mixtures = check_number(name, "n_mixtures", n_mixtures, 1, 100, integer=True)
        log_scale_min = check_number(name, "log_scale_min", log_scale_min, -30.0, 30.0)
        self.k, self.log_scale_min = n_mixtures, float(log_scale_min)
        self.params_per_value = 3 * n_mixtures

    def _params(self, out: torch.Tensor):
        """(log weights, means, log scales), each (B, K, *input_shape)."""
        a, m, log_s = rearrange(out, "b (p k c) ... -> p b k c ...", p=3, k=self.k)
        return torch.log_softmax(a, 1), m, log_s.clamp_min(self.log_scale_min)

    def log_prob(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        log_w, m, log_s = self._params(out)
        y = (2 * x - 1).unsqueeze(1)  # (B, 1, ...)
        inv_s = torch.exp(-log_s)
        upper, lower = (y + HALF_BIN - m) * inv_s, (y - HALF_BIN - m) * inv_s
        mid = _log_sigmoid_diff(upper, lower)
        log_p = torch.where(y < -1 + HALF_BIN, logsigmoid(upper),
                            torch.where(y > 1 - HALF_BIN, logsigmoid(-lower), mid))
        per_value = torch.logsumexp(log_w + log_p, dim=1)
        return rearrange(per_value, "b ... -> b (...)").sum(-1)

    def mean(self, out: torch.Tensor) -> torch.Tensor:
        """E[x] exactly: E[k] = sum_{k=1}^{255} P(K >= k), P(K >= k) = 1 - F(lower edge of k)
        per component (a loop over the 255 edges keeps memory at one (B, K, ...) tensor)."""
        log_w, m, log_s = self._params(out)
        inv_s = torch.exp(-log_s)
        tail = torch.zeros_like(m)
        for k in range(1, 256):
            tail += torch.sigmoid((m - (2 * k / 255 - 1 - HALF_BIN)) * inv_s)
        return (log_w.exp() * tail).sum(1) / 255

    def sample(self, out: torch.Tensor, generator: torch.Generator | None = None
               ) -> torch.Tensor:
        log_w, m, log_s = self._params(out)
        b, k = log_w.shape[:2]
        w = rearrange(log_w.exp(), "b k ... -> (b ...) k")
        pick = torch.multinomial(w, 1, generator=generator).squeeze(1)
        pick = rearrange(pick, "(b n) -> b n", b=b).reshape(b, 1, *log_w.shape[2:])
        mu = m.gather(1, pick).squeeze(1)
        s = log_s.gather(1, pick).exp().squeeze(1)
        u = torch.rand(mu.shape, device=mu.device, dtype=mu.dtype, generator=generator)
        u = u.clamp(1e-5, 1 - 1e-5)
        y = (mu + s * (torch.log(u) - torch.log1p(-u))).clamp(-1, 1)
        return torch.round((y + 1) / 2 * 255) / 255
