import dataclasses
import math

import pytest
import torch

from priorvae.data import load_splits
from priorvae.datasets import Splits
from priorvae.likelihoods import build_likelihood, prepare_splits
from priorvae.quality import (
    SHIPPED,
    class_entropy,
    classifier_digest,
    classifier_unavailable,
    features,
    frechet_distance,
    get_classifier,
    shipped_classifier_path,
)

BERNOULLI = build_likelihood("bernoulli", (1,))  # only its flags matter to the classifier


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


def test_a_classifier_is_trained_cached_and_accurate_for_data_without_shipped_weights(
        tmp_path):
    splits = dataclasses.replace(prepare_splits(load_splits("digits"), BERNOULLI),
                                 name="digits_elsewhere")
    clf = get_classifier(splits, tmp_path, likelihood=BERNOULLI)
    assert clf.origin == "trained"
    cached = list(tmp_path.glob("digits_elsewhere-*.pt"))
    assert len(cached) == 1
    feats, probs = features(clf, splits.x_test)
    assert feats.shape == (300, 64) and probs.shape == (300, 10)
    assert (probs.argmax(1) == splits.y_test).float().mean() > 0.8  # binarized 8x8 digits
    state = torch.get_rng_state()
    again = get_classifier(splits, tmp_path, likelihood=BERNOULLI)  # from the cache, identical
    assert again.origin == "cached"
    assert torch.equal(state, torch.get_rng_state()), "loading must not move the global RNG"
    torch.testing.assert_close(features(again, splits.x_test)[0], feats)
    # test images are closer to test images than to noise
    noise = torch.bernoulli(torch.full_like(splits.x_test, 0.3))
    real = frechet_distance(features(clf, splits.x_val)[0], feats)
    assert real < frechet_distance(features(clf, noise)[0], feats)


def _fake_splits(name, shape, classes, labelled=True):
    x = torch.rand(20, *shape)
    y = torch.arange(20) % classes if labelled else None
    return Splits(name, x, y, x, y, x, y, "intensity", classes if labelled else None)


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_classifiers_load_with_their_recorded_digest(name, tmp_path):
    path = shipped_classifier_path(name)
    assert path.is_file() and path.stat().st_size < 1_000_000  # small: package data
    recorded = torch.load(path, weights_only=True)
    assert recorded["digest"] == SHIPPED[name]
    shape = {"digits": (1, 8, 8), "mnist": (1, 28, 28)}[name]
    clf = get_classifier(_fake_splits(name, shape, 10), tmp_path, likelihood=BERNOULLI)
    assert clf.origin == "shipped" and classifier_digest(clf) == SHIPPED[name]
    assert not list(tmp_path.iterdir())  # nothing trained, nothing cached


def test_shipped_digits_classifier_recognises_the_test_digits():
    splits = prepare_splits(load_splits("digits"), BERNOULLI)
    clf = get_classifier(splits, None, likelihood=BERNOULLI)
    assert clf.origin == "shipped"
    _, probs = features(clf, splits.x_test)
    assert (probs.argmax(1) == splits.y_test).float().mean() > 0.8


def test_data_without_labels_has_no_classifier_and_says_why(tmp_path):
    splits = _fake_splits("tensors", (5,), 3, labelled=False)
    assert get_classifier(splits, tmp_path, likelihood=BERNOULLI) is None
    assert classifier_unavailable(splits).startswith("no labels: data set 'tensors' has none")
    # labels with their class count from the data set, on vectors
    labelled = _fake_splits("tensors", (5,), 3)
    assert classifier_unavailable(labelled) is None
    clf = get_classifier(labelled, tmp_path, epochs=1, likelihood=BERNOULLI)
    assert features(clf, labelled.x_test)[1].shape == (20, 3)


def test_too_few_held_out_images_skip_the_feature_measures_with_the_reason():
    """A labelled data set whose test split holds 2 images: evaluate crashed in the k-NN radii
    (k = 5) or the Fréchet distance's eigh; now no classifier, and the reason is given."""
    x, y = torch.rand(40, 1, 4, 4), torch.arange(40) % 2
    splits = Splits("tiny", x[:30], y[:30], x[30:38], y[30:38], x[38:], y[38:], "intensity", 2)
    reason = classifier_unavailable(splits)
    assert reason is not None and reason.startswith("2 held-out images") and "at least 6" in reason
    assert get_classifier(splits, None, likelihood=build_likelihood("bernoulli", (1, 4, 4))) is None
    assert classifier_unavailable(dataclasses.replace(splits, x_test=x[:6], y_test=y[:6])) is None
