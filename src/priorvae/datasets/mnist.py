"""MNIST and FashionMNIST (LeCun et al. 1998; Xiao et al. 2017), 28x28 grey levels, 8-bit.

Split of Tomczak & Welling (2018): train = the first 50,000 official training images,
validation = the last 10,000, test = the official 10,000. Files in torchvision's layout,
``ROOT/MNIST/raw/train-images-idx3-ubyte`` (or ``FashionMNIST``), downloaded by torchvision
when ``download = true``.
"""

from __future__ import annotations

from ..errors import DataError
from ..idx import check_idx_pair
from . import DataSet, Splits, register_dataset

__all__ = ["MNIST", "FashionMNIST", "RAW_FILES"]

RAW_FILES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte",
             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
N_VALIDATION = 10_000


@register_dataset("mnist")
class MNIST(DataSet):
    value_type = "8bit"
    n_classes = 10
    shape = (1, 28, 28)
    torchvision_class = "MNIST"

    def load(self) -> Splits:
        import torchvision

        cls = getattr(torchvision.datasets, self.torchvision_class)
        folder = self.root / cls.__name__ / "raw"
        for prefix in ("train", "t10k"):  # files that are there are checked, not misread
            images, labels = (folder / f"{prefix}-{kind}-idx{dim}-ubyte"
                              for kind, dim in (("images", 3), ("labels", 1)))
            if images.is_file() and labels.is_file():
                n = check_idx_pair(images, labels, self.shape[1:], self.n_classes)
                if prefix == "train" and n <= N_VALIDATION:
                    raise DataError(f"{images} holds {n} images; the training split needs "
                                    f"more than the {N_VALIDATION:,} validation images")
        try:
            train = cls(str(self.root), train=True, download=self.download)
            test = cls(str(self.root), train=False, download=self.download)
        except Exception as exc:  # torchvision raises RuntimeError, URLError, OSError...
            expected = "\n  ".join(str(folder / f) for f in RAW_FILES)
            how = ("downloading failed" if self.download
                   else "download is off ([data] download = false)")
            first = str(exc).splitlines()[0] if str(exc) else ""
            raise DataError(
                f"{cls.__name__} files not found under {self.root} and {how} "
                f"({type(exc).__name__}: {first}).\nExpected the files:\n  {expected}\n"
                f"(or their .gz versions). Put them there, or set [data] root / $PRIORVAE_DATA "
                f"to the folder that holds {cls.__name__}/raw/."
            ) from None
        x_all = train.data.unsqueeze(1).float() / 255.0
        y_all = train.targets.long()
        n_train = len(x_all) - N_VALIDATION
        return Splits(self.name, x_all[:n_train].contiguous(), y_all[:n_train].contiguous(),
                      x_all[n_train:].contiguous(), y_all[n_train:].contiguous(),
                      test.data.unsqueeze(1).float() / 255.0, test.targets.long(),
                      self.value_type, self.n_classes)


@register_dataset("fashion_mnist")
class FashionMNIST(MNIST):
    torchvision_class = "FashionMNIST"


