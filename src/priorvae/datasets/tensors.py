"""Your own arrays: a ``.npy``, ``.npz`` or ``.pt`` file, or one file per split.

``[data]`` keys (besides ``root``/``download``, unused here):

- ``path``: one file. ``.npy``: the examples. ``.npz`` / ``.pt`` (a tensor or a dict of
  tensors): ``x`` (and optional labels ``y``), or ``x_train``, ``x_val``, ``x_test`` (and
  ``y_train``...). ``.pt`` files are read with ``weights_only=True``, ``.npy``/``.npz`` without
  pickles: a file cannot run code.
- ``train``, ``val``, ``test``: one file per split instead (each as above, ``x`` [+ ``y``]).
- Splits that are not given are split off the training examples by a permutation seeded by
  ``split_seed``: the test split (``test_fraction``, default 0.1), then the validation split
  (``val_fraction``, default 0.1).
- Shapes: images (N, C, H, W); (N, H, W, C) is accepted when unambiguous (last axis 1, 3 or 4,
  second not) or with ``layout = "nhwc"``; when both read as channels, ``layout`` must say
  which; (N, H, W) is one channel; vectors (N, D).
- ``value_type``: inferred when not given: uint8 -> ``8bit`` (divided by 255; uint8 holding
  only 0 and 1 is ambiguous and must be declared), booleans or only 0/1 -> ``binary``, floats
  in [0, 1] -> ``intensity``, else ``real``. Declared ``binary`` keeps uint8 0/1 as they are.
- Labels: integers (N,); ``n_classes`` = largest label + 1 unless given.
"""

from __future__ import annotations

import math
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError, DataError
from . import (
    MAX_CLASSES,
    VALUE_TYPES,
    DataSet,
    Splits,
    available_memory,
    check_fractions,
    check_n_classes,
    check_split_seed,
    not_found,
    register_dataset,
    split_by_fraction,
)

__all__ = ["Tensors", "read_arrays", "to_images"]

PARTS = ("train", "val", "test")


def read_arrays(path: str | Path) -> dict[str, np.ndarray]:
    """The arrays of one file by key (``x``, ``y``, ``x_train``...; a bare array is ``x``)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise not_found("file", path)
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            with open(path, "rb") as f:
                if f.read(6) != b"\x93NUMPY":
                    raise DataError(f"{path} is not a .npy file (no NUMPY header)")
                f.seek(0)
                _check_fits(path, {"x": _header(f)})
            return {"x": np.load(path, allow_pickle=False)}
        if suffix == ".npz":
            with zipfile.ZipFile(path) as zf:  # the headers first: a small file may unpack
                _check_fits(path, {n.removesuffix(".npy"): _header(zf.open(n))  # to terabytes
                                   for n in zf.namelist() if n.endswith(".npy")})
            with np.load(path, allow_pickle=False) as npz:
                return {k: npz[k] for k in npz.files}
        if suffix in (".pt", ".pth"):
            with warnings.catch_warnings():  # torch's note on checking sparse tensors
                warnings.filterwarnings("ignore", "Validating sparse", UserWarning)
                obj = torch.load(path, map_location="cpu", weights_only=True)
            obj = obj if isinstance(obj, dict) else {"x": obj}
            bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
            if bad:
                raise DataError(f"{path}: entry {bad[0]!r} is not a tensor")
            for k, v in obj.items():  # a crafted view would be larger than its data
                if v.layout != torch.strided \
                        or v.numel() * v.element_size() > v.untyped_storage().nbytes():
                    raise DataError(f"{path}: entry {k!r} of shape {tuple(v.shape)} is not a "
                                    f"plain tensor holding its values (save .contiguous())")
            return {str(k): v.numpy() for k, v in obj.items()}
    except DataError:
        raise
    except Exception as exc:  # ValueError, UnpicklingError, zipfile errors, ...
        raise DataError(f"{path} cannot be read as {suffix} ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    raise DataError(f"{path}: [data] name = 'tensors' reads .npy, .npz or .pt files, "
                    f"got {suffix or 'no suffix'!r}")


def _header(f) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) from the header of the .npy stream ``f``, without reading the data."""
    fmt = np.lib.format
    read = fmt.read_array_header_1_0 if fmt.read_magic(f) == (1, 0) else \
        fmt.read_array_header_2_0
    shape, _, dtype = read(f)
    return shape, dtype


