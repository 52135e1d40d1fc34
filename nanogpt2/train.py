"""Training and fine-tuning: one `train(TrainConfig)` for from-scratch, full fine-tuning, LoRA, and DDP.

The loop is nanoGPT's train.py made resumable bit for bit:
  data      nanogpt2.data: cached uint16 tokens, memory-mapped; a data position is one integer
  model     scratch (a preset, optionally resized) | from_pretrained(--init-from) | + LoRA adapters
  optimizer AdamW; weight decay on 2-D tensors only (matmul weights and embeddings), none on biases and
            LayerNorm gains (nanoGPT's configure_optimizers)
  schedule  linear warmup, then cosine decay to min_lr_ratio * lr (GPT-3 paper, appendix B; nanoGPT get_lr)
  step      grad_accum micro-batches (under DDP only the last one all-reduces), clip the global grad norm,
            AdamW step, scheduler step
  precision fp32 master weights; bf16 autocast where it pays (--dtype auto: a CUDA GPU with bf16, or a CPU with
            native bf16 matmuls, AVX512-BF16/AMX, where we measured it faster; see docs/TRAINING.md)
  output    out_dir/ holds an HF checkpoint (config.json + model.safetensors, or adapter_config.json +
            adapter_model.safetensors for LoRA) + training_state.pt (step, data position, optimizer,
            scheduler, every RNG): `--resume` continues from it, ending on CPU with bitwise the weights
            of an uninterrupted run. Ctrl-C (SIGINT, or SIGTERM) finishes the current step, saves, exits.
  DDP       under torchrun (RANK/WORLD_SIZE set): NCCL on GPU, gloo on CPU; rank r reads its own slice of
            each global batch; only rank 0 writes files.

Every option lives once, in TrainConfig; tools/train.py builds its command line from it.
"""
from __future__ import annotations

import dataclasses
import math
import os
import random
import signal
import threading
import time
import typing
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import PRESETS, GPT2Config
from .data import SequenceSampler, load_tokens, split_tokens, tokenize_file
from .model import GPT2LMHeadModel

STATE_FILE = "training_state.pt"


def _opt(help: str, **kw):
    return field(metadata={"help": help}, **kw)


