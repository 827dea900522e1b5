"""Resampled prior (Learned Accept/Reject Sampling, LARS): a base prior reweighted by a learned
acceptance function.

    p(z) = pi(z) a(z) / Z,   a(z) = sigmoid(MLP(z)),   Z = E_pi[a(z)]

Sampling is truncated rejection as in the paper: up to T proposals z_t ~ pi, each accepted
with probability a(z_t); if none of the first T - 1 is accepted the T-th is taken. The
density of exactly that sampler, which ``log_prob`` returns, is

    p_T(z) = pi(z) [alpha_T a(z) / Z + 1 - alpha_T],   alpha_T = 1 - (1 - Z)^(T - 1),

normalised for any a, and pi(z) a(z) / Z as T grows. Z is estimated by Monte Carlo:

- in a training step from S fresh base samples, smoothed by an exponential moving average as
  in the paper (the value is the average, the gradient the current batch's);
- otherwise (evaluation, ``frozen()``) once from ``n_normalizer`` base samples drawn with a
  fixed seed, so that repeated evaluations agree; ``log_normalizer_stderr()`` is its standard
  error in nats (delta method: std(a) / (sqrt(S) Z)), reported next to the test NLL.

**Truncation share.** A share (1 - Z)^(T - 1) of the samples is the T-th proposal, taken
unfiltered from the base: ``sampler_report()`` gives it (``truncation_share``, recorded by
``evaluate``, which warns above 5%). With Z = 0.009 (a joint LARS prior on MNIST) and the
default T = 100 it is 41%: the density accounts for it (p_T above, no NLL error), but the
prior's samples are then 41% N(0, I) draws and its sample-based measures (hole rate, two-sample
tests) measure that mixture. Keeping the share under a fraction s needs
T >= 1 + log(s) / log(1 - Z) (s = 1%: T = 510 at Z = 0.009), and a sample costs about
min(T, 1/Z) proposals. T is part of the density, so changing it changes the model: choose it
before training.

The base is N(0, I) or any registered prior that needs no build context (``base``,
``base_args``; a ``file.py:Class`` spec there is pinned and checked like ``[prior] name``); its
parameters, if any, are learned too. With a constant a(z) the prior is
exactly the base (a new resampled prior is, since the last layer starts at zero).

References:
    | Resampled Priors for Variational Autoencoders (Bauer & Mnih, 2019)
    | https://arxiv.org/abs/1810.11428
"""

import math

import torch
from torch import nn

from priorvae.errors import PriorError
from priorvae.priors.base import Prior, build_prior, register_prior

__all__ = ["ResampledPrior"]


