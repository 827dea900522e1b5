"""Aggregated-posterior log-density throughput against a naive version and the matmul roofline.

log q(z) for ``--points`` points against ``--components`` diagonal Gaussians in D dimensions
(default 10,000 x 50,000 x 40, posteriors shaped like a trained MNIST encoder's). In one run:

- ``matmul``: the machine's float32 matrix-multiply rate (a square 2048 product, best of 5);
  the roofline time is the mixture's 2 * points * components * (2D + 1) flops at that rate;
- ``priorvae``: ``AggregatedPosterior.log_prob`` (tiled matrix product + clamped logsumexp);
- ``naive``: the (B, N, D) broadcast of (z - mu)^2 / var and ``torch.logsumexp``, chunked over
  points to the same memory budget (unchunked it would need points * components * D * 4 bytes).

Each method runs in a fresh child process, so the peak resident memory it reports is its own.
One JSON line per measurement.

    python benchmarks/aggregate_throughput.py [--points 10000] [--components 50000] [--dim 40]
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import resource
import time

import torch

from priorvae.aggregate import AggregatedPosterior
from priorvae.gaussian import LOG_2PI


def make_inputs(points: int, components: int, dim: int):
    gen = torch.Generator().manual_seed(0)
    mu = torch.randn(components, dim, generator=gen)
    logvar = -2.0 + 0.3 * torch.randn(components, dim, generator=gen)
    z = mu[torch.randint(components, (points,), generator=gen)] + 0.5 * torch.randn(
        points, dim, generator=gen)
    return z, mu, logvar


def naive_log_prob(z, mu, logvar, max_elements: int) -> torch.Tensor:
    """Broadcast (rows, N, D) in chunks of rows; what one writes first."""
    rows = max(1, max_elements // (mu.shape[0] * mu.shape[1]))
    out = []
    for s in range(0, len(z), rows):
        d = z[s:s + rows, None, :] - mu[None]
        logn = -0.5 * (LOG_2PI + logvar[None] + d**2 / logvar.exp()[None]).sum(-1)
        out.append(torch.logsumexp(logn, -1) - math.log(mu.shape[0]))
    return torch.cat(out)


def matmul_rate(n: int = 2048) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = math.inf
    for _ in range(5):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def _child(method, args, queue):
    torch.set_num_threads(args.threads)
    z, mu, logvar = make_inputs(args.points, args.components, args.dim)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if method == "matmul":
        queue.put({"flops_per_s": matmul_rate()})
        return
    if method == "priorvae":
        q = AggregatedPosterior(mu, logvar, max_elements=args.budget)
        q.log_prob(z[:200])  # warm-up
        t0 = time.perf_counter()
        out = q.log_prob(z)
    else:
        naive_log_prob(z[:20], mu, logvar, args.budget)
        t0 = time.perf_counter()
        out = naive_log_prob(z, mu, logvar, args.budget)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    ref = AggregatedPosterior(mu.double(), logvar.double()).log_prob(z[:200].double())
    queue.put({"seconds": seconds, "extra_peak_rss_mb": round((peak - base) / 1024, 1),
               "max_abs_err_vs_float64": float((out[:200].double() - ref).abs().max())})


def run(method, args) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(method, args, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--points", type=int, default=10_000)
    p.add_argument("--components", type=int, default=50_000)
    p.add_argument("--dim", type=int, default=40)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--budget", type=int, default=2**24,
                   help="max elements of a block held at once (both methods)")
    args = p.parse_args()
    flops = 2 * args.points * args.components * (2 * args.dim + 1)
    rate = run("matmul", args)["flops_per_s"]
    roofline = flops / rate
    common = {"points": args.points, "components": args.components, "dim": args.dim,
              "threads": args.threads, "budget_elements": args.budget,
              "budget_mb": args.budget * 4 / 2**20}
    print(json.dumps({"bench": "matmul_rate", "gflops": round(rate / 1e9, 1),
                      "roofline_s": round(roofline, 3), **common}), flush=True)
    for method in ("priorvae", "naive"):
        r = run(method, args)
        print(json.dumps({"bench": "aggregate_log_prob", "method": method,
                          "seconds": round(r["seconds"], 3),
                          "x_roofline": round(r["seconds"] / roofline, 2),
                          "points_per_s": round(args.points / r["seconds"]),
                          "extra_peak_rss_mb": r["extra_peak_rss_mb"],
                          "max_abs_err_vs_float64": round(r["max_abs_err_vs_float64"], 6),
                          **common}), flush=True)


if __name__ == "__main__":
    main()
