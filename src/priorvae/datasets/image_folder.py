"""A folder of PNG/JPEG images, optionally one subfolder per class (the subfolder's name is
the label, classes sorted by name), as torchvision's ``ImageFolder``.

``[data]`` keys: ``path`` (the folder), ``size`` ([H, W] or one number: every image is resized
to it, bilinear; without it every image must have the same size), ``channels`` (1: grey,
3: RGB; default: 1 if every image is grey, else 3), ``val_fraction``, ``test_fraction``,
``split_seed`` (validation and test examples split off by a seeded permutation, as for
``tensors``). Values are 8-bit (value type ``8bit``). Files are read in sorted order.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError, DataError
from . import (
    DataSet,
    Splits,
    check_fractions,
    check_split_seed,
    not_found,
    register_dataset,
    split_by_fraction,
)

__all__ = ["ImageFolder", "EXTENSIONS", "MAX_SIDE", "to_8bit"]

EXTENSIONS = (".png", ".jpg", ".jpeg")
MAX_SIDE = 4096  # [data] size: the largest height or width


def to_8bit(img, path: Path):
    """A PIL image as 8-bit grey ("L") or "RGB". 16-bit grey (PNG mode ``I;16``, or ``I`` with
    values in 0..65535) is scaled to 0..255 (``convert`` would clip it at 255)."""
    from PIL import Image

    if img.mode.startswith("I;16") or img.mode == "I":
        a = np.asarray(img).astype(np.int64)
        if a.size and (a.min() < 0 or a.max() > 65535):
            raise DataError(f"{path}: {img.mode} grey values outside 0..65535; save 8- or "
                            f"16-bit images")
        return Image.fromarray(((a * 255 + 32767) // 65535).astype(np.uint8), "L")
    return img.convert("L") if img.mode in ("L", "1") else img.convert("RGB")


@register_dataset("image_folder")
class ImageFolder(DataSet):
    value_type = "8bit"
    n_classes = None
    shape = None

    def __init__(self, root=None, download: bool = True, path: str | None = None,
                 size: int | list[int] | None = None, channels: int | None = None,
                 val_fraction: float = 0.1, test_fraction: float = 0.1, split_seed: int = 0):
        super().__init__(root, download)
        if not isinstance(path, str) or not path:
            raise ConfigError("[data] name = 'image_folder' needs path = FOLDER")
        if isinstance(size, int) and not isinstance(size, bool):
            size = [size, size]
        if size is not None and not (isinstance(size, list) and len(size) == 2 and all(
                isinstance(s, int) and not isinstance(s, bool) and 0 < s <= MAX_SIDE
                for s in size)):
            raise ConfigError(f"[data] size must be [H, W] or one integer, each in "
                              f"1..{MAX_SIDE}, got {size!r}")
        if channels not in (None, 1, 3):
            raise ConfigError(f"[data] channels must be 1 or 3, got {channels!r}")
        check_fractions(val_fraction, test_fraction)
        split_seed = check_split_seed(split_seed)
        self.path, self.size, self.channels = Path(path).expanduser(), size, channels
        self.fractions, self.split_seed = (val_fraction, test_fraction), split_seed

    def _files(self) -> tuple[list[Path], list[int] | None, list[str]]:
        if not self.path.is_dir():
            raise not_found("path: image folder", self.path)
        # hidden entries (.ipynb_checkpoints, .DS_Store, .git) are not classes or images
        entries = sorted(p for p in self.path.iterdir() if not p.name.startswith("."))
        classes = [p for p in entries if p.is_dir()]
        loose = [p for p in entries if p.is_file() and p.suffix.lower() in EXTENSIONS]
        if classes and loose:
            raise DataError(f"{self.path} holds both images and subfolders; put every image in "
                            f"a class subfolder, or none")
        if not classes:
            files, labels = loose, None
        else:
            files, labels = [], []
            for k, folder in enumerate(classes):
                found = sorted(p for p in folder.iterdir() if not p.name.startswith(".")
                               and p.is_file() and p.suffix.lower() in EXTENSIONS)
                if not found:
                    raise DataError(f"{folder}: a class subfolder without images "
                                    f"({', '.join(EXTENSIONS)}); remove it or add its images")
                files += found
                labels += [k] * len(found)
        if len(files) < 3:
            raise DataError(f"{self.path}: {len(files)} images ({', '.join(EXTENSIONS)}); need "
                            f"at least 3 for the train / validation / test splits")
        return files, labels, [c.name for c in classes]

    def load(self) -> Splits:
        from PIL import Image, UnidentifiedImageError

        files, labels, class_names = self._files()
        images, first_size = [], None
        for path in files:
            try:
                with Image.open(path) as img:
                    img.load()
                    images.append(to_8bit(img, path))
            except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError,
                    MemoryError) as exc:
                raise DataError(f"{path} is not a readable image ({type(exc).__name__}: "
                                f"{exc})") from None
            if self.size is None:
                first_size = first_size or (images[0].size, files[0])
                if images[-1].size != first_size[0]:
                    (w0, h0), (w, h) = first_size[0], images[-1].size
                    raise DataError(f"{self.path}: images of different sizes ({first_size[1].name}"
                                    f" is {h0}x{w0}, {path.name} is {h}x{w}); declare [data] "
                                    f"size = [H, W] to resize them")
        channels = self.channels or (1 if all(i.mode == "L" for i in images) else 3)
        arrays = []
        for img in images:
            img = img.convert("L" if channels == 1 else "RGB")
            if self.size is not None:
                img = img.resize((self.size[1], self.size[0]), Image.BILINEAR)
            a = np.asarray(img, dtype=np.uint8)
            arrays.append(a[None] if a.ndim == 2 else a.transpose(2, 0, 1))
        x = torch.from_numpy(np.stack(arrays).astype(np.float32)) / 255.0
        y = None if labels is None else torch.tensor(labels, dtype=torch.long)
        parts = {}
        for i, frac in enumerate(reversed(self.fractions)):  # test first, then validation
            keep, off = split_by_fraction(len(x), frac, self.split_seed + i,
                                          ("test_fraction", "val_fraction")[i])
            parts[i] = (x[off], None if y is None else y[off])
            x, y = x[keep], None if y is None else y[keep]
        (x_test, y_test), (x_val, y_val) = parts[0], parts[1]
        self.n_classes = len(class_names) or None
        return Splits(self.name, x, y, x_val, y_val, x_test, y_test, self.value_type,
                      self.n_classes)
