"""Sample quality: a small classifier trained by priorvae, and distances in its feature space.

People judge samples by eye; these numbers stand in for that:

- :func:`frechet_distance` between two sets of features (Heusel et al., 2017, with this
  project's classifier instead of Inception):
  FD = |m_a - m_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^{1/2}).
- :func:`class_entropy`: entropy (nats) of the mean predicted class distribution; log 10 when
  the samples spread evenly over the 10 classes, near 0 when they collapse onto one.

:func:`get_classifier` gives the data set's classifier: for the built-in labelled sets the
reference weights shipped in the package (``priorvae/classifiers/NAME.pt``, trained by
:func:`_train_classifier` with seed 0 on one CPU thread; their digests in :data:`SHIPPED`), so
fd_* and feature_* compare across machines; for other labelled data a small MLP trained on
the training split (as the likelihood prepares it: Bernoulli binarizes) once and cached in
the user cache (``~/.cache/priorvae/classifiers/NAME-FINGERPRINT.pt``). Data without labels
has no classifier: :func:`classifier_unavailable` says why, and the feature measures are
skipped with that reason.
"""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path

import torch
from torch import nn

from .data import Splits, iterate_batches
from .errors import DataError, RunError
from .likelihoods import Likelihood
from .stop import check_stop

__all__ = ["Classifier", "get_classifier", "classifier_cache_dir", "classifier_digest",
           "classifier_unavailable", "classifier_cache_path", "shipped_classifier_path",
           "SHIPPED", "frechet_distance", "class_entropy", "features", "MIN_HELDOUT"]

MIN_HELDOUT = 6  # validation and test images the feature measures need (k-NN with k = 5)

FEATURES = 64
# data set -> digest of the shipped reference classifier (priorvae/classifiers/NAME.pt)
SHIPPED = {"digits": "1b0eb81f9149", "mnist": "453aa1ea8995"}