def _check_fits(path: Path, headers: dict) -> None:
    """Refuse arrays whose values (and their float32 copy) would not fit in half the memory
    available, before numpy allocates them (a crafted header or a zip bomb: killed, not an
    error)."""
    need = sum(math.prod(shape) * (dtype.itemsize + 4) for shape, dtype in headers.values())
    have = available_memory()
    if need > have // 2:
        arrays = ", ".join(f"{k} {shape}" for k, (shape, _) in headers.items())
        raise DataError(f"{path}: its arrays ({arrays}) need about {need / 2**30:.3g} GiB, "
                        f"more than half the {have / 2**30:.3g} GiB available here")


def to_images(x: np.ndarray, layout: str, where: str) -> np.ndarray:
    """(N, C, H, W) images or (N, D) vectors from an array of 2, 3 or 4 axes."""
    if x.ndim == 2:
        return x
    if x.ndim == 3:
        return x[:, None]
    if x.ndim == 4:
        channels_last, channels_first = x.shape[3] in (1, 3, 4), x.shape[1] in (1, 3, 4)
        if layout == "auto" and channels_last and channels_first:
            raise DataError(f"{where}: an array of shape {x.shape} could be (N, C, H, W) or "
                            f"(N, H, W, C); declare [data] layout = 'nchw' or 'nhwc'")
        nhwc = layout == "nhwc" or (layout == "auto" and channels_last)
        return np.transpose(x, (0, 3, 1, 2)) if nhwc else x
    raise DataError(f"{where}: an array of shape {x.shape}; expected images (N, C, H, W), "
                    f"(N, H, W, C) or (N, H, W), or vectors (N, D)")


def _values(x: np.ndarray, declared: str | None, where: str) -> tuple[torch.Tensor, str]:
    if x.dtype == np.bool_:
        return torch.from_numpy(x.astype(np.float32)), declared or "binary"
    if (declared == "binary" and np.issubdtype(x.dtype, np.integer) and x.size
            and x.max() > 1):  # masks stored as 0/255 bytes (image tools write them so)
        return torch.from_numpy(x.astype(np.float32) / 255.0), declared
    if declared != "binary" and (x.dtype == np.uint8 or (
            declared == "8bit" and np.issubdtype(x.dtype, np.integer))):
        if x.min() < 0 or x.max() > 255:
            raise DataError(f"{where}: 8bit integers must lie in 0..255")
        if declared is None and x.size and x.max() <= 1:  # binary data stored as bytes?
            raise DataError(f"{where}: uint8 values 0 and 1 only: binary data, or 8-bit "
                            f"levels 0 and 1/255? declare [data] value_type = 'binary' or "
                            f"'8bit'")
        return torch.from_numpy(x.astype(np.float32) / 255.0), declared or "8bit"
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise DataError(f"{where}: examples must be numbers, got dtype {x.dtype}")
    if x.dtype == np.float64 and x.size:  # finite values float32 would make infinite
        big = np.abs(np.where(np.isfinite(x), x, 0.0)).max()
        if big > np.finfo(np.float32).max:
            raise DataError(f"{where}: values beyond the float32 range (largest magnitude "
                            f"{big:.3g}); scale them")
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    if declared == "8bit" and t.numel() and t.max() > 1:  # floats 0..255
        t = t / 255.0
    if declared == "8bit" and t.numel():  # k/255 stored in a narrower float (float16: 6e-2
        levels = (t * 255).round()        # of a level off): snapped onto the grid when near
        if bool(((t * 255 - levels).abs() < 0.1).all()):
            t = levels / 255.0
    if declared:
        return t, declared
    if not torch.isfinite(t).all() or t.numel() == 0:
        return t, "real"  # the check names the NaN
    if bool(((t == 0) | (t == 1)).all()):
        return t, "binary"
    return t, "intensity" if t.min() >= 0 and t.max() <= 1 else "real"


