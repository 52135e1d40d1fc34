"""Training and fine-tuning: one `train(TrainConfig)` for from-scratch, full fine-tuning, LoRA, DDP and FSDP.

This file holds the options (TrainConfig; tools/train.py builds its command line from it, so every default is
written once) and the loop, nanoGPT's train.py made resumable bit for bit, in named steps:

    train(cfg)
      setup(cfg) -> Run          processes, tokens, model, optimizer, schedule; on --resume the saved state
      while run.step < max_steps:
        train_step(run)          grad_accum micro-batches, clip the global grad norm, AdamW step, schedule step
        StepLog.line             every --log-interval steps: loss, lr, ms/step, tok/s
        evaluate(run)            every --eval-interval steps and at the end: validation loss ...
        save(run, metrics)       ... then a checkpoint; also on Ctrl-C (SIGINT or SIGTERM), which then stops
      finish(run, interrupted)   --export-dir: a plain HF checkpoint, LoRA merged

The pieces each live in a module of their own, one floor down:
  nanogpt2.data          cached uint16 tokens, memory-mapped; the data position is one integer
  nanogpt2.optim         AdamW (weight decay on 2-D tensors only), linear warmup then cosine decay
  nanogpt2.loss          the loss in fp32; bf16 autocast where it pays (--dtype auto: a CUDA GPU with bf16, or a
                         CPU with native bf16 matmuls, AVX512-BF16/AMX; measured in docs/TRAINING.md)
  nanogpt2.checkpoint    out_dir/: an HF checkpoint (a PEFT adapter under LoRA) + training_state.pt (step, data
                         position, optimizer, scheduler, every RNG, as plain data loaded with weights_only=True):
                         `--resume` ends on CPU with bitwise the weights of an uninterrupted run. With --fsdp a
                         sharded checkpoint (torch.distributed.checkpoint) that resumes on any number of processes
  nanogpt2.distributed   under torchrun (RANK/WORLD_SIZE set): NCCL on GPU, gloo on CPU; rank r reads its own
                         slice of each global batch; DDP replicates the model, --fsdp shards it (FSDP2); only rank 0
                         writes files, except a sharded checkpoint's shards
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn as nn
from tqdm import tqdm

from .checkpoint import (export_checkpoint, is_sharded_checkpoint, load_sharded_checkpoint, load_training_state,
                         read_sharded_weights, restore_rng_state, rng_state, save_checkpoint,
                         save_sharded_checkpoint)
from .config import PRESETS, GPT2Config
from .dtypes import DTYPES, FLAG_CHOICES
from .data import (SequenceSampler, Split, check_vocab, is_shard_folder, load_tokens, shard_splits, split_tokens,
                   tokenize_file)
from .distributed import Dist, any_rank, data_parallel, gather_objects, grad_sync, init_distributed, shard_model
from .flags import dataclass_parser, flag
from .lora import apply_lora, load_adapter
from .loss import AUTOCAST_CHOICES, autocast_dtype, lm_loss
from .model import GPT2LMHeadModel
from .optim import build_optimizer, build_scheduler
from .quantization import DEFAULT_GROUP_SIZE, GROUP_SIZES, check_scheme

# ---- options --------------------------------------------------------------------------------------

@dataclass
class TrainConfig:
    # ---- data -------------------------------------------------------------------------------------
    data: str = flag("UTF-8 text file to train on (tokenized once with the GPT-2 tokenizer, cached), or a folder of "
                     "token shards from tools/prepare_data.py (streamed from disk; it carries its own train/val "
                     "split, so --val-fraction does not apply)", default="")
    val_fraction: float = flag("held-out validation split: this last fraction of the tokens", default=0.1)
    cache_dir: Optional[str] = flag("token cache directory (default: $XDG_CACHE_HOME or ~/.cache, /nanogpt2/tokens)",
                                   default=None)
    # ---- model ------------------------------------------------------------------------------------
    init_from: str = flag("'scratch', or a checkpoint to fine-tune: local HF directory, bundled model, hub id, "
                         "or preset name (its hub weights)", default="scratch")
    preset: str = flag(f"architecture when training from scratch: {', '.join(PRESETS)}", default="gpt2")
    n_layer: Optional[int] = flag("from scratch: override the preset's n_layer", default=None)
    n_head: Optional[int] = flag("from scratch: override the preset's n_head", default=None)
    n_embd: Optional[int] = flag("from scratch: override the preset's n_embd", default=None)
    n_positions: Optional[int] = flag("from scratch: max context (default: --block-size)", default=None)
    vocab_size: Optional[int] = flag("from scratch: vocabulary size (default: GPT-2's 50257; nanoGPT pads to 50304 "
                                    "for faster matmuls; smaller only for data whose token ids all fit)", default=None)
    dropout: Optional[float] = flag("dropout (embd, attn, resid); default: 0 from scratch, the checkpoint's value "
                                   "when fine-tuning", default=None)
    attn_implementation: str = flag("attention backend: auto, triton, sdpa, eager", default="auto")
    # ---- LoRA -------------------------------------------------------------------------------------
    lora_r: int = flag("LoRA rank; 0 = full fine-tuning", default=0)
    lora_alpha: float = flag("LoRA alpha; the update is scaled by alpha / r (PEFT's convention)", default=8.0)
    lora_dropout: float = flag("dropout on the LoRA branch's input", default=0.0)
    lora_targets: str = flag("comma-separated projections to adapt: c_attn, c_proj, c_fc (or attn.c_proj, "
                            "mlp.c_proj)", default="c_attn")
    quantize: Optional[str] = flag("int8 or int4: store the --init-from base as integers and train LoRA adapters on "
                                   "it (QLoRA; needs --lora-r; nanogpt2/quantization.py)", default=None)
    group_size: Optional[int] = flag(f"int4's group size: {', '.join(map(str, GROUP_SIZES))} (default "
                                     f"{DEFAULT_GROUP_SIZE})", default=None)
    # ---- optimisation -----------------------------------------------------------------------------
    max_steps: int = flag("optimizer steps to train for", default=1000)
    batch_size: int = flag("sequences per micro-batch, per process", default=8)
    grad_accum: int = flag("micro-batches per optimizer step (global batch = batch_size * grad_accum * "
                          "world_size sequences)", default=1)
    block_size: Optional[int] = flag("tokens per training sequence (default: the model's n_positions)", default=None)
    lr: float = flag("peak learning rate", default=6e-4)
    min_lr_ratio: float = flag("the cosine decays to lr * this", default=0.1)
    warmup_steps: int = flag("linear warmup steps", default=100)
    lr_decay_steps: Optional[int] = flag("step at which the cosine reaches its minimum (default: --max-steps)",
                                        default=None)
    weight_decay: float = flag("AdamW weight decay, on 2-D weights only", default=0.1)
    beta1: float = flag("AdamW beta1", default=0.9)
    beta2: float = flag("AdamW beta2", default=0.95)
    grad_clip: float = flag("clip the global gradient norm to this; 0 disables", default=1.0)
    # ---- evaluation, logging, checkpoints -----------------------------------------------------------
    eval_interval: int = flag("evaluate (and save a checkpoint) every this many steps", default=250)
    eval_iters: int = flag("validation micro-batches per evaluation, per process", default=20)
    log_interval: int = flag("print a log line every this many steps", default=10)
    out_dir: str = flag("where checkpoints go", default="out")
    resume: bool = flag("continue the run saved in --out-dir (same data, batch, seed)", default=False)
    export_dir: Optional[str] = flag("at the end, also write a plain HF checkpoint here (LoRA merged, weights "
                                    "cast to --export-dtype)", default=None)
    export_dtype: str = flag("dtype of the exported checkpoint: float32, float16, bfloat16", default="float32")
    # ---- system -----------------------------------------------------------------------------------
    device: str = flag("auto, cpu, cuda, cuda:N (under torchrun: cuda:LOCAL_RANK)", default="auto")
    dtype: str = flag("autocast: auto (bf16 on CUDA and on CPUs with AVX512-BF16/AMX, else fp32), float32, bfloat16",
                     default="auto")
    compile: bool = flag("torch.compile the model", default=False)
    grad_checkpointing: bool = flag("recompute each block's activations in backward (less memory, ~1/3 more "
                                   "compute)", default=False)
    fsdp: bool = flag("shard weights, gradients and AdamW state over the processes (FSDP2, fully_shard per block) "
                      "instead of replicating them (DDP); checkpoints become sharded (torch.distributed.checkpoint) "
                      "and resume on any number of processes. Also runs in one process (a group of one)",
                      default=False)
    fsdp_offload: bool = flag("with --fsdp: keep the sharded weights, gradients and AdamW state in CPU memory (the "
                              "optimizer steps on the CPU)", default=False)
    seed: int = flag("seed for init, data order and dropout", default=1337)

    def __post_init__(self):
        positive = ("max_steps", "batch_size", "grad_accum", "eval_interval", "eval_iters", "log_interval")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.block_size is not None and self.block_size < 1:
            raise ValueError(f"--block-size must be >= 1, got {self.block_size}")
        if self.lora_r < 0:
            raise ValueError(f"--lora-r must be >= 0 (0 = full fine-tuning), got {self.lora_r}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if self.dtype not in AUTOCAST_CHOICES:
            raise ValueError(f"--dtype {self.dtype!r} is not one of {', '.join(AUTOCAST_CHOICES)}")
        if self.export_dtype not in DTYPES:
            raise ValueError(f"--export-dtype {self.export_dtype!r} is not one of {', '.join(FLAG_CHOICES)}")
        if self.init_from == "scratch" and self.preset not in PRESETS:
            raise ValueError(f"--preset {self.preset!r} is not one of {', '.join(PRESETS)}")
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"--dropout must be in [0, 1), got {self.dropout}")
        if self.lr <= 0:
            raise ValueError(f"--lr must be > 0, got {self.lr}")
        if self.quantize is not None:
            check_scheme(self.quantize, self.group_size)
            if self.lora_r == 0 or self.init_from == "scratch":
                raise ValueError(f"--quantize {self.quantize} trains LoRA adapters on a pretrained base: it needs "
                                 "--lora-r > 0 and --init-from a checkpoint (integer weights take no optimizer steps)")
            if self.fsdp:
                raise ValueError("--quantize with --fsdp is not supported: FSDP shards float parameters; the "
                                 "integer base of QLoRA fits one device at 1/4 or 1/8 of fp32 anyway")
        elif self.group_size is not None:
            raise ValueError(f"--group-size {self.group_size} needs --quantize int4")
        if self.fsdp_offload and not self.fsdp:
            raise ValueError("--fsdp-offload offloads FSDP's shards: it needs --fsdp as well")


# Options that fix the model, the data order or the batch: a resumed run must keep them.
# --fsdp too: its checkpoints are sharded, the others not.
RESUME_MUST_MATCH = ("init_from", "preset", "n_layer", "n_head", "n_embd", "n_positions", "vocab_size",
                     "block_size", "seed",
                     "val_fraction", "lora_r", "lora_alpha", "lora_dropout", "lora_targets", "fsdp",
                     "quantize", "group_size")


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    """tools/train.py's command line: one flag per TrainConfig field (--max-steps for max_steps); --data required."""
    return dataclass_parser(TrainConfig, prog, description=__doc__.split("\n")[0], required=("data",))