@register_prior("resampled")
class ResampledPrior(Prior):
    """LARS prior: base pi reweighted by a(z) = sigmoid(MLP(z)), truncated at T proposals.

    Args:
        latent_dim: D.
        base, base_args: the proposal pi (a registered prior name and its arguments).
        hidden: hidden widths of the acceptance MLP (tanh, as in the paper).
        truncation: T, proposals per sample.
        batch_normalizer: S, base samples per training step for Z.
        ema: decay of the moving average of Z in training.
        n_normalizer: base samples for Z outside training (fixed seed).
    """

    estimated_normalizer = True
    spec_arguments = {"base": "base_args"}  # base names a prior: through the gate like [prior]

    def __init__(self, latent_dim: int, base: str = "standard_normal",
                 base_args: dict | None = None, hidden: tuple = (100, 100), truncation: int = 100,
                 batch_normalizer: int = 1024, ema: float = 0.99, n_normalizer: int = 100_000):
        super().__init__(latent_dim)
        if truncation < 1 or batch_normalizer < 2 or n_normalizer < 2 or not 0 <= ema < 1:
            raise PriorError(f"resampled: need truncation >= 1, batch_normalizer >= 2, "
                             f"n_normalizer >= 2 and 0 <= ema < 1; got {truncation}, "
                             f"{batch_normalizer}, {n_normalizer}, {ema}")
        try:
            self.base = build_prior(base, latent_dim=latent_dim, **(base_args or {}))
        except PriorError as exc:
            raise PriorError(f"resampled: base = {base!r}: {exc}") from None
        widths = [latent_dim, *hidden]
        layers = [m for a, b in zip(widths, widths[1:], strict=False)
                  for m in (nn.Linear(a, b), nn.Tanh())]
        self.logit = nn.Sequential(*layers, nn.Linear(widths[-1], 1))
        nn.init.zeros_(self.logit[-1].weight)  # a(z) constant at the start: p = pi exactly
        nn.init.zeros_(self.logit[-1].bias)
        self.truncation, self.batch_normalizer = int(truncation), int(batch_normalizer)
        self.ema, self.n_normalizer = float(ema), int(n_normalizer)
        self.register_buffer("z_average", torch.tensor(-1.0))  # < 0: no average yet

    def log_accept(self, z: torch.Tensor) -> torch.Tensor:
        """log a(z): (B, D) -> (B,)."""
        return nn.functional.logsigmoid(self.logit(z)).squeeze(-1)

    def normalizer(self) -> tuple[torch.Tensor, float]:
        """(Z, standard error of log Z) as ``log_prob`` uses it now (see the module text)."""
        if self.in_training_step():
            a = self.log_accept(self.base.sample(self.batch_normalizer)).exp()
            z_batch = a.mean()
            with torch.no_grad():  # torch.where, not `if`: no host sync per step
                avg = self.z_average
                new = torch.where(avg < 0, z_batch, self.ema * avg + (1 - self.ema) * z_batch)
                self.z_average.copy_(new)
            return z_batch + (new - z_batch).detach(), math.nan
        cache = self.frozen_cache
        if cache is not None and "normalizer" in cache:
            return cache["normalizer"]
        total, total_sq = 0.0, 0.0
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            torch.manual_seed(0)  # the same estimate every time; the caller's RNG untouched
            for start in range(0, self.n_normalizer, 100_000):
                m = min(100_000, self.n_normalizer - start)
                a = self.log_accept(self.base.sample(m)).exp().double()
                total, total_sq = total + a.sum().item(), total_sq + (a * a).sum().item()
        mean = total / self.n_normalizer
        var = max(total_sq / self.n_normalizer - mean * mean, 0.0)
        out = (torch.tensor(mean, device=self.device, dtype=self.dtype),
               math.sqrt(var / self.n_normalizer) / mean)
        if cache is not None:
            cache["normalizer"] = out
        return out

    def log_normalizer_stderr(self) -> float:
        with torch.no_grad():
            was = self.training
            self.eval()
            try:
                return self.normalizer()[1]
            finally:
                self.train(was)

    def sampler_report(self) -> dict[str, float]:
        """``truncation_share``: the expected share of samples that are the T-th, unfiltered
        proposal, (1 - Z)^(T - 1) with the evaluation estimate of Z; and ``truncation`` (T)."""
        with torch.no_grad():
            was = self.training
            self.eval()
            try:
                zn = float(self.normalizer()[0])
            finally:
                self.train(was)
        share = (1.0 - min(max(zn, 0.0), 1.0)) ** (self.truncation - 1)
        return {"truncation_share": share, "truncation": float(self.truncation)}

    def _log_prob(self, z: torch.Tensor) -> torch.Tensor:
        zn, _ = self.normalizer()
        zn = zn.clamp(1e-12, 1.0)
        # log(1 - alpha_T) = (T - 1) log(1 - Z);  log alpha_T = log(1 - (1 - Z)^(T - 1))
        log_rest = (self.truncation - 1) * torch.log1p(-zn.clamp_max(1 - 1e-7))
        if self.truncation > 1:
            log_alpha = torch.log(-torch.expm1(log_rest))
        else:  # T = 1: the first proposal is always taken, p = pi
            log_alpha = log_rest - math.inf
        mix = torch.logaddexp(log_alpha + self.log_accept(z) - torch.log(zn), log_rest)
        return self.base.log_prob(z) + mix

    def _sample(self, n: int) -> torch.Tensor:
        out = torch.empty(n, self.latent_dim, device=self.device, dtype=self.dtype)
        todo = torch.arange(n, device=self.device)
        for t in range(self.truncation):
            z = self.base.sample(len(todo))
            if t == self.truncation - 1:  # the last proposal is taken whatever a(z)
                out[todo] = z
                break
            accept = torch.rand(len(todo), device=self.device) < self.log_accept(z).exp()
            out[todo[accept]] = z[accept]
            todo = todo[~accept]
            if len(todo) == 0:
                break
        return out

    def extra_repr(self) -> str:
        return f"latent_dim={self.latent_dim}, truncation={self.truncation}"
