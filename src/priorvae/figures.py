"""Pictures of prior samples against the aggregated posterior (matplotlib, saved as PNG).

Images are shown as grids (grey or colour); vectors (N, D) as heat maps, one row per example
and one column per dimension, on one colour scale for all panels of a figure.

- :func:`samples_figure`: prior samples | aggregated-posterior samples | reconstructions.
- :func:`latent_atlas`: posterior means coloured by label (one colour, said in the title, when
  the data has no labels) with prior samples overlaid; exact
  for latent_dim 2 (with contours of log p(z) and log q(z) and the holes shaded: where
  log q(z) falls below the hole threshold), the PCA plane of the posterior means otherwise.
- :func:`log_q_histogram`: log q(z) for prior samples against posterior samples of held-out
  images, with the hole threshold.
- :func:`hole_score_figure`: decoded prior samples sorted by the two-sample classifier's hole
  score, the most data-like rows beside the most hole-like rows.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torchvision.utils import make_grid  # noqa: E402

__all__ = ["samples_figure", "latent_atlas", "log_q_histogram", "hole_score_figure", "grid_image",
           "auc_noise"]


def grid_image(images: torch.Tensor, nrow: int = 8):
    """(N, C, H, W) in [0, 1] -> (H', W') or (H', W', 3) array for imshow; vectors (N, D)
    -> the (N, D) array itself (a heat map, one row per example)."""
    if images.dim() == 2:
        return images.float().cpu().numpy()
    grid = make_grid(images.float().clamp(0, 1).cpu(), nrow=nrow, pad_value=1.0)
    return grid[0].numpy() if grid.shape[0] in (1, 3) and images.shape[1] == 1 else \
        grid.permute(1, 2, 0).numpy()


def _value_range(*panels: torch.Tensor) -> tuple[float, float]:
    """(low, high) for a shared colour scale: [0, 1] for images, the 1st-99th percentiles of
    every panel's values for vectors."""
    if panels[0].dim() != 2:
        return 0.0, 1.0
    values = torch.cat([p.float().flatten().cpu() for p in panels])
    values = values[torch.randperm(len(values), generator=torch.Generator().manual_seed(0))
                    [:100_000]]  # a fixed subset: the global random state is not touched
    low, high = torch.quantile(values, 0.01).item(), torch.quantile(values, 0.99).item()
    return low, max(high, low + 1e-6)


def _show(ax, images: torch.Tensor, nrow: int, value_range: tuple[float, float]) -> None:
    low, high = value_range
    if images.dim() == 2:  # vectors: one row per example
        ax.imshow(grid_image(images), cmap="viridis", vmin=low, vmax=high, aspect="auto",
                  interpolation="nearest")
        ax.set_xlabel("dimension", fontsize=8)
        ax.set_ylabel("example", fontsize=8)
        ax.tick_params(labelsize=7)
        return
    ax.imshow(grid_image(images, nrow), cmap="gray", vmin=low, vmax=high)
    ax.axis("off")