def parse_args(argv=None, prog: Optional[str] = None) -> TrainConfig:
    return TrainConfig(**vars(build_parser(prog).parse_args(argv)))


def check_resume_matches(cfg: TrainConfig, state: dict, world_size: int) -> None:
    """Refuse to --resume a run with options that change the model, the data order or the global batch:
    the ValueError lists each such option's saved value and the new one."""
    saved = saved_options(state)
    diff = [f"--{k.replace('_', '-')} {saved[k]!r} (now {getattr(cfg, k)!r})" for k in RESUME_MUST_MATCH
            if saved[k] != getattr(cfg, k)]
    saved_batch = saved["batch_size"] * saved["grad_accum"] * state.get("world_size", 1)
    batch = cfg.batch_size * cfg.grad_accum * world_size
    if saved_batch != batch:
        diff.append(f"global batch {saved_batch} sequences (now {batch})")
    if diff:
        raise ValueError(f"--resume: the run in {cfg.out_dir} was started with " + ", ".join(diff) +
                         "; resume with the same settings")


# ---- set up: model, data, the run ---------------------------------------------------------------

def build_model(cfg: TrainConfig) -> GPT2LMHeadModel:
    """The model to train (fp32, train mode), with LoRA applied when cfg.lora_r > 0. Seeds torch first, so
    the same cfg builds the same weights (random init and LoRA's A matrices)."""
    torch.manual_seed(cfg.seed)
    if cfg.init_from == "scratch":
        sizes = {k: getattr(cfg, k) for k in ("n_layer", "n_head", "n_embd", "vocab_size") if getattr(cfg, k) is not None}
        n_positions = cfg.n_positions or cfg.block_size or PRESETS[cfg.preset].get("n_positions", 1024)
        p = 0.0 if cfg.dropout is None else cfg.dropout
        config = GPT2Config.preset(cfg.preset, **sizes, n_positions=n_positions, resid_pdrop=p, embd_pdrop=p,
                                   attn_pdrop=p)
        model = GPT2LMHeadModel(config)
    else:
        model = GPT2LMHeadModel.from_pretrained(cfg.init_from, dtype=torch.float32, quantize=cfg.quantize,
                                                group_size=cfg.group_size)
        if cfg.dropout is not None:
            model.config.resid_pdrop = model.config.embd_pdrop = model.config.attn_pdrop = cfg.dropout
            for m in model.modules():
                if isinstance(m, nn.Dropout):
                    m.p = cfg.dropout
                elif hasattr(m, "attn_pdrop"):
                    m.attn_pdrop = cfg.dropout
    model.set_attn_implementation(cfg.attn_implementation)
    if cfg.lora_r > 0:
        apply_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                   target_modules=tuple(t.strip() for t in cfg.lora_targets.split(",") if t.strip()))
    return model.train()


