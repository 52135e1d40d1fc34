"""Data-parallel training: which process this is (torchrun's environment), the process group, and the few
collectives the training loop needs. With one process every function here is a no-op.

    torchrun --nproc_per_node=N tools/train.py ...   # sets RANK, WORLD_SIZE, LOCAL_RANK for each process

NCCL on CUDA, gloo on CPU. Each rank holds a full copy of the model (DistributedDataParallel); sharded data
parallelism (FSDP) would be set up here as well, next to `data_parallel`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel


@dataclass
class Dist:
    rank: int = 0         # this process, 0 .. world_size-1 (rank 0 tokenizes, prints and writes files)
    world_size: int = 1   # processes in the run
    local_rank: int = 0   # this process on its machine: its GPU index

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def master(self) -> bool:
        return self.rank == 0

    def barrier(self):
        if self.enabled:
            torch.distributed.barrier()


def init_distributed(device: str) -> tuple[Dist, torch.device]:
    """Read torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); start the process group if > 1 process.
    NCCL for CUDA, gloo for CPU. Returns the ranks and this process's device ("auto": CUDA if there is one;
    under torchrun "cuda" means cuda:LOCAL_RANK)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    d = Dist(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if d.enabled and device == "cuda":
        device = f"cuda:{d.local_rank}"
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if d.enabled and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return d, dev


def data_parallel(model: nn.Module, dist: Dist, device: torch.device) -> nn.Module:
    """`model` wrapped in DistributedDataParallel (gradients averaged over ranks in backward), or `model`
    itself in a single process."""
    if not dist.enabled:
        return model
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def gather_objects(obj, dist: Dist) -> list:
    """Every rank's `obj`, in rank order, on every rank: [obj] in a single process."""
    if not dist.enabled:
        return [obj]
    objs = [None] * dist.world_size
    torch.distributed.all_gather_object(objs, obj)
    return objs


def any_rank(flag: bool, dist: Dist, device: torch.device) -> bool:
    """True on every rank if `flag` is True on any: so that all ranks take the same branch (e.g. stop after
    the same step, whichever rank received the Ctrl-C)."""
    if not dist.enabled:
        return flag
    t = torch.tensor(float(flag), device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())