@dataclass
class TrainConfig:
    # ---- data -------------------------------------------------------------------------------------
    data: str = _opt("UTF-8 text file to train on (tokenized once with the GPT-2 tokenizer, cached)", default="")
    val_fraction: float = _opt("held-out validation split: this last fraction of the tokens", default=0.1)
    cache_dir: Optional[str] = _opt("token cache directory (default: $XDG_CACHE_HOME or ~/.cache, /nanogpt2/tokens)",
                                    default=None)
    # ---- model ------------------------------------------------------------------------------------
    init_from: str = _opt("'scratch', or a checkpoint to fine-tune: local HF directory, bundled model, hub id, "
                          "or preset name (its hub weights)", default="scratch")
    preset: str = _opt(f"architecture when training from scratch: {', '.join(PRESETS)}", default="gpt2")
    n_layer: Optional[int] = _opt("from scratch: override the preset's n_layer", default=None)
    n_head: Optional[int] = _opt("from scratch: override the preset's n_head", default=None)
    n_embd: Optional[int] = _opt("from scratch: override the preset's n_embd", default=None)
    n_positions: Optional[int] = _opt("from scratch: max context (default: --block-size)", default=None)
    vocab_size: Optional[int] = _opt("from scratch: vocabulary size (default: GPT-2's 50257; nanoGPT pads to 50304 "
                                     "for faster matmuls; smaller only for data whose token ids all fit)", default=None)
    dropout: Optional[float] = _opt("dropout (embd, attn, resid); default: 0 from scratch, the checkpoint's value "
                                    "when fine-tuning", default=None)
    attn_implementation: str = _opt("attention backend: auto, triton, sdpa, eager", default="auto")
    # ---- LoRA -------------------------------------------------------------------------------------
    lora_r: int = _opt("LoRA rank; 0 = full fine-tuning", default=0)
    lora_alpha: float = _opt("LoRA alpha; the update is scaled by alpha / r (PEFT's convention)", default=8.0)
    lora_dropout: float = _opt("dropout on the LoRA branch's input", default=0.0)
    lora_targets: str = _opt("comma-separated projections to adapt: c_attn, c_proj, c_fc (or attn.c_proj, "
                             "mlp.c_proj)", default="c_attn")
    # ---- optimisation -----------------------------------------------------------------------------
    max_steps: int = _opt("optimizer steps to train for", default=1000)
    batch_size: int = _opt("sequences per micro-batch, per process", default=8)
    grad_accum: int = _opt("micro-batches per optimizer step (global batch = batch_size * grad_accum * "
                           "world_size sequences)", default=1)
    block_size: Optional[int] = _opt("tokens per training sequence (default: the model's n_positions)", default=None)
    lr: float = _opt("peak learning rate", default=6e-4)
    min_lr_ratio: float = _opt("the cosine decays to lr * this", default=0.1)
    warmup_steps: int = _opt("linear warmup steps", default=100)
    lr_decay_steps: Optional[int] = _opt("step at which the cosine reaches its minimum (default: --max-steps)",
                                         default=None)
    weight_decay: float = _opt("AdamW weight decay, on 2-D weights only", default=0.1)
    beta1: float = _opt("AdamW beta1", default=0.9)
    beta2: float = _opt("AdamW beta2", default=0.95)
    grad_clip: float = _opt("clip the global gradient norm to this; 0 disables", default=1.0)
    # ---- evaluation, logging, checkpoints -----------------------------------------------------------
    eval_interval: int = _opt("evaluate (and save a checkpoint) every this many steps", default=250)
    eval_iters: int = _opt("validation micro-batches per evaluation, per process", default=20)
    log_interval: int = _opt("print a log line every this many steps", default=10)
    out_dir: str = _opt("where checkpoints go", default="out")
    resume: bool = _opt("continue the run saved in --out-dir (same data, batch, seed)", default=False)
    export_dir: Optional[str] = _opt("at the end, also write a plain HF checkpoint here (LoRA merged, weights "
                                     "cast to --export-dtype)", default=None)
    export_dtype: str = _opt("dtype of the exported checkpoint: float32, float16, bfloat16", default="float32")
    # ---- system -----------------------------------------------------------------------------------
    device: str = _opt("auto, cpu, cuda, cuda:N (under torchrun: cuda:LOCAL_RANK)", default="auto")
    dtype: str = _opt("autocast: auto (bf16 on CUDA and on CPUs with AVX512-BF16/AMX, else fp32), float32, bfloat16",
                      default="auto")
    compile: bool = _opt("torch.compile the model", default=False)
    grad_checkpointing: bool = _opt("recompute each block's activations in backward (less memory, ~1/3 more "
                                    "compute)", default=False)
    seed: int = _opt("seed for init, data order and dropout", default=1337)

    def __post_init__(self):
        positive = ("max_steps", "batch_size", "grad_accum", "eval_interval", "eval_iters", "log_interval")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.block_size is not None and self.block_size < 1:
            raise ValueError(f"--block-size must be >= 1, got {self.block_size}")
        if self.lora_r < 0:
            raise ValueError(f"--lora-r must be >= 0 (0 = full fine-tuning), got {self.lora_r}")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"--dtype {self.dtype!r} is not one of auto, float32, bfloat16")
        if self.export_dtype not in _DTYPES:
            raise ValueError(f"--export-dtype {self.export_dtype!r} is not one of {', '.join(_DTYPES)}")
        if self.init_from == "scratch" and self.preset not in PRESETS:
            raise ValueError(f"--preset {self.preset!r} is not one of {', '.join(PRESETS)}")
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"--dropout must be in [0, 1), got {self.dropout}")
        if self.lr <= 0:
            raise ValueError(f"--lr must be > 0, got {self.lr}")


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Options that fix the model, the data order or the batch: a resumed run must keep them.
RESUME_MUST_MATCH = ("init_from", "preset", "n_layer", "n_head", "n_embd", "n_positions", "vocab_size",
                     "block_size", "seed",
                     "val_fraction", "lora_r", "lora_alpha", "lora_dropout", "lora_targets")


def build_parser(prog: Optional[str] = None, config_class=None, description: Optional[str] = None,
                 required: tuple[str, ...] = ("data",)):
    """argparse built from a config dataclass (TrainConfig by default): one flag per field (--max-steps for
    max_steps), the field's default and its `help` metadata; bools get --flag / --no-flag."""
    import argparse
    config_class = config_class or TrainConfig
    parser = argparse.ArgumentParser(prog=prog, description=description or __doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    hints = typing.get_type_hints(config_class)
    for f in dataclasses.fields(config_class):
        flag = "--" + f.name.replace("_", "-")
        kind = hints[f.name]
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=f.metadata["help"])
            continue
        base = next((a for a in typing.get_args(kind) if a is not type(None)), kind)  # Optional[int] -> int
        parser.add_argument(flag, type=base, default=f.default, help=f.metadata["help"], required=f.name in required)
    return parser


