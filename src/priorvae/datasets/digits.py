"""scikit-learn's bundled 8x8 digits (UCI optdigits test set, 1,797 images), offline.

Intensities k/16 scaled to [0, 1] (value type ``intensity``); one fixed permutation (seed 0)
gives 1,297 training, 200 validation and 300 test images.
"""

from __future__ import annotations

import torch

from . import DataSet, Splits, register_dataset

__all__ = ["Digits"]


@register_dataset("digits")
class Digits(DataSet):
    value_type = "intensity"
    n_classes = 10
    shape = (1, 8, 8)

    def load(self) -> Splits:
        from sklearn.datasets import load_digits

        bunch = load_digits()
        x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
        y = torch.tensor(bunch.target, dtype=torch.long)
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
        x, y = x[perm], y[perm]
        return Splits(self.name, x[:1297], y[:1297], x[1297:1497], y[1297:1497],
                      x[1497:], y[1497:], self.value_type, self.n_classes)
