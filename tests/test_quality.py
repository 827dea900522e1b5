import math

import pytest
import torch

from priorvae.data import load_splits
from priorvae.quality import class_entropy, features, frechet_distance, get_classifier


def test_frechet_distance_closed_form_for_diagonal_gaussians():
    torch.manual_seed(0)
    n = 200_000
    va, vb = torch.tensor([1.0, 4.0, 0.25]), torch.tensor([2.0, 1.0, 0.25])
    ma, mb = torch.tensor([0.0, 1.0, -1.0]), torch.tensor([0.5, 1.0, 0.0])
    a = ma + torch.randn(n, 3) * va.sqrt()
    b = mb + torch.randn(n, 3) * vb.sqrt()
    exact = ((ma - mb) ** 2).sum() + ((va.sqrt() - vb.sqrt()) ** 2).sum()
    assert frechet_distance(a, b) == pytest.approx(exact.item(), abs=0.03)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)


def test_class_entropy_extremes():
    assert class_entropy(torch.eye(10)) == pytest.approx(math.log(10))
    assert class_entropy(torch.eye(10)[[3] * 50]) == pytest.approx(0.0, abs=1e-9)


def test_digits_classifier_is_cached_and_accurate(tmp_path):
    splits = load_splits("digits")
    clf = get_classifier(splits, tmp_path)
    assert (tmp_path / "digits.pt").is_file()
    feats, probs = features(clf, splits.x_test)
    assert feats.shape == (300, 64) and probs.shape == (300, 10)
    assert (probs.argmax(1) == splits.y_test).float().mean() > 0.8  # binarized 8x8 digits
    state = torch.get_rng_state()
    again = get_classifier(splits, tmp_path)  # from the cache, identical
    assert torch.equal(state, torch.get_rng_state()), "loading must not move the global RNG"
    torch.testing.assert_close(features(again, splits.x_test)[0], feats)
    # test images are closer to test images than to noise
    noise = torch.bernoulli(torch.full_like(splits.x_test, 0.3))
    real = frechet_distance(features(clf, splits.x_val)[0], feats)
    assert real < frechet_distance(features(clf, noise)[0], feats)
