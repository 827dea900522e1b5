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
from .data import iterate_batches, load_splits
from .errors import RunError, TrainingError
from .runs import (
    BEST_CKPT,
    CONFIG_FILE,
    LAST_CKPT,
    load_checkpoint,
    read_metrics,
    read_run_config,
    resolve_device,
    run_config_dict,
    save_checkpoint,
    update_metrics,
    write_run_config,
)
from .vae import VAE, build_vae

__all__ = ["train", "train_step", "beta_at", "mean_elbo", "check_run_dir"]

FINISHED = ("finished", "early_stopped")


def beta_at(epoch: int, warmup_epochs: int) -> float:
    """KL weight at ``epoch`` (1-based): rises linearly to 1 over ``warmup_epochs``."""
    return 1.0 if warmup_epochs <= 0 else min(1.0, epoch / warmup_epochs)


def train_step(model, opt: torch.optim.Optimizer, x: torch.Tensor, beta: float):
    """One optimisation step on the batch ``x``; returns the (detached) loss and mean terms.

    A non-finite loss is returned without updating the parameters, for the caller to handle.
    """
    loss, terms = model.loss(x, beta)
    if torch.isfinite(loss):
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return loss.detach(), terms


@torch.no_grad()
def mean_elbo(model: VAE, x: torch.Tensor, batch_size: int = 1000) -> dict[str, float]:
    """Mean single-sample ELBO, reconstruction and KL over the binary images ``x`` (N, ...)."""
    sums = {"elbo": 0.0, "recon": 0.0, "kl": 0.0}
    for batch in iterate_batches(x, batch_size, shuffle=False, dynamic_binarization=False):
        terms = model(batch)
        for k in sums:
            sums[k] += terms[k].sum().item()
    return {k: v / len(x) for k, v in sums.items()}


def _config_diff(old: dict, new: dict) -> list[str]:
    out = []
    for table in sorted(set(old) | set(new)):
        a, b = old.get(table, {}), new.get(table, {})
        for key in sorted(set(a) | set(b)):
            if (table, key) == ("train", "device"):
                continue  # resuming on another device is fine
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


