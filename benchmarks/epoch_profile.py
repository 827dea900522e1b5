"""Where one protocol epoch of MNIST goes: the step's matrix products against everything else.

The configuration of ``experiments/mnist_full.toml`` (gated MLP 300-300, z = 40, batch 100,
AdamNormGrad 5e-4), per prior with its ``[compare.args]``: the real training step
(``priorvae.train.train_step`` on ``local_batches``: dynamic binarization, ELBO, backward,
gradient normalisation, fused Adam), the validation ELBO on the 10,000 validation images,
the end-of-epoch bookkeeping (``last.pt``, metrics.json, TensorBoard scalars) and the
every-N-epochs work (image grids, diagnostics) amortised over its cadence.

Printed per prior and thread count (one JSON line each, appended to
``results_epoch_profile.jsonl``):

- ``step_ms``: median training step; ``epoch_s``: the epoch it implies (500 steps) plus
  validation and bookkeeping;
- the step split by ``torch.profiler`` self times into matrix products (``mm``, ``addmm``,
  ``bmm``), the optimizer (fused Adam), the gradient normalisation (norms and divisions),
  binarization (``uniform_`` and the comparison) and the rest (elementwise ops, autograd);
- ``roofline_ms``: the step's matrix-product FLOPs (counted by the profiler) at this
  machine's float32 matmul rate, measured in the same run on (1024 x 1024) products;
- the prior's own share: the step with the prior against the N(0, I) step of the same run.

Both sides alternate: every round runs every prior once, ``--reps`` rounds after a warm-up;
medians are printed. CPU time (``time.process_time``) is printed beside wall time: on a shared
machine, one thread's CPU time is the less noisy of the two.

    OMP_NUM_THREADS=1 python benchmarks/epoch_profile.py --threads 1 2 --reps 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from priorvae.config import load_config
from priorvae.data import load_splits
from priorvae.distributed import DistEnv
from priorvae.likelihoods import build_likelihood, prepare_splits
from priorvae.train import epoch_order, global_mean_elbo, local_batches, make_optimizer, train_step
from priorvae.vae import build_vae, likelihood_spec

REPO = Path(__file__).resolve().parents[1]
MATMUL = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addmv", "aten::mv"}
OPTIM = {"aten::_fused_adam_", "Optimizer.step#Adam.step"}
GRADNORM = {"aten::linalg_vector_norm", "aten::_foreach_norm", "aten::_foreach_add_",
            "aten::_foreach_div_", "aten::div_"}
BINARIZE = {"aten::uniform_", "aten::lt", "aten::rand"}


def timed(fn, n: int = 1) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of ``n`` calls of ``fn``."""
    w, c = time.perf_counter(), time.process_time()
    for _ in range(n):
        fn()
    return time.perf_counter() - w, time.process_time() - c


def matmul_rate(reps: int = 5) -> float:
    """float32 GFLOP/s of a (1024 x 1024) @ (1024 x 1024) product, best of ``reps`` (wall
    time, or CPU time per thread where that is shorter: the machine is shared)."""
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    a @ b
    threads = torch.get_num_threads()
    best = min(min(w, c / threads) / 4 for w, c in (timed(lambda: a @ b, 4) for _ in range(reps)))
    return 2 * 1024**3 / best / 1e9


