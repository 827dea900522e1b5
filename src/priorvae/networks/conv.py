"""``conv``: two stride-2 convolutions then dense layers, and the mirror image.

Encoder: Conv(4, stride 2) -> ReLU -> Conv(4, stride 2) -> ReLU -> dense layers ``hidden`` ->
(mu, logvar). Decoder: dense layers -> (c2, H/4, W/4) -> two transposed stride-2 convolutions
-> (out_channels, H, W). Needs H and W divisible by 4. Weights are He-normal.

References:
    | Auto-Encoding Variational Bayes (Kingma & Welling, 2014) https://arxiv.org/abs/1312.6114
    | Delving Deep into Rectifiers (He et al., 2015) https://arxiv.org/abs/1502.01852 (init)
"""

from __future__ import annotations

import math

import torch
from einops import rearrange
from torch import nn

from . import Networks, register_network
from .layers import GaussianHead, check_conv_shape, check_hidden, dense_stack, he_init

__all__ = ["Conv", "ConvEncoder", "ConvDecoder"]


class ConvEncoder(nn.Module):
    """x (B, C, H, W) -> two stride-2 convs -> dense -> (mu, logvar), each (B, D)."""

    def __init__(self, input_shape, hidden, latent_dim, channels=(32, 64), activation="relu",
                 logvar_min=-6.0, logvar_max=2.0):
        super().__init__()
        c, h, w = input_shape
        c1, c2 = channels
        self.conv = nn.Sequential(
            nn.Conv2d(c, c1, 4, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(c1, c2, 4, stride=2, padding=1), nn.ReLU(),
        )
        self.body = dense_stack([c2 * (h // 4) * (w // 4), *hidden], activation)
        self.head = GaussianHead(hidden[-1], latent_dim, logvar_min, logvar_max)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.head(self.body(rearrange(self.conv(x), "b c h w -> b (c h w)")))


class ConvDecoder(nn.Module):
    """z (B, D) -> dense -> two stride-2 transposed convs -> (B, out_channels, H, W)."""

    def __init__(self, input_shape, hidden, latent_dim, channels=(32, 64), activation="relu",
                 out_channels: int | None = None):
        super().__init__()
        c, h, w = input_shape
        c1, c2 = channels
        self.grid = (c2, h // 4, w // 4)
        self.body = dense_stack([latent_dim, *reversed(hidden)], activation)
        self.fc = nn.Linear(hidden[0], math.prod(self.grid))
        self.deconv = nn.Sequential(
            nn.ReLU(),
            nn.ConvTranspose2d(c2, c1, 4, stride=2, padding=1), nn.ReLU(),
            nn.ConvTranspose2d(c1, c if out_channels is None else out_channels, 4, stride=2,
                               padding=1),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        c2, gh, gw = self.grid
        h = rearrange(self.fc(self.body(z)), "b (c h w) -> b c h w", c=c2, h=gh, w=gw)
        return self.deconv(h)


@register_network("conv")
class Conv(Networks):
    """Convolutions of ``channels`` (two sizes), then dense layers ``hidden``."""

    example_shapes = ((1, 8, 8), (3, 12, 16))

    def __init__(self, input_shape, latent_dim, out_channels, logvar_min=-6.0, logvar_max=2.0,
                 hidden: list[int] = (300, 300), channels: list[int] = (32, 64),
                 activation: str = "gated"):
        super().__init__(input_shape, latent_dim, out_channels, logvar_min, logvar_max)
        hidden = check_hidden(hidden)
        check_conv_shape("conv", self.input_shape, channels)
        self.encoder = ConvEncoder(input_shape, hidden, latent_dim, channels, activation,
                                   logvar_min, logvar_max)
        self.decoder = ConvDecoder(input_shape, hidden, latent_dim, channels, activation,
                                   out_channels)
        he_init(self.encoder)
        he_init(self.decoder)
