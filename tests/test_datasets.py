"""Data sets: a contract test over every registered data set (each loaded from tiny files this
test writes in the data set's own layout; nothing is downloaded), and bad input."""

import pickle
import re
import shutil
import sys

import numpy as np
import pytest
import torch

from priorvae.config import load_config
from priorvae.data import input_shape
from priorvae.datasets import (
    VALUE_TYPES,
    DataSet,
    Splits,
    build_dataset,
    list_datasets,
    load_dataset,
    register_dataset,
)
from priorvae.errors import ConfigError, DataError, PluginError


def _idx(path, array, magic):
    header = np.array([magic, *array.shape], dtype=">u4").tobytes()
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def write_fashion_mnist(root, n_train=10_004, n_test=6):
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        _idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)), 0x803)
        _idx(raw / f"{prefix}-labels-idx1-ubyte", rng.integers(0, 10, (n,)), 0x801)
    return {"root": str(root), "download": False}


def write_static_mnist(root, n=(5, 3, 4)):
    folder = root / "BinarizedMNIST"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for part, k in zip(("train", "valid", "test"), n, strict=True):
        rows = rng.integers(0, 2, (k, 784))
        text = "\n".join(" ".join(map(str, r)) for r in rows) + "\n"
        (folder / f"binarized_mnist_{part}.amat").write_text(text)
    return {"root": str(root), "download": False}


def write_omniglot(root, n_train=12, n_test=4):
    from scipy.io import savemat

    (root / "Omniglot").mkdir(parents=True)
    rng = np.random.default_rng(0)
    savemat(root / "Omniglot" / "chardata.mat",
            {"data": rng.random((784, n_train)), "testdata": rng.random((784, n_test))})
    return {"root": str(root), "download": False, "n_validation": 3}


def write_cifar10(root, per_batch=4, n_test=3):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, n in [*((f"data_batch_{i}", per_batch) for i in range(1, 6)), ("test_batch", n_test)]:
        entry = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 "labels": [int(v) for v in rng.integers(0, 10, n)]}
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f)
    return {"root": str(root), "download": False, "n_validation": 5}


def write_tensors(root):
    x = np.random.default_rng(0).integers(0, 256, (40, 8, 8, 3), dtype=np.uint8)  # NHWC
    np.save(root / "x.npy", x)
    return {"path": str(root / "x.npy")}


def write_image_folder(root):
    from PIL import Image

    rng = np.random.default_rng(0)
    for label in ("circles", "squares"):
        (root / "imgs" / label).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)).save(
                root / "imgs" / label / f"{i}.png")
    return {"path": str(root / "imgs")}


# name -> (writer of tiny files returning the [data] keys, expected shape, labelled)
FIXTURES = {
    "digits": (lambda root: {}, (1, 8, 8), True),
    "fashion_mnist": (write_fashion_mnist, (1, 28, 28), True),
    "static_mnist": (write_static_mnist, (1, 28, 28), False),
    "omniglot": (write_omniglot, (1, 28, 28), False),
    "cifar10": (write_cifar10, (3, 32, 32), True),
    "tensors": (write_tensors, (3, 8, 8), False),
    "image_folder": (write_image_folder, (3, 6, 5), True),
}


