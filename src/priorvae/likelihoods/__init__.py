"""Likelihoods p(x|z): the data model, chosen by name, one file per family.

A likelihood owns everything the VAE assumes about the data: how a batch is prepared for
training (Bernoulli: a fresh binarization; others: the data as they are), the fixed
preparation of the held-out splits, log p(x|z) in nats, the decoder output it needs, and
pictures (``mean``) and draws (``sample``). The VAE never asks which one it has.

Contract (subclass :class:`Likelihood`, register with :func:`register_likelihood`):

- ``__init__(input_shape, **own arguments)``: ``input_shape`` is the data's (C, H, W) or (D,).
- ``log_prob(out, x) -> (B,)``: log p(x|z) summed over every value of an item, in nats; ``out``
  is the decoder output of shape ``(B, *out_shape)``, ``x`` prepared data (B, *input_shape).
- ``mean(out)``, ``sample(out, generator=None)``: (B, *input_shape) in the data's space.
- ``params_per_value``: decoder outputs per data channel (``out_channels(C) = P * C``); the
  decoder output is ``(B, P * C, H, W)`` for images, ``(B, P * D)`` for vectors, parameter p of
  channel c at index ``p * C + c``.
- ``prepare(x, generator=None)``: a training batch, drawn afresh each time it is used.
  ``prepare_fixed(x, generator)``: a reproducible preparation (validation / test / the
  training split for q(z)); default: ``prepare``.
- class flags: ``value_types`` (the data value types accepted: ``binary`` {0, 1},
  ``intensity`` [0, 1], ``8bit`` k/255, ``real``), ``bits_per_dim`` (log_prob is a probability
  mass over the 256 levels of 8-bit data, so NLL / (D ln 2) is bits/dim), ``binarizes``
  (the prepared data are binary whatever the data), ``feature_draws`` (decoded samples are
  compared with held-out data in the quality classifier's features as draws; False: as
  means, for densities whose draws only add pixel noise).

The held-out splits are prepared once by :func:`prepare_splits` with the seeds
``VALIDATION_SEED`` / ``TEST_SEED`` (for Bernoulli: the binarization every MNIST number of
this project was measured on).
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import torch
from torch import nn

from ..datasets import VALUE_TYPES  # the data sets' value types, which value_types names
from ..errors import ConfigError
from ..registry import Registry

__all__ = ["Likelihood", "LIKELIHOODS", "register_likelihood", "build_likelihood",
           "list_likelihoods", "get_likelihood_class", "prepare_once", "prepare_splits",
           "VALUE_TYPES", "VALIDATION_SEED", "TEST_SEED", "check_number"]

def check_number(owner: str, key: str, value, low: float, high: float,
                 integer: bool = False) -> float | int:
    """``[likelihood] key`` of ``owner``: a number (an integer if ``integer``) in [low, high],
    never a bool, NaN or infinity; one line naming the key otherwise."""
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not low <= value <= high:
        what = "an integer" if integer else "a number"
        raise ConfigError(f"[likelihood] {key} of {owner!r} must be {what} in "
                          f"[{low:g}, {high:g}], got {value!r}")
    return value


VALIDATION_SEED = 1234  # seeds of the one-off preparation of the validation and test splits
TEST_SEED = VALIDATION_SEED + 1


class Likelihood(nn.Module):
    """Base class of likelihoods p(x | decoder output); see the module docstring."""

    value_types: ClassVar[frozenset[str]] = frozenset()
    bits_per_dim: ClassVar[bool] = False
    binarizes: ClassVar[bool] = False
    feature_draws: ClassVar[bool] = True
    params_per_value: int = 1

    def __init__(self, input_shape):
        super().__init__()
        self.input_shape = tuple(int(s) for s in input_shape)

    def out_channels(self, in_channels: int) -> int:
        """Decoder output channels for ``in_channels`` data channels."""
        return self.params_per_value * in_channels

    @property
    def out_shape(self) -> tuple[int, ...]:
        """The decoder's output shape for one item: (P * C, H, W) or (P * D,)."""
        return (self.out_channels(self.input_shape[0]), *self.input_shape[1:])

    def prepare(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """A training batch as the likelihood models it (default: unchanged)."""
        return x

    def prepare_fixed(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """A reproducible preparation of a fixed set (default: :meth:`prepare`)."""
        return self.prepare(x, generator)

    def log_prob(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """log p(x | out) per item, summed over its values: (B,), in nats."""
        raise NotImplementedError

    def forward(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.log_prob(out, x)

    def mean(self, out: torch.Tensor) -> torch.Tensor:
        """E[x | out], for pictures: (B, *input_shape)."""
        raise NotImplementedError

    def sample(self, out: torch.Tensor, generator: torch.Generator | None = None
               ) -> torch.Tensor:
        """One draw x ~ p(x | out): (B, *input_shape)."""
        raise NotImplementedError

    def nll_bits_per_dim(self, nll: float) -> float | None:
        """Bits per dimension of a mean NLL in nats (None unless ``bits_per_dim``)."""
        return nll / (math.prod(self.input_shape) * math.log(2)) if self.bits_per_dim else None


LIKELIHOODS = Registry("likelihood", Likelihood, "priorvae.likelihoods",
                       reserved=("input_shape",))
"""The likelihood registry: names, entry points (group ``priorvae.likelihoods``) and
``file.py:Class`` / ``module:Class`` specs through the one gate (:mod:`priorvae.trust`)."""
register_likelihood = LIKELIHOODS.register
list_likelihoods = LIKELIHOODS.list
get_likelihood_class = LIKELIHOODS.get


def build_likelihood(name: str, input_shape, sha256: str | None = None, **kwargs) -> Likelihood:
    """The likelihood ``name`` (a registered name or a spec) for data of ``input_shape``."""
    return LIKELIHOODS.build(name, sha256=sha256, input_shape=tuple(input_shape), **kwargs)


def prepare_once(likelihood: Likelihood, x: torch.Tensor, seed: int) -> torch.Tensor:
    """:meth:`Likelihood.prepare_fixed` with a generator on ``x``'s device seeded ``seed``."""
    return likelihood.prepare_fixed(x, torch.Generator(device=x.device).manual_seed(seed))


def prepare_splits(splits, likelihood: Likelihood):
    """The splits with validation and test prepared once (``VALIDATION_SEED``, ``TEST_SEED``,
    drawn on the CPU whatever the splits' device); the training split is left as it is (it is
    prepared per batch)."""
    cls = type(likelihood)  # its own registered name, not one inherited from a built-in
    name = vars(cls).get("likelihood_name", cls.__name__)

    def fixed(x: torch.Tensor, seed: int, part: str) -> torch.Tensor:
        with LIKELIHOODS.guard(f"likelihood {name!r}: prepare_fixed failed on the {part} "
                               f"split"):
            return prepare_once(likelihood, x.cpu(), seed).to(x.device)

    return dataclasses.replace(splits, x_val=fixed(splits.x_val, VALIDATION_SEED, "validation"),
                               x_test=fixed(splits.x_test, TEST_SEED, "test"))


from . import bernoulli, categorical, discretized_logistic, gaussian  # noqa: E402,F401  built-ins
