"""Encoder/decoder families, chosen by name, one file per family.

A family (subclass :class:`Networks`, register with :func:`register_network`) is built from
``(input_shape, latent_dim, out_channels, logvar_min, logvar_max, **own arguments)`` and sets
two modules:

- ``self.encoder``: x (B, *input_shape) -> (mu, logvar), each (B, latent_dim), the
  log-variance bounded to [logvar_min, logvar_max] (:class:`~.layers.GaussianHead` does it);
- ``self.decoder``: z (B, latent_dim) -> likelihood parameters (B, out_channels, *spatial),
  ``input_shape = (C, *spatial)``: images (C, H, W) or vectors (D,) (then (B, out_channels)).
  ``out_channels`` comes from the likelihood (``P * C`` for P parameters per value).

Class flags: ``input_ranks`` (1: vectors, 3: images) the family accepts, ``example_shapes``
(input shapes the contract tests build it for). :func:`build_networks` probes both modules
with a dummy batch, so a family whose outputs have the wrong shape fails when it is built,
saying what was expected.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from ..errors import ConfigError, PriorVAEError
from ..registry import Registry

__all__ = ["Networks", "NETWORKS", "register_network", "build_networks", "list_networks",
           "get_network_class", "check_networks", "check_size"]

RESERVED = ("input_shape", "latent_dim", "out_channels", "logvar_min", "logvar_max")


class Networks(nn.Module):
    """Base class of encoder/decoder families; subclasses set ``encoder`` and ``decoder``."""

    input_ranks: ClassVar[frozenset[int]] = frozenset({3})
    example_shapes: ClassVar[tuple[tuple[int, ...], ...]] = ((1, 8, 8),)
    encoder: nn.Module
    decoder: nn.Module

    def __init__(self, input_shape, latent_dim: int, out_channels: int,
                 logvar_min: float = -6.0, logvar_max: float = 2.0):
        super().__init__()
        name = getattr(type(self), "network_name", type(self).__name__)
        if len(input_shape) not in self.input_ranks:
            kinds = {1: "vectors (D,)", 3: "images (C, H, W)"}
            raise ConfigError(
                f"[network] name = {name!r} takes "
                f"{' or '.join(kinds.get(r, f'rank-{r} items') for r in sorted(self.input_ranks))}"
                f", but the data's items have shape {tuple(input_shape)}")
        if latent_dim < 1:
            raise ConfigError(f"[model] latent_dim must be positive, got {latent_dim}")
        self.input_shape = tuple(int(s) for s in input_shape)
        self.latent_dim, self.out_channels = int(latent_dim), int(out_channels)
        self.logvar_min, self.logvar_max = float(logvar_min), float(logvar_max)


NETWORKS = Registry("network", Networks, "priorvae.networks", reserved=RESERVED)
"""The network-family registry: names, entry points (group ``priorvae.networks``) and
``file.py:Class`` / ``module:Class`` specs through the one gate (:mod:`priorvae.trust`)."""
register_network = NETWORKS.register
list_networks = NETWORKS.list
get_network_class = NETWORKS.get


@torch.no_grad()
def check_networks(name: str, encoder: nn.Module, decoder: nn.Module, input_shape,
                   latent_dim: int, out_channels: int) -> None:
    """Run both modules once on a dummy batch of 2 (in eval mode, on the CPU) and refuse
    outputs of the wrong shape, in one line naming what was expected."""
    modes = [(m, m.training) for m in (encoder, decoder)]
    want_z = (2, latent_dim)
    want_out = (2, out_channels, *tuple(input_shape)[1:])
    try:
        encoder.eval()
        decoder.eval()
        with NETWORKS.guard(f"network {name!r}: the encoder failed on a batch of 2 items "
                            f"{tuple(input_shape)}"):
            enc = encoder(torch.zeros(2, *input_shape))
        if not (isinstance(enc, (tuple, list)) and len(enc) == 2
                and all(isinstance(t, torch.Tensor) and tuple(t.shape) == want_z for t in enc)):
            got = (tuple(tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                         for t in enc) if isinstance(enc, (tuple, list)) else type(enc).__name__)
            raise ConfigError(f"network {name!r}: the encoder must return (mu, logvar), each "
                              f"{want_z} for a batch of 2 items {tuple(input_shape)}; got {got}")
        with NETWORKS.guard(f"network {name!r}: the decoder failed on z {want_z}"):
            out = decoder(torch.zeros(*want_z))
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != want_out:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ConfigError(
                f"network {name!r}: the decoder must return {want_out} = (batch, out_channels "
                f"= {out_channels} from the likelihood, *{tuple(input_shape)[1:]}) for z "
                f"{want_z}; got {got}")
    finally:
        for m, training in modes:
            m.train(training)


def check_size(name: str, sha256: str | None, context: dict, kwargs: dict,
               training: bool = False) -> None:
    """Refuse, before anything is allocated, a family whose float32 weights (``training``:
    with their gradients and Adam's two moments, 4 times as much) would not fit in the memory
    available here, naming its size arguments: the family is built once on the meta device,
    which allocates nothing, to count them. One that cannot be built there is left to the
    real build (which reports its errors)."""
    from ..datasets import available_memory

    cls = NETWORKS.get(name, sha256)
    try:
        with torch.device("meta"):
            family = cls(**context, **kwargs)
    except PriorVAEError:
        raise
    except (Exception, SystemExit):
        return
    tensors = [*family.parameters(), *family.buffers()]
    weights = sum(t.numel() * t.element_size() for t in tensors)
    need, have = weights * (4 if training else 1), available_memory()
    if need > have:
        sizes = ", ".join(f"{k} = {v!r}" for k, v in kwargs.items() if not isinstance(v, str))
        defaults = ", ".join(f"{k} = {v!r}" for k, v in NETWORKS.arguments(cls).items())
        gib = 2**30
        raise ConfigError(
            f"[network] {sizes or f'name = {name!r}'} with [model] latent_dim = "
            f"{context['latent_dim']}: {sum(t.numel() for t in tensors):.3g} weights, "
            f"{weights / gib:.3g} GiB as float32"
            + (f" and {need / gib:.3g} GiB to train (with gradients and Adam's moments)"
               if training else "")
            + f", but {have / gib:.3g} GiB of memory are available here; choose smaller sizes"
            + (f" (defaults: {defaults})" if defaults else ""))


def build_networks(name: str, input_shape, latent_dim: int, out_channels: int,
                   logvar_min: float = -6.0, logvar_max: float = 2.0,
                   sha256: str | None = None, training: bool = False,
                   **kwargs) -> tuple[nn.Module, nn.Module]:
    """(encoder, decoder) of the family ``name`` (a registered name or a spec), checked: its
    size first (:func:`check_size`; ``training``: room for training it too), then the shapes
    of its outputs."""
    context = dict(input_shape=tuple(input_shape), latent_dim=latent_dim,
                   out_channels=out_channels, logvar_min=logvar_min, logvar_max=logvar_max)
    check_size(name, sha256, context, kwargs, training)
    family = NETWORKS.build(name, sha256=sha256, **context, **kwargs)
    check_networks(name, family.encoder, family.decoder, input_shape, latent_dim, out_channels)
    return family.encoder, family.decoder


from . import conv, mlp, resconv  # noqa: E402,F401  the built-in families
