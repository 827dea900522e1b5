"""The two terms of KL(p || q) for prior sources of one run, with held-out codes as reference.

KL(p || q) = E_p[log p] - E_p[log q], with q the aggregated posterior of the training images
(a mixture of N posteriors). A prior can have a large KL(p || q) because its samples fall where
q is small (holes) or because it is sharper than q (a low entropy -E_p[log p]). This script
prints both terms, and the same two log-densities at held-out codes (one posterior sample of
each test image), which is where a prior that matched the population's q(z) would put its
samples. It only reads the run (shared lock) and writes nothing.

    PRIORVAE_DATA=../shared/data python experiments/kl_terms.py RUN_DIR \\
        --sources trained expost-flow --n 2000
"""

from __future__ import annotations

import argparse
import json

import torch

from priorvae.data import load_splits
from priorvae.expost import load_prior_source
from priorvae.likelihoods import prepare_splits
from priorvae.runs import AGGREGATE, Run, resolve_device


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir")
    ap.add_argument("--sources", nargs="+", default=["trained"])
    ap.add_argument("--n", type=int, default=2000, help="prior samples and held-out codes")
    ap.add_argument("--device")
    args = ap.parse_args()
    run = Run.open(args.run_dir)
    with run.lock("kl-terms", exclusive=False):
        dev = resolve_device(args.device or run.config.train.device)
        model = run.load_model("best", dev)
        splits = prepare_splits(load_splits(run.config.data, device=dev), model.likelihood)
        q = load_prior_source(run, model, AGGREGATE, splits)
        torch.manual_seed(run.config.train.seed)
        mu, logvar = model.encode(splits.x_test[:args.n])
        held_out = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)  # (n, D)
        with q.frozen():
            log_q_held_out = q.log_prob(held_out).mean().item()
            for source in args.sources:
                prior = load_prior_source(run, model, source, splits)
                with prior.frozen():
                    z = prior.sample(args.n)
                    log_p, log_q = prior.log_prob(z).mean().item(), q.log_prob(z).mean().item()
                    log_p_held_out = prior.log_prob(held_out).mean().item()
                print(json.dumps({
                    "source": source, "kl_p_q": round(log_p - log_q, 2),
                    "E_p_log_p": round(log_p, 2), "E_p_log_q": round(log_q, 2),
                    "held_out_log_q": round(log_q_held_out, 2),
                    "held_out_log_p": round(log_p_held_out, 2), "n": args.n}), flush=True)


if __name__ == "__main__":
    main()
