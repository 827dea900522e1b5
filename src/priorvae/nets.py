"""Encoder and decoder families, chosen by name (``[model] family``), and likelihoods.

- ``mlp``: dense layers (default 300-300, latent 40). ``activation = "gated"`` uses the gated
  dense layer of Tomczak & Welling (2018), h = (W x + b) * sigmoid(V x + c) (their default
  and ours); ``"relu"`` uses Linear + ReLU.
- ``conv``: two stride-2 convolutions (channels from ``[model] channels``), then dense layers;
  the decoder mirrors it with transposed convolutions. Needs H and W divisible by 4.

The encoder maps x (B, C, H, W) to ``(mu, logvar)``, each (B, D), the log-variance bounded by
Hardtanh(logvar_min, logvar_max) as in the VampPrior code. The decoder maps z (B, D) to
Bernoulli logits (B, C, H, W). Weights use He-normal initialisation.
"""

from __future__ import annotations

import math

import torch
from einops import rearrange
from torch import nn

from .config import ModelConfig, NetworkConfig
from .errors import ConfigError
from .gaussian import EXP_FLOOR

__all__ = [
    "GatedDense",
    "MLPEncoder",
    "MLPDecoder",
    "ConvEncoder",
    "ConvDecoder",
    "BernoulliLikelihood",
    "bernoulli_log_prob",
    "GaussianLikelihood",
    "build_networks",
]

LOG_2PI = math.log(2 * math.pi)


class GatedDense(nn.Module):
    """Gated dense layer: ``(W x + b) * sigmoid(V x + c)``; (B, I) -> (B, O)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.h = nn.Linear(in_features, out_features)
        self.g = nn.Linear(in_features, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.h(x) * torch.sigmoid(self.g(x))


def _dense_stack(sizes: list[int], activation: str) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, o in zip(sizes[:-1], sizes[1:], strict=True):
        if activation == "gated":
            layers.append(GatedDense(i, o))
        elif activation == "relu":
            layers += [nn.Linear(i, o), nn.ReLU()]
        else:
            raise ConfigError(f"[model] activation must be 'gated' or 'relu', got {activation!r}")
    return nn.Sequential(*layers)


def _he_init(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.kaiming_normal_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class _GaussianHead(nn.Module):
    """Linear heads for ``mu`` and a Hardtanh-bounded ``logvar``: (B, H) -> 2 x (B, D)."""

    def __init__(self, hidden: int, latent_dim: int, logvar_min: float, logvar_max: float):
        super().__init__()
        self.mu = nn.Linear(hidden, latent_dim)
        self.logvar = nn.Linear(hidden, latent_dim)
        self.bound = nn.Hardtanh(logvar_min, logvar_max)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.mu(h), self.bound(self.logvar(h))


class MLPEncoder(nn.Module):
    """x (B, C, H, W) -> (mu, logvar), each (B, D)."""

    def __init__(self, input_shape, hidden, latent_dim, activation="gated",
                 logvar_min=-6.0, logvar_max=2.0):
        super().__init__()
        self.input_shape = tuple(input_shape)
        self.body = _dense_stack([math.prod(input_shape), *hidden], activation)
        self.head = _GaussianHead(hidden[-1], latent_dim, logvar_min, logvar_max)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.head(self.body(rearrange(x, "b c h w -> b (c h w)")))


class MLPDecoder(nn.Module):
    """z (B, D) -> logits (B, C, H, W)."""

    def __init__(self, input_shape, hidden, latent_dim, activation="gated"):
        super().__init__()
        self.input_shape = tuple(input_shape)
        self.body = _dense_stack([latent_dim, *reversed(hidden)], activation)
        self.out = nn.Linear(hidden[0], math.prod(input_shape))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        c, h, w = self.input_shape
        return rearrange(self.out(self.body(z)), "b (c h w) -> b c h w", c=c, h=h, w=w)


def _check_conv_shape(input_shape) -> None:
    _, h, w = input_shape
    if h % 4 or w % 4:
        raise ConfigError(f"[model] family = 'conv' needs H and W divisible by 4, got {h}x{w}")


class ConvEncoder(nn.Module):
    """x (B, C, H, W) -> two stride-2 convs -> dense -> (mu, logvar), each (B, D)."""

    def __init__(self, input_shape, hidden, latent_dim, channels=(32, 64), activation="relu",
                 logvar_min=-6.0, logvar_max=2.0):
        super().__init__()
        _check_conv_shape(input_shape)
        c, h, w = input_shape
        c1, c2 = channels
        self.conv = nn.Sequential(
            nn.Conv2d(c, c1, 4, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(c1, c2, 4, stride=2, padding=1), nn.ReLU(),
        )
        self.body = _dense_stack([c2 * (h // 4) * (w // 4), *hidden], activation)
        self.head = _GaussianHead(hidden[-1], latent_dim, logvar_min, logvar_max)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.head(self.body(rearrange(self.conv(x), "b c h w -> b (c h w)")))


class ConvDecoder(nn.Module):
    """z (B, D) -> dense -> two stride-2 transposed convs -> logits (B, C, H, W)."""

    def __init__(self, input_shape, hidden, latent_dim, channels=(32, 64), activation="relu"):
        super().__init__()
        _check_conv_shape(input_shape)
        c, h, w = input_shape
        c1, c2 = channels
        self.grid = (c2, h // 4, w // 4)
        self.body = _dense_stack([latent_dim, *reversed(hidden)], activation)
        self.fc = nn.Linear(hidden[0], math.prod(self.grid))
        self.deconv = nn.Sequential(
            nn.ReLU(),
            nn.ConvTranspose2d(c2, c1, 4, stride=2, padding=1), nn.ReLU(),
            nn.ConvTranspose2d(c1, c, 4, stride=2, padding=1),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        c2, gh, gw = self.grid
        h = rearrange(self.fc(self.body(z)), "b (c h w) -> b c h w", c=c2, h=gh, w=gw)
        return self.deconv(h)


def _softplus_tail(logits: torch.Tensor) -> torch.Tensor:
    """log(1 + exp(-|l|)), with |l| capped at 80 (the cap changes it by < 2e-35)."""
    return logits.abs().neg_().clamp_min_(EXP_FLOOR).exp_().log1p_()


class _BernoulliLogProb(torch.autograd.Function):
    """Elementwise log Bern(x; sigmoid(l)) = x*l - softplus(l), with a cheap exact backward.

    softplus(l) = max(l, 0) + log1p(exp(-|l|)): on this project's CPU build torch's
    ``softplus`` kernel (log1p of arguments up to e^20) runs ~10x slower than ``exp`` and
    ``log1p`` on (0, 1], and ``exp`` takes a slow path for results that underflow, hence the
    cap at |l| = 80. The gradient is x - sigmoid(l), one pass instead of autograd's chain.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(logits, x)
        return x * logits - logits.clamp_min(0) - _softplus_tail(logits)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        logits, x = ctx.saved_tensors
        grad_logits = grad * (x - torch.sigmoid(logits)) if ctx.needs_input_grad[0] else None
        grad_x = grad * logits if ctx.needs_input_grad[1] else None
        return grad_logits, grad_x


