"""Loading a configured data set onto the training device, and batching it by shuffled index.

The data sets themselves live in :mod:`priorvae.datasets` (one file each; the registry and
the contract in its ``__init__``). This module puts a data set's splits on the device:

- Training batches are **dynamically binarized**: every time an image is used, each pixel is a
  fresh Bernoulli draw with the intensity as probability (:func:`binarize`, on the device).
- Validation and test splits of [0, 1]-valued data are binarized once, with fixed seeds
  (``BINARIZE_SEED``, ``BINARIZE_SEED + 1``), so every model is scored on the same binary
  images.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import torch

from .datasets import Splits, build_dataset, data_root, load_dataset

__all__ = [
    "Splits",
    "input_shape",
    "data_root",
    "load_splits",
    "binarize",
    "iterate_batches",
    "BINARIZE_SEED",
    "BINARIZED_TYPES",
]

BINARIZE_SEED = 1234  # seed of the one-off binarization of validation and test
# value types whose held-out splits are binarized (and whose training batches are)
BINARIZED_TYPES = ("binary", "intensity", "8bit")


def input_shape(data) -> tuple[int, ...]:
    """One example's shape ((C, H, W) or (D,)) of a ``[data]`` table or a data set's name;
    without loading the data when the data set declares it."""
    return build_dataset(data).input_shape()


def binarize(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One Bernoulli draw per pixel with probability ``x`` (same shape, values in {0, 1}).

    ``u < x`` with u ~ U[0, 1): the same distribution as ``torch.bernoulli``, 4x faster on CPU.
    """
    u = torch.rand(x.shape, device=x.device, dtype=x.dtype, generator=generator)
    return (u < x).to(x.dtype)


def _binarize_once(x: torch.Tensor, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.bernoulli(x, generator=gen)


def load_splits(
    name="mnist",
    root: str | os.PathLike | None = None,
    download: bool = True,
    device: torch.device | str = "cpu",
) -> Splits:
    """Load a data set's train / validation / test splits onto ``device``.

    ``name`` is a config's ``[data]`` table (``load_splits(cfg.data)``) or a data set's name
    (then ``root`` and ``download`` apply).

    Returns:
        :class:`Splits` with ``x_train`` as loaded (grey levels stay grey), ``x_val`` and
        ``x_test`` binarized once with fixed seeds when the values lie in [0, 1], and labels
        (or None).
    """
    dataset = build_dataset(name, root=root, download=download) if isinstance(name, str) \
        else build_dataset(name)
    splits = load_dataset(dataset)
    if splits.value_type in BINARIZED_TYPES:
        splits.x_val = _binarize_once(splits.x_val, BINARIZE_SEED)
        splits.x_test = _binarize_once(splits.x_test, BINARIZE_SEED + 1)
    return splits.to(device)


def iterate_batches(
    x: torch.Tensor,
    batch_size: int,
    shuffle: bool = True,
    dynamic_binarization: bool = True,
    generator: torch.Generator | None = None,
) -> Iterator[torch.Tensor]:
    """Yield batches of ``x`` by (shuffled) index, binarizing each batch on ``x``'s device.

    The last batch may be smaller. No DataLoader: the split already lives on the device.
    """
    n = x.shape[0]
    order = (
        torch.randperm(n, device=x.device, generator=generator) if shuffle
        else torch.arange(n, device=x.device)
    )
    for start in range(0, n, batch_size):
        batch = x[order[start:start + batch_size]]
        yield binarize(batch, generator) if dynamic_binarization else batch
