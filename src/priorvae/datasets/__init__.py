"""Data sets as plug-ins: the :class:`DataSet` contract, :class:`Splits`, and the registry.

A data set is a class with three class attributes and one method:

- ``value_type``: what its values are, one of :data:`VALUE_TYPES`: ``"binary"`` (floats in
  {0, 1}), ``"intensity"`` (floats in [0, 1]), ``"8bit"`` (floats k/255, k in 0..255),
  ``"real"`` (any finite float). A likelihood declares the value types it accepts
  (Bernoulli: binary, intensity, 8bit); a mismatch is refused before a run folder is written.
- ``n_classes``: the number of label classes, or None (no labels).
- ``shape``: one example's shape, (C, H, W) for images or (D,) for vectors; None when only the
  files tell (``tensors``, ``image_folder``: then :meth:`DataSet.input_shape` loads them).
- ``load() -> Splits``: float32 ``x_train``/``x_val``/``x_test`` ((N, C, H, W) or (N, D)),
  values as loaded (grey levels stay grey: binarizing is the likelihood's business), and
  integer labels (N,) or None.

The constructor takes ``root`` and ``download`` (the ``[data]`` keys every data set shares)
and the data set's own keyword arguments, which are the other keys of ``[data]``.
:func:`load_dataset` checks what ``load`` returns (shapes, NaN/inf, values against the
declared value type, label lengths) and raises one line naming what is wrong.

Registry: :func:`register_dataset` (a decorator), :func:`build_dataset`, :func:`list_datasets`;
entry-point group ``priorvae.datasets``. Root folder: ``[data] root``, else
``$PRIORVAE_DATA``, else ``$XDG_CACHE_HOME/priorvae`` (or ``~/.cache/priorvae``).
"""

from __future__ import annotations

import hashlib
import numbers
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

import torch

from ..errors import ConfigError, DataError, PluginError, PriorVAEError
from ..registry import Registry

__all__ = ["VALUE_TYPES", "DATASETS", "Splits", "DataSet", "register_dataset", "get_dataset_class",
           "build_dataset", "list_datasets", "load_dataset", "check_splits", "check_suits",
           "data_root", "split_by_fraction", "check_same_data", "available_memory",
           "check_n_validation", "check_n_classes", "check_split_seed", "check_fractions",
           "not_found", "validation_permutation", "MAX_CLASSES"]

VALUE_TYPES = ("binary", "intensity", "8bit", "real")
MAX_CLASSES = 65536  # n_classes: the quality classifier has one output per class
GROUP = "priorvae.datasets"


@dataclass
class Splits:
    """A data set's train / validation / test values ``x_*`` (float32, (N, C, H, W) or (N, D))
    and integer labels ``y_*`` (N,) or None; ``value_type`` and ``n_classes`` as declared."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor | None
    x_val: torch.Tensor
    y_val: torch.Tensor | None
    x_test: torch.Tensor
    y_test: torch.Tensor | None
    value_type: str = "intensity"
    n_classes: int | None = None

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    @property
    def has_labels(self) -> bool:
        return self.y_train is not None and self.y_test is not None

    def digest(self) -> str:
        """sha256 of the value type and every split's values and labels (shapes included): the
        data a run was trained on, recorded in its checkpoints."""
        h = hashlib.sha256(self.value_type.encode())
        for key in ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test"):
            t = getattr(self, key)
            h.update(f"{key}{None if t is None else tuple(t.shape)}".encode())
            if t is not None:
                h.update(t.detach().cpu().contiguous().numpy())
        return h.hexdigest()

    def to(self, device: torch.device | str) -> Splits:
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for key in ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test"):
            if moved[key] is not None:
                moved[key] = moved[key].to(device)
        return Splits(**moved)


class DataSet:
    """The contract of a data set (see the module docstring). Subclass, set the class
    attributes, implement :meth:`load`, and register with ``@register_dataset("name")``."""

    name: ClassVar[str] = ""
    value_type: ClassVar[str] = "real"
    n_classes: ClassVar[int | None] = None
    shape: ClassVar[tuple[int, ...] | None] = None

    def __init__(self, root: str | os.PathLike | None = None, download: bool = True):
        self.root, self.download = data_root(root), download

    def load(self) -> Splits:
        raise NotImplementedError

    def input_shape(self) -> tuple[int, ...]:
        """One example's shape, without loading when the class declares it."""
        return tuple(self.shape) if self.shape else load_dataset(self).input_shape


