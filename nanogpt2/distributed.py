"""Data-parallel training: which process this is (torchrun's environment), the process group, how the model is
spread over the processes (DDP: a full copy each; FSDP2: a shard each), and the few collectives the training loop
needs. With one process and no --fsdp every function here is a no-op.

    torchrun --nproc_per_node=N tools/train.py ...          # sets RANK, WORLD_SIZE, LOCAL_RANK for each process
    torchrun --nproc_per_node=N tools/train.py ... --fsdp   # each rank holds 1/N of weights, grads, AdamW state

NCCL on CUDA, gloo on CPU. DDP (DistributedDataParallel) replicates everything and all-reduces gradients; FSDP2
(`torch.distributed.fsdp.fully_shard`, Zhao et al. 2023, "PyTorch FSDP") keeps each parameter as a DTensor
sharded along dim 0 and all-gathers one block's weights just before that block runs (forward, and again in
backward), then frees them; gradients are reduce-scattered, so each rank keeps and updates only its shard.
"""
from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed
import torch.nn as nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
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


def init_distributed(device: str, need_group: bool = False) -> tuple[Dist, torch.device]:
    """Read torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); start the process group if > 1 process, or
    if `need_group` (FSDP: fully_shard and torch.distributed.checkpoint work on a group, even of one process,
    so one process runs the very code N processes run). NCCL for CUDA, gloo for CPU. Returns the ranks and this
    process's device ("auto": CUDA if there is one; under torchrun "cuda" means cuda:LOCAL_RANK)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    d = Dist(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":   # an index: torch.cuda.set_device refuses a bare "cuda"
        device = f"cuda:{d.local_rank if d.enabled else torch.cuda.current_device()}"
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if (d.enabled or need_group) and not torch.distributed.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        # torchrun (even --nproc_per_node 1) sets RANK: its rendezvous (env://). MASTER_ADDR alone is no sign of
        # it (a shell may export it for other jobs), and env:// would then fail for want of RANK and WORLD_SIZE.
        if d.enabled or "RANK" in os.environ:
            torch.distributed.init_process_group(backend=backend)
        else:  # plain `python`: a group of one needs no network, an in-process store will do
            torch.distributed.init_process_group(backend=backend, store=torch.distributed.HashStore(), rank=0,
                                                 world_size=1)
    return d, dev


def data_parallel(model: nn.Module, dist: Dist, device: torch.device) -> nn.Module:
    """`model` wrapped in DistributedDataParallel (gradients averaged over ranks in backward), or `model`
    itself in a single process."""
    if not dist.enabled:
        return model
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def shard_model(model: nn.Module, device: torch.device, param_dtype: Optional[torch.dtype] = None,
                offload: bool = False) -> nn.Module:
    """Shard a GPT2LMHeadModel in place over all ranks of the process group with FSDP2 and return it.

    One FSDP unit per block (its weights are all-gathered just before it runs and freed after, so only one
    block's full weights are alive at a time), then the root, which takes what is left: wte (= lm_head, the
    tied matrix), wpe, ln_f. Sharding the root rather than wte and lm_head separately keeps the tie one
    parameter: FSDP2 swaps in one sharded DTensor for every module that shares it (checked below).

    param_dtype: bf16 -> MixedPrecisionPolicy: weights all-gathered and computed with in bf16, gradients
    reduce-scattered in fp32, and the sharded master weights and AdamW state stay fp32.
    offload: CPUOffloadPolicy: the sharded weights, gradients and optimizer state live in host memory (the
    optimizer steps on the CPU); each block's weights are copied to `device` when it is gathered.

    Parameters move to `device` (CPU with offload); ones built on the meta device (a skeleton to load a
    checkpoint into) are allocated there uninitialised, one shard per rank. Build the optimizer after this
    call: its parameters must be the sharded DTensors."""
    tied = model.lm_head.weight is model.transformer.wte.weight
    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    kw = dict(mesh=mesh)
    if param_dtype is not None:
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    if offload:
        kw["offload_policy"] = CPUOffloadPolicy(pin_memory=device.type == "cuda")
    for block in model.transformer.h:
        fully_shard(block, **kw)
    fully_shard(model, **kw)
    if any(p.is_meta for p in model.parameters()):
        model.to_empty(device="cpu" if offload else device)
    if tied and model.lm_head.weight is not model.transformer.wte.weight:
        raise RuntimeError("FSDP sharding untied lm_head from wte: the two would train apart")
    return model


def grad_sync(net: nn.Module, last_micro_batch: bool):
    """The context a micro-batch's backward runs in. DDP: no_sync() on all but the last micro-batch, so the
    gradients are all-reduced once per step. FSDP: every micro-batch reduce-scatters at once (a rank keeps only
    its shard of the gradient; deferring would keep the whole unsharded gradient alive, the memory FSDP saves)."""
    if isinstance(net, DistributedDataParallel) and not last_micro_batch:
        return net.no_sync()
    return nullcontext()


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