def parse_args(argv=None, prog: Optional[str] = None) -> TrainConfig:
    return TrainConfig(**vars(build_parser(prog).parse_args(argv)))


# ---- distributed ----------------------------------------------------------------------------------

@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

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
    NCCL for CUDA, gloo for CPU. Returns the ranks and this process's device."""
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


# ---- model, optimizer, schedule -----------------------------------------------------------------

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
        model = GPT2LMHeadModel.from_pretrained(cfg.init_from, dtype=torch.float32)
        if cfg.dropout is not None:
            model.config.resid_pdrop = model.config.embd_pdrop = model.config.attn_pdrop = cfg.dropout
            for m in model.modules():
                if isinstance(m, nn.Dropout):
                    m.p = cfg.dropout
                elif hasattr(m, "attn_pdrop"):
                    m.attn_pdrop = cfg.dropout
    model.set_attn_implementation(cfg.attn_implementation)
    if cfg.lora_r > 0:
        from .lora import apply_lora
        apply_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                   target_modules=tuple(t.strip() for t in cfg.lora_targets.split(",") if t.strip()))
    return model.train()


def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW over the trainable parameters: 2-D tensors (matmul weights, embeddings, LoRA A/B) decay,
    biases and LayerNorm parameters do not (nanoGPT; decaying a gain or shift pulls it to 0, not to a
    sensible prior). The tied lm_head/wte matrix appears once (named_parameters dedups it)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = device.type == "cuda"  # one kernel for all parameters; CPU keeps the (deterministic) for-each path
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused)


class WarmupCosine:
    """lr multiplier at `step`: linear warmup to 1, cosine to min_ratio at decay_steps, then min_ratio.
    A callable object (not a lambda), so LambdaLR's state_dict saves its fields with the checkpoint."""

    def __init__(self, warmup_steps: int, decay_steps: int, min_ratio: float):
        self.warmup_steps, self.decay_steps, self.min_ratio = warmup_steps, decay_steps, min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        if step >= self.decay_steps:
            return self.min_ratio
        progress = (step - self.warmup_steps) / max(1, self.decay_steps - self.warmup_steps)
        return self.min_ratio + 0.5 * (1.0 + math.cos(math.pi * progress)) * (1.0 - self.min_ratio)


def build_scheduler(optimizer, cfg: TrainConfig):
    schedule = WarmupCosine(cfg.warmup_steps, cfg.lr_decay_steps or cfg.max_steps, cfg.min_lr_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: the CPU multiplies bf16 in hardware (oneDNN uses it), so bf16 autocast pays off.
    torch.cpu's probes are private; without them, assume not."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def autocast_dtype(cfg: TrainConfig, device: torch.device) -> Optional[torch.dtype]:
    """bf16 autocast or None (plain fp32). 'auto' picks bf16 on a CUDA GPU that supports it and on a CPU with
    native bf16 matmuls: on the 2-core AVX512-BF16 CPU we develop on, a bf16-autocast training step took
    0.6x the time of an fp32 one for a matmul-bound model (2 x 768 wide) and 0.95x for shakespeare-tiny, whose
    fp32 softmax over 50257 tokens dominates (docs/TRAINING.md). Without native bf16, CPUs emulate it: fp32."""
    if cfg.dtype == "bfloat16":
        return torch.bfloat16
    if cfg.dtype == "float32":
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if device.type == "cpu" and cpu_has_native_bf16() else None


def lm_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, amp: Optional[torch.dtype]) -> torch.Tensor:
    """Mean next-token cross-entropy: x (B, T) -> logits (B, T, V) against y (B, T), computed in fp32."""
    with torch.autocast(x.device.type, dtype=amp) if amp else nullcontext():
        logits = model(x).logits
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1))


# ---- checkpoints ----------------------------------------------------------------------------------