def load_model(cfg: TrainConfig, resuming: bool) -> GPT2LMHeadModel:
    """build_model(cfg), or on --resume the saved model: full training reloads the saved fp32 weights (and
    config, dropout included); LoRA rebuilds the same frozen base and loads the saved adapters into it.
    A sharded (--fsdp) run resumes into model_skeleton on the meta device: its weights arrive after sharding,
    each rank reading only its shard (setup -> restore)."""
    if resuming and cfg.fsdp:
        return model_skeleton(cfg, cfg.out_dir, device="meta")
    if resuming and cfg.lora_r == 0:
        model = GPT2LMHeadModel.from_pretrained(cfg.out_dir, dtype=torch.float32).train()
        model.set_attn_implementation(cfg.attn_implementation)
        return model
    model = build_model(cfg)
    if resuming:
        load_adapter(model, cfg.out_dir)
    return model


def model_skeleton(cfg: TrainConfig, out_dir: str, device: str = "cpu") -> GPT2LMHeadModel:
    """The model a sharded checkpoint of the run `cfg` in `out_dir` loads into. Full training: the saved
    architecture (out_dir/config.json, dropout included), its weights uninitialised (on "meta": not even
    allocated); the checkpoint holds every weight. LoRA: build_model(cfg), the frozen --init-from base with
    adapters; the checkpoint holds the adapters."""
    if cfg.lora_r > 0:
        return build_model(cfg)
    with torch.device(device):
        model = GPT2LMHeadModel(GPT2Config.from_json_file(os.path.join(out_dir, "config.json")), init=False)
    model.set_attn_implementation(cfg.attn_implementation)
    return model.train()