class Cell:
    """One prior's model, optimizer and batch stream (batches of epoch 1, cycled)."""

    def __init__(self, prior: str, config: str, root: str, splits):
        cfg = load_config(config, [f"data.root={json.dumps(root)}", "data.download=false"])
        kwargs = cfg.extra.get("compare", {}).get("args", {}).get(prior, {})
        sets = [f"prior.name={prior}", *(f"prior.{k}={json.dumps(v)}" for k, v in kwargs.items())]
        self.cfg = cfg = load_config(config, [f"data.root={json.dumps(root)}",
                                              "data.download=false", *sets])
        torch.manual_seed(0)
        self.splits = splits
        self.model = build_vae(cfg, splits.input_shape, data=splits.x_train).train()
        self.opt = make_optimizer(self.model.parameters(), cfg.train.lr)
        self.needs_index = getattr(self.model.prior, "needs_data", False)
        self.order = epoch_order(len(splits.x_train), 0, 1, torch.device("cpu"))
        self.batches = iter(())

    def step(self):
        try:
            x, n, idx = next(self.batches)
        except StopIteration:
            self.batches = local_batches(self.splits.x_train, self.order,
                                         self.cfg.train.batch_size, DistEnv(),
                                         self.model.likelihood.prepare)
            x, n, idx = next(self.batches)
        self.model.train()
        return train_step(self.model, self.opt, x, 0.5, n, self.cfg.train.grad_norm == "unit",
                          False, None, idx if self.needs_index else None)

    def validate(self):
        self.model.eval()
        global_mean_elbo(self.model, self.splits.x_val, self.cfg.train.val_batch_size,
                         DistEnv(), torch.device("cpu"))

    def bookkeeping(self, folder: Path):
        """What ``_end_of_epoch`` writes every epoch: last.pt (model, Adam state, RNG)."""
        from priorvae.runs import save_checkpoint

        save_checkpoint(folder / "last.pt", {"model": self.model.state_dict(),
                                             "optimizer": self.opt.state_dict(),
                                             "rng_cpu": torch.get_rng_state()})

    def periodic(self, classifier) -> dict:
        """Seconds (wall, CPU) of the image grids and of the diagnostics, as ``_end_of_epoch``
        runs them every ``image_every`` / ``diagnostics_every`` epochs."""
        from torch.utils.tensorboard import SummaryWriter

        from priorvae.train import _image_grid, _log_diagnostics

        self.model.eval()
        with tempfile.TemporaryDirectory() as d, SummaryWriter(log_dir=d) as writer:
            def images():
                with torch.random.fork_rng(devices=[]):
                    xs = self.splits.x_val[:32]
                    recon = torch.cat([xs, self.model.reconstruct(xs)])
                    writer.add_image("r", _image_grid(recon, 8), 0)
                    writer.add_image("s", _image_grid(self.model.sample(64), 8), 0)

            out = {"images": timed(images)}
            out["diagnostics"] = timed(lambda: _log_diagnostics(
                writer, self.model, self.splits, classifier, 0, torch.device("cpu")))
        return out

    def split(self, steps: int) -> dict:
        """Profiler self-time shares of ``steps`` steps, and their matrix-product FLOPs."""
        with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
            for _ in range(steps):
                self.step()
        groups = dict.fromkeys(("matmul", "optimizer", "gradnorm", "binarize", "other"), 0.0)
        flops = 0
        for ev in prof.key_averages():
            t = ev.self_cpu_time_total / 1e6
            key = ("matmul" if ev.key in MATMUL else "optimizer" if ev.key in OPTIM else
                   "gradnorm" if ev.key in GRADNORM else "binarize" if ev.key in BINARIZE
                   else "other")
            groups[key] += t
            if ev.key in MATMUL:
                flops += ev.flops
        total = sum(groups.values())
        return {"shares": {k: round(v / total, 3) for k, v in groups.items()},
                "matmul_gflop_per_step": round(flops / steps / 1e9, 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(REPO / "experiments" / "mnist_full.toml"))
    p.add_argument("--priors", nargs="+",
                   default=["standard_normal", "vampprior", "exemplar", "flow"])
    p.add_argument("--threads", nargs="+", type=int, default=[1])
    p.add_argument("--steps", type=int, default=40, help="timed steps per prior and round")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results_epoch_profile.jsonl"))
    args = p.parse_args()

    root = os.environ.get("PRIORVAE_DATA", str(REPO.parent / "shared" / "data"))
    cfg = load_config(args.config, [f"data.root={json.dumps(root)}", "data.download=false"])
    splits = load_splits(cfg.data)
    name, sha, kwargs = likelihood_spec(cfg)
    lik = build_likelihood(name, splits.input_shape, sha256=sha, **kwargs)
    splits = prepare_splits(splits, lik)  # validation and test, as train() prepares them
    cells = {name: Cell(name, args.config, root, splits) for name in args.priors}
    tmp = Path(tempfile.mkdtemp())
    steps_per_epoch = -(-len(splits.x_train) // cfg.train.batch_size)
    from priorvae.quality import classifier_cache_dir, get_classifier

    classifier = get_classifier(splits, classifier_cache_dir(), likelihood=lik)
    for threads in args.threads:
        torch.set_num_threads(threads)
        rate = matmul_rate()
        rec: dict[str, dict[str, list]] = {n: {} for n in cells}
        for rnd in range(args.reps + 1):  # round 0: warm-up, not counted
            for name, cell in cells.items():
                parts = {"step": timed(cell.step, args.steps),
                         "validation": timed(cell.validate),
                         "checkpoint": timed(lambda c=cell: c.bookkeeping(tmp))}
                if rnd:
                    for k, (w, c) in parts.items():
                        n = args.steps if k == "step" else 1
                        rec[name].setdefault(k + "_wall", []).append(w / n)
                        rec[name].setdefault(k + "_cpu", []).append(c / n)
        base = base_cpu = None
        for name, cell in cells.items():
            med = {k: statistics.median(v) for k, v in rec[name].items()}
            split = cell.split(10)
            roof = split["matmul_gflop_per_step"] / rate
            step = med["step_wall"]
            if base is None:
                base, base_cpu = step, med["step_cpu"]
            per = cell.periodic(classifier)
            every = {"images": cfg.train.image_every, "diagnostics": cfg.train.diagnostics_every}
            amortised = {k: per[k][0] / every[k] if every[k] else 0.0 for k in per}
            epoch = (step * steps_per_epoch + med["validation_wall"] + med["checkpoint_wall"]
                     + sum(amortised.values()))
            epoch_cpu = (med["step_cpu"] * steps_per_epoch + med["validation_cpu"]
                         + med["checkpoint_cpu"] + sum(per[k][1] / every[k] for k in per
                                                       if every[k]))
            out = {"bench": "epoch_profile", "prior": name, "threads": threads,
                   "reps": args.reps, "steps": args.steps, "matmul_gflops": round(rate, 1),
                   "step_ms": round(1e3 * step, 2),
                   "step_cpu_ms": round(1e3 * med["step_cpu"], 2),
                   "roofline_ms": round(1e3 * roof, 2),
                   "step_over_roofline": round(step / roof, 2),
                   "step_cpu_over_roofline": round(med["step_cpu"] / threads / roof, 2),
                   "step_over_standard_normal": round(step / base, 2),
                   "step_cpu_over_standard_normal": round(med["step_cpu"] / base_cpu, 2),
                   "validation_s": round(med["validation_wall"], 3),
                   "checkpoint_s": round(med["checkpoint_wall"], 3),
                   "epoch_s": round(epoch, 2),
                   "validation_share": round(med["validation_wall"] / epoch, 3),
                   "checkpoint_share": round(med["checkpoint_wall"] / epoch, 3),
                   "images_s": round(per["images"][0], 3),
                   "diagnostics_s": round(per["diagnostics"][0], 2),
                   "image_every": every["images"], "diagnostics_every": every["diagnostics"],
                   "periodic_share": round(sum(amortised.values()) / epoch, 3),
                   "epoch_cpu_s": round(epoch_cpu, 2),
                   **split, "torch": torch.__version__}
            print(json.dumps(out), flush=True)
            with open(args.out, "a") as f:
                f.write(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
