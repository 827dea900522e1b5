"""Loading a configured data set onto the training device, and batching it by shuffled index.

The data sets themselves live in :mod:`priorvae.datasets` (one file each; the registry and
the contract in its ``__init__``). This module puts a data set's splits on the device, as
loaded: how the data are modelled (Bernoulli: dynamic binarization of training batches, and
validation and test binarized once with the seeds every MNIST number was measured on) is the
likelihood's business (:mod:`priorvae.likelihoods`, :func:`~priorvae.likelihoods.prepare_splits`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import torch

from .datasets import Splits, build_dataset, data_root, load_dataset
from .likelihoods.bernoulli import binarize

__all__ = [
    "Splits",
    "input_shape",
    "data_root",
    "load_splits",
    "iterate_batches",
]


def input_shape(data) -> tuple[int, ...]:
    """One example's shape ((C, H, W) or (D,)) of a ``[data]`` table or a data set's name;
    without loading the data when the data set declares it."""
    return build_dataset(data).input_shape()


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
        :class:`Splits` as loaded (grey levels stay grey; prepare validation and test for a
        likelihood with :func:`~priorvae.likelihoods.prepare_splits`), labels or None.
    """
    dataset = build_dataset(name, root=root, download=download) if isinstance(name, str) \
        else name  # a [data] table: its errors name the data set as the config does
    return load_dataset(dataset).to(device)


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
