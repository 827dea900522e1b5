"""CIFAR-10 (Krizhevsky 2009): 32x32 colour images of 10 classes, 8-bit values.

50,000 training images (the last ``n_validation``, default 5,000, of a permutation seeded by
``split_seed`` are the validation set) and the official 10,000 test images. Files in
torchvision's layout, ``ROOT/cifar-10-batches-py/{data_batch_1..5,test_batch}`` (python
pickles with ``data`` (N, 3072) uint8, channel-major, and ``labels``), downloaded by
torchvision's ``CIFAR10`` when ``download = true``.
"""

from __future__ import annotations

import pickle

import numpy as np
import torch

from ..errors import DataError
from . import (
    DataSet,
    Splits,
    check_n_validation,
    check_split_seed,
    register_dataset,
    validation_permutation,
)

__all__ = ["CIFAR10"]

FOLDER = "cifar-10-batches-py"
TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]


class _ArraysOnly(pickle.Unpickler):
    """Unpickles dicts, lists and numpy arrays, nothing that runs code: a config (or a shared
    run folder) may point ``[data] root`` anywhere."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray",
               "_reconstruct"), ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


@register_dataset("cifar10")
class CIFAR10(DataSet):
    value_type = "8bit"
    n_classes = 10
    shape = (3, 32, 32)

    def __init__(self, root=None, download: bool = True, n_validation: int = 5000,
                 split_seed: int = 0):
        super().__init__(root, download)
        self.n_validation = check_n_validation(n_validation)
        self.split_seed = check_split_seed(split_seed)

    def load(self) -> Splits:
        folder = self.root / FOLDER
        missing = [f for f in (*TRAIN_FILES, "test_batch") if not (folder / f).is_file()]
        if missing and self.download:
            import torchvision

            try:
                torchvision.datasets.CIFAR10(str(self.root), train=True, download=True)
            except Exception as exc:  # URLError, OSError, RuntimeError...
                raise DataError(f"downloading CIFAR-10 into {self.root} failed "
                                f"({type(exc).__name__}: {exc})") from None
            missing = [f for f in missing if not (folder / f).is_file()]
        if missing:
            raise DataError(f"CIFAR-10 files missing in {folder}: {', '.join(missing)} "
                            f"(download is off or failed); set [data] root to the folder that "
                            f"holds {FOLDER}/")
        xs, ys = zip(*(self._batch(folder / f) for f in TRAIN_FILES), strict=True)
        x, y = torch.cat(xs), torch.cat(ys)
        x_test, y_test = self._batch(folder / "test_batch")
        perm = validation_permutation(len(x), self.n_validation, self.split_seed, folder)
        k = len(x) - self.n_validation
        train, val = perm[:k].sort().values, perm[k:].sort().values
        return Splits(self.name, x[train], y[train], x[val], y[val], x_test, y_test,
                      self.value_type, self.n_classes)

    @staticmethod
    def _batch(path) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            with open(path, "rb") as f:  # the official files are pickles: numpy arrays only
                entry = _ArraysOnly(f, encoding="latin1").load()
            data = np.asarray(entry["data"], dtype=np.uint8)
            labels = np.asarray(entry["labels"] if "labels" in entry else entry["fine_labels"])
        except Exception as exc:  # UnpicklingError, KeyError, EOFError...
            raise DataError(f"{path} is not a CIFAR-10 batch ({type(exc).__name__}: "
                            f"{exc})") from None
        if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
            raise DataError(f"{path}: expected data (N, 3072) and N labels, got data "
                            f"{data.shape} and {len(labels)} labels")
        x = torch.from_numpy(data.reshape(-1, 3, 32, 32).astype(np.float32)) / 255.0
        return x, torch.from_numpy(labels.astype(np.int64))