def bernoulli_log_prob(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """log Bern(x; sigmoid(logits)) per element (same shape), numerically stable."""
    return _BernoulliLogProb.apply(logits, x)


def _bernoulli_log_prob_sum_nograd(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """sum_j x_j l_j - softplus(l_j) for (B, P) logits without autograd, in few passes (the
    evaluation path, where the decoder's output is the largest tensor)."""
    return (torch.linalg.vecdot(x, logits) - logits.clamp_min(0).sum(-1)
            - _softplus_tail(logits).sum(-1))


class BernoulliLikelihood(nn.Module):
    """log p(x|z) for binary x under Bernoulli(sigmoid(logits)), summed over pixels: (B,)."""

    def forward(self, logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (logits.requires_grad or x.requires_grad):
            return rearrange(bernoulli_log_prob(logits, x), "b ... -> b (...)").sum(-1)
        return _bernoulli_log_prob_sum_nograd(rearrange(logits, "b ... -> b (...)"),
                                              rearrange(x, "b ... -> b (...)"))

    def mean(self, logits: torch.Tensor) -> torch.Tensor:
        """Pixel probabilities, for pictures."""
        return torch.sigmoid(logits)


class GaussianLikelihood(nn.Module):
    """log N(x; decoder output, sigma^2 I) summed over features: (B,). For tests and real data."""

    def __init__(self, sigma: float = 1.0):
        super().__init__()
        self.register_buffer("log_sigma", torch.tensor(math.log(sigma)))

    def forward(self, mean: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        var = torch.exp(2 * self.log_sigma)
        ll = -0.5 * (LOG_2PI + 2 * self.log_sigma + (x - mean) ** 2 / var)
        return rearrange(ll, "b ... -> b (...)").sum(-1)

    def mean(self, out: torch.Tensor) -> torch.Tensor:
        return out


def build_networks(network: NetworkConfig, model: ModelConfig,
                   input_shape) -> tuple[nn.Module, nn.Module]:
    """Encoder and decoder of the family ``[network] name`` for images of ``input_shape``."""
    args = {"hidden": [300, 300], "activation": "gated", "channels": [32, 64], **network.kwargs}
    hidden, activation, channels = args["hidden"], args["activation"], args["channels"]
    if model.latent_dim < 1:
        raise ConfigError(f"[model] latent_dim must be positive, got {model.latent_dim}")
    if not hidden:
        raise ConfigError("[network] hidden must list at least one layer size")
    if network.name == "mlp":
        enc = MLPEncoder(input_shape, hidden, model.latent_dim, activation,
                         model.logvar_min, model.logvar_max)
        dec = MLPDecoder(input_shape, hidden, model.latent_dim, activation)
    elif network.name == "conv":
        if len(channels) != 2:
            raise ConfigError(f"[network] channels must list 2 sizes, got {channels}")
        enc = ConvEncoder(input_shape, hidden, model.latent_dim, channels, activation,
                          model.logvar_min, model.logvar_max)
        dec = ConvDecoder(input_shape, hidden, model.latent_dim, channels, activation)
    else:
        raise ConfigError(f"[network] name must be 'mlp' or 'conv', got {network.name!r}")
    _he_init(enc)
    _he_init(dec)
    return enc, dec
