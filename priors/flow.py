"""Normalizing-flow prior (nflows) over a standard-normal base.

With an invertible transform f mapping z to u = f(z) and base N(0, I):

    log p(z) = log N(f(z); 0, I) + log |det df/dz|

Transforms (``transform``), each layer followed by a permutation:

- ``maf``: masked affine autoregressive flow (Papamakarios et al., 2017). Density in one
  pass; sampling takes D sequential passes.
- ``nsf``: autoregressive rational-quadratic neural spline flow (Durkan et al., 2019);
  sampling is D sequential passes too (about 1 s per call at D = 40 on a CPU).
- ``realnvp``: affine coupling layers (Dinh et al., 2017); density and sampling in one pass.
- ``coupling_nsf``: rational-quadratic spline coupling layers; one pass each way.

References:
    | Masked Autoregressive Flow for Density Estimation (Papamakarios et al., 2017)
    | https://arxiv.org/abs/1705.07057
    | Neural Spline Flows (Durkan et al., 2019) https://arxiv.org/abs/1906.04032
    | Density estimation using Real NVP (Dinh et al., 2017) https://arxiv.org/abs/1605.08803
    | Variational Lossy Autoencoder (Chen et al., 2017), flow priors for VAEs
    | https://arxiv.org/abs/1611.02731
"""

import math

import torch
from nflows.nn.nets import ResidualNet
from nflows.transforms.autoregressive import (
    MaskedAffineAutoregressiveTransform,
    MaskedPiecewiseRationalQuadraticAutoregressiveTransform,
)
from nflows.transforms.base import CompositeTransform
from nflows.transforms.coupling import (
    AffineCouplingTransform,
    PiecewiseRationalQuadraticCouplingTransform,
)
from nflows.transforms.permutations import RandomPermutation, ReversePermutation
from nflows.utils.torchutils import create_alternating_binary_mask

from priorvae.errors import PriorError
from priorvae.gaussian import log_standard_normal
from priorvae.priors.base import Prior, register_prior

__all__ = ["FlowPrior", "TRANSFORMS"]

TRANSFORMS = ("maf", "nsf", "realnvp", "coupling_nsf")
_EPS = 1e-3
_UNIT = math.log(math.expm1(1.0 - _EPS))  # softplus(_UNIT) + _EPS == 1


class _AffineCoupling(AffineCouplingTransform):
    """nflows' affine coupling with scale softplus(a + c) + 1e-3, which is 1 at a = 0 (nflows'
    sigmoid(a + 2) + 1e-3 cannot reach 1), so a zero-initialised layer is the identity."""

    def _scale_and_shift(self, transform_params):
        unconstrained = transform_params[:, self.num_transform_features:, ...]
        shift = transform_params[:, :self.num_transform_features, ...]
        return torch.nn.functional.softplus(unconstrained + _UNIT) + _EPS, shift


@register_prior("flow")
class FlowPrior(Prior):
    """Normalizing flow p(z) over R^D.

    Args:
        latent_dim: D.
        transform: one of ``maf``, ``nsf``, ``realnvp``, ``coupling_nsf``.
        num_layers: number of transform layers.
        hidden_features: width of each layer's conditioner network.
        num_blocks: residual blocks per conditioner network.
        num_bins: spline bins (``nsf``, ``coupling_nsf``).
        tail_bound: splines act on [-tail_bound, tail_bound], identity (linear tails) outside.
        permutation: ``reverse`` or ``random`` between layers.
    """

    def __init__(self, latent_dim: int, transform: str = "maf", num_layers: int = 5,
                 hidden_features: int = 128, num_blocks: int = 2, num_bins: int = 8,
                 tail_bound: float = 5.0, permutation: str = "reverse"):
        super().__init__(latent_dim)
        if transform not in TRANSFORMS:
            raise PriorError(f"flow: transform must be one of {TRANSFORMS}, got {transform!r}")
        if permutation not in ("reverse", "random"):
            raise PriorError(
                f"flow: permutation must be 'reverse' or 'random', got {permutation!r}")
        if transform in ("realnvp", "coupling_nsf") and latent_dim < 2:
            raise PriorError(f"flow: transform {transform!r} needs latent_dim >= 2")
        d = latent_dim
        spline = dict(num_bins=num_bins, tails="linear", tail_bound=tail_bound)

        def conditioner(in_features: int, out_features: int) -> ResidualNet:
            return ResidualNet(in_features, out_features, hidden_features, num_blocks=num_blocks)

        layers = []
        for i in range(num_layers):
            if transform == "maf":
                layers.append(MaskedAffineAutoregressiveTransform(d, hidden_features,
                                                                  num_blocks=num_blocks))
            elif transform == "nsf":
                layers.append(MaskedPiecewiseRationalQuadraticAutoregressiveTransform(
                    d, hidden_features, num_blocks=num_blocks, **spline))
            else:
                mask = create_alternating_binary_mask(d, even=(i % 2 == 0))
                if transform == "realnvp":
                    layers.append(_AffineCoupling(mask, conditioner))
                else:
                    layers.append(PiecewiseRationalQuadraticCouplingTransform(
                        mask, conditioner, **spline))
            layers.append(ReversePermutation(d) if permutation == "reverse"
                          else RandomPermutation(d))
        self.transform_name = transform
        self.transform = CompositeTransform(layers)  # z -> u
        # Zero the conditioners' output layers and set the biases that make every layer the
        # identity, so a new flow prior is N(0, I), not a random warp (MAF's scale is
        # softplus(a) + 1e-3 with a = params[..., 0]; the bias makes it 1).
        for module in self.transform.modules():
            last = getattr(module, "final_layer", None)
            if isinstance(last, torch.nn.Linear):
                torch.nn.init.zeros_(last.weight)
                torch.nn.init.zeros_(last.bias)
        with torch.no_grad():
            for layer in layers:
                if isinstance(layer, MaskedAffineAutoregressiveTransform):
                    layer.autoregressive_net.final_layer.bias[0::2] = _UNIT
                elif transform in ("nsf", "coupling_nsf") and hasattr(layer, "num_bins"):
                    # knot derivatives are 1e-3 + softplus(a): a = _UNIT makes them 1, so
                    # uniform bins with unit slopes are the identity
                    net = getattr(layer, "autoregressive_net", None) or layer.transform_net
                    bias = net.final_layer.bias.view(-1, 3 * num_bins - 1)
                    bias[:, 2 * num_bins:] = _UNIT
        self.register_buffer("_anchor", torch.zeros(()))  # dtype/device for base samples

    def _log_prob(self, z: torch.Tensor) -> torch.Tensor:
        u, log_det = self.transform(z)
        return log_standard_normal(u) + log_det

    def _sample(self, n: int) -> torch.Tensor:
        u = torch.randn(n, self.latent_dim, device=self._anchor.device, dtype=self._anchor.dtype)
        z, _ = self.transform.inverse(u)
        return z

    def extra_repr(self) -> str:
        return f"latent_dim={self.latent_dim}, transform={self.transform_name!r}"
