"""Statically binarized MNIST (Larochelle & Murray 2011): one fixed binarization, no labels.

The benchmark of the VampPrior and IWAE papers: 50,000 training, 10,000 validation and 10,000
test images of 28x28 binary pixels, in the text files
``ROOT/BinarizedMNIST/binarized_mnist_{train,valid,test}.amat`` (one image per line, 784
space-separated 0/1 values), downloaded from Hugo Larochelle's page when ``download = true``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import DataError
from . import DataSet, Splits, register_dataset

__all__ = ["StaticMNIST", "URL", "read_amat"]

URL = "http://www.cs.toronto.edu/~larocheh/public/datasets/binarized_mnist/"
FILES = {"train": "binarized_mnist_train.amat", "val": "binarized_mnist_valid.amat",
         "test": "binarized_mnist_test.amat"}


def read_amat(path: Path, width: int = 784) -> torch.Tensor:
    """(N, width) float32 of a text file with ``width`` 0/1 values per line."""
    raw = np.frombuffer(path.read_bytes(), dtype=np.uint8)
    digit = (raw == ord("0")) | (raw == ord("1"))
    space = (raw == ord(" ")) | (raw == ord("\n")) | (raw == ord("\r")) | (raw == ord("\t"))
    if not bool((digit | space).all()):
        raise DataError(f"{path} holds characters other than 0, 1 and white space: not a "
                        f"binarized MNIST .amat file")
    values = raw[digit] - ord("0")
    lines = sum(1 for line in path.read_bytes().splitlines() if line.strip())
    if lines == 0 or values.size != lines * width:
        raise DataError(f"{path}: {values.size} values on {lines} lines, expected {width} per "
                        f"line (28x28 images)")
    return torch.from_numpy(values.reshape(lines, width).astype(np.float32))


@register_dataset("static_mnist")
class StaticMNIST(DataSet):
    value_type = "binary"
    n_classes = None
    shape = (1, 28, 28)

    def load(self) -> Splits:
        folder = self.root / "BinarizedMNIST"
        parts = {}
        for part, file in FILES.items():
            path = folder / file
            if not path.is_file():
                if not self.download:
                    raise DataError(f"{path} not found and download is off ([data] download = "
                                    f"false); put the three binarized_mnist_*.amat files in "
                                    f"{folder}, or set [data] root")
                _download(URL + file, folder, file)
            parts[part] = read_amat(path).reshape(-1, *self.shape)
        return Splits(self.name, parts["train"], None, parts["val"], None, parts["test"], None,
                      self.value_type, self.n_classes)


def _download(url: str, folder: Path, file: str) -> None:
    from torchvision.datasets.utils import download_url

    try:
        download_url(url, str(folder), file)
    except Exception as exc:  # URLError, OSError, ...
        raise DataError(f"downloading {url} into {folder} failed ({type(exc).__name__}: "
                        f"{exc}); put the file there by hand, or set [data] root") from None
