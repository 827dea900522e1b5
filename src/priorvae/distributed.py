"""torch.distributed set-up from torchrun's environment, and the few collectives training needs.

``torchrun --nproc_per_node=N -m priorvae train CONFIG`` starts N processes with ``RANK``,
``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` set; :func:`setup` reads
them, picks the backend (NCCL on GPUs, gloo on CPU) and the device (``cuda:LOCAL_RANK`` or the
CPU). Without torchrun (no ``WORLD_SIZE``, or 1) everything here is a no-op, so the single
process path is the same code.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import ConfigError

__all__ = ["DistEnv", "setup", "teardown", "world_size", "all_reduce_sum", "broadcast_object"]


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands: rank, world size, local rank, and whether it owns the group."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that writes checkpoints, metrics and TensorBoard."""
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer") from None


def setup(device_name: str) -> tuple[DistEnv, torch.device]:
    """Join the process group torchrun describes (if any); return it and this rank's device.

    ``device_name`` is ``[train] device``: ``auto`` takes ``cuda:LOCAL_RANK`` when CUDA is
    available, else the CPU; ``cpu`` forces gloo on the CPU; ``cuda`` uses ``cuda:LOCAL_RANK``.
    """
    from .runs import resolve_device

    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        return DistEnv(), resolve_device(device_name)
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    use_cuda = device_name != "cpu" and torch.cuda.is_available()
    if device_name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"[train] device = {device_name!r} but CUDA is not available")
    if use_cuda:
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(backend="nccl" if use_cuda else "gloo",
                                **({"device_id": device} if use_cuda else {}))
    return DistEnv(rank=rank, world_size=world, local_rank=local_rank, owns_group=owns), device


def teardown(env: DistEnv) -> None:
    if env.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def world_size() -> int:
    """Processes in the current group (1 without torch.distributed)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce_sum(t: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Sum of ``t`` over all ranks (in place; returns it). Identity for one process."""
    if env.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_object(obj, env: DistEnv):
    """Rank 0's ``obj`` on every rank (picklable objects). Identity for one process."""
    if not env.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
