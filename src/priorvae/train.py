"""The training loop: :func:`train`, which reads top to bottom, and :func:`train_epoch`.

Adam, KL warm-up (beta = min(1, epoch / warmup_epochs), epochs counted from 1), validation
ELBO with beta = 1 after every epoch, best model kept, early stopping once ``patience`` epochs
after warm-up bring no improvement, an atomic checkpoint after every epoch (resume continues
from it bit for bit), TensorBoard scalars, image grids, diagnostics and the config, and a
progress bar. Under torchrun every process runs it; rank 0 alone owns the run folder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .config import Config, pin_plugins
from .data import load_splits
from .datasets import check_same_data, check_suits
from .distributed import DistEnv, all_reduce_sum, broadcast_object, teardown, world_size
from .distributed import setup as dist_setup
from .errors import ConfigError, PriorVAEError, RunBusyError, RunError, TrainingError
from .likelihoods import get_likelihood_class, prepare_splits
from .measure import diagnose, mean_elbo
from .runs import (
    CONFIG_FILE,
    EVALUATION_KEYS,
    FINISHED,
    Run,
    load_weights,
    read_regular,
    run_config_dict,
)
from .sanity import absurd, non_finite, warn
from .stop import check_stop
from .vae import VAE, build_vae, likelihood_spec

__all__ = ["train", "train_epoch", "TrainState", "train_step", "beta_at", "global_mean_elbo",
           "make_optimizer", "normalize_gradients", "epoch_order", "local_batches",
           "compile_forward", "check_joint"]


@dataclass
class TrainState:
    """Everything besides the weights, the optimizer and the RNG that a resumed run needs to
    continue exactly where it stopped (saved in ``last.pt`` under these names)."""

    epoch: int = 0  # the last finished epoch
    best_val: float = -math.inf  # best validation ELBO so far, and its epoch
    best_epoch: int = 0
    bad_epochs: int = 0  # epochs without improvement, counted after warm-up
    train_seconds: float = 0.0
    history: list[dict] = field(default_factory=list)

    @classmethod
    def from_checkpoint(cls, ckpt: dict) -> TrainState:
        return cls(**{f.name: ckpt[f.name] for f in dataclasses.fields(cls)})


def beta_at(epoch: int, warmup_epochs: int) -> float:
    """KL weight at ``epoch`` (1-based): rises linearly to 1 over ``warmup_epochs``."""
    return 1.0 if warmup_epochs <= 0 else min(1.0, epoch / warmup_epochs)


def make_optimizer(params, lr: float) -> torch.optim.Adam:
    """Adam, fused into one kernel per step where PyTorch supports it (float32 on CPU/CUDA):
    on 2 CPU cores the unfused step was a third of a training step."""
    params = list(params)
    fused = all(p.dtype == torch.float32 and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.Adam(params, lr=lr, fused=fused or None)


def normalize_gradients(params, eps: float = 1e-7) -> None:
    """AdamNormGrad (Tomczak & Welling's code): each parameter's gradient divided by its L2 norm
    (+ eps), in place, before the optimizer step."""
    grads = [p.grad for p in params if p.grad is not None]
    if grads:
        norms = torch._foreach_norm(grads)
        torch._foreach_add_(norms, eps)
        torch._foreach_div_(grads, norms)


def train_step(model, opt: torch.optim.Optimizer, x: torch.Tensor, beta: float,
               global_batch: int | None = None, grad_norm: bool = False,
               autocast: bool = False, forward=None,
               index: torch.Tensor | None = None) -> torch.Tensor:
    """One optimisation step on the (local) batch ``x``; returns the detached sums over it of
    (loss, elbo, recon, kl) as one (4,) tensor, without synchronising with the device.

    The loss is ``sum over x of -(recon - beta * kl) / (global_batch / world)``: with DDP
    averaging gradients over the world this is the mean over the global batch, and with one
    process (``global_batch = len(x)``) the plain batch mean. ``forward`` is the (compiled or
    DDP-wrapped) module to call, ``model`` by default. ``index`` (B,): the images' positions in
    the training split, for priors made of training images (leave-one-out).
    """
    forward = model if forward is None else forward
    n = len(x)
    per_rank = (global_batch or n) / world_size()
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
        terms = forward(x) if index is None else forward(x, index)
    per_image = -(terms["recon"] - beta * terms["kl"])
    loss = per_image.sum() / per_rank
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if grad_norm:
        normalize_gradients(p for g in opt.param_groups for p in g["params"])
    opt.step()
    return torch.stack([per_image.sum(), terms["elbo"].sum(), terms["recon"].sum(),
                        terms["kl"].sum()]).detach().float()


def epoch_order(n: int, seed: int, epoch: int, device: torch.device) -> torch.Tensor:
    """The epoch's shuffle of ``n`` training images: a function of (seed, epoch) alone, so every
    rank draws the same one and a run resumed on another number of processes sees it too."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=gen).to(device)


def local_batches(x: torch.Tensor, order: torch.Tensor, batch_size: int, env: DistEnv,
                  prepare=None):
    """This rank's share of each global batch: (local batch, prepared by ``prepare`` (the
    likelihood's: Bernoulli binarizes afresh) if given, global batch size, the local batch's
    positions in ``x``).

    Global batch b is ``order[b*B:(b+1)*B]``; rank r takes positions r, r + W, r + 2W, ... of
    it, so W processes together take exactly the batches one process would. A last global
    batch with fewer images than processes is dropped (with several processes only).
    """
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        if env.enabled:
            if len(idx) < env.world_size:
                break
            idx_local = idx[env.rank::env.world_size]
        else:
            idx_local = idx
        batch = x[idx_local]
        yield (batch if prepare is None else prepare(batch)), len(idx), idx_local


@torch.no_grad()
def global_mean_elbo(model: VAE, x: torch.Tensor, batch_size: int, env: DistEnv,
                     device: torch.device) -> dict[str, float]:
    """:func:`mean_elbo` over ``x`` split across the ranks, all-reduced: every rank gets the
    same global value (early stopping must agree everywhere)."""
    if not env.enabled:
        return mean_elbo(model, x, batch_size)
    part = x[env.rank::env.world_size]
    local = mean_elbo(model, part, batch_size) if len(part) else {"elbo": 0.0, "recon": 0.0,
                                                                   "kl": 0.0}
    keys = ("elbo", "recon", "kl")
    t = torch.tensor([local[k] * len(part) for k in keys] + [len(part)], dtype=torch.float64,
                     device=device)
    all_reduce_sum(t, env)
    return {k: (t[i] / t[-1]).item() for i, k in enumerate(keys)}


def _image_grid(images: torch.Tensor, nrow: int, min_width: int = 256) -> torch.Tensor:
    """(N, C, H, W) in [0, 1] -> one (C', H', W') grid, small images enlarged (nearest);
    vectors (N, D) -> a (1, N', D') heat map, one row per example, scaled to [0, 1]."""
    from torchvision.utils import make_grid

    if images.dim() == 2:
        x = images.float().cpu()
        x = (x - x.min()) / (x.max() - x.min()).clamp_min(1e-12)
        scale = max(1, min_width // x.shape[1])
        return x.repeat_interleave(scale, 1).repeat_interleave(4, 0)[None]
    images = images.float().clamp(0, 1).cpu()
    scale = max(1, min_width // (nrow * images.shape[-1]))
    if scale > 1:
        images = torch.nn.functional.interpolate(images, scale_factor=scale, mode="nearest")
    return make_grid(images, nrow=nrow, pad_value=1.0)


def compile_forward(module, device: torch.device):
    """torch.compile of the training forward; on CUDA with CUDA graphs (mode reduce-overhead),
    which removes the per-step launch overhead of these small networks."""
    mode = "reduce-overhead" if device.type == "cuda" else None
    return torch.compile(module, mode=mode, dynamic=False)


def train_epoch(model: VAE, opt: torch.optim.Optimizer, x_train: torch.Tensor, epoch: int,
                cfg: Config, env: DistEnv | None = None, forward=None,
                progress: bool = False) -> dict[str, float]:
    """One pass over the training images ``x_train`` (N, ...) as loaded, each batch prepared
    afresh by the likelihood (Bernoulli: binarized); returns the epoch's mean loss, elbo,
    recon and kl over all ranks.

    Raises:
        TrainingError: a step's loss was not finite (the message names the epoch and step).
    """
    tc, env = cfg.train, env or DistEnv()
    beta = beta_at(epoch, tc.warmup_epochs)
    device = x_train.device
    model.train()
    order = epoch_order(len(x_train), tc.seed, epoch, device)
    # sums of (loss, elbo, recon, kl, images) stay on the device: no host sync per step
    sums = torch.zeros(5, dtype=torch.float64, device=device)
    first_bad = torch.full((), -1, dtype=torch.long, device=device)
    steps = tqdm(local_batches(x_train, order, tc.batch_size, env, model.likelihood.prepare),
                 leave=False,
                 total=math.ceil(len(x_train) / tc.batch_size), desc=f"epoch {epoch}",
                 disable=not progress, dynamic_ncols=True)
    # a prior made of the training images must know which images a batch holds, so that no
    # image scores itself (the exemplar prior's leave-one-out)
    needs_index = getattr(model.prior, "needs_data", False)
    for step, (x, global_n, idx) in enumerate(steps, start=1):
        if not env.enabled:  # SIGTERM: stop between steps (with DDP: at the epoch's end)
            check_stop()
        step_sums = train_step(model, opt, x, beta, global_n, tc.grad_norm == "unit",
                               tc.precision == "bf16", forward, idx if needs_index else None)
        first_bad = torch.where((first_bad < 0) & ~torch.isfinite(step_sums[0]), step, first_bad)
        sums[:4] += step_sums
        sums[4] += len(x)
        if progress and step % 25 == 0:
            steps.set_postfix(loss=f"{(sums[0] / sums[4]).item():.3f}")
    all_reduce_sum(sums, env)
    if env.enabled:  # every rank stops at the same point, or none does
        from .stop import stop_requested

        stops = torch.tensor(float(stop_requested()), device=device)
        if all_reduce_sum(stops, env).item() > 0:
            from .stop import Terminated

            raise Terminated()
    bad_step = int(all_reduce_sum(first_bad.clamp_min(0), env).item())
    if not torch.isfinite(sums[0]) or bad_step > 0:
        raise TrainingError(f"non-finite loss at epoch {epoch}, "
                            + (f"step {bad_step}" if bad_step > 0 else "a step"))
    totals = sums.tolist()
    return {k: totals[i] / totals[4] for i, k in enumerate(("loss", "elbo", "recon", "kl"))}


def check_joint(cfg: Config) -> None:
    """Refuse, in one line, a prior that cannot be trained jointly (``joint = False``)."""
    from .registry import get_prior_class

    name = cfg.prior.name
    if not get_prior_class(name, cfg.prior.file_sha256).joint:
        short = name.rpartition(":")[2]
        raise ConfigError(f"[prior] name = {short!r} is ex-post only: its log-density is too "
                          f"costly to train with the VAE (an ODE solve per step); train with "
                          f"another prior, then: priorvae fit-prior RUN_DIR --prior {short}")


def train(cfg: Config, run_dir: str | Path, progress: bool = True) -> dict:
    """Train (or resume) the run in ``run_dir``; return its metrics.json contents.

    Under torchrun (``WORLD_SIZE`` > 1) every process runs this function: the model is wrapped
    in DDP, each rank takes its share of every global batch (``[train] batch_size`` is the
    global batch), validation and training metrics are all-reduced, and rank 0 alone opens the
    run folder, holds its lock and writes checkpoints, metrics.json and TensorBoard.
    """
    pin_plugins(cfg)  # the caller chose its code: pinned for the folder, in the trust record
    env, device = dist_setup(cfg.train.device)
    try:
        return _train(cfg, Path(run_dir), progress and env.is_main, env, device)
    finally:
        teardown(env)


def _train(cfg: Config, run_dir: Path, progress: bool, env: DistEnv,
           device: torch.device) -> dict:
    tc, main = cfg.train, env.is_main
    if env.enabled and tc.batch_size < env.world_size:
        raise ConfigError(f"[train] batch_size ({tc.batch_size}) is the global batch; it must be "
                          f"at least the number of processes ({env.world_size})")
    # data, networks and prior are built before the folder is touched: a rejected argument
    # leaves nothing behind
    check_joint(cfg)
    splits = load_splits(cfg.data, device=device)
    data_sha256 = splits.digest()  # in every checkpoint: evaluate refuses other data
    # the likelihood must accept the data's values
    lik_name, lik_sha, _ = likelihood_spec(cfg)
    check_suits(splits.value_type, lik_name,
                get_likelihood_class(lik_name, lik_sha).value_types, cfg.data.name)
    torch.manual_seed(tc.seed)
    model = build_vae(cfg, splits.input_shape, data=splits.x_train,
                      training=device.type == "cpu").to(device)  # room to train it here?
    splits = prepare_splits(splits, model.likelihood)  # validation and test, once
    opt = make_optimizer(model.parameters(), tc.lr)
    if env.enabled:  # each rank its own noise (binarization, eps); the shuffle is shared
        torch.manual_seed(tc.seed + 7919 * env.rank)

    with contextlib.ExitStack() as stack:
        run, phase = _claim_run(run_dir, cfg, env, stack)
        if phase == "finished":
            if main:
                print(f"{run_dir}: this run already finished; nothing to do "
                      f"(evaluate it with: priorvae evaluate {run_dir})")
            return run.metrics()
        state = TrainState()
        if phase == "resume":
            state = _restore(run, model, opt, env, device, data_sha256)
        forward = model
        if env.enabled:
            from torch.nn.parallel import DistributedDataParallel

            forward = DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None)
        if tc.compile:
            forward = compile_forward(forward, device)

        writer = classifier = None
        status = "finished"
        try:
            if main:
                writer = stack.enter_context(run.tensorboard(purge_step=state.epoch + 1))
                if phase == "new":
                    writer.add_text("config", "```toml\n" + read_regular(
                        run.file(CONFIG_FILE)).decode(errors="replace") + "\n```", 0)
                # training changes best.pt: results of an earlier one no longer hold
                run.update_metrics(drop=(*EVALUATION_KEYS, "prior_sources", "error",
                                         "warnings"),
                                   status="running", prior=cfg.prior.name, data=cfg.data.name,
                                   device=str(device), world_size=env.world_size)
                if tc.diagnostics_every > 0:
                    from .quality import classifier_cache_dir, get_classifier

                    classifier = get_classifier(splits, classifier_cache_dir(),
                                                progress=progress,
                                                likelihood=model.likelihood)
            epochs = tqdm(range(state.epoch + 1, tc.epochs + 1), desc="epochs",
                          initial=state.epoch, total=tc.epochs, disable=not progress,
                          dynamic_ncols=True)
            for epoch in epochs:
                t0 = time.perf_counter()
                try:
                    stats = train_epoch(model, opt, splits.x_train, epoch, cfg, env, forward,
                                        progress)
                except TrainingError as exc:
                    raise TrainingError(f"{exc}; {_what_is_kept(run, state)}") from None
                model.eval()
                val = global_mean_elbo(model, splits.x_val, tc.val_batch_size, env, device)
                bad = non_finite(val)
                if bad:  # a diverged model is never saved, as best or as last
                    raise TrainingError(f"non-finite validation {bad[0]} ({val[bad[0]]}) at "
                                        f"epoch {epoch}; {_what_is_kept(run, state)}")
                state.train_seconds += time.perf_counter() - t0
                state.epoch = epoch
                improved = val["elbo"] > state.best_val
                if improved:
                    state.best_val, state.best_epoch = val["elbo"], epoch
                    if main:
                        run.save_checkpoint("best", {"model": model.state_dict(), "epoch": epoch,
                                                     "config": run_config_dict(cfg),
                                                     "data_sha256": data_sha256})
                if epoch > tc.warmup_epochs:  # early-stopping counter starts after warm-up
                    state.bad_epochs = 0 if improved else state.bad_epochs + 1
                row = {"epoch": epoch, "beta": beta_at(epoch, tc.warmup_epochs),
                       "lr": opt.param_groups[0]["lr"],
                       **{f"train_{k}": v for k, v in stats.items()},
                       **{f"val_{k}": v for k, v in val.items()}, "seconds": state.train_seconds}
                state.history.append(row)
                stopping = tc.patience > 0 and state.bad_epochs >= tc.patience
                if main:
                    _end_of_epoch(run, cfg, writer, model, opt, splits, classifier, device, env,
                                  state, row, last=stopping or epoch == tc.epochs,
                                  data_sha256=data_sha256)
                epochs.set_postfix(train=f"{stats['loss']:.2f}", val=f"{-val['elbo']:.2f}",
                                   best=f"{-state.best_val:.2f}")
                if stopping:
                    status = "early_stopped"
                    break
        except TrainingError as exc:
            if main:
                run.update_metrics(status="failed", error=str(exc))
            raise
        except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (at a step's end) via the command line
            if main:
                with contextlib.suppress(PriorVAEError):
                    run.update_metrics(status="interrupted")
                print(f"\ninterrupted; run the same command again to resume from "
                      f"{run.path / 'last.pt'}", file=sys.stderr)
            raise
        except BaseException:
            if main:  # e.g. the disk filled up: say so if the disk still lets us
                with contextlib.suppress(PriorVAEError):
                    run.update_metrics(status="failed")
            raise
        if not main:
            return {"status": status}
        odd = absurd({"best_val_elbo": state.best_val}, math.prod(splits.input_shape))
        warnings = [warn("train", f"{o} nats per image is absurd for these images; the "
                         f"run probably diverged (check its TensorBoard curves)") for o in odd]
        return run.update_metrics(status=status, **({"warnings": warnings} if warnings else {}))


def _what_is_kept(run: Run, state: TrainState) -> str:
    """What a stopped training leaves, for its error line."""
    if not state.epoch:
        return "training stopped before its first checkpoint. Try a lower [train] lr."
    return (f"training stopped; {run.path / 'last.pt'} (epoch {state.epoch}, the last epoch "
            f"whose loss and validation ELBO were finite) and best.pt (epoch "
            f"{state.best_epoch}) are kept. Try a lower [train] lr.")


def _claim_run(run_dir: Path, cfg: Config, env: DistEnv, stack: contextlib.ExitStack):
    """Rank 0 opens (or creates) the run folder and holds its lock for the whole training;
    every rank learns the phase: 'new', 'resume' or 'finished'."""
    answer, run = None, None
    if env.is_main:
        try:
            run = Run.create(run_dir, cfg)
            stack.enter_context(run.lock("train"))
            run.adopt_config(cfg)
            phase = ("finished" if run.status in FINISHED else
                     "resume" if run.checkpoint_path("last").is_file() else "new")
            answer = ("ok", phase)
        except PriorVAEError as exc:  # every rank raises it, busy or not (compare skips busy)
            answer = ("busy" if isinstance(exc, RunBusyError) else "error", str(exc))
    kind, value = broadcast_object(answer, env)
    if kind != "ok":
        raise (RunBusyError if kind == "busy" else RunError)(value)
    if run is None:  # other ranks read the folder rank 0 owns
        run = Run(run_dir, cfg, trust_remote_code=True)
    return run, value


_RESTART = "delete last.pt to train this run from its start (best.pt is overwritten then)"
# what last.pt must hold to resume a run, and of which types
_RESUMABLE = {"model": dict, "optimizer": dict, "epoch": int, "best_val": (float, int),
              "best_epoch": int, "bad_epochs": int, "train_seconds": (float, int),
              "history": list, "rng_cpu": torch.Tensor}


def _check_resumable(ckpt: dict, path: Path) -> None:
    """One line for a last.pt that cannot resume a run: a field missing (a copy of best.pt
    has no optimizer) or of the wrong type, or epochs that do not add up."""
    missing = [k for k in _RESUMABLE if k not in ckpt]
    if missing:
        hint = " (a copy of best.pt?)" if "optimizer" in missing else ""
        raise RunError(f"{path} cannot resume this run: it has no {', '.join(missing[:3])}"
                       f"{hint}; {_RESTART}")
    for key, kind in _RESUMABLE.items():
        value = ckpt[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
            raise RunError(f"{path} is damaged: its {key!r} is a {type(value).__name__}, not a "
                           f"{names}; {_RESTART}")
    if not 0 <= ckpt["best_epoch"] <= ckpt["epoch"] or ckpt["bad_epochs"] < 0 or (
            ckpt["epoch"] > 0 and not math.isfinite(ckpt["best_val"])):
        raise RunError(f"{path} is damaged: epoch {ckpt['epoch']}, best epoch "
                       f"{ckpt['best_epoch']}, best validation ELBO {ckpt['best_val']} do not "
                       f"add up; {_RESTART}")


def _restore(run: Run, model: VAE, opt, env: DistEnv, device: torch.device,
             data_sha256: str) -> TrainState:
    ckpt = run.load_checkpoint("last", device)
    path = run.checkpoint_path("last")
    check_same_data(ckpt.get("data_sha256"), data_sha256, path)
    _check_resumable(ckpt, path)
    load_weights(model, ckpt["model"], path)
    state = TrainState.from_checkpoint(ckpt)
    try:
        opt.load_state_dict(ckpt["optimizer"])
        if env.is_main:
            torch.set_rng_state(ckpt["rng_cpu"].cpu())
            if device.type == "cuda" and isinstance(ckpt.get("rng_cuda"), torch.Tensor):
                torch.cuda.set_rng_state(ckpt["rng_cuda"].cpu(), device)
    except (KeyError, ValueError, TypeError, RuntimeError, IndexError) as exc:
        raise RunError(f"{path} is damaged ({type(exc).__name__}: "
                       f"{str(exc).splitlines()[0][:100] if str(exc) else ''}); {_RESTART}") \
            from None
    if env.is_main:
        print(f"{run.path}: resuming after epoch {state.epoch} (best validation ELBO "
              f"{state.best_val:.3f} at epoch {state.best_epoch})")
    else:
        torch.manual_seed(run.config.train.seed + 7919 * env.rank + 104_729 * (state.epoch + 1))
    return state


def _log_diagnostics(writer, model, splits, classifier, epoch, device) -> None:
    """Prior-vs-aggregate diagnostics on a subset (q(z) from 5,000 training images, 2,000
    validation images held out, 2,000 samples), as TensorBoard scalars; RNG forked."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        metrics, _ = diagnose(model, splits, classifier, n=2000, train_subset=5000,
                              heldout=splits.x_val[:2000],
                              heldout_labels=None if splits.y_val is None else splits.y_val[:2000])
    for key, value in metrics.items():
        writer.add_scalar(f"diagnostics/{key}", value, epoch)


def _end_of_epoch(run: Run, cfg: Config, writer, model, opt, splits, classifier, device, env,
                  state: TrainState, row: dict, last: bool = False,
                  data_sha256: str | None = None) -> None:
    """Rank 0: the checkpoint, TensorBoard scalars, pictures, diagnostics and metrics.json;
    the pictures and diagnostics every ``image_every`` / ``diagnostics_every`` epochs and at
    the ``last`` epoch (the final one, or the one early stopping ends on)."""
    tc, epoch = cfg.train, state.epoch
    ckpt = {"model": model.state_dict(), "optimizer": opt.state_dict(),
            **dataclasses.asdict(state), "world_size": env.world_size,
            "config": run_config_dict(cfg), "rng_cpu": torch.get_rng_state(),
            "data_sha256": data_sha256}
    if device.type == "cuda":
        ckpt["rng_cuda"] = torch.cuda.get_rng_state(device)
    run.save_checkpoint("last", ckpt)

    for k in ("loss", "elbo", "recon", "kl"):
        writer.add_scalar(f"train/{k}", row[f"train_{k}"], epoch)
    writer.add_scalar("val/loss", -row["val_elbo"], epoch)  # beta = 1
    for k in ("elbo", "recon", "kl"):
        writer.add_scalar(f"val/{k}", row[f"val_{k}"], epoch)
    writer.add_scalar("train/beta", row["beta"], epoch)
    writer.add_scalar("train/lr", row["lr"], epoch)
    if tc.image_every > 0 and (epoch % tc.image_every == 0 or last):
        # pictures draw from a forked RNG so they never change the training stream
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            xs = splits.x_val[:32]
            recon = torch.cat([xs, model.reconstruct(xs)])
            writer.add_image("images/reconstructions", _image_grid(recon, 8), epoch)
            writer.add_image("images/prior_samples", _image_grid(model.sample(64), 8), epoch)
    if tc.diagnostics_every > 0 and (epoch % tc.diagnostics_every == 0 or last):
        _log_diagnostics(writer, model, splits, classifier, epoch, device)
    run.update_metrics(epochs_trained=epoch, best_epoch=state.best_epoch,
                       best_val_elbo=state.best_val, val_elbo=row["val_elbo"],
                       train_seconds=state.train_seconds)
