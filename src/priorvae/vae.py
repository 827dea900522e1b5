"""The VAE: encoder + decoder + any prior, one ELBO for all priors.

With q(z|x) = N(mu(x), diag(exp(logvar(x)))), z = mu + sigma * eps, the single-sample ELBO is

    ELBO(x) = log p(x|z) - [log q(z|x) - log p(z)]

(the bracket is the Monte-Carlo KL). The VAE never asks which prior, likelihood or networks
it has: it only calls ``prior.log_prob`` (once per step), ``prior.sample``,
``likelihood.log_prob`` (log p(x|z), :mod:`priorvae.likelihoods`) and ``likelihood.mean``.
The importance-weighted bound

    IWAE_k(x) = logsumexp_i [log p(x|z_i) + log p(z_i) - log q(z_i|x)] - log k,  z_i ~ q(z|x)

is computed in chunks over k so that k = 5000 fits in memory.

References:
    | Auto-Encoding Variational Bayes (Kingma & Welling, 2014) https://arxiv.org/abs/1312.6114
    | Importance Weighted Autoencoders (Burda et al., 2016) https://arxiv.org/abs/1509.00519
"""

from __future__ import annotations

import contextlib
import math

import torch
from einops import rearrange, repeat
from torch import nn

from .config import Config
from .errors import PriorError
from .gaussian import LOG_2PI
from .likelihoods import Likelihood, build_likelihood
from .networks import build_networks
from .priors import PriorContext, build_prior, get_prior_class

__all__ = ["VAE", "build_vae", "likelihood_spec", "network_spec"]


def _full(t: torch.Tensor) -> torch.Tensor:
    """float32 for half-precision tensors (autocast outputs); others unchanged."""
    return t.float() if t.dtype in (torch.bfloat16, torch.float16) else t