def saved_options(state: dict) -> dict:
    """The options a run was saved with (training_state.pt's "config"), one per TrainConfig field: an option
    newer than the run gets its default (what the run had then), one since removed is dropped."""
    return {f.name: state["config"].get(f.name, f.default) for f in dataclasses.fields(TrainConfig)}


def saved_config(state: dict) -> TrainConfig:
    """The TrainConfig a run was saved with (saved_options)."""
    return TrainConfig(**saved_options(state))


def export_sharded(out_dir: str, export_dir: str, dtype: str = "float32") -> None:
    """A sharded (--fsdp) checkpoint in out_dir -> a plain HF checkpoint in export_dir (LoRA merged, cast to
    `dtype`), in this process alone: one model's worth of CPU memory, no process group (tools/export_hf.py)."""
    if not is_sharded_checkpoint(out_dir):
        raise FileNotFoundError(f"{out_dir!r} holds no sharded checkpoint (sharded/.metadata): only --fsdp runs "
                                "write one; a run without --fsdp saves a Hugging Face checkpoint already")
    cfg = saved_config(load_training_state(out_dir))
    model = model_skeleton(cfg, out_dir)
    read_sharded_weights(out_dir, model)
    export_checkpoint(model, export_dir, dtype)


def tokenized_data(cfg: TrainConfig, dist: Dist) -> str:
    """The tokens of cfg.data: a shard folder (tools/prepare_data.py) as it is; a text file's cached token file,
    which rank 0 tokenizes (once; cached) while the other ranks wait, then find it."""
    if is_shard_folder(cfg.data):
        return cfg.data
    path = tokenize_file(cfg.data, cfg.cache_dir, verbose=True) if dist.master else None
    dist.barrier()
    return path or tokenize_file(cfg.data, cfg.cache_dir, verbose=False)


