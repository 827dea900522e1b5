"""Two-sample measures against cases whose answer is known."""

import pytest
import torch

from priorvae.twosample import (
    auc,
    classifier_two_sample,
    density_coverage,
    knn_radii,
    knn_two_sample,
    precision_recall,
)


def two_modes(n: int, d: int = 2, gen=None) -> torch.Tensor:
    """Equal mixture of N(+4 e_1, I) and N(-4 e_1, I)."""
    x = torch.randn(n, d, generator=gen)
    x[:, 0] += torch.where(torch.arange(n) % 2 == 0, 4.0, -4.0)
    return x


def test_knn_radii_match_brute_force():
    x = torch.randn(300, 3, dtype=torch.float64)
    d = torch.cdist(x, x)
    d.fill_diagonal_(float("inf"))
    for k in (1, 3, 5):
        ref = d.sort(1).values[:, k - 1]
        torch.testing.assert_close(knn_radii(x, k, max_elements=1000), ref.float(), rtol=1e-5,
                                   atol=1e-5)


def test_one_distribution_gives_precision_recall_density_near_one():
    real, fake = torch.randn(3000, 2), torch.randn(3000, 2)
    pr, dc = precision_recall(real, fake), density_coverage(real, fake)
    assert pr["precision"] > 0.9 and pr["recall"] > 0.9
    assert dc["density"] == pytest.approx(1.0, abs=0.1)
    # for p = q, coverage is about 1 - 2^-k (Naeem et al., 2020): 0.97 for k = 5
    assert dc["coverage"] > 0.93


def test_disjoint_supports_give_zero_precision_recall_density_coverage():
    real, fake = torch.randn(1000, 5), torch.randn(1000, 5) + 20
    out = knn_two_sample(real, fake)
    assert out == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0,
                   "precision_stderr": 0.0, "recall_stderr": 0.0, "density_stderr": 0.0,
                   "coverage_stderr": 0.0}


def test_fake_on_one_of_two_modes_has_precision_but_half_recall_and_coverage():
    real = two_modes(4000)
    fake = torch.randn(4000, 2)
    fake[:, 0] += 4  # the +4 mode only
    out = knn_two_sample(real, fake)
    assert out["precision"] > 0.9
    assert 0.4 < out["recall"] < 0.6
    assert 0.4 < out["coverage"] < 0.6
    # every fake point lies in about k real balls of its mode: density stays near 1
    assert out["density"] == pytest.approx(1.0, abs=0.1)


def test_results_do_not_depend_on_the_block_size():
    real, fake = torch.randn(777, 40), torch.randn(555, 40) * 1.3 + 0.2
    whole = knn_two_sample(real, fake, max_elements=10**9)
    for max_elements in (1, 999, 37 * 777, 200 * 777):  # smallest, uneven, larger blocks
        assert knn_two_sample(real, fake, max_elements=max_elements) == whole
        assert torch.equal(knn_radii(real, 3, max_elements=max_elements),
                           knn_radii(real, 3, max_elements=10**9))


def test_knn_rejects_bad_shapes_and_k():
    with pytest.raises(ValueError, match="k must be"):
        knn_radii(torch.randn(3, 2), 3)
    with pytest.raises(ValueError, match="real and fake"):
        knn_two_sample(torch.randn(10, 2), torch.randn(10, 3))


def test_auc_is_mann_whitney_with_ties():
    scores = torch.tensor([0.1, 0.4, 0.35, 0.8, 0.4])
    labels = torch.tensor([0, 0, 1, 1, 1])
    # positive-negative pairs: (0.35 > 0.1), (0.35 < 0.4), (0.8 > both), (0.4 > 0.1, 0.4 = 0.4)
    assert auc(scores, labels) == pytest.approx((1 + 0 + 2 + 1 + 0.5) / 6)
    assert auc(torch.arange(10.0), torch.arange(10) >= 5) == 1.0


def test_classifier_cannot_tell_one_distribution_from_itself():
    out = classifier_two_sample(torch.randn(6000, 10), torch.randn(6000, 10), epochs=10)
    assert out["auc"] == pytest.approx(0.5, abs=0.04)
    assert out["accuracy"] == pytest.approx(0.5, abs=0.04)


