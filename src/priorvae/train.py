"""The training loop: one readable function, :func:`train`.

Adam, KL warm-up (beta = min(1, epoch / warmup_epochs), epochs counted from 1), validation
ELBO with beta = 1 after every epoch, best model kept, early stopping once ``patience`` epochs
after warm-up bring no improvement, an atomic checkpoint after every epoch (resume continues
from it), TensorBoard scalars, image grids and the config, and a progress bar.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .config import Config
from .data import binarize, iterate_batches, load_splits
from .distributed import DistEnv, all_reduce_sum, broadcast_object, teardown, world_size
from .distributed import setup as dist_setup
from .errors import ConfigError, RunError, TrainingError
from .runs import (
    BEST_CKPT,
    CONFIG_FILE,
    LAST_CKPT,
    load_checkpoint,
    read_metrics,
    read_run_config,
    run_config_dict,
    save_checkpoint,
    update_metrics,
    write_run_config,
)
from .vae import VAE, build_vae

__all__ = ["train", "train_step", "beta_at", "mean_elbo", "global_mean_elbo", "check_run_dir",
           "make_optimizer", "normalize_gradients", "epoch_order", "local_batches",
           "compile_forward"]

FINISHED = ("finished", "early_stopped")


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
               autocast: bool = False, forward=None) -> torch.Tensor:
    """One optimisation step on the (local) batch ``x``; returns the detached sums over it of
    (loss, elbo, recon, kl) as one (4,) tensor, without synchronising with the device.

    The loss is ``sum over x of -(recon - beta * kl) / (global_batch / world)``: with DDP
    averaging gradients over the world this is the mean over the global batch, and with one
    process (``global_batch = len(x)``) the plain batch mean. ``forward`` is the (compiled or
    DDP-wrapped) module to call, ``model`` by default.
    """
    forward = model if forward is None else forward
    n = len(x)
    per_rank = (global_batch or n) / world_size()
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
        terms = forward(x)
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
                  dynamic_binarization: bool = True):
    """This rank's share of each global batch: (binarized local batch, global batch size).

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
        yield (binarize(batch) if dynamic_binarization else batch), len(idx)


@torch.no_grad()
def mean_elbo(model: VAE, x: torch.Tensor, batch_size: int = 1000) -> dict[str, float]:
    """Mean single-sample ELBO, reconstruction and KL over the binary images ``x`` (N, ...)."""
    sums = {"elbo": 0.0, "recon": 0.0, "kl": 0.0}
    for batch in iterate_batches(x, batch_size, shuffle=False, dynamic_binarization=False):
        terms = model(batch)
        for k in sums:
            sums[k] += terms[k].sum().item()
    return {k: v / len(x) for k, v in sums.items()}


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


def _config_diff(old: dict, new: dict) -> list[str]:
    out = []
    for table in sorted(set(old) | set(new)):
        a, b = old.get(table, {}), new.get(table, {})
        for key in sorted(set(a) | set(b)):
            if (table, key) in (("train", "device"), ("train", "compile")):
                continue  # resuming on another device, compiled or not, is fine
            if a.get(key) != b.get(key):
                out.append(f"[{table}] {key}: {a.get(key)!r} in the run, {b.get(key)!r} now")
    return out


def check_run_dir(run_dir: Path, cfg: Config) -> str:
    """'new', 'resume' or 'finished'; refuses a folder holding a different configuration."""
    if not (run_dir / CONFIG_FILE).is_file():
        if run_dir.exists() and any(run_dir.iterdir()):
            raise RunError(f"{run_dir} exists, is not empty and holds no {CONFIG_FILE}; "
                           f"choose another --out")
        return "new"
    diff = _config_diff(run_config_dict(read_run_config(run_dir)), run_config_dict(cfg))
    if diff:
        raise RunError(f"{run_dir} holds a run with a different configuration:\n  "
                       + "\n  ".join(diff) + "\nRefusing to overwrite it; choose another --out.")
    if read_metrics(run_dir).get("status") in FINISHED:
        return "finished"
    return "resume" if (run_dir / LAST_CKPT).is_file() else "new"