def load_splits(cfg: TrainConfig, token_file: str, vocab_size: int, block_size: int) -> tuple[Split, Split]:
    """(train, val) splits of the tokens, each id checked to fit the model's vocabulary: a token file's last
    --val-fraction is held out; a shard folder brings the split prepare_data made, streamed from its shards.
    Too few tokens for one sequence is a ValueError naming the data and what to change."""
    if is_shard_folder(token_file):
        train, val = shard_splits(token_file, block_size)
        check_vocab(cfg.data, vocab_size, train.tokens, val.tokens)
        return train, val
    tokens = load_tokens(token_file)
    check_vocab(cfg.data, vocab_size, tokens)
    return split_tokens(tokens, cfg.val_fraction, block_size, source=cfg.data)


@dataclass
class Run:
    """A training run between steps: what setup() builds and the step functions advance."""
    cfg: TrainConfig
    dist: Dist
    device: torch.device
    model: GPT2LMHeadModel          # the weights: what is clipped, saved and exported (sharded in place by --fsdp)
    net: nn.Module                  # what runs forward: `model`, compiled and/or wrapped in DDP
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    train_sampler: SequenceSampler
    val_sampler: Optional[SequenceSampler]  # None without a validation split (--val-fraction 0)
    amp: Optional[torch.dtype]      # autocast dtype; None = fp32
    block_size: int                 # T, tokens per sequence
    resumed: bool                   # continued from a checkpoint (--resume)
    step: int = 0                   # optimizer steps done
    seen: int = 0                   # sequences consumed by all ranks together: the data position

    @property
    def tokens_per_step(self) -> int:
        """B * A * W * T: tokens in one global batch."""
        return self.cfg.batch_size * self.cfg.grad_accum * self.dist.world_size * self.block_size


