"""Diagonal-Gaussian densities and mixtures, the arithmetic every mixture-type prior shares.

A mixture of K diagonal Gaussians evaluated at B points is computed without the (B, K, D)
broadcast: with precisions P = exp(-logvar), the exponent expands into matrix products

    sum_d (z_d - m_kd)^2 P_kd = (z*z) @ P^T - 2 z @ (m*P)^T + sum_d m_kd^2 P_kd,

which one product of a (B, 2D+1) by a (2D+1, K) matrix delivers, so memory is O(B K) and the
work runs at matrix-multiply speed. The price is cancellation: in float32 the error grows with
|z|^2 / sigma^2, about 0.01 nats for 40-d components at the encoder's lower bound
(logvar = -6) and under 1e-3 nats at typical variances (tests/test_gaussian.py); pass float64
tensors where that matters. Points are processed in chunks
so that the (chunk, K) block stays below ``max_elements``.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "LOG_2PI",
    "log_normal_diag",
    "log_standard_normal",
    "component_log_probs",
    "mixture_log_prob",
]

LOG_2PI = math.log(2 * math.pi)


def log_normal_diag(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log N(z; mu, diag(exp(logvar))) summed over the last dimension: (..., D) -> (...)."""
    return -0.5 * (LOG_2PI + logvar + (z - mu) ** 2 * torch.exp(-logvar)).sum(-1)


def log_standard_normal(z: torch.Tensor) -> torch.Tensor:
    """log N(z; 0, I) summed over the last dimension: (..., D) -> (...)."""
    return -0.5 * (LOG_2PI + z**2).sum(-1)


def _expanded(means: torch.Tensor, logvars: torch.Tensor, log_weights: torch.Tensor):
    """The (K, 2D+1) right-hand matrix [-P/2, m*P, c] of the expanded exponent."""
    d = means.shape[1]
    prec = torch.exp(-logvars)
    const = log_weights - 0.5 * (d * LOG_2PI + logvars.sum(-1) + (means**2 * prec).sum(-1))
    return torch.cat([-0.5 * prec, means * prec, const[:, None]], dim=1)


def _left(z: torch.Tensor) -> torch.Tensor:
    return torch.cat([z * z, z, torch.ones_like(z[:, :1])], dim=1)  # (b, 2D+1)


def component_log_probs(z: torch.Tensor, means: torch.Tensor, logvars: torch.Tensor,
                        log_weights: torch.Tensor | None = None) -> torch.Tensor:
    """log w_k + log N(z; m_k, diag(exp(logvar_k))) for every point and component: (B, K)."""
    if log_weights is None:
        log_weights = torch.zeros(means.shape[0], dtype=z.dtype, device=z.device)
    return _left(z) @ _expanded(means, logvars, log_weights).T


def mixture_log_prob(
    z: torch.Tensor,
    means: torch.Tensor,
    logvars: torch.Tensor,
    log_weights: torch.Tensor | None = None,
    max_elements: int = 2**24,
) -> torch.Tensor:
    """log sum_k w_k N(z; m_k, diag(exp(logvar_k))).

    One matrix product per chunk gives every component's log-density:
    ``[z*z, z, 1] @ [-P/2, m*P, c]^T`` with P = exp(-logvar) and
    c_k = log w_k - 1/2 (D log 2 pi + sum_d logvar_kd + sum_d m_kd^2 P_kd).

    Args:
        z: points (B, D).
        means, logvars: components (K, D).
        log_weights: (K,) normalised log mixture weights; uniform (-log K) when None.
        max_elements: largest (chunk, K) block of log-densities held at once.

    Returns:
        (B,) log densities.
    """
    k = means.shape[0]
    if log_weights is None:
        log_weights = torch.full((k,), -math.log(k), dtype=z.dtype, device=z.device)
    right = _expanded(means, logvars, log_weights)  # (K, 2D+1)
    rows = max(1, max_elements // max(k, 1))
    out = []
    for start in range(0, z.shape[0], rows):
        out.append(torch.logsumexp(_left(z[start:start + rows]) @ right.T, dim=-1))
    return torch.cat(out) if len(out) > 1 else out[0]