def _image_grid(images: torch.Tensor, nrow: int, min_width: int = 256) -> torch.Tensor:
    """(N, C, H, W) in [0, 1] -> one (C', H', W') grid, small images enlarged (nearest)."""
    from torchvision.utils import make_grid

    images = images.float().clamp(0, 1).cpu()
    scale = max(1, min_width // (nrow * images.shape[-1]))
    if scale > 1:
        images = torch.nn.functional.interpolate(images, scale_factor=scale, mode="nearest")
    return make_grid(images, nrow=nrow, pad_value=1.0)


def _log_diagnostics(writer, model, splits, classifier, epoch, device) -> None:
    """Prior-vs-aggregate diagnostics on a subset (q(z) from 5,000 training images, 2,000
    validation images held out, 2,000 samples), as TensorBoard scalars; RNG forked."""
    from .evaluate import diagnose

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        metrics, _ = diagnose(model, splits, classifier, n=2000, train_subset=5000,
                              heldout=splits.x_val[:2000], heldout_labels=splits.y_val[:2000])
    for key, value in metrics.items():
        writer.add_scalar(f"diagnostics/{key}", value, epoch)


def _setup_state(run_dir: Path, cfg: Config, env: DistEnv) -> str:
    """check_run_dir on rank 0 (which also creates the folder), its answer on every rank."""
    answer = None
    if env.is_main:
        try:
            state = check_run_dir(run_dir, cfg)
            if state == "new":
                run_dir.mkdir(parents=True, exist_ok=True)
                write_run_config(run_dir, cfg)
            answer = ("ok", state)
        except RunError as exc:
            answer = ("error", str(exc))
    kind, value = broadcast_object(answer, env)
    if kind == "error":
        raise RunError(value)
    return value


def compile_forward(module, device: torch.device):
    """torch.compile of the training forward; on CUDA with CUDA graphs (mode reduce-overhead),
    which removes the per-step launch overhead of these small networks."""
    mode = "reduce-overhead" if device.type == "cuda" else None
    return torch.compile(module, mode=mode, dynamic=False)


def train(cfg: Config, run_dir: str | Path, progress: bool = True) -> dict:
    """Train (or resume) the run in ``run_dir``; return its metrics.json contents.

    Under torchrun (``WORLD_SIZE`` > 1) every process runs this function: the model is wrapped
    in DDP, each rank takes its share of every global batch (``[train] batch_size`` is the
    global batch), validation and training metrics are all-reduced, and rank 0 alone writes
    the checkpoints, metrics.json and TensorBoard.
    """
    run_dir = Path(run_dir)
    tc = cfg.train
    if tc.grad_norm not in ("none", "unit"):
        raise ConfigError(f"[train] grad_norm must be 'none' or 'unit', got {tc.grad_norm!r}")
    if tc.precision not in ("float32", "bf16"):
        raise ConfigError(f"[train] precision must be 'float32' or 'bf16', got {tc.precision!r}")
    env, device = dist_setup(tc.device)
    try:
        return _train(cfg, run_dir, progress and env.is_main, env, device)
    finally:
        teardown(env)


def _train(cfg: Config, run_dir: Path, progress: bool, env: DistEnv,
           device: torch.device) -> dict:
    tc = cfg.train
    main = env.is_main
    if env.enabled and tc.batch_size < env.world_size:
        raise ConfigError(f"[train] batch_size ({tc.batch_size}) is the global batch; it must be "
                          f"at least the number of processes ({env.world_size})")
    state = _setup_state(run_dir, cfg, env)
    if state == "finished":
        if main:
            print(f"{run_dir}: this run already finished; nothing to do "
                  f"(evaluate it with: priorvae evaluate {run_dir})")
        return read_metrics(run_dir)
    torch.manual_seed(tc.seed)

    splits = load_splits(cfg.data.name, cfg.data.root, cfg.data.download, device=device)
    model = build_vae(cfg, splits.input_shape, data=splits.x_train).to(device)
    opt = make_optimizer(model.parameters(), tc.lr)
    if env.enabled:  # each rank its own noise (binarization, eps); the shuffle is shared
        torch.manual_seed(tc.seed + 7919 * env.rank)

    start_epoch, best_val, best_epoch, bad_epochs = 1, -math.inf, 0, 0
    train_seconds, history = 0.0, []
    if state == "resume":
        ckpt = load_checkpoint(run_dir / LAST_CKPT, map_location=device)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        start_epoch = ckpt["epoch"] + 1
        if main:
            torch.set_rng_state(ckpt["rng_cpu"])
            if device.type == "cuda" and "rng_cuda" in ckpt:
                torch.cuda.set_rng_state(ckpt["rng_cuda"].cpu(), device)
        else:
            torch.manual_seed(tc.seed + 7919 * env.rank + 104_729 * start_epoch)
        best_val, best_epoch, bad_epochs = ckpt["best_val"], ckpt["best_epoch"], ckpt["bad_epochs"]
        train_seconds, history = ckpt["train_seconds"], ckpt["history"]
        if main:
            print(f"{run_dir}: resuming after epoch {ckpt['epoch']} (best validation ELBO "
                  f"{best_val:.3f} at epoch {best_epoch})")

    forward = model
    if env.enabled:
        from torch.nn.parallel import DistributedDataParallel

        forward = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if tc.compile:
        forward = compile_forward(forward, device)

    writer = classifier = None
    if main:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(log_dir=str(run_dir), purge_step=start_epoch)
        if state == "new":
            toml_text = (run_dir / CONFIG_FILE).read_text()
            writer.add_text("config", "```toml\n" + toml_text + "\n```", 0)
        update_metrics(run_dir, status="running", prior=cfg.prior.name, data=cfg.data.name,
                       device=str(device), world_size=env.world_size)
        if tc.diagnostics_every > 0:
            from .quality import classifier_cache_dir, get_classifier

            classifier = get_classifier(splits, classifier_cache_dir(), progress=progress)

    status = "finished"
    steps_per_epoch = math.ceil(len(splits.x_train) / tc.batch_size)
    epochs = tqdm(range(start_epoch, tc.epochs + 1), desc="epochs", initial=start_epoch - 1,
                  total=tc.epochs, disable=not progress, dynamic_ncols=True)
    try:
        for epoch in epochs:
            t0 = time.perf_counter()
            beta = beta_at(epoch, tc.warmup_epochs)
            model.train()
            order = epoch_order(len(splits.x_train), tc.seed, epoch, device)
            # sums of (loss, elbo, recon, kl, images) stay on the device: no sync per step
            sums = torch.zeros(5, dtype=torch.float64, device=device)
            first_bad = torch.full((), -1, dtype=torch.long, device=device)
            steps = tqdm(local_batches(splits.x_train, order, tc.batch_size, env), leave=False,
                         total=steps_per_epoch, desc=f"epoch {epoch}", disable=not progress,
                         dynamic_ncols=True)
            for step, (x, global_n) in enumerate(steps, start=1):
                step_sums = train_step(model, opt, x, beta, global_n, tc.grad_norm == "unit",
                                       tc.precision == "bf16", forward)
                bad = ~torch.isfinite(step_sums[0])
                first_bad = torch.where((first_bad < 0) & bad, step, first_bad)
                sums[:4] += step_sums
                sums[4] += len(x)
                if progress and step % 25 == 0:
                    steps.set_postfix(loss=f"{(sums[0] / sums[4]).item():.3f}")
            all_reduce_sum(sums, env)
            bad_step = int(all_reduce_sum(first_bad.clamp_min(0), env).item())
            if not torch.isfinite(sums[0]) or bad_step > 0:
                last = (f"the last good checkpoint ({run_dir / LAST_CKPT}, epoch "
                        f"{epoch - 1}) is intact" if epoch > 1 else "no checkpoint yet")
                where = f"step {bad_step}" if bad_step > 0 else "a step"
                raise TrainingError(
                    f"non-finite loss at epoch {epoch}, {where}; training stopped, {last}. "
                    f"Try a lower [train] lr.")
            totals = sums.tolist()
            train_stats = {k: totals[i] / totals[4]
                           for i, k in enumerate(("loss", "elbo", "recon", "kl"))}

            model.eval()
            val = global_mean_elbo(model, splits.x_val, tc.val_batch_size, env, device)
            train_seconds += time.perf_counter() - t0
            improved = val["elbo"] > best_val
            if improved:
                best_val, best_epoch = val["elbo"], epoch
                if main:
                    save_checkpoint(run_dir / BEST_CKPT, {
                        "model": model.state_dict(), "epoch": epoch,
                        "config": run_config_dict(cfg)})
            if epoch > tc.warmup_epochs:  # early-stopping counter starts after warm-up
                bad_epochs = 0 if improved else bad_epochs + 1
            row = {"epoch": epoch, "beta": beta, "lr": opt.param_groups[0]["lr"],
                   **{f"train_{k}": v for k, v in train_stats.items()},
                   **{f"val_{k}": v for k, v in val.items()}, "seconds": train_seconds}
            history.append(row)
            if main:
                _end_of_epoch(cfg, run_dir, writer, model, opt, splits, classifier, device, env,
                              epoch, row, history, best_val, best_epoch, bad_epochs,
                              train_seconds)
            epochs.set_postfix(train=f"{train_stats['loss']:.2f}", val=f"{-val['elbo']:.2f}",
                               best=f"{-best_val:.2f}")
            if tc.patience > 0 and bad_epochs >= tc.patience:
                status = "early_stopped"
                break
    except TrainingError as exc:
        if main:
            update_metrics(run_dir, status="failed", error=str(exc))
        raise
    except KeyboardInterrupt:
        if main:
            update_metrics(run_dir, status="interrupted")
            print(f"\ninterrupted; run the same command again to resume from "
                  f"{run_dir / LAST_CKPT}")
        raise
    finally:
        if writer is not None:
            writer.close()
    return update_metrics(run_dir, status=status) if main else {"status": status}


def _end_of_epoch(cfg, run_dir, writer, model, opt, splits, classifier, device, env, epoch, row,
                  history, best_val, best_epoch, bad_epochs, train_seconds) -> None:
    """Rank 0: the checkpoint, TensorBoard scalars, pictures, diagnostics and metrics.json."""
    tc = cfg.train
    ckpt = {"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch,
            "best_val": best_val, "best_epoch": best_epoch, "bad_epochs": bad_epochs,
            "train_seconds": train_seconds, "history": history, "world_size": env.world_size,
            "config": run_config_dict(cfg), "rng_cpu": torch.get_rng_state()}
    if device.type == "cuda":
        ckpt["rng_cuda"] = torch.cuda.get_rng_state(device)
    save_checkpoint(run_dir / LAST_CKPT, ckpt)

    for k in ("loss", "elbo", "recon", "kl"):
        writer.add_scalar(f"train/{k}", row[f"train_{k}"], epoch)
    writer.add_scalar("val/loss", -row["val_elbo"], epoch)  # beta = 1
    for k in ("elbo", "recon", "kl"):
        writer.add_scalar(f"val/{k}", row[f"val_{k}"], epoch)
    writer.add_scalar("train/beta", row["beta"], epoch)
    writer.add_scalar("train/lr", row["lr"], epoch)
    if tc.image_every > 0 and (epoch % tc.image_every == 0 or epoch == tc.epochs):
        # pictures draw from a forked RNG so they never change the training stream
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            xs = splits.x_val[:32]
            recon = torch.cat([xs, model.reconstruct(xs)])
            writer.add_image("images/reconstructions", _image_grid(recon, 8), epoch)
            writer.add_image("images/prior_samples", _image_grid(model.sample(64), 8), epoch)
    if tc.diagnostics_every > 0 and (epoch % tc.diagnostics_every == 0 or epoch == tc.epochs):
        _log_diagnostics(writer, model, splits, classifier, epoch, device)
    update_metrics(run_dir, epochs_trained=epoch, best_epoch=best_epoch,
                   best_val_elbo=best_val, val_elbo=row["val_elbo"],
                   train_seconds=train_seconds)
