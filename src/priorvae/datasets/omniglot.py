"""Omniglot 28x28 (Lake et al. 2015) as used by IWAE, the VampPrior and the Exemplar VAE.

``chardata.mat`` of Burda et al.'s IWAE repository: 24,345 training and 8,070 test images of
28x28 grey levels in [0, 1] (value type ``intensity``: binarized dynamically for training,
once for validation and test, like MNIST), stored column-major. As in the VampPrior code
(Tomczak & Welling 2018, ``utils/load_data.py``), the last 1,345 images of a shuffled training
set are the validation set (23,000 / 1,345 / 8,070). That code shuffles with numpy's unseeded
global generator; here the permutation is seeded (``split_seed``, default 0), so every run
gets the same split. No labels are used.

File: ``ROOT/Omniglot/chardata.mat``, downloaded from the IWAE repository when
``download = true``.
"""

from __future__ import annotations

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

__all__ = ["Omniglot", "URL"]

URL = "https://raw.githubusercontent.com/yburda/iwae/master/datasets/OMNIGLOT/chardata.mat"


@register_dataset("omniglot")
class Omniglot(DataSet):
    value_type = "intensity"
    n_classes = None
    shape = (1, 28, 28)

    def __init__(self, root=None, download: bool = True, n_validation: int = 1345,
                 split_seed: int = 0):
        super().__init__(root, download)
        self.n_validation = check_n_validation(n_validation)
        self.split_seed = check_split_seed(split_seed)

    def load(self) -> Splits:
        from scipy.io import loadmat

        folder = self.root / "Omniglot"
        path = folder / "chardata.mat"
        if not path.is_file():
            if not self.download:
                raise DataError(f"{path} not found and download is off ([data] download = "
                                f"false); put chardata.mat (IWAE repository) there, or set "
                                f"[data] root")
            from .static_mnist import _download

            _download(URL, folder, "chardata.mat")
        try:
            raw = loadmat(str(path))
        except Exception as exc:  # scipy raises ValueError, MatReadError, ...
            raise DataError(f"{path} is not a readable .mat file ({type(exc).__name__}: "
                            f"{exc})") from None
        for key in ("data", "testdata"):
            if key not in raw or np.ndim(raw[key]) != 2 or np.shape(raw[key])[0] != 784:
                raise DataError(f"{path}: expected an array {key!r} of shape (784, N)")
        train, test = self._images(raw["data"]), self._images(raw["testdata"])
        perm = validation_permutation(len(train), self.n_validation, self.split_seed, path)
        train = train[perm]
        n = len(train) - self.n_validation
        return Splits(self.name, train[:n].contiguous(), None, train[n:].contiguous(), None,
                      test, None, self.value_type, self.n_classes)

    @staticmethod
    def _images(data: np.ndarray) -> torch.Tensor:
        """(784, N) column-major -> (N, 1, 28, 28), as the reference code's
        ``reshape((-1, 28, 28)).reshape((-1, 784), order='F')``."""
        x = np.asarray(data, dtype=np.float32).T.reshape(-1, 28, 28).transpose(0, 2, 1)
        return torch.from_numpy(np.ascontiguousarray(x)).unsqueeze(1)
