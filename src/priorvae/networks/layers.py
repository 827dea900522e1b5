"""Building blocks shared by the network families: gated dense layers, dense stacks, the
Gaussian posterior head and He-normal initialisation."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError

__all__ = ["GatedDense", "dense_stack", "check_hidden", "he_init", "GaussianHead", "ACTIVATIONS"]

ACTIVATIONS = ("gated", "relu")


class GatedDense(nn.Module):
    """Gated dense layer: ``(W x + b) * sigmoid(V x + c)``; (B, I) -> (B, O)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.h = nn.Linear(in_features, out_features)
        self.g = nn.Linear(in_features, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.h(x) * torch.sigmoid(self.g(x))


def dense_stack(sizes: list[int], activation: str) -> nn.Sequential:
    """Dense layers sizes[0] -> sizes[1] -> ..., each followed by its activation."""
    layers: list[nn.Module] = []
    for i, o in zip(sizes[:-1], sizes[1:], strict=True):
        if activation == "gated":
            layers.append(GatedDense(i, o))
        elif activation == "relu":
            layers += [nn.Linear(i, o), nn.ReLU()]
        else:
            raise ConfigError(f"[network] activation must be 'gated' or 'relu', "
                              f"got {activation!r}")
    return nn.Sequential(*layers)


def check_hidden(hidden) -> list[int]:
    """``hidden``: a non-empty list of positive layer sizes."""
    if not (isinstance(hidden, (list, tuple)) and hidden
            and all(isinstance(h, int) and not isinstance(h, bool) and h >= 1 for h in hidden)):
        raise ConfigError(f"[network] hidden must list at least one positive layer size, "
                          f"got {hidden!r}")
    return list(hidden)


def check_conv_shape(family: str, input_shape, channels) -> None:
    """A conv family halves H and W twice (divisible by 4) with 2 positive channel sizes."""
    _, h, w = input_shape
    if h % 4 or w % 4:
        raise ConfigError(f"[network] name = {family!r} needs H and W divisible by 4, "
                          f"got {h}x{w}")
    if not isinstance(channels, (list, tuple)) or len(channels) != 2 or not all(
            isinstance(c, int) and not isinstance(c, bool) and c >= 1 for c in channels):
        raise ConfigError(f"[network] channels must list 2 positive sizes, got {channels}")


def he_init(module: nn.Module) -> None:
    """He-normal weights and zero biases for every linear and convolutional layer."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.kaiming_normal_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class GaussianHead(nn.Module):
    """Linear heads for ``mu`` and a Hardtanh-bounded ``logvar``: (B, H) -> 2 x (B, D)."""

    def __init__(self, hidden: int, latent_dim: int, logvar_min: float, logvar_max: float):
        super().__init__()
        self.mu = nn.Linear(hidden, latent_dim)
        self.logvar = nn.Linear(hidden, latent_dim)
        self.bound = nn.Hardtanh(logvar_min, logvar_max)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.mu(h), self.bound(self.logvar(h))