@pytest.mark.parametrize("name", list_datasets())
def test_every_data_set_loads_with_its_declared_shape_and_value_type(name, tmp_path,
                                                                     request):
    if name == "mnist":
        kwargs, shape, labelled = ({"root": str(request.getfixturevalue("mnist_root")),
                                    "download": False}, (1, 28, 28), True)
    else:
        assert name in FIXTURES, f"add tiny files for data set {name!r} to FIXTURES"
        writer, shape, labelled = FIXTURES[name]
        kwargs = writer(tmp_path)
    dataset = build_dataset(name, **kwargs)
    assert isinstance(dataset, DataSet) and dataset.value_type in VALUE_TYPES
    s = load_dataset(dataset)
    assert isinstance(s, Splits) and s.name == name
    assert s.input_shape == shape == dataset.input_shape()
    assert s.value_type == dataset.value_type
    for part in ("train", "val", "test"):
        x, y = getattr(s, f"x_{part}"), getattr(s, f"y_{part}")
        assert x.dtype == torch.float32 and x.shape[1:] == shape and len(x) > 0
        assert (y is not None) == labelled
        if labelled:
            assert y.dtype == torch.long and y.shape == (len(x),)
            assert 0 <= y.min() and y.max() < s.n_classes
    if not labelled:
        assert s.n_classes is None
    if dataset.shape is not None:
        assert tuple(dataset.shape) == shape
    if name in ("mnist", "fashion_mnist"):  # fixed slices (tests/test_data.py); slow to read
        return
    # the same files give the same splits
    again = load_dataset(build_dataset(name, **kwargs))
    assert torch.equal(again.x_val, s.x_val) and torch.equal(again.x_test, s.x_test)


def test_static_mnist_is_binary_and_keeps_file_order(tmp_path):
    write_static_mnist(tmp_path)
    s = load_dataset(build_dataset("static_mnist", root=str(tmp_path), download=False))
    first = (tmp_path / "BinarizedMNIST" / "binarized_mnist_train.amat").read_text().split("\n")[0]
    assert s.x_train[0].flatten().tolist() == [float(v) for v in first.split()]
    assert (len(s.x_train), len(s.x_val), len(s.x_test)) == (5, 3, 4)
    assert s.value_type == "binary"


def test_omniglot_images_are_read_column_major_and_split_by_seed(tmp_path):
    from scipy.io import loadmat

    write_omniglot(tmp_path)
    raw = loadmat(tmp_path / "Omniglot" / "chardata.mat")
    s = load_dataset(build_dataset("omniglot", root=str(tmp_path), download=False,
                                   n_validation=3))
    assert (len(s.x_train), len(s.x_val), len(s.x_test)) == (9, 3, 4)
    # the reference code: data.T.reshape((-1, 28, 28)).reshape((-1, 784), order='F')
    ref = raw["testdata"].T.reshape((-1, 28, 28)).reshape((-1, 784), order="F")
    assert np.allclose(s.x_test.reshape(4, 784).numpy(), ref)
    other = load_dataset(build_dataset("omniglot", root=str(tmp_path), download=False,
                                       n_validation=3, split_seed=1))
    assert not torch.equal(other.x_val, s.x_val)


def test_cifar10_pickles_may_not_run_code(tmp_path):
    write_cifar10(tmp_path)
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_1", "wb") as f:
        pickle.dump({"data": np.zeros((4, 3072), np.uint8), "labels": print}, f)
    with pytest.raises(DataError, match="data_batch_1 is not a CIFAR-10 batch.*refusing"):
        load_dataset(build_dataset("cifar10", root=str(tmp_path), download=False))


