"""The metrics' display schema: one place for each metric's title, unit, better direction and
the value it takes when the prior matches the aggregated posterior (p = q).

Tables, figures, the command line's summaries and TensorBoard read it, so a metric is named and
judged the same everywhere. The metric *names* (the keys of metrics.json) are those of
:mod:`priorvae.measure`; this module only says how to show them.

    >>> METRICS["hole_rate"].label
    'hole rate ↓'
    >>> METRICS["hole_rate"].format(0.0412)
    '4.1%'
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Metric", "METRICS", "SUMMARY_KEYS", "FIGURE_KEYS", "HEADLINE_KEYS", "metric",
           "format_value"]


@dataclass(frozen=True)
class Metric:
    """How to show one metric.

    Attributes:
        key: its name in metrics.json.
        title: a short human title.
        unit: "nats", "%" (a share, shown as a percentage), "" (a number) ...
        better: "lower", "higher", or None (neither: read against ``reference``).
        reference: the value when p = q (None: no such value), drawn as a line in figures.
        digits: significant digits to print.
        column: the header of its column in compare's results.md headline table, where that
            is shorter than the title ("" : the title).
        column_div: what that table divides the value by (60: seconds shown as minutes).
    """

    key: str
    title: str
    unit: str = ""
    better: str | None = None
    reference: float | None = None
    digits: int = 3
    column: str = ""
    column_div: float = 1

    @property
    def arrow(self) -> str:
        return {"lower": "↓", "higher": "↑"}.get(self.better or "", "")

    @property
    def label(self) -> str:
        """Title with the better direction: 'hole rate ↓'."""
        return f"{self.title} {self.arrow}".rstrip()

    @property
    def cue(self) -> str:
        """'lower is better', 'higher is better' or ''."""
        return f"{self.better} is better" if self.better else ""

    @property
    def header(self) -> str:
        """The header of its column in the results tables' headline: 'ELBO'."""
        return self.column or self.title

    def format(self, value) -> str:
        if value is None:
            return "–"
        if self.unit == "%":
            return f"{100 * value:.{max(0, self.digits - 2)}f}%"
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)
        text = f"{value:.{self.digits}g}" if abs(value) < 1000 else f"{value:.0f}"
        return f"{text} {self.unit}" if self.unit and self.unit != "%" else text


_ALL = [
    Metric("test_nll", "test NLL", "nats", "lower", digits=4),
    Metric("test_bits_per_dim", "test NLL", "bits/dim", "lower", digits=4, column="bits/dim"),
    Metric("test_elbo", "test ELBO", "nats", "higher", digits=4, column="ELBO"),
    Metric("kl", "KL(q(z|x) || p(z))", "nats"),
    Metric("mutual_info", "I(x; z)", "nats"),
    Metric("marginal_kl", "KL(q(z) || p(z))", "nats", "lower", 0.0),
    Metric("kl_prior_to_agg", "KL(p(z) || q(z))", "nats", "lower", 0.0, column="KL(p‖q)"),
    Metric("hole_rate", "hole rate", "%", "lower", 0.01),
    Metric("mmd", "MMD²", "", "lower", 0.0),
    Metric("active_units", "active units"),
    Metric("fd_prior", "FD of prior samples", "", "lower", column="fd_prior"),
    Metric("fd_aggregate", "FD of q(z) samples", "", "lower", column="fd_aggregate"),
    Metric("class_entropy_prior", "class entropy, prior samples", "nats", "higher"),
    Metric("class_entropy_aggregate", "class entropy, q(z) samples", "nats", "higher"),
    Metric("latent_precision", "latent precision", "", "higher"),
    Metric("latent_recall", "latent recall", "", "higher"),
    Metric("latent_density", "latent density", "", None, 1.0),
    Metric("latent_coverage", "latent coverage", "", "higher"),
    Metric("latent_c2st_auc", "classifier AUC p vs q", "", "lower", 0.5,
           column="classifier AUC"),
    Metric("latent_c2st_acc", "classifier accuracy p vs q", "", "lower", 0.5),
    Metric("feature_precision", "feature precision", "", "higher"),
    Metric("feature_recall", "feature recall", "", "higher"),
    Metric("feature_density", "feature density", "", None, 1.0),
    Metric("feature_coverage", "feature coverage", "", "higher"),
    Metric("feature_c2st_auc", "image classifier AUC", "", "lower", 0.5),
    Metric("feature_c2st_acc", "image classifier accuracy", "", "lower", 0.5),
    # the share of a truncated (LARS) sampler's samples that are its last, unfiltered proposal
    Metric("truncation_share", "LARS truncation share", "%", "lower"),
    # compare's matched column: NLL with a source minus with the VAE's own prior, same draws
    Metric("matched_diff", "Δ NLL vs own prior, matched", "nats", "lower",
           column="Δ NLL vs own prior, matched [paired se]"),
    Metric("train_seconds", "training time", "s", "lower", column="train min", column_div=60),
    Metric("fit_seconds", "ex-post fit time", "s", "lower", column="fit min", column_div=60),
]
METRICS: dict[str, Metric] = {m.key: m for m in _ALL}

# what `priorvae evaluate` prints per prior source, and the bars of comparison.png
SUMMARY_KEYS = ("test_nll", "test_bits_per_dim", "test_elbo", "hole_rate", "latent_c2st_auc",
                "kl_prior_to_agg", "marginal_kl", "latent_precision", "latent_coverage",
                "fd_prior", "fd_aggregate", "active_units")
FIGURE_KEYS = ("test_nll", "hole_rate", "latent_c2st_auc", "kl_prior_to_agg", "marginal_kl",
               "latent_coverage", "fd_prior", "fd_aggregate")
# the headline table of compare's results.md: what a reader compares first (every column
# follows it); test_bits_per_dim only where some row has it
HEADLINE_KEYS = ("test_nll", "test_bits_per_dim", "test_elbo", "hole_rate", "kl_prior_to_agg",
                 "latent_precision", "latent_recall", "latent_coverage", "latent_c2st_auc",
                 "fd_prior", "fd_aggregate", "matched_diff", "train_seconds", "fit_seconds")


def metric(key: str) -> Metric:
    """The schema entry of ``key`` (a plain one for a metric not listed)."""
    return METRICS.get(key) or Metric(key, key)


def format_value(key: str, value) -> str:
    return metric(key).format(value)