class Classifier(nn.Module):
    """MLP x (B, C, H, W) or (B, D) -> logits (B, classes); ``features`` is its last hidden
    layer. ``origin``: ``"shipped"`` (the package's reference weights), ``"cached"`` or
    ``"trained"`` (on this machine)."""

    def __init__(self, input_shape, classes: int = 10, hidden: int = 256):
        super().__init__()
        self.origin = "trained"
        self.body = nn.Sequential(
            nn.Linear(math.prod(input_shape), hidden), nn.ReLU(),
            nn.Linear(hidden, FEATURES), nn.ReLU(),
        )
        self.head = nn.Linear(FEATURES, classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x.flatten(1))  # (B, ...) -> (B, prod(...))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _train_classifier(splits: Splits, likelihood: Likelihood, epochs: int, seed: int = 0
                      ) -> tuple[Classifier, float]:
    gen = torch.Generator(device=splits.x_train.device).manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Classifier(splits.input_shape, splits.n_classes).to(splits.x_train.device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    n = len(splits.x_train)
    for _ in range(epochs):
        check_stop()  # SIGTERM: stop between epochs (nothing is cached)
        order = torch.randperm(n, device=splits.x_train.device, generator=gen)
        for start in range(0, n, 128):
            idx = order[start:start + 128]
            x = likelihood.prepare_fixed(splits.x_train[idx], gen)  # as the model sees data
            loss = nn.functional.cross_entropy(model(x), splits.y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model(splits.x_test).argmax(1) == splits.y_test).float().mean().item()
    return model, acc


def classifier_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/priorvae/classifiers`` (or ``~/.cache/...``): never the data folder."""
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "priorvae" / "classifiers"


def classifier_unavailable(splits: Splits) -> str | None:
    """Why data set ``splits`` has no quality classifier (None: it has one)."""
    if not splits.has_labels or not splits.n_classes:
        return (f"no labels: data set {splits.name!r} has none, and fd_*, class_entropy_* and "
                f"feature_* need a classifier trained on labelled examples")
    if splits.n_classes < 2:
        return f"one class: data set {splits.name!r} has a single label"
    held = min(len(splits.x_val), len(splits.x_test))
    if held < MIN_HELDOUT:  # k-NN radii (k = 5) and a Fréchet distance need more points
        return (f"{held} held-out images: data set {splits.name!r} needs at least "
                f"{MIN_HELDOUT} validation and test images for fd_*, class_entropy_* and "
                f"feature_*")
    return None


def shipped_classifier_path(name: str) -> Path:
    """The package's reference weights for data set ``name``."""
    return Path(__file__).resolve().parent / "classifiers" / f"{name}.pt"


def _fingerprint(splits: Splits) -> str:
    digest = hashlib.sha256()
    for t in (splits.x_train, splits.y_train):
        digest.update(str(tuple(t.shape)).encode())
        digest.update(t.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:12]


def classifier_cache_path(splits: Splits, cache_dir: str | Path, likelihood: Likelihood) -> Path:
    """Where the classifier trained for ``splits`` is cached: ``NAME-FINGERPRINT.pt`` (the
    fingerprint: the training split's values and labels; ``-values`` when the likelihood
    does not binarize)."""
    suffix = "" if likelihood.binarizes else "-values"
    return Path(cache_dir) / f"{splits.name}-{_fingerprint(splits)}{suffix}.pt"


def _load(path: Path, splits: Splits, origin: str) -> Classifier:
    device = splits.x_train.device
    from .runs import load_checkpoint, load_weights

    try:  # the checks of a run folder's files: no link followed, weights only, shapes
        state = load_checkpoint(path, map_location=device)
        with torch.random.fork_rng(devices=[]):  # building draws weights: keep the caller's RNG
            model = Classifier(splits.input_shape, splits.n_classes).to(device)
        if not isinstance(state.get("model"), dict):
            raise RunError(f"{path} is not a classifier (no model weights)")
        load_weights(model, state["model"], path)
    except RunError as exc:
        how = ("reinstall priorvae" if origin == "shipped"
               else "delete it and it is trained again on the next evaluation")
        raise DataError(f"the {origin} sample-quality classifier is unusable: {exc}; "
                        f"{how}") from None
    model.origin = origin
    return model.eval()


def get_classifier(splits: Splits, cache_dir: str | Path | None, epochs: int | None = None,
                   progress: bool = False, *, likelihood: Likelihood) -> Classifier | None:
    """The data set's classifier for data as ``likelihood`` prepares them (``splits``: held-out
    splits prepared, :func:`~priorvae.likelihoods.prepare_splits`): the shipped reference
    weights for the built-in sets (:data:`SHIPPED`, when the likelihood binarizes, as they were
    trained), else trained once and cached in ``cache_dir`` (None: no cache). None when the
    data set has no labels (:func:`classifier_unavailable` says why)."""
    if classifier_unavailable(splits):
        return None
    binary = likelihood.binarizes
    shipped = shipped_classifier_path(splits.name)
    if splits.name in SHIPPED and binary and shipped.is_file():
        model = _load(shipped, splits, "shipped")
        if classifier_digest(model) != SHIPPED[splits.name]:
            raise DataError(f"{shipped} has digest {classifier_digest(model)}, expected "
                            f"{SHIPPED[splits.name]}: the package is damaged; reinstall it")
        return model
    path = classifier_cache_path(splits, cache_dir, likelihood) if cache_dir else None
    if path is not None and os.path.lexists(path):
        return _load(path, splits, "cached")
    epochs = epochs or (40 if len(splits.x_train) < 5000 else 5)
    if progress:
        print(f"training the {splits.name} classifier for sample quality ({epochs} epochs)...")
    model, acc = _train_classifier(splits, likelihood, epochs)
    if progress:
        print(f"classifier test accuracy {acc:.4f}")
    if path is not None:
        from .runs import save_checkpoint

        save_checkpoint(path, {"model": model.state_dict(), "test_accuracy": acc})
    return model


def classifier_digest(classifier: nn.Module) -> str:
    """The first 12 hex digits of the sha256 of the classifier's weights. Every fd_* and
    feature_* number depends on the classifier: the shipped ones are the same everywhere; one
    trained on a machine (seeded, but another thread count or CPU can round differently) may
    differ between machines, and numbers with different digests do not compare exactly."""
    digest = hashlib.sha256()
    for name, tensor in sorted(classifier.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:12]


@torch.no_grad()
def features(classifier: Classifier, x: torch.Tensor, batch_size: int = 1000):
    """Feature vectors (N, F) and class probabilities (N, classes) of examples x (N, ...)."""
    feats, probs = [], []
    for batch in iterate_batches(x, batch_size, shuffle=False, dynamic_binarization=False):
        f = classifier.features(batch)
        feats.append(f)
        probs.append(torch.softmax(classifier.head(f), -1))
    return torch.cat(feats), torch.cat(probs)


def _sqrtm_psd(m: torch.Tensor) -> torch.Tensor:
    vals, vecs = torch.linalg.eigh(m)
    return (vecs * vals.clamp_min(0).sqrt()) @ vecs.T


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to feature sets a (N, F) and b (M, F)."""
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    root_a = _sqrtm_psd(cov_a)
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp_min(0).sqrt().sum()
    fd = (mu_a - mu_b).pow(2).sum() + torch.trace(cov_a) + torch.trace(cov_b) - 2 * cross
    return max(fd.item(), 0.0)


def class_entropy(probs: torch.Tensor) -> float:
    """Entropy (nats) of the mean class distribution of predicted probabilities (N, classes)."""
    p = probs.double().mean(0)
    return -(p * torch.log(p.clamp_min(1e-12))).sum().item()
