import pytest
import torch

from priorvae.data import data_root, iterate_batches, load_splits
from priorvae.errors import DataError, PluginError


def _is_binary(t):
    return bool(((t == 0) | (t == 1)).all())


def test_digits_split_keeps_grey_levels():
    s = load_splits("digits")
    assert (len(s.x_train), len(s.x_val), len(s.x_test)) == (1297, 200, 300)
    assert s.input_shape == (1, 8, 8)
    # grey levels in every split: binarizing is the Bernoulli likelihood's business
    assert not any(_is_binary(x) for x in (s.x_train, s.x_val, s.x_test))
    assert all(0 <= x.min() and x.max() <= 1 for x in (s.x_train, s.x_val, s.x_test))
    again = load_splits("digits")
    assert torch.equal(s.x_test, again.x_test) and torch.equal(s.x_val, again.x_val)


def test_dynamic_binarization_differs_between_epochs():
    s = load_splits("digits")
    e1 = next(iterate_batches(s.x_train, 2000, shuffle=False))
    e2 = next(iterate_batches(s.x_train, 2000, shuffle=False))
    assert _is_binary(e1) and _is_binary(e2)
    assert not torch.equal(e1, e2)
    # each pixel is a Bernoulli draw with the grey level as probability
    assert torch.allclose(e1.mean(), s.x_train.mean(), atol=0.01)


def test_iterate_batches_covers_every_image_once():
    x = torch.arange(250.0).reshape(250, 1, 1, 1) / 250
    batches = list(iterate_batches(x, 100, dynamic_binarization=False))
    assert [len(b) for b in batches] == [100, 100, 50]
    assert torch.equal(torch.cat(batches).flatten().sort().values, x.flatten())


def test_mnist_split(mnist_root):
    s = load_splits("mnist", root=mnist_root, download=False)
    assert (len(s.x_train), len(s.x_val), len(s.x_test)) == (50_000, 10_000, 10_000)
    assert s.input_shape == (1, 28, 28)
    assert not _is_binary(s.x_val) and not _is_binary(s.x_test)
    assert torch.equal(s.x_test * 255, (s.x_test * 255).round())  # 8-bit grey levels k/255
    assert torch.bincount(s.y_test).tolist()[:2] == [980, 1135]  # official test set
    again = load_splits("mnist", root=mnist_root, download=False)
    assert torch.equal(s.x_test, again.x_test)


def test_missing_files_give_one_clear_message(tmp_path):
    with pytest.raises(DataError) as info:
        load_splits("mnist", root=tmp_path, download=False)
    msg = str(info.value)
    assert "train-images-idx3-ubyte" in msg and str(tmp_path / "MNIST" / "raw") in msg
    assert "download is off" in msg


def test_data_root_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("PRIORVAE_DATA", str(tmp_path / "env"))
    assert data_root("explicit") == data_root("explicit")
    assert str(data_root("explicit")) == "explicit"
    assert data_root(None) == tmp_path / "env"
    monkeypatch.delenv("PRIORVAE_DATA")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert data_root(None) == tmp_path / "cache" / "priorvae"


def test_unknown_dataset():
    with pytest.raises(PluginError, match="unknown data set 'cifar'.*Did you mean: cifar10"):
        load_splits("cifar")