def samples_figure(prior_images, aggregate_images, originals, reconstructions, title=""):
    """Three panels of 64 images (N, C, H, W) in [0, 1] or vectors (N, D) each; originals
    interleave reconstructions."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.8))
    pairs = torch.stack([originals[:32], reconstructions[:32]], 1).flatten(0, 1)
    panels = [(prior_images[:64], "samples from the prior p(z)"),
              (aggregate_images[:64], "samples from the aggregated posterior q(z)"),
              (pairs, "test images | reconstructions")]
    value_range = _value_range(*(imgs for imgs, _ in panels))
    for ax, (imgs, name) in zip(axes, panels, strict=True):
        _show(ax, imgs, 8, value_range)
        ax.set_title(name, fontsize=10)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def _pca(mu: torch.Tensor):
    center = mu.mean(0)
    _, _, v = torch.linalg.svd(mu - center, full_matrices=False)
    return center, v[:2].T  # (D,), (D, 2)


MAX_ATLAS_PRIOR_SAMPLES = 600  # enough to see where the prior puts mass, few enough to see codes


@torch.no_grad()
def latent_atlas(mu, labels, prior_z, prior=None, agg=None, threshold=None, title=""):
    """Posterior means (N, D) coloured by ``labels`` (N,) (None: one colour, said in the
    title), prior samples (M, D) overlaid."""
    d = mu.shape[1]
    fig, ax = plt.subplots(figsize=(7, 6.2))
    if d == 2:
        pts, pz = mu.cpu(), prior_z.cpu()
        lim = torch.quantile(torch.cat([pts, pz]).abs().flatten(), 0.995).item() * 1.1
        if prior is not None and agg is not None:
            axis = torch.linspace(-lim, lim, 160)
            gz = torch.stack(torch.meshgrid(axis, axis, indexing="xy"), -1).reshape(-1, 2)
            dev = agg.mu.device
            log_p = prior.log_prob(gz.to(dev)).reshape(160, 160).cpu()
            log_q = agg.log_prob(gz.to(dev)).reshape(160, 160).cpu()
            if threshold is not None:
                ax.contourf(axis, axis, (log_q < threshold).float(), levels=[0.5, 1.5],
                            colors=["#f4c7c3"], alpha=0.6)
            ax.contour(axis, axis, log_p, levels=8, colors="k", linewidths=0.6, alpha=0.6)
            ax.contour(axis, axis, log_q, levels=8, cmap="Blues", linewidths=0.8)
        xlabel, ylabel = "z1", "z2"
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
    else:
        center, proj = _pca(mu.double().cpu())
        pts = ((mu.double().cpu() - center) @ proj).float()
        pz = ((prior_z.double().cpu() - center) @ proj).float()
        xlabel, ylabel = "PC 1 of the posterior means", "PC 2"
    # prior samples first, small black +, the codes over them: a + that stays visible is
    # prior mass where no image encodes
    pz = pz[:min(MAX_ATLAS_PRIOR_SAMPLES, len(pts))]  # no more prior samples than codes
    ax.scatter(pz[:, 0], pz[:, 1], c="k", marker="+", s=12, linewidths=0.6, alpha=0.5,
               label=f"{len(pz)} prior samples", zorder=2)
    if labels is not None:
        sc = ax.scatter(pts[:, 0], pts[:, 1], c=labels.cpu(), cmap="tab10", s=10, linewidths=0,
                        alpha=0.9, zorder=3)
        fig.colorbar(sc, ax=ax, label="label")
    else:
        ax.scatter(pts[:, 0], pts[:, 1], c="C0", s=10, linewidths=0, alpha=0.9, zorder=3,
                   label="posterior means")
    ax.legend(loc="upper right", fontsize=8, markerscale=1.5)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    shaded = " (shaded: holes, log q(z) below threshold)" if d == 2 and threshold else ""
    means = ("posterior means by label" if labels is not None
             else "posterior means (no labels: one colour)")
    ax.set_title((title + "\n" if title else "") + means + " over prior samples (black +)"
                 + shaded, fontsize=9)
    fig.tight_layout()
    return fig


def log_q_histogram(log_q_prior, log_q_posterior, threshold, hole_rate=None, title=""):
    """Histograms of log q(z) for prior samples and for held-out posterior samples."""
    fig, ax = plt.subplots(figsize=(7, 4))
    both = torch.cat([log_q_prior, log_q_posterior]).double()
    lo = max(torch.quantile(both, 0.001).item(), threshold - 60)
    hi = torch.quantile(both, 0.999).item()
    bins = torch.linspace(lo, hi, 80).numpy()
    ax.hist(log_q_posterior.clamp(min=lo).numpy(), bins=bins, density=True, alpha=0.6,
            label="z ~ q(z|x), held-out x")
    ax.hist(log_q_prior.clamp(min=lo).numpy(), bins=bins, density=True, alpha=0.6,
            label="z ~ p(z)")
    ax.axvline(threshold, color="r", linestyle="--", label="1st percentile (hole threshold)")
    ax.set_xlabel("log q(z)  (values below the axis are clipped into its first bin)")
    ax.set_ylabel("density")
    rate = f", hole rate {hole_rate:.1%}" if hole_rate is not None else ""
    ax.set_title((title + ": " if title else "") + "log q(z) of prior vs posterior samples"
                 + rate, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def auc_noise(n_p: int, n_q: int) -> float:
    """Standard error of a classifier AUC under p = q with ``n_p`` and ``n_q`` held-out points
    (the Mann-Whitney statistic's null variance: (n_p + n_q + 1) / (12 n_p n_q))."""
    return ((n_p + n_q + 1) / (12 * n_p * n_q)) ** 0.5


def hole_score_figure(best_images, best_scores, worst_images, worst_scores, auc=None, title="",
                      n_heldout: tuple[int, int] | None = None):
    """Two panels of decoded prior samples (N, C, H, W): the lowest hole scores (the classifier
    takes them for q(z) samples) and the highest (prior mass that q(z) lacks: holes).

    With ``n_heldout`` (the classifier's held-out p and q points), an AUC within two standard
    errors of 0.5 is said on the figure: then the classifier cannot tell p from q and the
    right panel shows no holes, only the top of a score that carries no signal."""
    noise = auc_noise(*n_heldout) if n_heldout else None
    no_signal = auc is not None and noise is not None and auc < 0.5 + 2 * noise
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6 if no_signal else 4.2))
    nrow = 8
    worst = ("highest hole scores: NOT holes (no signal)" if no_signal
             else "highest hole scores: in holes")
    panels = [(best_images, best_scores, "lowest hole scores: like q(z)"),
              (worst_images, worst_scores, worst)]
    value_range = _value_range(best_images, worst_images)
    for ax, (imgs, scores, name) in zip(axes, panels, strict=True):
        _show(ax, imgs, nrow, value_range)
        ax.set_title(f"{name}\nscore {scores.min().item():.2f} to {scores.max().item():.2f}",
                     fontsize=10)
    what = "prior samples sorted by P(prior | z) of a classifier p(z) vs q(z)"
    if auc is not None:
        what += f" (held-out AUC {auc:.3f}" + (f" ± {noise:.3f} at p = q)" if noise else ")")
    fig.suptitle((title + "\n" if title else "") + what, fontsize=10)
    if no_signal:
        fig.text(0.5, 0.02, "AUC within 2 standard errors of 0.5: the classifier cannot tell "
                 "prior samples from q(z) samples, so neither panel shows holes",
                 ha="center", fontsize=10, color="#b00000")
    fig.tight_layout(rect=(0, 0.06 if no_signal else 0, 1, 1))
    return fig