def test_classifier_separates_disjoint_distributions():
    out = classifier_two_sample(torch.randn(2000, 10), torch.randn(2000, 10) + 3, epochs=10)
    assert out["auc"] > 0.99 and out["accuracy"] > 0.97
    assert out["hole_score"].shape == (1000,) and out["p_index"].shape == (1000,)
    assert len(set(out["p_index"].tolist())) == 1000 and 0 <= out["p_index"].min() \
        and out["p_index"].max() < 2000  # a random half of p, each point once


def test_classifier_halves_are_random_not_the_data_sets_order():
    # MNIST's test set is not exchangeable: its first 5,000 images (NIST SD-3) are cleaner than
    # its last 5,000 (SD-1). A classifier trained on the first half of q and scored on the second
    # put a prior that matches q(z) at an AUC of 0.48, not 0.5 (0.58 with random halves). Here q's
    # first half is narrow and its second broad; p is the same mixture, shuffled: p = q.
    gen = torch.Generator().manual_seed(0)
    q = torch.cat([torch.randn(3000, 2, generator=gen), 3 * torch.randn(3000, 2, generator=gen)])
    p = torch.cat([torch.randn(3000, 2, generator=gen),
                   3 * torch.randn(3000, 2, generator=gen)])[torch.randperm(6000, generator=gen)]
    out = classifier_two_sample(p, q, epochs=10)
    assert abs(out["auc"] - 0.5) < 3 * out["auc_stderr"] + 0.01, out["auc"]


def test_classifier_keeps_the_codes_of_one_image_on_one_side():
    from priorvae.twosample import _random_halves

    for n, block in [(10, 3), (12, 3), (7, 1), (4, 6), (1800, 6)]:
        train, held = _random_halves(n, block, torch.Generator().manual_seed(1))
        assert sorted(train.tolist() + held.tolist()) == list(range(n))  # a partition
        assert len(train) > 0 and len(held) > 0
        if -(-n // block) >= 2:
            sides = {i: 0 for i in train.tolist()} | {i: 1 for i in held.tolist()}
            assert all(len({sides[i] for i in range(b, min(b + block, n))}) == 1
                       for b in range(0, n, block))  # every block whole on one side
            assert abs(len(train) - len(held)) <= 2 * block
    with pytest.raises(ValueError, match="q_block"):
        classifier_two_sample(torch.randn(8, 2), torch.randn(8, 2), q_block=0)


def test_hole_score_ranks_uncovered_prior_points_above_covered_ones():
    p = torch.randn(8000, 2)  # the prior: N(0, I)
    q = torch.randn(8000, 2)
    q[:, 0] = q[:, 0].abs()  # q covers the half-plane z_1 > 0 only: z_1 < 0 is a hole
    out = classifier_two_sample(p, q, epochs=15)
    held = p[out["p_index"]]
    in_hole = held[:, 0] < -0.5
    covered = held[:, 0] > 0.5
    assert out["hole_score"][in_hole].mean() > 0.9
    assert out["hole_score"][covered].mean() < 0.5
    assert auc(out["hole_score"][in_hole | covered], in_hole[in_hole | covered]) > 0.95


def test_auc_stderr_matches_the_spread_of_repeated_draws():
    from priorvae.twosample import auc_stderr

    gen = torch.Generator().manual_seed(0)
    values = []
    for _ in range(200):
        pos, neg = torch.randn(300, generator=gen) + 0.5, torch.randn(200, generator=gen)
        values.append(auc(torch.cat([pos, neg]), torch.cat([torch.ones(300), torch.zeros(200)])))
    spread = torch.tensor(values).std().item()
    predicted = auc_stderr(sum(values) / len(values), 300, 200)
    assert 0.8 < predicted / spread < 1.25, (predicted, spread)
    out = knn_two_sample(two_modes(500, gen=gen), two_modes(400, gen=gen))
    p = out["precision"]  # a mean of 0/1 indicators over the 400 fake points
    assert out["precision_stderr"] == pytest.approx((p * (1 - p) * 400 / 399 / 400) ** 0.5)
    assert all(out[f"{k}_stderr"] >= 0 for k in ("recall", "density", "coverage"))
