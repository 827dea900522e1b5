"""Two-sample measures: are the generated points where the real ones are, and are all covered?

Pure functions of two point sets ``real`` (N, D) and ``fake`` (M, D), on their device:

- :func:`precision_recall` (Kynkäänniemi et al., 2019). The real manifold is the union of
  balls B(r_i, NND_k(r_i)) around each real point, NND_k the distance to its k-th nearest
  real neighbour (itself excluded); likewise the fake manifold.

      precision = 1/M sum_j 1[f_j in real manifold]     (are samples where the data is?)
      recall    = 1/N sum_i 1[r_i in fake manifold]     (is all of the data reached?)

- :func:`density_coverage` (Naeem et al., 2020), with the real balls alone (robust to fake
  outliers, which inflate the fake manifold and so recall):

      density  = 1/(k M) sum_j sum_i 1[f_j in B(r_i, NND_k(r_i))]    (about 1 if p = q)
      coverage = 1/N sum_i 1[exists j: f_j in B(r_i, NND_k(r_i))]

- Monte-Carlo errors (``NAME_stderr``): of each k-NN mean over its own points with the other
  side's balls held fixed; of the AUC by Hanley & McNeil (1982) over the held-out halves.
  The k-NN errors leave out the noise of the other side's balls, so they are lower bounds:
  over 25-30 independent draws of N(0, I) against N(0, I) or 1.3 N(0, I) (1,000 points a side,
  D = 8 and 40) they were 0.5-1.0 of the spread (coverage and density lowest). The classifier's
  AUC error was 1.3 of its spread (12 draws).
- :func:`classifier_two_sample` (Lopez-Paz & Oquab, 2017): an MLP learns to tell ``p`` from
  ``q`` on one half of each; its AUC and accuracy on the other half are 0.5 when the two are
  indistinguishable and 1 when they are disjoint. Its probability that a held-out ``p`` point
  came from ``p`` is a per-sample **hole score**: high where p puts mass that q lacks (the
  classifier-based hole finder of NCP-VAE, Aneja et al., 2021).

Distances are computed in row blocks (``max_elements`` numbers at a time, no N x M matrix held),
with the squared distance of every pair evaluated by the same arithmetic whatever the block,
so every result is exactly the same for any block size.

References:
    | Improved Precision and Recall Metric for Assessing Generative Models
    | (Kynkäänniemi et al., 2019) https://arxiv.org/abs/1904.06991
    | Reliable Fidelity and Diversity Metrics for Generative Models (Naeem et al., 2020)
    | https://arxiv.org/abs/2002.09797
    | Revisiting Classifier Two-Sample Tests (Lopez-Paz & Oquab, 2017)
    | https://arxiv.org/abs/1610.06545
    | A Contrastive Learning Approach for Training VAEs with Prior Holes (NCP-VAE, Aneja et al.,
    | 2021) https://arxiv.org/abs/2010.02917
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["knn_radii", "precision_recall", "density_coverage", "knn_two_sample",
           "classifier_two_sample", "auc", "auc_stderr"]

DEFAULT_MAX_ELEMENTS = 2**24  # distances held at once: 64 MB in float32


def _sq_dist(a: torch.Tensor, b: torch.Tensor, b_sq: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances (A, B) = |b|^2 - 2 a.b + |a|^2 from one fused matrix
    product (addmm); the inner dimension D is never split, so with aligned row blocks a pair's
    value does not depend on the block."""
    return torch.addmm(b_sq[None], a, b.T, alpha=-2).add_(a.square().sum(1, keepdim=True)) \
        .clamp_min_(0)