def setup(cfg: TrainConfig) -> Run:
    """Everything the loop needs, in an order that keeps runs reproducible: the model is built from seeded
    RNGs; then either the saved state (optimizer, schedule, step, data position, RNGs) is restored, or torch
    is seeded per rank for dropout."""
    dist, device = init_distributed(cfg.device, need_group=cfg.fsdp)
    token_file = tokenized_data(cfg, dist)
    state = load_training_state(cfg.out_dir) if cfg.resume else None
    if state is not None:
        check_resume_matches(cfg, state, dist.world_size)
    amp = autocast_dtype(cfg.dtype, device)
    model = load_model(cfg, resuming=state is not None)
    model.transformer.gradient_checkpointing = cfg.grad_checkpointing
    block_size = cfg.block_size or model.config.n_positions
    if block_size > model.config.n_positions:
        raise ValueError(f"--block-size {block_size} exceeds the model's n_positions {model.config.n_positions}")
    train_split, val_split = load_splits(cfg, token_file, model.config.vocab_size, block_size)

    # --fsdp: bf16 autocast also gathers and computes with bf16 weights (MixedPrecisionPolicy); shards stay fp32
    model = shard_model(model, device, amp, cfg.fsdp_offload) if cfg.fsdp else model.to(device)
    optimizer = build_optimizer(model, cfg.lr, (cfg.beta1, cfg.beta2), cfg.weight_decay,
                                torch.device("cpu") if cfg.fsdp_offload else device)  # where its parameters are
    scheduler = build_scheduler(optimizer, cfg.warmup_steps, cfg.lr_decay_steps or cfg.max_steps, cfg.min_lr_ratio)
    run = Run(cfg, dist, device, model, net=model, optimizer=optimizer, scheduler=scheduler,
              train_sampler=SequenceSampler(train_split, cfg.seed),
              val_sampler=SequenceSampler(val_split, cfg.seed, shuffle=False) if val_split.num_sequences else None,
              amp=amp, block_size=block_size, resumed=state is not None)
    if state is not None:
        restore(run, state)
    else:
        torch.manual_seed(cfg.seed + dist.rank)  # same init everywhere, different dropout masks per rank
    net = torch.compile(model) if cfg.compile else model
    run.net = net if cfg.fsdp else data_parallel(net, dist, device)  # FSDP syncs gradients itself
    return run


def describe(run: Run) -> str:
    """The line a run starts with: model size, data, batch, device, precision."""
    m, cfg = run.model, run.cfg
    trainable = sum(p.numel() for p in m.parameters() if p.requires_grad)
    return (f"model: {m.num_parameters() / 1e6:.2f}M parameters ({trainable / 1e6:.3f}M trainable), "
            f"n_layer={m.config.n_layer} n_head={m.config.n_head} n_embd={m.config.n_embd}; "
            f"data: {len(run.train_sampler.split.tokens):,} train / "
            f"{len(run.val_sampler.split.tokens) if run.val_sampler else 0:,} val tokens; "
            f"batch {cfg.batch_size}x{cfg.grad_accum}x{run.dist.world_size} sequences of {run.block_size} = "
            f"{run.tokens_per_step:,} tokens/step; device {run.device}, {'bf16 autocast' if run.amp else 'fp32'}"
            + parallelism(run)
            + (f"; resuming at step {run.step}" if run.resumed else ""))


def parallelism(run: Run) -> str:
    """describe()'s words for how the model is spread over the processes ("" for one process, no --fsdp)."""
    if run.cfg.fsdp:
        return (f"; FSDP over {run.dist.world_size} process(es)"
                + (", bf16 weights in compute, fp32 gradient reduction" if run.amp else "")
                + (", shards offloaded to CPU" if run.cfg.fsdp_offload else ""))
    return f"; DDP over {run.dist.world_size} processes" if run.dist.enabled else ""


# ---- one optimisation step, evaluation ----------------------------------------------------------

def train_step(run: Run) -> torch.Tensor:
    """One optimizer step: grad_accum (A) micro-batches of batch_size (B) sequences per rank, where rank r of
    W reads sequences [r*B, (r+1)*B) of each global micro-batch of B*W; gradients accumulate over the
    micro-batches (DDP averages them over ranks on the last one only; FSDP reduce-scatters each, see
    distributed.grad_sync); the global grad norm is clipped (over DTensor shards under FSDP: the norm of the
    whole gradient); AdamW and the schedule step. Returns this rank's loss for the step (0-d, on the device,
    detached)."""
    cfg, dist = run.cfg, run.dist
    B, A, W = cfg.batch_size, cfg.grad_accum, dist.world_size
    step_loss = torch.zeros((), device=run.device)
    for micro in range(A):
        x, y = run.train_sampler.batch(run.seen + micro * B * W + dist.rank * B, B)  # (B, T) each
        x, y = x.to(run.device, non_blocking=True), y.to(run.device, non_blocking=True)
        with grad_sync(run.net, last_micro_batch=micro == A - 1):  # DDP all-reduces on the last one only
            loss = lm_loss(run.net, x, y, run.amp) / A
            loss.backward()
        step_loss += loss.detach()
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_([p for p in run.model.parameters() if p.requires_grad], cfg.grad_clip)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.step += 1
    run.seen += B * A * W
    return step_loss