def train(cfg: Config, run_dir: str | Path, progress: bool = True) -> dict:
    """Train (or resume) the run in ``run_dir``; return its metrics.json contents."""
    run_dir = Path(run_dir)
    state = check_run_dir(run_dir, cfg)
    if state == "finished":
        print(f"{run_dir}: this run already finished; nothing to do "
              f"(evaluate it with: priorvae evaluate {run_dir})")
        return read_metrics(run_dir)
    tc = cfg.train
    device = resolve_device(tc.device)
    torch.manual_seed(tc.seed)

    splits = load_splits(cfg.data.name, cfg.data.root, cfg.data.download, device=device)
    model = build_vae(cfg, splits.input_shape, data=splits.x_train).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=tc.lr)

    start_epoch, best_val, best_epoch, bad_epochs = 1, -math.inf, 0, 0
    train_seconds, history = 0.0, []
    if state == "resume":
        ckpt = load_checkpoint(run_dir / LAST_CKPT, map_location=device)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["rng_cpu"])
        if device.type == "cuda" and "rng_cuda" in ckpt:
            torch.cuda.set_rng_state(ckpt["rng_cuda"].cpu(), device)
        start_epoch = ckpt["epoch"] + 1
        best_val, best_epoch, bad_epochs = ckpt["best_val"], ckpt["best_epoch"], ckpt["bad_epochs"]
        train_seconds, history = ckpt["train_seconds"], ckpt["history"]
        print(f"{run_dir}: resuming after epoch {ckpt['epoch']} (best validation ELBO "
              f"{best_val:.3f} at epoch {best_epoch})")
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_run_config(run_dir, cfg)

    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(run_dir), purge_step=start_epoch)
    if state == "new":
        toml_text = (run_dir / CONFIG_FILE).read_text()
        writer.add_text("config", "```toml\n" + toml_text + "\n```", 0)
    update_metrics(run_dir, status="running", prior=cfg.prior.name, data=cfg.data.name,
                   device=str(device))
    classifier = None
    if tc.diagnostics_every > 0:
        from .quality import classifier_cache_dir, get_classifier

        classifier = get_classifier(splits, classifier_cache_dir(), progress=progress)

    status = "finished"
    epochs = tqdm(range(start_epoch, tc.epochs + 1), desc="epochs", initial=start_epoch - 1,
                  total=tc.epochs, disable=not progress, dynamic_ncols=True)
    try:
        for epoch in epochs:
            t0 = time.perf_counter()
            beta = beta_at(epoch, tc.warmup_epochs)
            model.train()
            sums = {"loss": 0.0, "elbo": 0.0, "recon": 0.0, "kl": 0.0}
            seen = 0
            steps = tqdm(iterate_batches(splits.x_train, tc.batch_size), leave=False,
                         total=math.ceil(len(splits.x_train) / tc.batch_size),
                         desc=f"epoch {epoch}", disable=not progress, dynamic_ncols=True)
            for step, x in enumerate(steps, start=1):
                loss, terms = train_step(model, opt, x, beta)
                if not torch.isfinite(loss):
                    last = (f"the last good checkpoint ({run_dir / LAST_CKPT}, epoch "
                            f"{epoch - 1}) is intact" if epoch > 1 else "no checkpoint yet")
                    raise TrainingError(
                        f"non-finite loss ({loss.item()}) at epoch {epoch}, step {step}; "
                        f"training stopped, {last}. Try a lower [train] lr.")
                n = len(x)
                seen += n
                sums["loss"] += loss.item() * n
                for k in ("elbo", "recon", "kl"):
                    sums[k] += terms[k].item() * n
                steps.set_postfix(loss=f"{sums['loss'] / seen:.3f}")
            train_stats = {k: v / seen for k, v in sums.items()}

            model.eval()
            val = mean_elbo(model, splits.x_val, tc.val_batch_size)
            train_seconds += time.perf_counter() - t0
            improved = val["elbo"] > best_val
            if improved:
                best_val, best_epoch = val["elbo"], epoch
                save_checkpoint(run_dir / BEST_CKPT, {
                    "model": model.state_dict(), "epoch": epoch,
                    "config": run_config_dict(cfg)})
            if epoch > tc.warmup_epochs:  # early-stopping counter starts after warm-up
                bad_epochs = 0 if improved else bad_epochs + 1
            row = {"epoch": epoch, "beta": beta, "lr": opt.param_groups[0]["lr"],
                   **{f"train_{k}": v for k, v in train_stats.items()},
                   **{f"val_{k}": v for k, v in val.items()}, "seconds": train_seconds}
            history.append(row)
            ckpt = {"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch,
                    "best_val": best_val, "best_epoch": best_epoch, "bad_epochs": bad_epochs,
                    "train_seconds": train_seconds, "history": history,
                    "config": run_config_dict(cfg), "rng_cpu": torch.get_rng_state()}
            if device.type == "cuda":
                ckpt["rng_cuda"] = torch.cuda.get_rng_state(device)
            save_checkpoint(run_dir / LAST_CKPT, ckpt)

            for k, v in train_stats.items():
                writer.add_scalar(f"train/{k}", v, epoch)
            writer.add_scalar("val/loss", -val["elbo"], epoch)  # beta = 1
            for k, v in val.items():
                writer.add_scalar(f"val/{k}", v, epoch)
            writer.add_scalar("train/beta", beta, epoch)
            writer.add_scalar("train/lr", row["lr"], epoch)
            if tc.image_every > 0 and (epoch % tc.image_every == 0 or epoch == tc.epochs):
                # pictures draw from a forked RNG so they never change the training stream
                with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                    xs = splits.x_val[:32]
                    recon = torch.cat([xs, model.reconstruct(xs)])
                    writer.add_image("images/reconstructions", _image_grid(recon, 8), epoch)
                    writer.add_image("images/prior_samples", _image_grid(model.sample(64), 8),
                                     epoch)
            if tc.diagnostics_every > 0 and (epoch % tc.diagnostics_every == 0
                                             or epoch == tc.epochs):
                _log_diagnostics(writer, model, splits, classifier, epoch, device)
            update_metrics(run_dir, epochs_trained=epoch, best_epoch=best_epoch,
                           best_val_elbo=best_val, val_elbo=val["elbo"],
                           train_seconds=train_seconds)
            epochs.set_postfix(train=f"{train_stats['loss']:.2f}", val=f"{-val['elbo']:.2f}",
                               best=f"{-best_val:.2f}")
            if tc.patience > 0 and bad_epochs >= tc.patience:
                status = "early_stopped"
                break
    except TrainingError as exc:
        update_metrics(run_dir, status="failed", error=str(exc))
        raise
    except KeyboardInterrupt:
        update_metrics(run_dir, status="interrupted")
        print(f"\ninterrupted; run the same command again to resume from {run_dir / LAST_CKPT}")
        raise
    finally:
        writer.close()
    return update_metrics(run_dir, status=status)
