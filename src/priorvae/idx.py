"""Checks of IDX files (the format of MNIST and FashionMNIST) before they are loaded.

torchvision reads the raw files without checking them: a truncated file ends in a reshape
error that reads like a missing download, and image and label files of different lengths
end in an IndexError mid-training. :func:`check_idx_pair` names the file and what is wrong
in one line. Format: a big-endian header (magic 0x00000803 and the sizes N, rows, cols for
images; 0x00000801 and N for labels), then one unsigned byte per pixel / label.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

from .errors import DataError

__all__ = ["check_idx_pair", "IMAGES_MAGIC", "LABELS_MAGIC"]

IMAGES_MAGIC, LABELS_MAGIC = 0x00000803, 0x00000801


def _header(path: Path, size: int) -> tuple[int, ...]:
    with open(path, "rb") as f:
        head = f.read(size)
    if len(head) < size:
        raise DataError(f"{path} is truncated ({len(head)} bytes, shorter than its header); "
                        f"delete it so that it is downloaded again")
    return struct.unpack(f">{size // 4}I", head)


def check_idx_pair(images: str | os.PathLike, labels: str | os.PathLike,
                   shape: tuple[int, int], classes: int) -> int:
    """Check an images file and its labels file: magic numbers, image size ``shape`` (H, W),
    file lengths against their headers, as many labels as images, labels below ``classes``.
    Returns the number of images; raises :class:`DataError` naming the file otherwise."""
    images, labels = Path(images), Path(labels)
    magic, n, rows, cols = _header(images, 16)
    if magic != IMAGES_MAGIC:
        raise DataError(f"{images} is not an IDX images file (magic {magic:#010x}, expected "
                        f"{IMAGES_MAGIC:#010x}); delete it so that it is downloaded again")
    if (rows, cols) != tuple(shape):
        raise DataError(f"{images} holds {rows}x{cols} images, expected "
                        f"{shape[0]}x{shape[1]}")
    expected = 16 + n * rows * cols
    if images.stat().st_size != expected:
        raise DataError(f"{images} has {images.stat().st_size} bytes, but its header promises "
                        f"{n} images of {rows}x{cols} ({expected} bytes): it is truncated or "
                        f"damaged; delete it so that it is downloaded again")
    magic, m = _header(labels, 8)
    if magic != LABELS_MAGIC:
        raise DataError(f"{labels} is not an IDX labels file (magic {magic:#010x}, expected "
                        f"{LABELS_MAGIC:#010x}); delete it so that it is downloaded again")
    if labels.stat().st_size != 8 + m:
        raise DataError(f"{labels} has {labels.stat().st_size} bytes, but its header promises "
                        f"{m} labels ({8 + m} bytes): it is truncated or damaged; delete it so "
                        f"that it is downloaded again")
    if m != n:
        raise DataError(f"{images} holds {n} images but {labels} holds {m} labels; they must "
                        f"be a matching pair (delete both so that they are downloaded again)")
    with open(labels, "rb") as f:
        f.seek(8)
        top = max(f.read(), default=0)
    if top >= classes:
        raise DataError(f"{labels} holds a label {top}, but the data set has {classes} classes")
    return n