class VAE(nn.Module):
    """Encoder, decoder, prior and likelihood.

    Args:
        encoder: x (B, ...) -> (mu, logvar), each (B, D).
        decoder: z (B, D) -> likelihood parameters (B, ...).
        prior: a :class:`~priorvae.registry.Prior` (``log_prob(z) -> (B,)``,
            ``sample(n) -> (n, D)``).
        likelihood: a :class:`~priorvae.likelihoods.Likelihood` (``log_prob(out, x) -> (B,)``,
            ``mean``, ``sample``, ``prepare``).
    """

    def __init__(self, encoder: nn.Module, decoder: nn.Module, prior: nn.Module,
                 likelihood: Likelihood):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.prior = prior
        self.likelihood = likelihood

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior parameters (mu, logvar), each (B, D)."""
        return self.encoder(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Decoder output, the likelihood's parameters: (B, D) -> (B, ...)."""
        return self.decoder(z)

    def forward(self, x: torch.Tensor, index: torch.Tensor | None = None
                ) -> dict[str, torch.Tensor]:
        """Per-image terms of the single-sample ELBO, each (B,): ``recon`` = log p(x|z),
        ``kl`` = log q(z|x) - log p(z), ``elbo`` = recon - kl.

        ``index`` (B,): the images' positions in the training split, given by the trainer so
        that a prior made of training images never scores an image with itself.

        Under bf16 autocast only the networks' matrix products run in bf16: z, log q(z|x),
        the prior's log-density and the likelihood are computed in float32.
        """
        mu, logvar = (_full(t) for t in self.encode(x))
        eps = torch.randn_like(mu)
        z = mu + torch.exp(0.5 * logvar) * eps
        recon = self.likelihood(_full(self.decode(z)), x)
        # log q(z|x) at z = mu + sigma*eps is exactly -1/2 sum(log 2pi + logvar + eps^2)
        log_q = -0.5 * (LOG_2PI + logvar + eps**2).sum(-1)
        # log_prob(z) unless images are to be left out: a prior that overrides the public
        # log_prob(z), as a torch.distributions user would, trains too
        args = {} if index is None else {"exclude": index}
        if torch.is_autocast_enabled(z.device.type):
            with torch.autocast(z.device.type, enabled=False):
                log_p = self.prior.log_prob(z, **args)
        else:
            log_p = self.prior.log_prob(z, **args)
        kl = log_q - log_p
        return {"recon": recon, "kl": kl, "elbo": recon - kl}

    @torch.no_grad()
    def elbo(self, x: torch.Tensor) -> torch.Tensor:
        """Single-sample ELBO per image (B,), in nats."""
        return self(x)["elbo"]

    @torch.no_grad()
    def iwae(self, x: torch.Tensor, k: int, max_elements: int = 2**21) -> torch.Tensor:
        """Importance-weighted bound on log p(x) with k samples per image: (B,), in nats.

        Chunked over k so that no decoder output holds more than ``max_elements`` numbers
        (2**21 floats = 8 MB: the chunk's elementwise passes stay in cache; 2**23 was 1.6x
        slower on a 2-core CPU).
        """
        return self.iwae_priors(x, k, [self.prior], max_elements)[0]

    @torch.no_grad()
    def iwae_priors(self, x: torch.Tensor, k: int, priors: list[nn.Module],
                    max_elements: int = 2**21) -> torch.Tensor:
        """IWAE_k(x) of this encoder and decoder under each of ``priors`` (S of them): (S, B).

        The k draws z_i ~ q(z|x), log p(x|z_i) and log q(z_i|x) are shared, so the decoder
        (nearly all of the cost) runs once however many priors are scored, and row s is
        exactly what :meth:`iwae` gives with ``priors[s]`` from the same random state: the
        same noise, the same arithmetic. Comparing ex-post priors on one VAE this way also
        uses common random numbers, so their differences carry less Monte-Carlo noise.
        """
        if k < 1:
            raise ValueError(f"k must be positive, got {k}")
        with contextlib.ExitStack() as stack:
            for prior in priors:
                stack.enter_context(prior.frozen())
            return self._iwae(x, k, max_elements, priors)

    def _iwae(self, x: torch.Tensor, k: int, max_elements: int,
              priors: list[nn.Module]) -> torch.Tensor:
        mu, logvar = self.encode(x)
        b, d = mu.shape
        std = torch.exp(0.5 * logvar)
        pixels = x[0].numel()
        chunk = max(1, min(k, max_elements // max(1, b * pixels)))
        log_w: list[list[torch.Tensor]] = [[] for _ in priors]
        for start in range(0, k, chunk):
            c = min(chunk, k - start)
            eps = torch.randn(c, b, d, device=mu.device, dtype=mu.dtype)
            z = rearrange(mu + std * eps, "c b d -> (c b) d")
            xs = repeat(x, "b ... -> (c b) ...", c=c)
            log_px = self.likelihood(self.decode(z), xs)
            log_q = rearrange(-0.5 * (LOG_2PI + logvar + eps**2).sum(-1), "c b -> (c b)")
            for rows, prior in zip(log_w, priors, strict=True):
                rows.append(rearrange(log_px + prior.log_prob(z) - log_q, "(c b) -> c b", c=c))
        return torch.stack([torch.logsumexp(torch.cat(rows), dim=0) for rows in log_w]) \
            - math.log(k)

    @torch.no_grad()
    def sample(self, n: int) -> torch.Tensor:
        """Means of n items decoded from prior samples (pixel probabilities): (n, ...)."""
        return self.likelihood.mean(self.decode(self.prior.sample(n)))

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Decoded posterior means (pixel probabilities): (B, ...)."""
        return self.likelihood.mean(self.decode(self.encode(x)[0]))


def likelihood_spec(cfg: Config) -> tuple[str, str | None, dict]:
    """(name, the file's sha256 for a file spec, arguments) of ``[likelihood]``."""
    t = cfg.likelihood
    return t.name, t.file_sha256, dict(t.kwargs)


def network_spec(cfg: Config) -> tuple[str, str | None, dict]:
    """(name, the file's sha256 for a file spec, arguments) of ``[network]``."""
    t = cfg.network
    return t.name, t.file_sha256, dict(t.kwargs)


def build_vae(cfg: Config, input_shape, data: torch.Tensor | None = None,
              training: bool = False) -> VAE:
    """Likelihood (``[likelihood]``), encoder and decoder (``[network]``, ``[model]``; their
    output width from the likelihood; ``training``: refused unless there is memory to train
    them here) and prior (``[prior]``, given the encoder as context)."""
    input_shape = tuple(input_shape)
    name, sha, kwargs = likelihood_spec(cfg)
    likelihood = build_likelihood(name, input_shape, sha256=sha, **kwargs)
    name, sha, kwargs = network_spec(cfg)
    encoder, decoder = build_networks(name, input_shape, cfg.model.latent_dim,
                                      likelihood.out_channels(input_shape[0]),
                                      cfg.model.logvar_min, cfg.model.logvar_max, sha256=sha,
                                      training=training, **kwargs)
    if data is None:  # restoring: priors that initialise from data get a placeholder
        if get_prior_class(cfg.prior.name, cfg.prior.file_sha256).needs_data:
            raise PriorError(f"prior {cfg.prior.name!r} is made of the training images: "
                             f"build it with data=the training split (Run.build_model does)")
        data = torch.zeros(1, *input_shape)
    context = PriorContext(encoder=encoder, input_shape=input_shape, data=data,
                           likelihood=likelihood)
    prior = build_prior(cfg.prior.name, latent_dim=cfg.model.latent_dim, context=context,
                        file_sha256=cfg.prior.file_sha256, **cfg.prior.kwargs)
    return VAE(encoder, decoder, prior, likelihood)
