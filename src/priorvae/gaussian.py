"""Diagonal-Gaussian densities and mixtures, the arithmetic every mixture-type prior shares.

A mixture of K diagonal Gaussians evaluated at B points is computed without the (B, K, D)
broadcast: with precisions P = exp(-logvar), the exponent expands into matrix products

    sum_d (z_d - m_kd)^2 P_kd = (z*z) @ P^T - 2 z @ (m*P)^T + sum_d m_kd^2 P_kd,

so memory is O(B K) and the work runs at matrix-multiply speed. Points are processed in chunks
so that the (chunk, K) block stays below ``max_elements``.
"""

from __future__ import annotations

import math

import torch

__all__ = ["LOG_2PI", "log_normal_diag", "log_standard_normal", "mixture_log_prob"]

LOG_2PI = math.log(2 * math.pi)


def log_normal_diag(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log N(z; mu, diag(exp(logvar))) summed over the last dimension: (..., D) -> (...)."""
    return -0.5 * (LOG_2PI + logvar + (z - mu) ** 2 * torch.exp(-logvar)).sum(-1)


def log_standard_normal(z: torch.Tensor) -> torch.Tensor:
    """log N(z; 0, I) summed over the last dimension: (..., D) -> (...)."""
    return -0.5 * (LOG_2PI + z**2).sum(-1)


def mixture_log_prob(
    z: torch.Tensor,
    means: torch.Tensor,
    logvars: torch.Tensor,
    log_weights: torch.Tensor | None = None,
    max_elements: int = 2**24,
) -> torch.Tensor:
    """log sum_k w_k N(z; m_k, diag(exp(logvar_k))).

    Args:
        z: points (B, D).
        means, logvars: components (K, D).
        log_weights: (K,) normalised log mixture weights; uniform (-log K) when None.
        max_elements: largest (chunk, K) block held at once.

    Returns:
        (B,) log densities.
    """
    k, d = means.shape
    prec = torch.exp(-logvars)  # (K, D)
    if log_weights is None:
        log_weights = torch.full((k,), -math.log(k), dtype=z.dtype, device=z.device)
    # per-component constant: log w_k - 1/2 (D log 2pi + sum logvar + sum m^2 P)
    const = log_weights - 0.5 * (d * LOG_2PI + logvars.sum(-1) + (means**2 * prec).sum(-1))
    mp = means * prec  # (K, D)
    rows = max(1, max_elements // max(k, 1))
    out = []
    for start in range(0, z.shape[0], rows):
        zc = z[start:start + rows]
        quad = (zc * zc) @ prec.T - 2.0 * (zc @ mp.T)  # (b, K)
        out.append(torch.logsumexp(const - 0.5 * quad, dim=-1))
    return torch.cat(out) if len(out) > 1 else out[0]