def _blocks(n_rows: int, n_cols: int, max_elements: int):
    """Row blocks of a multiple of 64 rows: a BLAS kernel computes a row in tiles of a few rows,
    and tiles aligned the same way give the same bits whatever the budget."""
    rows = max(64, max_elements // max(1, n_cols) // 64 * 64)
    return range(0, n_rows, rows), rows


def _knn_sq_radii(x: torch.Tensor, ks: tuple[int, ...], max_elements: int
                  ) -> dict[int, torch.Tensor]:
    """Squared distance of each point of x (N, D) to its k-th nearest neighbour in x, itself
    excluded, for each k in ``ks``, from one top-k pass: {k: (N,)}."""
    k_max = max(ks)
    if min(ks) < 1 or k_max >= len(x):
        raise ValueError(f"k must be in [1, {len(x) - 1}] for {len(x)} points, got {k_max}")
    x_sq = x.square().sum(1)
    starts, rows = _blocks(len(x), len(x), max_elements)
    parts = []
    for s in starts:
        d2 = _sq_dist(x[s:s + rows], x, x_sq)
        idx = torch.arange(s, min(s + rows, len(x)), device=x.device)
        d2[idx - s, idx] = torch.inf  # not its own neighbour (duplicates still count)
        parts.append(d2.topk(k_max, dim=1, largest=False).values)
    top = torch.cat(parts)
    return {k: top[:, k - 1] for k in ks}


@torch.no_grad()
def knn_radii(x: torch.Tensor, k: int, max_elements: int = DEFAULT_MAX_ELEMENTS) -> torch.Tensor:
    """Distance of each point of x (N, D) to its k-th nearest neighbour in x, itself excluded:
    (N,)."""
    return _knn_sq_radii(x.float(), (k,), max_elements)[k].sqrt()


@torch.no_grad()
def knn_two_sample(real: torch.Tensor, fake: torch.Tensor, k_pr: int = 3, k_dc: int = 5,
                   max_elements: int = DEFAULT_MAX_ELEMENTS) -> dict[str, float]:
    """Precision and recall (k = ``k_pr``) and density and coverage (k = ``k_dc``) in one pass
    over the real-fake distances. real (N, D), fake (M, D)."""
    if real.dim() != 2 or fake.dim() != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"real and fake must be (N, D) and (M, D), got {tuple(real.shape)} "
                         f"and {tuple(fake.shape)}")
    # float32: the k-NN comparisons need distances, not their last digits (2x the speed)
    real, fake = real.float(), fake.float()
    r_real = _knn_sq_radii(real, (k_pr, k_dc), max_elements)  # squared radii throughout
    r_pr_real, r_dc_real = r_real[k_pr], r_real[k_dc]
    r_pr_fake = _knn_sq_radii(fake, (k_pr,), max_elements)[k_pr]
    real_sq = real.square().sum(1)
    in_real = torch.zeros(len(fake), dtype=torch.bool, device=fake.device)
    density_count = torch.zeros((), dtype=torch.float64, device=fake.device)
    per_fake = torch.zeros(len(fake), dtype=torch.float64, device=fake.device)  # for its error
    recalled = torch.zeros(len(real), dtype=torch.bool, device=real.device)
    nearest_fake = torch.full((len(real),), torch.inf, device=real.device)
    starts, rows = _blocks(len(fake), len(real), max_elements)
    for s in starts:
        d2 = _sq_dist(fake[s:s + rows], real, real_sq)  # (rows, N)
        in_real[s:s + rows] = (d2 <= r_pr_real).any(1)
        inside = d2 <= r_dc_real
        density_count += inside.sum()
        per_fake[s:s + rows] = inside.sum(1)
        recalled |= (d2 <= r_pr_fake[s:s + rows, None]).any(0)
        nearest_fake = torch.minimum(nearest_fake, d2.min(0).values)
    covered = nearest_fake <= r_dc_real
    return {
        "precision": in_real.double().mean().item(),
        "recall": recalled.double().mean().item(),
        "density": (density_count / (k_dc * len(fake))).item(),
        "coverage": covered.double().mean().item(),
        # standard errors of each mean over its own points, the other side's balls held fixed
        "precision_stderr": _se(in_real), "recall_stderr": _se(recalled),
        "density_stderr": _se(per_fake / k_dc), "coverage_stderr": _se(covered),
    }


def _se(values: torch.Tensor) -> float:
    values = values.double()
    return (values.std() / len(values) ** 0.5).item() if len(values) > 1 else float("nan")


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3,
                     max_elements: int = DEFAULT_MAX_ELEMENTS) -> dict[str, float]:
    """Improved precision and recall (Kynkäänniemi et al., 2019) of fake (M, D) against
    real (N, D) with k-NN balls."""
    out = knn_two_sample(real, fake, k_pr=k, k_dc=k, max_elements=max_elements)
    return {"precision": out["precision"], "recall": out["recall"]}


def density_coverage(real: torch.Tensor, fake: torch.Tensor, k: int = 5,
                     max_elements: int = DEFAULT_MAX_ELEMENTS) -> dict[str, float]:
    """Density and coverage (Naeem et al., 2020) of fake (M, D) against real (N, D)."""
    out = knn_two_sample(real, fake, k_pr=k, k_dc=k, max_elements=max_elements)
    return {"density": out["density"], "coverage": out["coverage"]}


def auc_stderr(a: float, n_pos: int, n_neg: int) -> float:
    """Standard error of an AUC ``a`` from ``n_pos`` and ``n_neg`` held-out points (Hanley &
    McNeil, 1982, https://doi.org/10.1148/radiology.143.1.7063747)."""
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    var = (a * (1 - a) + (n_pos - 1) * (q1 - a * a) + (n_neg - 1) * (q2 - a * a)) / (n_pos * n_neg)
    return max(var, 0.0) ** 0.5


def auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve of ``scores`` (N,) for binary ``labels`` (N,), by the
    Mann-Whitney rank statistic with tied scores given their average rank."""
    scores, labels = scores.double().flatten(), labels.bool().flatten()
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("auc needs both labels present")
    s = scores.sort().values
    rank = (torch.searchsorted(s, scores, right=False) + torch.searchsorted(s, scores, right=True)
            + 1).double() / 2  # average 1-based rank of each score
    return ((rank[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)).item()


def _random_halves(n: int, block: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (train, held out) of a seeded random split of ``n`` points into halves that
    keeps each run of ``block`` consecutive points (the codes of one image) on one side."""
    n_blocks = -(-n // block)
    order = torch.randperm(n_blocks, generator=gen)
    index = (order[:, None] * block + torch.arange(block)).flatten()
    index = index[index < n]  # the last block may be short
    if n_blocks < 2:  # one block: it cannot stay whole on one side
        return index[:n // 2], index[n // 2:]
    sizes = torch.full((n_blocks,), block)
    sizes[-1] = n - (n_blocks - 1) * block
    cut = int(sizes[order[:n_blocks // 2]].sum())  # whole blocks: half of them train
    return index[:cut], index[cut:]


def classifier_two_sample(p_samples: torch.Tensor, q_samples: torch.Tensor, hidden: int = 128,
                          epochs: int = 30, batch_size: int = 256, lr: float = 1e-3,
                          seed: int = 0, q_block: int = 1) -> dict:
    """Classifier two-sample test between p (N, D) and q (M, D).

    A seeded random half of each set trains an MLP (inputs standardised with the training
    half's mean and std) by logistic loss; the other halves evaluate it. The halves are
    random, not the first and the second: a data set's order is not exchangeable (MNIST's
    first 5,000 test images are the cleaner writers of NIST SD-3, the last 5,000 those of
    SD-1; a classifier trained on the first half of q and tested on the second scores a
    prior that matches q(z) well far below 0.5). ``q_block``: q comes in runs of that many
    consecutive points that belong together (several codes of one image), kept on one side.

    Returns:
        dict with ``auc`` and ``accuracy`` (held-out halves; balanced accuracy at threshold
        1/2), ``hole_score`` (n_p,) the classifier's probability "from p" for the held-out
        p points, and ``p_index`` (n_p,) their indices in ``p_samples``.
    """
    if p_samples.dim() != 2 or q_samples.shape[1:] != p_samples.shape[1:]:
        raise ValueError(f"p and q must be (N, D) and (M, D), got {tuple(p_samples.shape)} and "
                         f"{tuple(q_samples.shape)}")
    if len(p_samples) < 4 or len(q_samples) < 4:
        raise ValueError("classifier_two_sample needs at least 4 points on each side")
    device = p_samples.device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    if isinstance(q_block, bool) or not isinstance(q_block, int) or q_block < 1:
        raise ValueError(f"q_block must be a positive integer, got {q_block!r}")
    p_tr, p_te = _random_halves(len(p_samples), 1, gen)
    q_tr, q_te = _random_halves(len(q_samples), q_block, gen)
    p_tr, p_te, q_tr, q_te = (i.to(device) for i in (p_tr, p_te, q_tr, q_te))
    p, q = p_samples.float(), q_samples.float()
    hp, hq = len(p_tr), len(q_tr)
    x_tr = torch.cat([p[p_tr], q[q_tr]])
    y_tr = torch.cat([torch.ones(hp), torch.zeros(hq)]).to(device)
    mean, std = x_tr.mean(0), x_tr.std(0).clamp_min(1e-6)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = nn.Sequential(nn.Linear(p.shape[1], hidden), nn.ReLU(), nn.Linear(hidden, hidden),
                            nn.ReLU(), nn.Linear(hidden, 1)).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    # weight the classes equally whatever their sizes, so 1/2 is chance for both halves
    pos_weight = torch.tensor(hq / hp, device=device)
    with torch.enable_grad():
        for _ in range(epochs):
            for idx in torch.randperm(len(x_tr), generator=gen).to(device).split(batch_size):
                logits = net((x_tr[idx] - mean) / std).squeeze(1)
                loss = nn.functional.binary_cross_entropy_with_logits(
                    logits, y_tr[idx], pos_weight=pos_weight)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    with torch.no_grad():
        score_p = torch.sigmoid(net((p[p_te] - mean) / std).squeeze(1))
        score_q = torch.sigmoid(net((q[q_te] - mean) / std).squeeze(1))
    scores = torch.cat([score_p, score_q])
    labels = torch.cat([torch.ones(len(score_p)), torch.zeros(len(score_q))]).to(device)
    accuracy = 0.5 * ((score_p > 0.5).double().mean() + (score_q <= 0.5).double().mean())
    area = auc(scores, labels)
    pa, qa = (score_p > 0.5).double().mean().item(), (score_q <= 0.5).double().mean().item()
    return {"auc": area, "accuracy": accuracy.item(), "hole_score": score_p,
            "p_index": p_te,
            "auc_stderr": auc_stderr(area, len(score_p), len(score_q)),
            "accuracy_stderr": 0.5 * (pa * (1 - pa) / len(score_p)
                                      + qa * (1 - qa) / len(score_q)) ** 0.5}
