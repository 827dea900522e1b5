"""Multi-process training through torchrun (gloo on CPU) and the pieces it is built from."""

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import read_metrics, tiny_toml
from priorvae.config import load_config
from priorvae.distributed import DistEnv
from priorvae.runs import Run, load_checkpoint
from priorvae.train import epoch_order, local_batches, train


def test_ranks_split_each_global_batch_exactly():
    n = 1297
    order = epoch_order(n, seed=3, epoch=2, device=torch.device("cpu"))
    assert torch.equal(order, epoch_order(n, 3, 2, torch.device("cpu")))  # all ranks agree
    assert not torch.equal(order, epoch_order(n, 3, 3, torch.device("cpu")))  # new shuffle
    ids = torch.arange(n, dtype=torch.float32)[:, None, None, None]  # image i holds i

    def batches(world, rank):
        env = DistEnv(rank=rank, world_size=world)
        out = []
        for b, g, idx in local_batches(ids, order, 100, env):
            assert torch.equal(b.flatten().long(), idx)  # the indices name the images
            out.append((g, idx.tolist()))
        return out

    single = batches(1, 0)
    assert [g for g, _ in single] == [100] * 12 + [97]
    shards = [batches(3, r) for r in range(3)]
    for b, (global_n, batch) in enumerate(single):
        assert all(shard[b][0] == global_n for shard in shards)
        assert sorted(i for shard in shards for i in shard[b][1]) == sorted(batch)
    assert [len(v) for _, v in shards[1]] == [33] * 12 + [32]
    # a last batch smaller than the world is dropped, so every rank takes the same steps
    tiny = epoch_order(7, 0, 1, torch.device("cpu"))
    assert len(list(local_batches(ids[:7], tiny, 5, DistEnv(0, 3)))) == 1


TORCHRUN_2 = [sys.executable, "-m", "torch.distributed.run", "--standalone",
              "--nproc_per_node=2", "-m", "priorvae"]
ENV_1_THREAD = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants. torchrun starts its workers in sessions of
    their own, so killing its process group alone leaves them running."""
    children = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            children += [int(c) for c in (task / "children").read_text().split()]
    for child in children:
        kill_tree(child)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def _torchrun(args, timeout=300):
    proc = subprocess.run([*TORCHRUN_2, *args], capture_output=True, text=True,
                          env=ENV_1_THREAD, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_two_process_gloo_run_matches_one_process_and_resumes_in_one(tmp_path):
    config = tiny_toml(tmp_path / "c.toml", model={"hidden": [64, 64], "latent_dim": 4},
                       train={"epochs": 30, "batch_size": 100, "lr": 2e-3, "patience": 0,
                              "device": "cpu", "diagnostics_every": 0, "image_every": 10})
    _torchrun(["train", str(config), "--out", str(tmp_path / "ddp"), "--quiet"])
    ddp = tmp_path / "ddp"
    metrics = read_metrics(ddp)
    assert metrics["status"] == "finished" and metrics["world_size"] == 2
    assert metrics["epochs_trained"] == 30
    # rank 0 alone writes: one TensorBoard events file, one set of checkpoints
    assert len(list(ddp.glob("events.out.tfevents.*"))) == 1
    ckpt = load_checkpoint(ddp / "last.pt")
    assert ckpt["world_size"] == 2 and len(ckpt["history"]) == 30

    # one process, same global batch: the same validation ELBO within seed noise
    single = train(load_config(config), tmp_path / "single", progress=False)
    other_seed = train(load_config(config, ["train.seed=1"]), tmp_path / "seed1", progress=False)
    noise = abs(single["best_val_elbo"] - other_seed["best_val_elbo"])
    gap = abs(metrics["best_val_elbo"] - single["best_val_elbo"])
    assert metrics["best_val_elbo"] > -35, metrics  # it trained (untrained: about -45)
    assert gap < max(3 * noise, 1.0), (gap, noise)

    # a checkpoint written by a 2-process run (killed mid-way) resumes in a 1-process run
    run = tmp_path / "killed"
    proc = subprocess.Popen(
        [*TORCHRUN_2, "train", str(config), "--out", str(run), "--quiet"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV_1_THREAD,
        start_new_session=True)
    try:
        t0 = time.time()
        while read_metrics(run).get("epochs_trained", 0) < 3:
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.time() - t0 < 180, "2-process run too slow to reach epoch 3"
            time.sleep(0.05)
    finally:
        kill_tree(proc.pid)
        proc.wait()
    t0 = time.time()  # the kernel drops the dead rank 0's lock on the folder
    while Run.open(run).is_busy():
        assert time.time() - t0 < 30, "the killed workers still hold the run folder"
        time.sleep(0.05)
    killed = load_checkpoint(run / "last.pt")
    assert killed["world_size"] == 2 and 3 <= killed["epoch"] < 30
    resumed = train(load_config(config), run, progress=False)
    assert resumed["status"] == "finished" and resumed["epochs_trained"] == 30
    after = load_checkpoint(run / "last.pt")
    assert after["world_size"] == 1 and len(after["history"]) == 30
    assert after["history"][:killed["epoch"]] == killed["history"]
    assert resumed["best_val_elbo"] > -35


def test_batch_smaller_than_world_is_refused(tmp_path):
    config = tiny_toml(tmp_path / "c.toml", train={"batch_size": 1, "device": "cpu"})
    proc = subprocess.run([*TORCHRUN_2, "train", str(config), "--out", str(tmp_path / "r"),
                           "--quiet"], capture_output=True, text=True, env=ENV_1_THREAD,
                          timeout=300)
    assert proc.returncode != 0
    assert "is the global batch; it must be at least the number of processes (2)" in proc.stderr


@pytest.mark.parametrize("options", [{"compile": True}, {"precision": "bf16"}])
def test_compiled_and_bf16_training_learn(tmp_path, options):
    config = tiny_toml(tmp_path / "c.toml", train={"epochs": 8, "device": "cpu", "lr": 3e-3,
                                                   "diagnostics_every": 0, **options})
    metrics = train(load_config(config), tmp_path / "run", progress=False)
    history = load_checkpoint(tmp_path / "run" / "last.pt")["history"]
    assert metrics["status"] == "finished"
    assert history[-1]["val_elbo"] > history[0]["val_elbo"] + 3  # it learns