def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(out_dir: str, model: GPT2LMHeadModel, optimizer, scheduler, cfg: TrainConfig, step: int,
                    sequences_seen: int, rng_states: list, world_size: int, metrics: dict) -> None:
    """Weights in HF format (or a PEFT adapter under LoRA) + training_state.pt, written last and atomically,
    so a checkpoint whose state file exists is complete."""
    os.makedirs(out_dir, exist_ok=True)
    if cfg.lora_r > 0:
        from .lora import save_adapter
        save_adapter(model, out_dir, base_model_name_or_path=cfg.init_from)
    else:
        model.save_pretrained(out_dir)
    state = {"step": step, "sequences_seen": sequences_seen, "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict(), "rng": rng_states, "world_size": world_size,
             "config": dataclasses.asdict(cfg), "metrics": metrics}
    tmp = os.path.join(out_dir, STATE_FILE + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, os.path.join(out_dir, STATE_FILE))


def load_state(out_dir: str) -> dict:
    path = os.path.join(out_dir, STATE_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--resume: no {STATE_FILE} in {out_dir!r}; train without --resume first, or point "
                                f"--out-dir at the run to continue")
    # weights_only=False: the state holds numpy's RNG tuple and python's random state; it is our own file
    return torch.load(path, map_location="cpu", weights_only=False)


def export_checkpoint(model: GPT2LMHeadModel, directory: str, dtype: str) -> None:
    """A plain HF checkpoint of `model` in `dtype`, LoRA folded in. Merges and casts `model` in place (no
    second copy of a large model): call it when training is over."""
    from .lora import has_lora, merge_lora
    if has_lora(model):
        merge_lora(model)
    model.to(_DTYPES[dtype]).save_pretrained(directory)


