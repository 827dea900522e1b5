"""``resconv``: residual convolutional encoder and decoder, for 32x32 colour images.

In the spirit of pythae's CIFAR-10 benchmark networks (after the VQ-VAE's): two stride-2
convolutions (H -> H/4), ``n_res`` residual blocks x + Conv1x1(ReLU(Conv3x3(ReLU(x)))), one
dense layer to (mu, logvar); the decoder is the mirror image with transposed convolutions and
outputs (out_channels, H, W). Needs H and W divisible by 4. Small by default (channels 32, 64;
about 1 M parameters at 32x32x3, latent 64, a 30-channel output) so a few epochs train on a CPU.

References:
    | Neural Discrete Representation Learning (van den Oord et al., 2017)
    | https://arxiv.org/abs/1711.00937 (the residual blocks)
    | Pythae (Chadebec et al., 2022) https://arxiv.org/abs/2206.08309 (benchmark networks)
    | Deep Residual Learning (He et al., 2016) https://arxiv.org/abs/1512.03385
"""

from __future__ import annotations

import math

import torch
from einops import rearrange
from torch import nn

from ..errors import ConfigError
from . import Networks, register_network
from .layers import GaussianHead, check_conv_shape, he_init

__all__ = ["ResConv", "ResBlock"]


class ResBlock(nn.Module):
    """x + Conv1x1(ReLU(Conv3x3(ReLU(x)))): (B, C, H, W) -> same."""

    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.ReLU(), nn.Conv2d(channels, hidden, 3, padding=1),
                                 nn.ReLU(), nn.Conv2d(hidden, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.net(x)


class _Encoder(nn.Module):
    def __init__(self, c, grid, c1, c2, n_res, res_hidden, latent_dim, logvar_min, logvar_max):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(c, c1, 4, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(c1, c2, 4, stride=2, padding=1),
            *(ResBlock(c2, res_hidden) for _ in range(n_res)), nn.ReLU())
        self.head = GaussianHead(math.prod(grid), latent_dim, logvar_min, logvar_max)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.head(rearrange(self.conv(x), "b c h w -> b (c h w)"))


class _Decoder(nn.Module):
    def __init__(self, out_channels, grid, c1, c2, n_res, res_hidden, latent_dim):
        super().__init__()
        self.grid = grid
        self.fc = nn.Linear(latent_dim, math.prod(grid))
        self.deconv = nn.Sequential(
            *(ResBlock(c2, res_hidden) for _ in range(n_res)), nn.ReLU(),
            nn.ConvTranspose2d(c2, c1, 4, stride=2, padding=1), nn.ReLU(),
            nn.ConvTranspose2d(c1, out_channels, 4, stride=2, padding=1))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        c, h, w = self.grid
        return self.deconv(rearrange(self.fc(z), "b (c h w) -> b c h w", c=c, h=h, w=w))


@register_network("resconv")
class ResConv(Networks):
    """Stride-2 convolutions of ``channels`` (two sizes) and ``n_res`` residual blocks."""

    example_shapes = ((3, 32, 32), (1, 8, 8))

    def __init__(self, input_shape, latent_dim, out_channels, logvar_min=-6.0, logvar_max=2.0,
                 channels: list[int] = (32, 64), n_res: int = 2, res_hidden: int = 32):
        super().__init__(input_shape, latent_dim, out_channels, logvar_min, logvar_max)
        check_conv_shape("resconv", self.input_shape, channels)
        c, h, w = self.input_shape
        if not (isinstance(n_res, int) and not isinstance(n_res, bool) and n_res >= 0
                and isinstance(res_hidden, int) and not isinstance(res_hidden, bool)
                and res_hidden >= 1):
            raise ConfigError(f"[network] n_res must be >= 0 and res_hidden >= 1, got "
                              f"{n_res!r}, {res_hidden!r}")
        c1, c2 = channels
        grid = (c2, h // 4, w // 4)
        self.encoder = _Encoder(c, grid, c1, c2, n_res, res_hidden, latent_dim,
                                logvar_min, logvar_max)
        self.decoder = _Decoder(out_channels, grid, c1, c2, n_res, res_hidden, latent_dim)
        he_init(self.encoder)
        he_init(self.decoder)