def test_tensors_layouts_labels_and_value_types(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.random((30, 5)).astype(np.float32) * 4 - 2  # real vectors
    y = rng.integers(0, 3, 30)
    np.savez(tmp_path / "v.npz", x=x, y=y)
    s = load_dataset(build_dataset("tensors", path=str(tmp_path / "v.npz")))
    assert s.input_shape == (5,) and s.value_type == "real" and s.n_classes == 3
    assert (len(s.x_train), len(s.x_val), len(s.x_test)) == (24, 3, 3)
    # every example lands in exactly one split, with its label
    together = torch.cat([s.x_train, s.x_val, s.x_test])
    assert sorted(map(tuple, together.tolist())) == sorted(map(tuple, x.tolist()))
    # separate files, a .pt dict, grey levels in [0, 1], (N, H, W)
    torch.save({"x": torch.rand(10, 4, 4)}, tmp_path / "train.pt")
    np.save(tmp_path / "test.npy", np.random.default_rng(1).random((3, 4, 4)))
    s = load_dataset(build_dataset("tensors", train=str(tmp_path / "train.pt"),
                                   test=str(tmp_path / "test.npy"), val_fraction=0.2))
    assert s.input_shape == (1, 4, 4) and s.value_type == "intensity"
    assert (len(s.x_train), len(s.x_val), len(s.x_test)) == (8, 2, 3) and s.y_train is None
    # uint8 NHWC -> 8bit NCHW, values k/255
    img = np.random.default_rng(2).integers(0, 256, (12, 5, 5, 3), dtype=np.uint8)
    np.save(tmp_path / "img.npy", img)
    s = load_dataset(build_dataset("tensors", path=str(tmp_path / "img.npy")))
    assert s.input_shape == (3, 5, 5) and s.value_type == "8bit"
    assert torch.equal((together := torch.cat([s.x_train, s.x_val, s.x_test]) * 255).round(),
                       together)
    # a declared value type is checked against the values
    with pytest.raises(DataError, match="declared intensity values must lie in \\[0, 1\\]"):
        load_dataset(build_dataset("tensors", path=str(tmp_path / "v.npz"),
                                   value_type="intensity"))


def _one_line(exc_info) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg, msg
    return msg


@pytest.mark.parametrize(("array", "match"), [
    (np.zeros(10, np.float32), "an array of shape \\(10,\\); expected images"),
    (np.zeros((4, 2, 3, 3, 3), np.float32), "an array of shape \\(4, 2, 3, 3, 3\\)"),
    (np.array([[0.0, np.nan]] * 10, np.float32), "the train split holds 8 NaN or infinite values"),
    (np.array([[0.0, np.inf]] * 10, np.float32), "NaN or infinite"),
    (np.array([["a", "b"]] * 10), "examples must be numbers"),
    (np.zeros((10, 3, 5, 4), np.uint8), "could be \\(N, C, H, W\\) or \\(N, H, W, C\\); declare"),
])
def test_bad_arrays_are_one_line(tmp_path, array, match):
    np.save(tmp_path / "bad.npy", array)
    with pytest.raises(DataError, match=match) as info:
        load_dataset(build_dataset("tensors", path=str(tmp_path / "bad.npy")))
    _one_line(info)


def test_bad_files_and_labels_are_one_line(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="file not found") as info:
        load_dataset(build_dataset("tensors", path=str(tmp_path / "nope.npy")))
    _one_line(info)
    monkeypatch.chdir(tmp_path)  # a relative path says where it was looked for
    with pytest.raises(DataError, match=re.escape(f"current directory, {tmp_path};")) as info:
        load_dataset(build_dataset("tensors", path="nope.npy"))
    _one_line(info)
    np.savez(tmp_path / "short.npz", x=np.zeros((10, 3), np.float32), y=np.zeros(9, np.int64))
    with pytest.raises(DataError, match="10 examples but labels of shape \\(9,\\)") as info:
        load_dataset(build_dataset("tensors", path=str(tmp_path / "short.npz")))
    _one_line(info)
    np.savez(tmp_path / "floaty.npz", x=np.zeros((10, 3), np.float32), y=np.zeros(10))
    with pytest.raises(DataError, match="labels must be integers"):
        load_dataset(build_dataset("tensors", path=str(tmp_path / "floaty.npz")))
    (tmp_path / "junk.npy").write_bytes(b"not numpy")
    with pytest.raises(DataError, match="junk.npy is not a .npy file") as info:
        load_dataset(build_dataset("tensors", path=str(tmp_path / "junk.npy")))
    _one_line(info)
    (tmp_path / "x.csv").write_text("1,2\n")
    with pytest.raises(DataError, match="reads .npy, .npz or .pt files"):
        load_dataset(build_dataset("tensors", path=str(tmp_path / "x.csv")))
    with pytest.raises(DataError, match="not found and download is off") as info:
        load_dataset(build_dataset("static_mnist", root=str(tmp_path), download=False))
    _one_line(info)
    write_static_mnist(tmp_path / "s")
    (tmp_path / "s" / "BinarizedMNIST" / "binarized_mnist_test.amat").write_text("0 1 1\n")
    with pytest.raises(DataError, match="3 values on 1 lines, expected 784 per line"):
        load_dataset(build_dataset("static_mnist", root=str(tmp_path / "s"), download=False))


def test_image_folder_mixed_sizes_and_unreadable_files(tmp_path):
    from PIL import Image

    folder = tmp_path / "mixed"
    folder.mkdir()
    for i, size in enumerate([(5, 6), (5, 6), (7, 6), (5, 6)]):
        Image.fromarray(np.full(size, 40 * i, np.uint8)).save(folder / f"{i}.png")
    with pytest.raises(DataError, match="images of different sizes .*2.png is 7x6.*"
                                        "declare \\[data\\] size") as info:
        load_dataset(build_dataset("image_folder", path=str(folder)))
    _one_line(info)
    s = load_dataset(build_dataset("image_folder", path=str(folder), size=[4, 3]))
    assert s.input_shape == (1, 4, 3) and s.value_type == "8bit" and s.y_train is None
    (folder / "9.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="9.png is not a readable image") as info:
        load_dataset(build_dataset("image_folder", path=str(folder), size=4))
    _one_line(info)
    with pytest.raises(DataError, match="image folder not found"):
        load_dataset(build_dataset("image_folder", path=str(tmp_path / "none")))


def test_config_keeps_a_data_sets_own_keys_and_refuses_unknown_ones(tmp_path):
    write_tensors(tmp_path)
    cfg = load_config(None, ["data.name=tensors", f"data.path='{tmp_path / 'x.npy'}'",
                             "data.val_fraction=0.2"])
    assert cfg.data.kwargs == {"path": str(tmp_path / "x.npy"), "val_fraction": 0.2}
    assert cfg.to_dict()["data"]["val_fraction"] == 0.2
    assert input_shape(cfg.data) == (3, 8, 8)
    with pytest.raises(ConfigError, match="unknown argument\\(s\\) 'val_fractoin'.*accepts"):
        load_config(None, ["data.name=tensors", "data.path=x.npy", "data.val_fractoin=0.2"])
    with pytest.raises(ConfigError, match="\\[data\\] name must be .*unknown data set "
                                          "'tensor'.*Did you mean: tensors"):
        load_config(None, ["data.name=tensor"])
    with pytest.raises(ConfigError, match="needs either path = FILE or train = FILE"):
        build_dataset("tensors")


def test_a_user_data_set_registers_and_is_checked():
    @register_dataset("tiny_test_vectors")
    class Tiny(DataSet):
        value_type = "intensity"
        shape = (3,)

        def load(self):
            x = torch.rand(6, 3)
            return Splits(self.name, x, None, x, None, x * 2, None, self.value_type)

    with pytest.raises(DataError, match="declared intensity values must lie in \\[0, 1\\], "
                                        "the test split has values in"):
        load_dataset(build_dataset("tiny_test_vectors"))
    with pytest.raises(PluginError, match="already registered"):
        register_dataset("tiny_test_vectors")(type("Other", (Tiny,), {}))
    with pytest.raises(PluginError, match="value_type must be one of"):
        register_dataset("tiny_bad")(type("Bad", (DataSet,), {"value_type": "floats"}))


def test_a_likelihood_that_does_not_suit_the_values_is_refused_before_writing(tmp_path,
                                                                            capsys):
    from conftest import tiny_toml
    from priorvae.cli import main

    np.save(tmp_path / "real.npy", np.random.default_rng(0).normal(size=(40, 6)) * 3)
    config = tiny_toml(tmp_path / "c.toml", data={"name": "tensors",
                                                  "path": str(tmp_path / "real.npy")})
    run = tmp_path / "run"
    assert main(["train", str(config), "--out", str(run), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "bernoulli" in err and "real values" in err, err
    assert not run.exists()


USER_DATA = """
import torch
from priorvae.datasets import DataSet, Splits


class Blobs(DataSet):
    value_type, n_classes, shape = "intensity", 2, (1, 4, 4)

    def __init__(self, root=None, download=True, n=60):
        super().__init__(root, download)
        self.n = n

    def load(self):
        g = torch.Generator().manual_seed(0)
        y = torch.arange(self.n) % 2
        x = (torch.rand(self.n, 1, 4, 4, generator=g) * 0.5 + 0.5 * y[:, None, None, None])
        a, b = self.n - 20, self.n - 10
        return Splits(self.name, x[:a], y[:a], x[a:b], y[a:b], x[b:], y[b:], self.value_type,
                      self.n_classes)
"""


def test_a_data_set_by_file_path_and_by_module_is_pinned_like_a_prior(tmp_path, monkeypatch,
                                                                      capsys):
    from conftest import tiny_toml
    from priorvae.cli import main

    (tmp_path / "my_data.py").write_text(USER_DATA)
    spec = f"{tmp_path / 'my_data.py'}:Blobs"
    config = tiny_toml(tmp_path / "c.toml", data={"name": spec, "n": 50},
                       train={"epochs": 1, "diagnostics_every": 0, "image_every": 0})
    run = tmp_path / "run"
    assert main(["train", str(config), "--out", str(run), "--quiet"]) == 0, \
        capsys.readouterr().err
    recorded = load_config(run / "config.toml").data
    assert recorded.name == spec and len(recorded.file_sha256) == 64
    assert recorded.kwargs == {"n": 50}
    # the file changes after training: the run folder's pin refuses the new code
    (tmp_path / "my_data.py").write_text(USER_DATA + "\n# changed\n")
    assert main(["evaluate", str(run), "--iw-samples", "2", "--no-diagnostics",
                 "--quiet"]) == 2
    assert "sha256" in capsys.readouterr().err
    # by module, importable from sys.path (dropped again afterwards: test_own_plugins has a
    # module of the same name in its own folder)
    monkeypatch.syspath_prepend(str(tmp_path))
    config = tiny_toml(tmp_path / "m.toml", data={"name": "my_data:Blobs"},
                       train={"epochs": 1, "diagnostics_every": 0, "image_every": 0})
    try:
        assert main(["train", str(config), "--out", str(tmp_path / "mod"), "--quiet"]) == 0, \
            capsys.readouterr().err
    finally:
        sys.modules.pop("my_data", None)


@pytest.mark.parametrize(("arrays", "kwargs", "match"), [
    ({"y": -np.ones(20, np.int64)}, {}, "labels must be class indices .*found -1"),
    ({"y": np.r_[10**12, np.zeros(19, np.int64)]}, {}, "at most 65536 classes.*1000000000000"),
    ({"y": np.zeros(20, np.int64)}, {"n_classes": 0}, "n_classes must be an integer in 1..65536"),
    ({"y": np.zeros(20, np.int64)}, {"n_classes": "3"}, "n_classes must be an integer"),
    ({}, {"split_seed": "a"}, "split_seed must be an integer in 0..2\\*\\*63 - 1, got 'a'"),
    ({}, {"split_seed": -1}, "split_seed must be an integer"),
    ({}, {"value_type": "8bit"}, "declared 8bit, but .* not multiples of 1/255"),
    ({"x": np.full((20, 3), 1e39)}, {}, "beyond the float32 range"),
    ({"x": np.zeros((1, 3), np.float32)}, {}, "\\[data\\] test_fraction = 0.1: 1 examples are"),
])
def test_hostile_tensors_values_and_keys_are_one_line(tmp_path, arrays, kwargs, match):
    """Labels out of range (negative, or a class count no classifier could hold), bad keys
    and values that are not what they are declared as: one line, not a traceback from numpy or
    torch, nor a silent run (negative labels trained, 8-bit bins on values off the levels)."""
    arrays = {"x": np.random.default_rng(0).random((20, 3)).astype(np.float32), **arrays}
    np.savez(tmp_path / "d.npz", **arrays)
    with pytest.raises((DataError, ConfigError), match=match) as info:
        load_dataset(build_dataset("tensors", path=str(tmp_path / "d.npz"), **kwargs))
    _one_line(info)


def test_uint8_zeros_and_ones_are_declared_not_guessed(tmp_path):
    """Binary data saved as uint8 0/1 was read as 8-bit levels 0 and 1/255 (near-black images,
    silently) and declaring value_type = 'binary' was refused ('values other than 0 and 1')."""
    x = (np.random.default_rng(0).random((20, 5)) > 0.5).astype(np.uint8)
    np.save(tmp_path / "b.npy", x)
    with pytest.raises(DataError, match="uint8 values 0 and 1 only: binary data, or 8-bit "
                                        "levels .* declare \\[data\\] value_type") as info:
        load_dataset(build_dataset("tensors", path=str(tmp_path / "b.npy")))
    _one_line(info)
    s = load_dataset(build_dataset("tensors", path=str(tmp_path / "b.npy"), value_type="binary"))
    assert s.value_type == "binary" and s.x_train.max() == 1
    s = load_dataset(build_dataset("tensors", path=str(tmp_path / "b.npy"), value_type="8bit"))
    assert s.value_type == "8bit" and s.x_train.max() == 1 / 255
    np.save(tmp_path / "m.npy", x * 255)  # masks stored as 0/255 bytes, declared binary
    s = load_dataset(build_dataset("tensors", path=str(tmp_path / "m.npy"), value_type="binary"))
    assert s.value_type == "binary" and set(s.x_train.unique().tolist()) <= {0.0, 1.0}


def test_8bit_levels_in_a_narrow_float_are_snapped_to_the_grid(tmp_path):
    """k/255 stored as float16 is up to 0.06 of a level off; declared 8bit, it loads onto the
    grid exactly. Values really off the grid are still refused."""
    k = np.random.default_rng(0).integers(0, 256, (40, 6))
    np.save(tmp_path / "h.npy", (k / 255).astype(np.float16))
    s = load_dataset(build_dataset("tensors", path=str(tmp_path / "h.npy"), value_type="8bit"))
    whole = torch.cat([s.x_train, s.x_val, s.x_test]) * 255
    assert torch.equal(whole, whole.round())
    np.save(tmp_path / "off.npy", (k / 255 + 0.3 / 255).astype(np.float32).clip(0, 1))
    with pytest.raises(DataError, match="not multiples of 1/255"):
        load_dataset(build_dataset("tensors", path=str(tmp_path / "off.npy"), value_type="8bit"))


def test_a_numpy_integer_class_count_is_accepted():
    """A user's load() computing n_classes = y.max() + 1 with numpy gets a plain int."""
    from priorvae.datasets import check_splits

    x, y = torch.rand(6, 3), torch.tensor([0, 1, 2, 0, 1, 2])
    s = check_splits(Splits("u", x, y, x, y, x, y, "intensity", np.int64(3)))
    assert s.n_classes == 3 and type(s.n_classes) is int


@pytest.mark.parametrize("bad", [0, -1, 65537, 2.0, True, "3"])
def test_n_classes_is_one_check_with_one_message(tmp_path, bad):
    """[data] n_classes of the tensors data set (a config value: ConfigError) and the
    n_classes of a data set's Splits (DataError) were two checks with two messages; now one,
    each naming where the value came from."""
    from priorvae.datasets import check_splits

    np.savez(tmp_path / "d.npz", x=np.random.default_rng(0).random((20, 3)).astype(np.float32),
             y=np.zeros(20, np.int64))
    with pytest.raises(ConfigError) as config:
        build_dataset("tensors", path=str(tmp_path / "d.npz"), n_classes=bad)
    x, y = torch.rand(6, 3), torch.zeros(6, dtype=torch.long)
    with pytest.raises(DataError) as data:
        check_splits(Splits("mine", x, y, x, y, x, y, "intensity", bad))
    config_line, data_line = _one_line(config), _one_line(data)
    assert config_line.startswith("[data] n_classes must be an integer in 1..65536"), config_line
    assert data_line.startswith("data set 'mine': n_classes must be"), data_line
    assert config_line.partition(" n_classes ")[2] == data_line.partition(" n_classes ")[2]


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"n_validation": 0}, "\\[data\\] n_validation must be a positive integer, got 0"),
    ({"n_validation": "9"}, "n_validation must be a positive integer, got '9'"),
    ({"split_seed": -1}, "\\[data\\] split_seed must be an integer in 0..2\\*\\*63 - 1"),
])
@pytest.mark.parametrize("name", ["omniglot", "cifar10"])
def test_split_keys_are_config_errors(tmp_path, capsys, name, kwargs, match):
    """[data] n_validation and split_seed are both config values: a bad one is a ConfigError
    (n_validation's was a DataError, the class of bad data), one line and exit code 2 from
    the command line before anything is written; too few images for n_validation stays a
    DataError (the data's fault)."""
    from conftest import tiny_toml
    from priorvae.cli import main

    with pytest.raises(ConfigError, match=match) as info:
        build_dataset(name, root=str(tmp_path), download=False, **kwargs)
    _one_line(info)
    sets = [f"--set=data.{k}={v!r}".replace("'", '"') for k, v in kwargs.items()]
    config = tiny_toml(tmp_path / "c.toml", data={"name": name})
    capsys.readouterr()
    assert main(["train", str(config), "--out", str(tmp_path / "run"), "--quiet", *sets]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and re.search(match, err), err
    assert not (tmp_path / "run").exists()
    from priorvae.datasets import validation_permutation
    with pytest.raises(DataError, match="holds 3 training images, not more than"):
        validation_permutation(3, 3, 0, "here")


def test_arrays_that_would_not_fit_in_memory_are_refused_from_their_headers(tmp_path,
                                                                            monkeypatch):
    """A .npy / .npz member whose header claims 10**11 values: refused by its header before
    numpy allocates (a compressed .npz of zeros inflates to that size: the process killed)."""
    import zipfile

    header = "{'descr': '<f4', 'fortran_order': False, 'shape': (100000000, 1000), }"
    header = header.ljust(118) + "\n"
    member = b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode()
    (tmp_path / "big.npy").write_bytes(member + b"\0" * 64)
    with zipfile.ZipFile(tmp_path / "big.npz", "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("x.npy", member + b"\0" * 64)
    monkeypatch.setattr("priorvae.datasets.tensors.available_memory", lambda: 64 * 2**30)
    for name in ("big.npy", "big.npz"):  # on any machine: 64 GiB available, say
        with pytest.raises(DataError, match=r"its arrays \(x \(100000000, 1000\)\) need about "
                                            r"745 GiB, more than half the 64 GiB available"):
            load_dataset(build_dataset("tensors", path=str(tmp_path / name)))


def test_a_pt_file_whose_tensor_is_larger_than_its_data_is_refused(tmp_path):
    """A crafted .pt: a view of 10**12 values over 10 stored ones (numpy would try to allocate
    terabytes), and a sparse tensor: one line each, before any copy."""
    torch.save(torch.zeros(10).as_strided((10**9, 10**3), (0, 0)), tmp_path / "view.pt")
    torch.save(torch.zeros(20, 3).to_sparse(), tmp_path / "sparse.pt")
    for name in ("view.pt", "sparse.pt"):
        with pytest.raises(DataError, match="is not a plain tensor holding its values") as info:
            load_dataset(build_dataset("tensors", path=str(tmp_path / name)))
        _one_line(info)


def test_image_folder_scales_16_bit_png_and_refuses_bad_folders(tmp_path, monkeypatch):
    """16-bit grey PNGs are scaled to 8 bits (PIL's convert('L') clips them at 255: a mid-grey
    16-bit image read as white); an empty class folder, a decompression bomb, an absurd size
    and a bad split_seed are one line."""
    from PIL import Image

    folder = tmp_path / "grey16"
    folder.mkdir()
    levels = np.arange(4 * 4).reshape(4, 4) * 4369  # 0..65535 in 16 steps
    for i in range(5):
        Image.fromarray(levels.astype(np.uint16)).save(folder / f"{i}.png")
    assert Image.open(folder / "0.png").mode.startswith("I")
    s = load_dataset(build_dataset("image_folder", path=str(folder)))
    assert s.input_shape == (1, 4, 4)
    torch.testing.assert_close(s.x_train[0, 0], torch.tensor(levels / 65535, dtype=torch.float32),
                               atol=0.5 / 255, rtol=0)
    classes = tmp_path / "classes"
    for label in ("a", "b", "empty"):
        (classes / label).mkdir(parents=True)
    for label in ("a", "b"):
        for i in range(3):
            Image.fromarray(np.zeros((4, 4), np.uint8)).save(classes / label / f"{i}.png")
    (classes / ".ipynb_checkpoints").mkdir()  # hidden entries are neither classes nor images
    (classes / "a" / ".hidden.png").write_bytes(b"not a png")
    hidden = tmp_path / "hidden"
    shutil.copytree(classes, hidden, ignore=shutil.ignore_patterns("empty"))
    s = load_dataset(build_dataset("image_folder", path=str(hidden)))
    assert s.n_classes == 2 and len(s.x_train) + len(s.x_val) + len(s.x_test) == 6
    bad = [({"path": str(classes)}, DataError, "empty: a class subfolder without images"),
           ({"path": str(folder), "size": [10**5, 10**5]}, ConfigError, "each in 1..4096"),
           ({"path": str(folder), "split_seed": 1.5}, ConfigError, "split_seed must be")]
    for kwargs, error, match in bad:
        with pytest.raises(error, match=match) as info:
            load_dataset(build_dataset("image_folder", **kwargs))
        _one_line(info)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 4)  # 4x4 = 16 pixels > 2 x 4: a "bomb"
    with pytest.raises(DataError, match="DecompressionBombError") as info:
        load_dataset(build_dataset("image_folder", path=str(folder)))
    _one_line(info)


def test_a_user_data_sets_dtypes_and_declared_shape_are_checked_when_loaded():
    """float64 or integer values and float labels went on to a dtype traceback inside torch
    (mid-training, half a run folder written); a declared shape other than the loaded one
    trained, then failed in evaluate."""
    def splits_of(x, y=None):
        return lambda self: Splits(self.name, x[:8], None if y is None else y[:8], x[8:10],
                                   None if y is None else y[8:10], x[10:], None if y is None
                                   else y[10:], self.value_type, None if y is None else 2)

    x = torch.rand(12, 3)
    cases = [(splits_of(x.double()), (3,), "train split holds torch.float64 values; load\\(\\) "
                                           "must return float32"),
             (splits_of((x > 0.5).long()), (3,), "torch.int64 values"),
             (splits_of(x, (torch.arange(12) % 2).float()), (3,), "labels are torch.float32; "
                                                                  "labels must be integer"),
             (splits_of(x), (4,), "declares shape = \\(4,\\), but load\\(\\) returns examples "
                                  "of shape \\(3,\\)")]
    for load, shape, match in cases:
        cls = type("Mine", (DataSet,), {"value_type": "intensity", "shape": shape, "load": load})
        with pytest.raises(DataError, match=match) as info:
            load_dataset(cls())
        assert "data set 'Mine'" in _one_line(info)