@torch.no_grad()
def evaluate(run: Run) -> float:
    """Mean validation loss (nats/token) over the first eval_iters global batches of the (unshuffled)
    validation split; each rank computes its slice and the mean is all-reduced."""
    net, sampler, dist = run.net, run.val_sampler, run.dist
    was_training = net.training
    net.eval()
    B, W = run.cfg.batch_size, dist.world_size
    n_batches = max(1, min(run.cfg.eval_iters, sampler.split.num_sequences // (B * W)))
    total = torch.zeros((), device=run.device)
    for i in range(n_batches):
        x, y = sampler.batch(i * B * W + dist.rank * B, B)
        total += lm_loss(net, x.to(run.device), y.to(run.device), run.amp)
    loss = total / n_batches
    if dist.enabled:
        torch.distributed.all_reduce(loss)
        loss /= W
    net.train(was_training)
    return loss.item()


# ---- checkpoint and resume ------------------------------------------------------------------------

def save(run: Run, metrics: dict) -> None:
    """A checkpoint of the run as it stands (nanogpt2.checkpoint writes it): rank 0 writes the weights and
    training_state.pt, holding every rank's RNG states; all ranks wait until it is complete. The state is
    plain data (tensors, numbers, strings, lists, dicts) so that --resume can load it with weights_only=True.
    --fsdp: every rank writes its shards of the weights and optimizer state (sharded/), rank 0 the rest."""
    rngs = gather_objects(rng_state(), run.dist)  # one per rank: each rank's dropout masks continue
    state = {"step": run.step, "sequences_seen": run.seen, "scheduler": run.scheduler.state_dict(), "rng": rngs,
             "world_size": run.dist.world_size, "config": dataclasses.asdict(run.cfg), "metrics": metrics}
    if run.cfg.fsdp:
        save_sharded_checkpoint(run.cfg.out_dir, run.model, run.optimizer, state, run.dist.master)
        return
    if run.dist.master:
        state["optimizer"] = run.optimizer.state_dict()
        save_checkpoint(run.cfg.out_dir, run.model, state, adapter_base=run.cfg.init_from)
    run.dist.barrier()


def restore(run: Run, state: dict) -> None:
    """Continue from a saved state: weights and optimizer (sharded: read shard by shard, on any number of
    ranks), schedule, step, data position and this rank's RNG states (saved by a different number of processes:
    each rank seeded afresh from (seed, step, rank), checkpoint.restore_rng_state)."""
    if run.cfg.fsdp:
        load_sharded_checkpoint(run.cfg.out_dir, run.model, run.optimizer)
    else:
        run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    run.step, run.seen = state["step"], state["sequences_seen"]
    restore_rng_state(state["rng"], run.dist.rank, run.dist.world_size, run.cfg.seed, run.step)


def finish(run: Run, interrupted: bool) -> None:
    """--export-dir: a plain HF checkpoint, LoRA merged, cast to --export-dtype (not after Ctrl-C). --fsdp:
    rank 0 converts the sharded checkpoint just saved (the last step always saves), as tools/export_hf.py does,
    rather than gathering the model through the process group."""
    cfg = run.cfg
    if not interrupted and cfg.export_dir and run.dist.master:  # last: it merges and casts the model in place
        if cfg.fsdp:
            export_sharded(cfg.out_dir, cfg.export_dir, cfg.export_dtype)
        else:
            export_checkpoint(run.model, cfg.export_dir, cfg.export_dtype)
        print(f"exported a {cfg.export_dtype} checkpoint to {cfg.export_dir}")
    run.dist.barrier()


# ---- logging, stopping ----------------------------------------------------------------------------

class StepLog:
    """The progress bar (rank 0) and, every log_interval steps, one line (llm.c's): step, training loss (this
    rank's mean over the interval), lr, ms/step, tok/s. Time spent inside paused() (evaluation, saving) is not
    step time."""

    def __init__(self, run: Run):
        self.master, self.device = run.dist.master, run.device
        self.max_steps, self.tokens_per_step = run.cfg.max_steps, run.tokens_per_step
        self.bar = tqdm(total=self.max_steps, initial=run.step, disable=not self.master, dynamic_ncols=True,
                        desc="train")
        self.loss_sum = torch.zeros((), device=run.device)  # summed on the device: no sync per step
        self.steps, self.t_last = 0, time.perf_counter()     # steps and start time of this log interval
        self.history: list[tuple[int, float]] = []          # (step, train loss) at every log line

    def add(self, step_loss: torch.Tensor) -> None:
        self.loss_sum += step_loss
        self.steps += 1
        self.bar.update(1)

    def line(self, step: int, lr: float) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()  # CUDA runs ahead of Python: wait, so the time is the steps' own
        dt = (time.perf_counter() - self.t_last) / self.steps  # seconds per step
        train_loss = self.loss_sum.item() / self.steps
        self.history.append((step, train_loss))
        self.write(f"step {step:>6}/{self.max_steps} | loss {train_loss:.4f} | lr {lr:.2e} | "
                   f"{dt * 1000:8.1f} ms/step | {self.tokens_per_step / dt:10,.0f} tok/s")
        self.loss_sum.zero_()
        self.steps, self.t_last = 0, time.perf_counter()

    @contextmanager
    def paused(self):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.t_last += time.perf_counter() - t0

    def write(self, message: str) -> None:
        if self.master:
            self.bar.write(message)

    def close(self) -> None:
        self.bar.close()


class StopRequest:
    """SIGINT/SIGTERM -> finish this step, save, exit. A second Ctrl-C interrupts at once (the handlers are
    restored after the first)."""

    def __init__(self):
        self.requested = False
        self._old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signal.signal works in the main thread only
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


# ---- the loop -------------------------------------------------------------------------------------

@dataclass
class TrainResult:
    step: int                      # optimizer steps completed
    interrupted: bool              # stopped by SIGINT/SIGTERM (a checkpoint was saved)
    val_loss: Optional[float]      # last evaluation (nats/token), None without a validation split
    history: list = field(default_factory=list)  # (step, train loss) at every log line


def train(cfg: TrainConfig, on_step: Optional[Callable[[int], None]] = None) -> TrainResult:
    """Run cfg. `on_step(step)` is called after every optimizer step (tests use it to simulate Ctrl-C)."""
    run = setup(cfg)
    if run.dist.master:
        print(describe(run))
    log = StepLog(run)
    val_loss, interrupted = None, False
    with StopRequest() as stop:
        while run.step < cfg.max_steps:
            log.add(train_step(run))
            last = run.step == cfg.max_steps
            if run.step % cfg.log_interval == 0 or last:
                log.line(run.step, run.optimizer.param_groups[0]["lr"])
            if on_step is not None:
                on_step(run.step)
            interrupted = any_rank(stop.requested, run.dist, run.device)  # all ranks stop after the same step
            if run.step % cfg.eval_interval == 0 or last or interrupted:
                with log.paused():
                    if run.val_sampler is not None and not interrupted:  # a Ctrl-C wants out: save, no eval
                        val_loss = evaluate(run)
                        log.write(f"step {run.step:>6} | val loss {val_loss:.4f} | val ppl {math.exp(val_loss):.2f}")
                    save(run, {"val_loss": val_loss})
            if interrupted:
                log.write(f"interrupted: saved step {run.step} to {cfg.out_dir}; continue with --resume")
                break
    log.close()
    finish(run, interrupted)
    return TrainResult(step=run.step, interrupted=interrupted, val_loss=val_loss, history=log.history)
