"""Exemplar prior: a mixture of Gaussians centred at the encodings of training images.

    p(z) = 1/N sum_n N(z; mu(x_n), sigma^2 I)

over N exemplars x_n (training images, prepared once by the VAE's likelihood: binarized with
seed 0 for Bernoulli) encoded by the VAE's own encoder, with
one learnable shared variance sigma^2. In a training step (leave-one-out) an image never
scores itself: its own component is left out, so the prior cannot collapse onto the training
codes; and a random subset of M exemplars stands in for all N (the paper also uses nearest
neighbours), so a step encodes M images, not N. Outside training steps all N exemplars are
used through the tiled mixture density (:func:`priorvae.gaussian.mixture_log_prob`), their
encodings computed once per ``frozen()`` block. The prior keeps the exemplars' *indices* into
the training split (a buffer, saved with the weights), never the images: a restored run
rebuilds the same exemplar set from the same data. Fitted ex-post (``fit-prior --prior
exemplar``) with a frozen encoder it is the aggregated posterior's means with one fitted
variance, fitted by leave-one-out likelihood.

References:
    | Exemplar VAE: Linking Generative Models, Nearest Neighbor Retrieval, and Data
    | Augmentation (Norouzi, Fleet & Norouzi, 2020) https://arxiv.org/abs/2004.04795
"""

import math

import torch
from torch import nn

from priorvae.aggregate import mixture_evaluation_limits
from priorvae.errors import PriorError
from priorvae.gaussian import LOG_2PI, logsumexp, mixture_log_prob
from priorvae.likelihoods import prepare_once
from priorvae.priors.base import Prior, register_prior

__all__ = ["ExemplarPrior"]


@register_prior("exemplar")
class ExemplarPrior(Prior):
    """Uniform mixture of N(mu(x_n), sigma^2 I) over exemplars x_n of the training split.

    Args:
        latent_dim: D.
        encoder: x (B, C, H, W) -> (mu, logvar) (build context; the VAE's encoder).
        data: training images (N, C, H, W) as loaded (build context).
        likelihood: the VAE's likelihood (build context), which prepares the images once
            (``prepare_fixed``, seed 0) as the model sees them.
        n_exemplars: how many training images serve as exemplars (a random subset, drawn
            once); None: all of them.
        subset: M, exemplars per training step (a fresh random subset each step).
        init_logvar: log sigma^2 at the start.
    """

    needs_data = True

    def __init__(self, latent_dim: int, encoder: nn.Module, data: torch.Tensor,
                 likelihood: nn.Module, n_exemplars: int | None = None, subset: int = 500,
                 init_logvar: float = -2.0):
        super().__init__(latent_dim)
        n = len(data)
        if n < 2:  # leave-one-out would leave the one image no exemplar: a NaN loss
            raise PriorError(f"exemplar: needs at least 2 training images, the data set has {n}")
        if n_exemplars is not None and not 2 <= n_exemplars <= n:
            raise PriorError(f"exemplar: n_exemplars must be in [2, {n}] (the training images), "
                             f"got {n_exemplars}")
        if subset < 2:  # with one, leave-one-out could leave an image no exemplar at all
            raise PriorError(f"exemplar: subset must be at least 2, got {subset}")
        self.encoder = encoder
        self.subset = int(subset)
        index = (torch.arange(n) if n_exemplars is None
                 else torch.randperm(n)[:n_exemplars].sort().values)
        self.register_buffer("index", index)  # the exemplar set: saved, so a restore rebuilds it
        self.register_buffer("n_data", torch.tensor(n))
        # prepared once with a fixed seed (the same images every time), binary ones stored as
        # bytes; not part of the state_dict: the images come from the data, not the checkpoint
        images = prepare_once(likelihood, data.float(), 0)
        if bool(((images == 0) | (images == 1)).all()):
            images = images.to(torch.uint8)
        self.register_buffer("images", images, persistent=False)
        self.logvar = nn.Parameter(torch.tensor(float(init_logvar)))

    @property
    def evaluation_limits(self) -> dict | None:
        return mixture_evaluation_limits(len(self.index))  # as q(z): one component per image

    def _check_data(self) -> None:
        if len(self.images) != int(self.n_data):
            raise PriorError(f"exemplar: this prior was built on {int(self.n_data)} training "
                             f"images, but {len(self.images)} were given to rebuild it")

    def encode(self, positions: torch.Tensor) -> torch.Tensor:
        """Encoder means of the exemplars at ``positions`` (into the exemplar set): (M, D)."""
        self._check_data()
        x = self.images[self.index[positions]].to(self.dtype)
        return self.encoder(x)[0]

    def means(self) -> torch.Tensor:
        """All N exemplar encodings (N, D); computed once inside ``frozen()``."""
        cache = self.frozen_cache
        if cache is not None and "means" in cache:
            return cache["means"]
        positions = torch.arange(len(self.index), device=self.index.device)
        out = torch.cat([self.encode(p) for p in positions.split(1000)])
        if cache is not None:
            cache["means"] = out
        return out

    def _log_prob(self, z: torch.Tensor, exclude: torch.Tensor | None = None) -> torch.Tensor:
        n = len(self.index)
        if not self.in_training_step():
            means = self.means()
            logvars = self.logvar.expand_as(means)
            if exclude is None:
                return mixture_log_prob(z, means, logvars)
            positions = torch.arange(n, device=z.device)
        else:
            positions = torch.randperm(n, device=z.device)[:self.subset]
            means = self.encode(positions)
        # log N(z; m, s^2 I) for every (code, exemplar) pair: (B, M)
        means = means.to(z.dtype)
        sq = (z * z).sum(1, keepdim=True) - 2 * z @ means.T + (means * means).sum(1)
        log_comp = -0.5 * (self.latent_dim * (LOG_2PI + self.logvar)
                           + sq.clamp_min(0) * torch.exp(-self.logvar))
        m = len(positions)
        if exclude is not None:  # leave-one-out: an image's own exemplar scores -inf
            own = self.index[positions][None, :] == exclude[:, None]
            log_comp = log_comp.masked_fill(own, -math.inf)
            m = m - own.sum(1)  # (B,)
            return logsumexp(log_comp, dim=1) - torch.log(m.to(z.dtype))
        return logsumexp(log_comp, dim=1) - math.log(m)

    def _sample(self, n: int) -> torch.Tensor:
        k = torch.randint(len(self.index), (n,), device=self.index.device)
        cache = self.frozen_cache
        mu = cache["means"][k] if cache is not None and "means" in cache else self.encode(k)
        return mu + torch.exp(0.5 * self.logvar) * torch.randn_like(mu)

    def extra_repr(self) -> str:
        return f"latent_dim={self.latent_dim}, exemplars={len(self.index)}, subset={self.subset}"
