"""The published reference for MNIST grey levels in bits/dim, evaluated here: the BB-ANS
authors' shipped one-layer VAE (Townsend, Bird & Barber 2019, "Practical lossless compression
with latent variables using bits back coding", table 2: negative test ELBO 1.39 bits/dim on full
MNIST). A 784-200-50 MLP with BatchNorm and a beta-binomial likelihood over 0..255::

    git clone https://github.com/bits-back/bits-back
    python experiments/reference_bits_per_dim.py \
        bits-back/torch_vae/saved_params/torch_vae_beta_binomial_params ../shared/data --k 100

prints the negative ELBO (averaged over the K draws) and the IWAE bound with K samples, in
bits/dim over all 10,000 test images (BatchNorm in evaluation mode; z sampled from q, not set
to its mean as the authors' own ``test`` does). The weights are read with ``weights_only=True``.
"""

from __future__ import annotations

import argparse
import math

import torch
from torch import lgamma, nn
from torch.nn import functional as F
from torchvision import datasets

__all__ = ["BetaBinomialVAE", "evaluate"]


def beta_binomial_log_pmf(k, n, a, b):
    """log P(k | n, a, b) of the beta-binomial distribution."""
    return (lgamma(n + 1) + lgamma(k + a) + lgamma(n - k + b) + lgamma(a + b)
            - lgamma(k + 1) - lgamma(n - k + 1) - lgamma(n + a + b) - lgamma(a) - lgamma(b))


class BetaBinomialVAE(nn.Module):
    """The authors' ``torch_vae/tvae_beta_binomial.py`` model (same parameter names)."""

    def __init__(self, hidden_dim: int = 200, latent_dim: int = 50):
        super().__init__()
        self.register_buffer("prior_mean", torch.zeros(1))
        self.register_buffer("prior_std", torch.ones(1))
        self.register_buffer("n", torch.ones(100, 784) * 255.0)
        self.fc1, self.bn1 = nn.Linear(784, hidden_dim), nn.BatchNorm1d(hidden_dim)
        self.fc21, self.fc22 = nn.Linear(hidden_dim, latent_dim), nn.Linear(hidden_dim, latent_dim)
        self.bn21, self.bn22 = nn.BatchNorm1d(latent_dim), nn.BatchNorm1d(latent_dim)
        self.fc3, self.bn3 = nn.Linear(latent_dim, hidden_dim), nn.BatchNorm1d(hidden_dim)
        self.fc4 = nn.Linear(hidden_dim, 784 * 2)

    def encode(self, x):
        """x (B, 784) in 0..255 -> mean and standard deviation of q(z|x), each (B, 50)."""
        h = F.relu(self.bn1(self.fc1(x / 255.0)))
        return self.bn21(self.fc21(h)), torch.exp(self.bn22(self.fc22(h)))

    def decode(self, z):
        """z (B, 50) -> beta-binomial (alpha, beta), each (B, 784)."""
        a, b = torch.split(self.fc4(F.relu(self.bn3(self.fc3(z)))), 784, dim=1)
        return a.exp(), b.exp()


@torch.no_grad()
def evaluate(model: BetaBinomialVAE, x: torch.Tensor, k: int) -> tuple[float, float]:
    """(negative ELBO, IWAE bound with k samples) in bits/dim over x (N, 784) in 0..255."""
    elbo, iwae = [], []
    for batch in x.split(100):
        mu, std = model.encode(batch)
        q = torch.distributions.Normal(mu, std)
        z = q.sample((k,))  # (k, B, 50)
        a, b = model.decode(z.flatten(0, 1))
        log_px = beta_binomial_log_pmf(batch.repeat(k, 1), torch.full_like(a, 255.0), a, b)
        log_w = (log_px.sum(1).view(k, -1) + torch.distributions.Normal(0.0, 1.0).log_prob(z)
                 .sum(-1) - q.log_prob(z).sum(-1))  # (k, B)
        elbo.append(log_w.mean(0))
        iwae.append(torch.logsumexp(log_w, 0) - math.log(k))
    bits = 784 * math.log(2)
    return -torch.cat(elbo).mean().item() / bits, -torch.cat(iwae).mean().item() / bits


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("params", help="torch_vae_beta_binomial_params from bits-back/bits-back")
    p.add_argument("root", help="data root holding MNIST/raw (torchvision layout)")
    p.add_argument("--k", type=int, default=100, help="importance samples (default 100)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.manual_seed(args.seed)
    model = BetaBinomialVAE()
    model.load_state_dict(torch.load(args.params, map_location="cpu", weights_only=True))
    model.eval()
    x = datasets.MNIST(args.root, train=False, download=False).data.view(-1, 784).float()
    elbo, iwae = evaluate(model, x, args.k)
    print(f"{len(x)} test images: -ELBO {elbo:.4f} bits/dim, IWAE (K = {args.k}) {iwae:.4f} "
          f"bits/dim")


if __name__ == "__main__":
    main()