@register_dataset("tensors")
class Tensors(DataSet):
    value_type = "real"  # the instance's is inferred from the arrays or declared
    n_classes = None
    shape = None

    def __init__(self, root=None, download: bool = True, path: str | None = None,
                 train: str | None = None, val: str | None = None, test: str | None = None,
                 value_type: str | None = None, layout: str = "auto", n_classes: int | None = None,
                 val_fraction: float = 0.1, test_fraction: float = 0.1, split_seed: int = 0):
        super().__init__(root, download)
        if (path is None) == (train is None):
            raise ConfigError("[data] name = 'tensors' needs either path = FILE or "
                              "train = FILE (with optional val, test)")
        if path is not None and (val or test):
            raise ConfigError("[data] path holds every split; val and test go with train")
        if value_type is not None and value_type not in VALUE_TYPES:
            raise ConfigError(f"[data] value_type must be one of {', '.join(VALUE_TYPES)}, "
                              f"got {value_type!r}")
        if layout not in ("auto", "nchw", "nhwc"):
            raise ConfigError(f"[data] layout must be 'auto', 'nchw' or 'nhwc', got {layout!r}")
        check_fractions(val_fraction, test_fraction)
        n_classes = check_n_classes(n_classes)
        split_seed = check_split_seed(split_seed)
        self.path, self.files = path, {"train": train, "val": val, "test": test}
        self.declared, self.layout, self.declared_classes = value_type, layout, n_classes
        self.fractions, self.split_seed = {"val": val_fraction, "test": test_fraction}, split_seed

    def _raw(self) -> dict[str, tuple[np.ndarray, np.ndarray | None, str]]:
        """{part: (x, y or None, where)} for the parts the files give."""
        out = {}
        if self.path is not None:
            arrays, where = read_arrays(self.path), str(self.path)
            if "x" in arrays:
                out["train"] = (arrays["x"], arrays.get("y"), where)
            for part in PARTS:
                if f"x_{part}" in arrays:
                    out[part] = (arrays[f"x_{part}"], arrays.get(f"y_{part}"), where)
            if "train" not in out:
                raise DataError(f"{where}: no array 'x' or 'x_train' (found: "
                                f"{', '.join(arrays) or 'nothing'})")
        else:
            for part, file in self.files.items():
                if file is not None:
                    arrays = read_arrays(file)
                    if "x" not in arrays and f"x_{part}" not in arrays:
                        raise DataError(f"{file}: no array 'x' (found: {', '.join(arrays)})")
                    out[part] = (arrays.get("x", arrays.get(f"x_{part}")),
                                 arrays.get("y", arrays.get(f"y_{part}")), str(file))
        return out

    def load(self) -> Splits:
        xs, ys, types = {}, {}, set()
        for part, (x, y, where) in self._raw().items():
            x = to_images(np.asarray(x), self.layout, where)
            try:
                xs[part], vt = _values(x, self.declared, where)
            except MemoryError:
                raise DataError(f"{where}: {x.shape} examples do not fit in memory as float32 "
                                f"values") from None
            types.add(vt)
            if y is not None:
                y = np.asarray(y)
                if not np.issubdtype(y.dtype, np.integer):
                    raise DataError(f"{where}: labels must be integers, got dtype {y.dtype}")
                if y.ndim != 1 or len(y) != len(x):
                    raise DataError(f"{where}: {len(x)} examples but labels of shape "
                                    f"{y.shape}; expected ({len(x)},)")
                y = torch.from_numpy(y.astype(np.int64))
            ys[part] = y
        # the widest type of any split (0/1 values lie on the 8-bit levels too)
        value_type = self.declared or next(
            t for t in ("real", "intensity", "8bit", "binary") if t in types)
        for i, part in enumerate(("test", "val")):
            if part not in xs:
                keep, off = split_by_fraction(len(xs["train"]), self.fractions[part],
                                              self.split_seed + i, f"{part}_fraction")
                y = ys["train"]
                xs[part], ys[part] = xs["train"][off], None if y is None else y[off]
                xs["train"], ys["train"] = xs["train"][keep], None if y is None else y[keep]
        labelled = [ys[p] is not None for p in PARTS]
        if any(labelled) and not all(labelled):
            raise DataError(f"{self.path or self.files['train']}: labels for some splits "
                            f"only; give them for every split or for none")
        n_classes = self.declared_classes
        if n_classes is None and all(labelled):
            low = int(min(ys[p].min() for p in PARTS))
            largest = int(max(ys[p].max() for p in PARTS))
            if low < 0 or largest >= MAX_CLASSES:
                raise DataError(f"{self.path or self.files['train']}: labels must be class "
                                f"indices 0..n_classes - 1 (at most {MAX_CLASSES} classes); "
                                f"found {low if low < 0 else largest}")
            n_classes = largest + 1
        self.n_classes, self.value_type = n_classes, value_type
        return Splits(self.name, xs["train"], ys["train"], xs["val"], ys["val"], xs["test"],
                      ys["test"], value_type, n_classes)