DATASETS = Registry("data set", DataSet, GROUP, reserved=("root", "download"),
                    name_attr="name")


def register_dataset(name: str):
    """Class decorator: register a :class:`DataSet` subclass under ``name``."""
    register = DATASETS.register(name)

    def wrap(cls: type[DataSet]) -> type[DataSet]:
        if getattr(cls, "value_type", None) not in VALUE_TYPES:
            raise PluginError(f"data set {name!r}: value_type must be one of "
                              f"{', '.join(VALUE_TYPES)}, got {cls.value_type!r}")
        return register(cls)

    return wrap


def list_datasets(pattern: str = "*") -> list[str]:
    """Names of the registered data sets matching ``pattern``, sorted."""
    return DATASETS.list(pattern)


def get_dataset_class(name: str, sha256: str | None = None) -> type[DataSet]:
    """The class registered as ``name`` (or a ``file.py:Class`` / ``module:Class`` spec,
    through the one gate); unknown names get the close matches."""
    return DATASETS.get(name, sha256)


def build_dataset(cfg: Any, **kwargs) -> DataSet:
    """The data set a ``[data]`` table names (``cfg`` with ``name``, ``root``, ``download``,
    the data set's own ``kwargs`` and ``file_sha256``), or a name plus keyword arguments.
    Arguments the class does not take are refused in one line with the ones it takes."""
    if isinstance(cfg, str):
        return DATASETS.build(cfg, **kwargs)
    args = {"root": cfg.root, "download": cfg.download, **cfg.kwargs, **kwargs}
    return DATASETS.build(cfg.name, sha256=cfg.file_sha256, **args)