# ---- evaluation -----------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(model: nn.Module, sampler: SequenceSampler, cfg: TrainConfig, dist: Dist, device: torch.device,
             amp: Optional[torch.dtype]) -> float:
    """Mean validation loss (nats/token) over the first eval_iters global batches of the (unshuffled)
    validation split; each rank computes its slice and the mean is all-reduced."""
    was_training = model.training
    model.eval()
    B, W = cfg.batch_size, dist.world_size
    n_batches = max(1, min(cfg.eval_iters, sampler.split.num_sequences // (B * W)))
    total = torch.zeros((), device=device)
    for i in range(n_batches):
        x, y = sampler.batch(i * B * W + dist.rank * B, B)
        total += lm_loss(model, x.to(device), y.to(device), amp)
    loss = total / n_batches
    if dist.enabled:
        torch.distributed.all_reduce(loss)
        loss /= W
    model.train(was_training)
    return loss.item()


# ---- the loop -------------------------------------------------------------------------------------

class StopRequest:
    """SIGINT/SIGTERM -> finish this step, save, exit. A second Ctrl-C interrupts at once (the handlers are
    restored after the first)."""

    def __init__(self):
        self.requested = False
        self._old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
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


@dataclass
class TrainResult:
    step: int                      # optimizer steps completed
    interrupted: bool              # stopped by SIGINT/SIGTERM (a checkpoint was saved)
    val_loss: Optional[float]      # last evaluation (nats/token), None without a validation split
    history: list = field(default_factory=list)  # (step, train loss) at every log line


def train(cfg: TrainConfig, on_step: Optional[Callable[[int], None]] = None) -> TrainResult:
    """Run cfg. `on_step(step)` is called after every optimizer step (tests use it to simulate Ctrl-C)."""
    from tqdm import tqdm
    dist, device = init_distributed(cfg.device)
    data_file = tokenize_file(cfg.data, cfg.cache_dir, verbose=dist.master) if dist.master else None
    dist.barrier()  # rank 0 tokenizes; the others wait for the cache file, then only read it
    if data_file is None:
        data_file = tokenize_file(cfg.data, cfg.cache_dir, verbose=False)

    state = load_state(cfg.out_dir) if cfg.resume else None
    if state is not None:
        saved = state["config"]
        diff = [f"--{k.replace('_', '-')} {saved[k]!r} (now {getattr(cfg, k)!r})" for k in RESUME_MUST_MATCH
                if saved.get(k) != getattr(cfg, k)]
        saved_batch = saved["batch_size"] * saved["grad_accum"] * state.get("world_size", 1)
        if saved_batch != cfg.batch_size * cfg.grad_accum * dist.world_size:
            diff.append(f"global batch {saved_batch} sequences (now {cfg.batch_size * cfg.grad_accum * dist.world_size})")
        if diff:
            raise ValueError(f"--resume: the run in {cfg.out_dir} was started with " + ", ".join(diff) +
                             "; resume with the same settings")

    if state is not None and cfg.lora_r == 0:  # the saved fp32 weights (and config: dropout included)
        model = GPT2LMHeadModel.from_pretrained(cfg.out_dir, dtype=torch.float32).train()
        model.set_attn_implementation(cfg.attn_implementation)
    else:
        model = build_model(cfg)
        if state is not None:  # LoRA: the same frozen base, then the saved adapters
            from .lora import load_adapter
            load_adapter(model, cfg.out_dir)
    model.to(device)
    model.transformer.gradient_checkpointing = cfg.grad_checkpointing
    block_size = cfg.block_size or model.config.n_positions
    if block_size > model.config.n_positions:
        raise ValueError(f"--block-size {block_size} exceeds the model's n_positions {model.config.n_positions}")

    tokens = load_tokens(data_file)
    if model.config.vocab_size < 50257:  # GPT-2 ids reach 50256: make sure this data's all fit
        top = max(int(tokens[s: s + (1 << 24)].max()) for s in range(0, len(tokens), 1 << 24))
        if top >= model.config.vocab_size:
            raise ValueError(f"{cfg.data} has token id {top}, out of range for vocab_size {model.config.vocab_size}; "
                             f"use the GPT-2 vocabulary (50257) for this data")
    train_split, val_split = split_tokens(tokens, cfg.val_fraction, block_size)
    train_sampler = SequenceSampler(train_split, cfg.seed)
    val_sampler = SequenceSampler(val_split, cfg.seed, shuffle=False)

    optimizer = build_optimizer(model, cfg, device)
    scheduler = build_scheduler(optimizer, cfg)
    step, seen = 0, 0
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, seen = state["step"], state["sequences_seen"]
        rngs = state["rng"]
        _set_rng_state(rngs[dist.rank] if len(rngs) == dist.world_size else rngs[0])
    else:
        torch.manual_seed(cfg.seed + dist.rank)  # same init everywhere, different dropout masks per rank

    amp = autocast_dtype(cfg, device)
    net = model
    if cfg.compile:
        net = torch.compile(net)
    if dist.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP
        net = DDP(net, device_ids=[device.index] if device.type == "cuda" else None)

    B, A, W, T = cfg.batch_size, cfg.grad_accum, dist.world_size, block_size
    tokens_per_step = B * A * W * T
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if dist.master:
        print(f"model: {model.num_parameters() / 1e6:.2f}M parameters ({trainable / 1e6:.3f}M trainable), "
              f"n_layer={model.config.n_layer} n_head={model.config.n_head} n_embd={model.config.n_embd}; "
              f"data: {len(train_split.tokens):,} train / {len(val_split.tokens):,} val tokens; "
              f"batch {B}x{A}x{W} sequences of {T} = {tokens_per_step:,} tokens/step; device {device}, "
              f"{'bf16 autocast' if amp else 'fp32'}" + (f"; resuming at step {step}" if state else ""))

    def checkpoint(metrics):
        rngs = [_rng_state()]
        if dist.enabled:
            rngs = [None] * W
            torch.distributed.all_gather_object(rngs, _rng_state())
        if dist.master:
            save_checkpoint(cfg.out_dir, model, optimizer, scheduler, cfg, step, seen, rngs, W, metrics)
        dist.barrier()

    val_loss, history = None, []
    has_val = val_split.num_sequences > 0
    bar = tqdm(total=cfg.max_steps, initial=step, disable=not dist.master, dynamic_ncols=True, desc="train")
    loss_sum, t_last, steps_since = torch.zeros((), device=device), time.perf_counter(), 0
    interrupted = False
    with StopRequest() as stop:
        while step < cfg.max_steps:
            # ---- one optimizer step: A micro-batches; rank r reads sequences [r*B, (r+1)*B) of each
            for micro in range(A):
                x, y = train_sampler.batch(seen + micro * B * W + dist.rank * B, B)
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                sync = nullcontext() if (not dist.enabled or micro == A - 1) else net.no_sync()
                with sync:  # DDP all-reduces gradients only on the last micro-batch
                    loss = lm_loss(net, x, y, amp) / A
                    loss.backward()
                loss_sum += loss.detach()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            seen += B * A * W
            steps_since += 1
            bar.update(1)

            if step % cfg.log_interval == 0 or step == cfg.max_steps:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                dt = (time.perf_counter() - t_last) / steps_since
                train_loss = loss_sum.item() / steps_since  # this rank's loss, mean over the interval
                history.append((step, train_loss))
                if dist.master:
                    lr = optimizer.param_groups[0]["lr"]
                    bar.write(f"step {step:>6}/{cfg.max_steps} | loss {train_loss:.4f} | lr {lr:.2e} | "
                              f"{dt * 1000:8.1f} ms/step | {tokens_per_step / dt:10,.0f} tok/s")
                loss_sum.zero_()
                t_last, steps_since = time.perf_counter(), 0
            if on_step is not None:
                on_step(step)
            stop_now = stop.requested
            if dist.enabled:  # every rank must stop after the same step, whichever saw the signal
                flag = torch.tensor(float(stop_now), device=device)
                torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
                stop_now = bool(flag.item())
            if step % cfg.eval_interval == 0 or step == cfg.max_steps or stop_now:
                t_eval = time.perf_counter()
                if has_val and not stop_now:
                    val_loss = evaluate(net, val_sampler, cfg, dist, device, amp)
                    if dist.master:
                        bar.write(f"step {step:>6} | val loss {val_loss:.4f} | val ppl {math.exp(val_loss):.2f}")
                checkpoint({"val_loss": val_loss})
                t_last += time.perf_counter() - t_eval  # evaluation and saving do not count as step time
            if stop_now:
                interrupted = True
                if dist.master:
                    bar.write(f"interrupted: saved step {step} to {cfg.out_dir}; continue with --resume")
                break
    bar.close()
    if not interrupted and cfg.export_dir and dist.master:  # last: it merges and casts the model in place
        export_checkpoint(model, cfg.export_dir, cfg.export_dtype)
        print(f"exported a {cfg.export_dtype} checkpoint to {cfg.export_dir}")
    dist.barrier()
    return TrainResult(step=step, interrupted=interrupted, val_loss=val_loss, history=history)


# ---- measurement helpers --------------------------------------------------------------------------

def saved_activation_bytes(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    """Bytes autograd keeps alive between forward and backward for one training step: every tensor saved
    for backward (torch.autograd.graph.saved_tensors_hooks sees each), counted once per storage, with the
    parameters left out (they exist either way). What gradient checkpointing trades away."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = lm_loss(model, x, y, None)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(storages.values())


# ---- perplexity with a sliding window ---------------------------------------------------------------

@torch.no_grad()
def sliding_window_perplexity(model: nn.Module, ids: torch.Tensor, max_length: Optional[int] = None,
                              stride: int = 512, device=None, progress: bool = False) -> tuple[float, float, int]:
    """(perplexity, mean nll in nats, tokens scored) of a long token sequence `ids` (N,), by Hugging Face's
    "Perplexity of fixed-length models" recipe (https://huggingface.co/docs/transformers/perplexity):
    windows of max_length tokens start every `stride` tokens; each window scores only the tokens no earlier
    window scored (the others are context, label -100); a window's mean loss is weighted by its count of
    non-ignored labels minus one, exactly as the recipe does (its `num_loss_tokens`), so the numbers equal
    transformers' to fp tolerance. stride == max_length means disjoint windows (no overlap)."""
    max_length = max_length or model.config.n_positions
    if not 1 <= stride <= max_length:
        raise ValueError(f"stride must be in [1, max_length={max_length}], got {stride}")
    if max_length > model.config.n_positions:
        raise ValueError(f"max_length {max_length} exceeds the model's n_positions {model.config.n_positions}")
    ids = ids.reshape(1, -1)
    seq_len = ids.size(1)
    if seq_len < 2:
        raise ValueError(f"need at least 2 tokens to score, got {seq_len}")
    device = device or next(model.parameters()).device
    nll_sum, n_tokens, prev_end = 0.0, 0, 0
    starts = range(0, seq_len, stride)
    if progress:
        from tqdm import tqdm
        starts = tqdm(starts, desc="perplexity")
    for begin in starts:
        end = min(begin + max_length, seq_len)
        trg_len = end - prev_end  # tokens this window scores (stride, except at the ends)
        input_ids = ids[:, begin:end].to(device)
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        num_loss_tokens = int((target_ids != -100).sum()) - target_ids.size(0)
        if num_loss_tokens > 0:  # a 1-token tail window has nothing to score (the recipe would add 0 * nan)
            loss = model(input_ids, labels=target_ids).loss  # mean over the scored, shifted labels
            nll_sum += loss.item() * num_loss_tokens
            n_tokens += num_loss_tokens
        prev_end = end
        if end == seq_len:
            break
    mean_nll = nll_sum / n_tokens
    return math.exp(mean_nll), mean_nll, n_tokens
