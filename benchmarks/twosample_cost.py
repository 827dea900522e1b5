"""Cost of the two-sample measures against the existing diagnostics, timed in one run.

The MNIST evaluation's shapes, D = 40: an aggregated posterior of 50,000 training codes,
10,000 held-out codes, 10,000 prior samples. "existing" is what ``diagnose`` computed before
the two-sample measures (ELBO surgery, KL(p || q), hole rate, MMD on 2,000, active units);
"two-sample" is the k-NN precision/recall/density/coverage and the classifier test on
10,000 vs 10,000 points. Synthetic codes (posteriors spread around N(0, I)), so no model or
data is needed. The contenders alternate (A B C A B C ...) for ``--reps`` rounds after one
warm-up round, so a load change on the machine hits all of them; medians are printed and
appended as one JSON line to ``results_twosample.jsonl``.

    python benchmarks/twosample_cost.py [--reps 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from priorvae.aggregate import AggregatedPosterior
from priorvae.diagnostics import active_units, elbo_surgery, hole_rate, kl_prior_to_agg, mmd
from priorvae.priors import build_prior
from priorvae.twosample import classifier_two_sample, knn_two_sample


def existing(prior, mu, lv, mu_te, lv_te, n):
    agg = AggregatedPosterior(mu, lv)
    elbo_surgery(mu, lv, prior, n_points=n)
    kl_prior_to_agg(prior, agg, n)
    hole_rate(prior, agg, mu_te, lv_te, n)
    mmd(prior.sample(2000), agg.sample(2000))
    active_units(mu_te)


def two_sample(prior, mu_te, lv_te, n):
    real = mu_te + torch.exp(0.5 * lv_te) * torch.randn_like(mu_te)
    fake = prior.sample(n)
    knn_two_sample(real, fake)
    classifier_two_sample(fake, real)


def alternating(contenders: dict, reps: int) -> dict[str, list[float]]:
    times = {name: [] for name in contenders}
    for rnd in range(reps + 1):  # round 0 warms up and is not counted
        for name, fn in contenders.items():
            t0 = time.perf_counter()
            fn()
            if rnd > 0:
                times[name].append(time.perf_counter() - t0)
    return times


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--n-train", type=int, default=50_000)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    d = 40
    prior = build_prior("standard_normal", latent_dim=d)
    mu, lv = torch.randn(args.n_train, d) * 0.9, torch.full((args.n_train, d), -3.0)
    mu_te, lv_te = torch.randn(args.n, d) * 0.9, torch.full((args.n, d), -3.0)
    times = alternating({
        "existing": lambda: existing(prior, mu, lv, mu_te, lv_te, args.n),
        "two_sample": lambda: two_sample(prior, mu_te, lv_te, args.n),
        "knn_only": lambda: knn_two_sample(mu_te, prior.sample(args.n)),
    }, args.reps)
    t_old, t_new, t_knn = (statistics.median(times[k]) for k in ("existing", "two_sample",
                                                                  "knn_only"))
    all_old, all_new = times["existing"], times["two_sample"]
    row = {"benchmark": "twosample_cost", "threads": args.threads, "n": args.n,
           "n_train": args.n_train, "latent_dim": d, "existing_s": t_old, "two_sample_s": t_new,
           "knn_only_s": t_knn, "ratio_two_sample_to_existing": t_new / t_old,
           "existing_all": all_old, "two_sample_all": all_new, "torch": torch.__version__}
    print(f"existing diagnostics        {t_old:7.2f} s")
    print(f"two-sample (k-NN + C2ST)    {t_new:7.2f} s   ({t_new / t_old:.2f}x the existing)")
    print(f"  of which k-NN measures    {t_knn:7.2f} s")
    with open(Path(__file__).with_name("results_twosample.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
