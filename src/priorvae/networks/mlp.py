"""``mlp``: dense encoder and decoder, for images (flattened) and vectors.

Encoder x -> hidden layers -> (mu, logvar); the decoder mirrors the hidden sizes. With
``activation = "gated"`` every layer is the gated dense layer of Tomczak & Welling (2018),
h = (W x + b) * sigmoid(V x + c) (their default and ours); ``"relu"`` is Linear + ReLU. Weights
are He-normal.

References:
    | VAE with a VampPrior (Tomczak & Welling, 2018) https://arxiv.org/abs/1705.07120
    | Language Modeling with Gated Convolutional Networks (Dauphin et al., 2017)
    | https://arxiv.org/abs/1612.08083
"""

from __future__ import annotations

import math

import torch
from einops import rearrange
from torch import nn

from . import Networks, register_network
from .layers import GaussianHead, check_hidden, dense_stack, he_init

__all__ = ["MLP", "MLPEncoder", "MLPDecoder"]


class MLPEncoder(nn.Module):
    """x (B, *input_shape) -> (mu, logvar), each (B, D)."""

    def __init__(self, input_shape, hidden, latent_dim, activation="gated",
                 logvar_min=-6.0, logvar_max=2.0):
        super().__init__()
        self.input_shape = tuple(input_shape)
        self.body = dense_stack([math.prod(input_shape), *hidden], activation)
        self.head = GaussianHead(hidden[-1], latent_dim, logvar_min, logvar_max)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.head(self.body(rearrange(x, "b ... -> b (...)")))


class MLPDecoder(nn.Module):
    """z (B, D) -> likelihood parameters (B, *out_shape)."""

    def __init__(self, out_shape, hidden, latent_dim, activation="gated"):
        super().__init__()
        self.out_shape = tuple(out_shape)
        self.body = dense_stack([latent_dim, *reversed(hidden)], activation)
        self.out = nn.Linear(hidden[0], math.prod(out_shape))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.out(self.body(z)).unflatten(-1, self.out_shape)


@register_network("mlp")
class MLP(Networks):
    """Dense layers of sizes ``hidden`` (default 300-300) with ``activation``."""

    input_ranks = frozenset({1, 3})
    example_shapes = ((1, 8, 8), (3, 4, 4), (5,))

    def __init__(self, input_shape, latent_dim, out_channels, logvar_min=-6.0, logvar_max=2.0,
                 hidden: list[int] = (300, 300), activation: str = "gated"):
        super().__init__(input_shape, latent_dim, out_channels, logvar_min, logvar_max)
        hidden = check_hidden(hidden)
        out_shape = (out_channels, *self.input_shape[1:])
        self.encoder = MLPEncoder(input_shape, hidden, latent_dim, activation,
                                  logvar_min, logvar_max)
        self.decoder = MLPDecoder(out_shape, hidden, latent_dim, activation)
        he_init(self.encoder)
        he_init(self.decoder)