def data_root(root: str | os.PathLike | None = None) -> Path:
    """The data folder: ``root`` if given, else ``$PRIORVAE_DATA``, else the user cache."""
    if root:
        return Path(root).expanduser()
    if os.environ.get("PRIORVAE_DATA"):
        return Path(os.environ["PRIORVAE_DATA"]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "priorvae"


def available_memory() -> int:
    """Bytes of memory available to a new allocation (MemAvailable on Linux)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 2**34


def not_found(what: str, path: Path) -> DataError:
    """The one line for a missing ``[data]`` file or folder; a relative path says where it was
    looked for (the current directory, as when the run was trained)."""
    where = "" if path.is_absolute() else (f" (a relative path is read from the current "
                                           f"directory, {Path.cwd()}; give an absolute path "
                                           f"to use the run from elsewhere)")
    return DataError(f"[data] {what} not found: {path}{where}")


def check_n_validation(n_validation) -> int:
    """``[data] n_validation``: a positive integer (the size of a seeded validation split); a
    config value, so a :class:`ConfigError` (a data set too small for it is a
    :class:`DataError`, :func:`validation_permutation`)."""
    if isinstance(n_validation, bool) or not isinstance(n_validation, int) or n_validation < 1:
        raise ConfigError(f"[data] n_validation must be a positive integer, "
                          f"got {n_validation!r}")
    return n_validation


def check_n_classes(n_classes, where: str = "[data]", error: type[PriorVAEError] = ConfigError
                    ) -> int | None:
    """``n_classes``: None (no labels) or an integer in 1..``MAX_CLASSES``, returned as an int
    (a numpy integer from a user's ``load()``). The one check of both places it comes from:
    ``[data] n_classes`` (``where = "[data]"``, a :class:`ConfigError`) and a data set's
    :class:`Splits` (``where = "data set 'NAME':"``, ``error = DataError``)."""
    if n_classes is not None and (isinstance(n_classes, bool) or not isinstance(
            n_classes, numbers.Integral) or not 1 <= n_classes <= MAX_CLASSES):
        raise error(f"{where} n_classes must be an integer in 1..{MAX_CLASSES} (or none: no "
                    f"labels), got {n_classes!r}")
    return None if n_classes is None else int(n_classes)


def check_split_seed(split_seed) -> int:
    """``[data] split_seed``: an integer in 0..2**63 - 1 (seeds a split permutation)."""
    if isinstance(split_seed, bool) or not isinstance(split_seed, int) \
            or not 0 <= split_seed < 2**63:
        raise ConfigError(f"[data] split_seed must be an integer in 0..2**63 - 1, "
                          f"got {split_seed!r}")
    return split_seed


def check_fractions(val_fraction, test_fraction) -> tuple[float, float]:
    """``[data] val_fraction`` and ``test_fraction``: numbers in (0, 1) (the shares split off
    by seed when a data set has no such split)."""
    for key, frac in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not 0 < frac < 1:
            raise ConfigError(f"[data] {key} must be a number in (0, 1), got {frac!r}")
    return val_fraction, test_fraction


def validation_permutation(n: int, n_validation: int, seed: int, source: Any) -> torch.Tensor:
    """A permutation of ``n`` training examples seeded by ``seed``, whose last ``n_validation``
    form the validation split; ``source`` (where the examples came from) names a set too small."""
    if n <= n_validation:
        raise DataError(f"{source} holds {n} training images, not more than "
                        f"[data] n_validation = {n_validation}")
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def split_by_fraction(n: int, fraction: float, seed: int,
                      key: str = "fraction") -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (kept, split off) of ``n`` items: a seeded permutation, ``round(fraction * n)``
    (at least 1) split off; ``key`` names the fraction in the line for too few items."""
    k = max(1, round(fraction * n))
    if k >= n:
        raise DataError(f"[data] {key} = {fraction:g}: {n} examples are too few to split "
                        f"off {k} and keep some; give more examples or a smaller fraction")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[k:].sort().values, perm[:k].sort().values


def _describe_values(x: torch.Tensor) -> str:
    return f"values in [{x.min().item():.4g}, {x.max().item():.4g}]"


def check_splits(splits: Splits, source: str = "") -> Splits:
    """Shapes, finiteness, values against ``splits.value_type`` and label lengths; one
    :class:`DataError` line for the first problem. Returns ``splits``."""
    where = f"data set {splits.name!r}" + (f" ({source})" if source else "")
    if splits.value_type not in VALUE_TYPES:
        raise DataError(f"{where}: value type {splits.value_type!r} is not one of "
                        f"{', '.join(VALUE_TYPES)}")
    splits.n_classes = k = check_n_classes(splits.n_classes, f"{where}:", DataError)
    shape = None
    for part in ("train", "val", "test"):
        x, y = getattr(splits, f"x_{part}"), getattr(splits, f"y_{part}")
        if not isinstance(x, torch.Tensor) or x.dim() not in (2, 4) or len(x) == 0:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise DataError(f"{where}: the {part} split must be a non-empty (N, C, H, W) image "
                            f"or (N, D) vector array, got shape {got}")
        if shape is not None and tuple(x.shape[1:]) != shape:
            raise DataError(f"{where}: the {part} split has examples of shape "
                            f"{tuple(x.shape[1:])}, the training split {shape}")
        shape = tuple(x.shape[1:])
        if x.dtype != torch.float32:  # the networks' weights are float32
            raise DataError(f"{where}: the {part} split holds {x.dtype} values; load() must "
                            f"return float32 (x.float())")
        if not torch.isfinite(x).all():
            bad = int((~torch.isfinite(x)).sum())
            raise DataError(f"{where}: the {part} split holds {bad} NaN or infinite values")
        if (y is None) != (splits.y_train is None):
            raise DataError(f"{where}: labels are given for some splits only; give them for "
                            f"train, validation and test, or for none")
        if y is not None and (y.dtype.is_floating_point or y.dtype.is_complex
                              or y.dtype == torch.bool):
            raise DataError(f"{where}: the {part} labels are {y.dtype}; labels must be "
                            f"integer class indices (y.long())")
        if y is not None and (y.dim() != 1 or len(y) != len(x)):
            raise DataError(f"{where}: the {part} split has {len(x)} examples but labels of "
                            f"shape {tuple(y.shape)}; expected ({len(x)},)")
        if y is not None and (y.min() < 0 or (k is not None and y.max() >= k)):
            accepted = "0..n_classes - 1" if k is None else f"0..{k - 1}"
            raise DataError(f"{where}: {part} labels must be class indices in {accepted}, "
                            f"found {int(y.min() if y.min() < 0 else y.max())}")
        vt = splits.value_type
        if vt in ("binary", "intensity", "8bit") and (x.min() < 0 or x.max() > 1):
            raise DataError(f"{where}: declared {vt} values must lie in [0, 1], the {part} "
                            f"split has {_describe_values(x)} (declare value_type = 'real')")
        levels = x * 255 if vt == "8bit" else None
        if vt == "8bit" and not bool(((levels - levels.round()).abs() < 1e-3).all()):
            raise DataError(f"{where}: declared 8bit, but the {part} split holds values that are "
                            f"not multiples of 1/255 (declare value_type = 'intensity')")
        if vt == "binary" and not bool(((x == 0) | (x == 1)).all()):
            raise DataError(f"{where}: declared binary, but the {part} split holds values "
                            f"other than 0 and 1")
    return splits


def load_dataset(dataset: DataSet | Any) -> Splits:
    """Load and check a data set (a :class:`DataSet` or a ``[data]`` table), on the CPU. An
    exception from its ``load()`` is one line naming it (the table's name: a spec as given)."""
    ds = dataset if isinstance(dataset, DataSet) else build_dataset(dataset)
    what = ds.name or type(ds).__name__
    named = what if isinstance(dataset, DataSet) else dataset.name
    with DATASETS.guard(f"data set {named!r} failed to load"):
        splits = ds.load()
    if not isinstance(splits, Splits):
        raise DataError(f"data set {what!r}: load() must return priorvae.datasets.Splits, "
                        f"got {type(splits).__name__}")
    splits.name = splits.name or what  # a class named by a file or module spec has no name
    check_splits(splits)
    declared = ds.shape  # what input_shape() says without loading
    if declared and tuple(declared) != splits.input_shape:
        raise DataError(f"data set {what!r} declares shape = {tuple(declared)}, but load() "
                        f"returns examples of shape {splits.input_shape}")
    return splits


def check_same_data(recorded: Any, digest: str, where: Any) -> None:
    """Refuse, in one line, to evaluate, fit or resume the checkpoint ``where`` on other data
    than it was trained on (``recorded``: its ``data_sha256``; None before it was recorded)."""
    if recorded is not None and recorded != digest:
        raise DataError(f"{where} was trained on other data than [data] gives now (its files, "
                        f"or the library that decodes them, changed since: sha256 "
                        f"{str(recorded)[:12]} then, {digest[:12]} now); restore them, or "
                        f"train a new run")


def check_suits(value_type: str, likelihood: str, accepted, data_name: str = "") -> None:
    """Refuse, in one line, a likelihood that does not accept the data's value type."""
    if value_type not in accepted:
        what = f"data set {data_name!r} holds" if data_name else "the data hold"
        raise ConfigError(f"[likelihood] name = {likelihood!r} accepts "
                          f"{', '.join(sorted(accepted))} values, but {what} {value_type} "
                          f"values; choose a likelihood that accepts {value_type} data")


# the built-in data sets register themselves on import
from . import cifar10, digits, image_folder, mnist, omniglot, static_mnist, tensors  # noqa: E402,F401,I001
