"""Hugging Face checkpoint I/O: resolve a name to files, read them strictly, map names, write them back.

Where a model comes from, in the order tried:
  1. a local directory (config.json + model.safetensors | model.safetensors.index.json + shards |
     pytorch_model.bin);
  2. a model bundled with nanogpt2 (nanogpt2/assets/models/<name>/, e.g. "shakespeare-tiny");
  3. a Hugging Face hub id ("gpt2", "openai-community/gpt2-medium", ...) through huggingface_hub, which
     honours HF_HOME / HF_HUB_OFFLINE and its cache.

The mapping to transformers' layout is four transposes per block and a tie (see model.py); loading is
strict where transformers is lenient: a missing, unexpected or mis-shaped tensor is an error naming it,
never a silently random-initialised weight. The model is built on the meta device and each tensor is
materialised once, in its final dtype and device, so loading needs about one model's size of memory.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import torch.nn as nn

from .attention import check_backend
from .config import PRESETS, GPT2Config

BUNDLED_DIR = os.path.join(os.path.dirname(__file__), "assets", "models")
SAFE_SINGLE, SAFE_INDEX, TORCH_BIN = "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"
# HF's Conv1D layers store weight [in, out]; ours are nn.Linear [out, in]: transpose on read and write.
CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# Buffers old checkpoints carry (the causal mask and its fill value); we rebuild neither.
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: the message names the file or tensor and what was expected."""


@dataclass
class Checkpoint:
    source: str                 # what the user asked for
    directory: str              # where the files are
    config_file: str
    weight_files: list[str]     # one safetensors, N shards, or one pytorch_model.bin


def bundled_models() -> list[str]:
    if not os.path.isdir(BUNDLED_DIR):
        return []
    return sorted(d for d in os.listdir(BUNDLED_DIR) if os.path.isfile(os.path.join(BUNDLED_DIR, d, "config.json")))


def _looks_like_path(name: str) -> bool:
    return name.startswith((os.sep, ".", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name


def _local_weight_files(directory: str) -> Optional[list[str]]:
    if os.path.isfile(os.path.join(directory, SAFE_SINGLE)):
        return [os.path.join(directory, SAFE_SINGLE)]
    if os.path.isfile(os.path.join(directory, SAFE_INDEX)):
        return _shards_from_index(os.path.join(directory, SAFE_INDEX))
    if os.path.isfile(os.path.join(directory, TORCH_BIN)):
        return [os.path.join(directory, TORCH_BIN)]
    return None


def _shards_from_index(index_file: str, fetch=None) -> list[str]:
    try:
        with open(index_file, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index_file} is not a valid safetensors index (needs a 'weight_map'): {e}") from None
    directory = os.path.dirname(index_file)
    files = []
    for shard in sorted(set(weight_map.values())):
        path = fetch(shard) if fetch else os.path.join(directory, shard)
        if not os.path.isfile(path):
            raise CheckpointError(f"{index_file} lists shard {shard!r}, which is missing from {directory}")
        files.append(path)
    return files


def resolve(name_or_path: str, revision: Optional[str] = None) -> Checkpoint:
    """Find config.json and the weight files for a directory, a bundled name or a hub id."""
    name = os.fspath(name_or_path)
    tried = []
    if os.path.isdir(os.path.expanduser(name)):
        directory = os.path.expanduser(name)
        config_file = os.path.join(directory, "config.json")
        files = _local_weight_files(directory)
        if not os.path.isfile(config_file) or files is None:
            raise CheckpointError(f"{directory} is not a GPT-2 checkpoint directory: it needs config.json and one of "
                                  f"{SAFE_SINGLE}, {SAFE_INDEX} (+ shards) or {TORCH_BIN}; it has "
                                  f"{sorted(os.listdir(directory))}")
        return Checkpoint(name, directory, config_file, files)
    tried.append(f"local directory {name!r}: does not exist")
    if name in bundled_models():
        directory = os.path.join(BUNDLED_DIR, name)
        return Checkpoint(name, directory, os.path.join(directory, "config.json"), _local_weight_files(directory))
    tried.append(f"bundled models {bundled_models()}: not among them")
    if _looks_like_path(name):
        raise CheckpointError(f"cannot load {name!r}: " + "; ".join(tried))
    return _resolve_hub(name, revision, tried)


def _resolve_hub(repo_id: str, revision: Optional[str], tried: list[str]) -> Checkpoint:
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:  # pragma: no cover - it is a dependency
        raise CheckpointError(f"cannot load {repo_id!r}: huggingface_hub is not installed") from None

    def fetch(filename: str) -> str:
        return hf_hub_download(repo_id, filename, revision=revision)

    try:
        config_file = fetch("config.json")
    except Exception as e:  # offline, unknown repo, unknown revision, no network: say which
        tried.append(f"Hugging Face hub id {repo_id!r}{f' at revision {revision!r}' if revision else ''}: "
                     f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        hint = ("pass a local directory holding config.json and model.safetensors, a bundled model name, or a hub "
                "id; without network access the hub files must already be in the huggingface_hub cache "
                "(HF_HOME), e.g. downloaded on a connected machine with `huggingface-cli download " + repo_id + "`")
        raise CheckpointError(f"cannot load {repo_id!r}:\n  - " + "\n  - ".join(tried) + f"\n{hint}") from None
    errors = []
    for filename in (SAFE_SINGLE, SAFE_INDEX, TORCH_BIN):
        try:
            path = fetch(filename)
        except Exception as e:
            errors.append(f"{filename}: {type(e).__name__}")
            continue
        files = _shards_from_index(path, fetch) if filename == SAFE_INDEX else [path]
        return Checkpoint(repo_id, os.path.dirname(config_file), config_file, files)
    raise CheckpointError(f"hub model {repo_id!r} has config.json but no weights could be fetched "
                          f"({'; '.join(errors)})")


def resolve_config_file(name_or_path: str, revision: Optional[str] = None) -> Optional[str]:
    """config.json of a checkpoint; None for a preset name whose files cannot be fetched (use the preset)."""
    try:
        return resolve(name_or_path, revision).config_file
    except CheckpointError:
        if name_or_path in PRESETS:
            return None
        raise


# ---- reading ------------------------------------------------------------------------------------

class _TensorSource:
    """Names, shapes and lazily read tensors of one weight file (safetensors via mmap, or a torch .bin)."""

    def __init__(self, path: str):
        self.path = path
        try:
            if path.endswith(".safetensors"):
                from safetensors import safe_open
                self._f = safe_open(path, framework="pt", device="cpu")
                self._keys = list(self._f.keys())
            else:  # weights_only: a pickle cannot run code; mmap: tensors stay on disk until used
                self._sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                self._keys = list(self._sd.keys())
        except Exception as e:
            raise CheckpointError(f"cannot read weight file {path}: {type(e).__name__}: {e} - the file is truncated "
                                  "or corrupt; download or save it again") from None

    def keys(self) -> list[str]:
        return self._keys

    def shape(self, key: str) -> tuple[int, ...]:
        if hasattr(self, "_f"):
            return tuple(self._f.get_slice(key).get_shape())
        return tuple(self._sd[key].shape)

    def get(self, key: str) -> torch.Tensor:
        try:
            return self._f.get_tensor(key) if hasattr(self, "_f") else self._sd[key]
        except Exception as e:
            raise CheckpointError(f"cannot read tensor {key!r} from {self.path}: {type(e).__name__}: {e} - the file "
                                  "is truncated or corrupt") from None


def _canonical(key: str) -> str:
    return key[len("transformer."):] if key.startswith("transformer.") else key


def _resolve_dtype(dtype, checkpoint_dtype: torch.dtype) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if dtype == "auto":
        return checkpoint_dtype
    if isinstance(dtype, str):
        names = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
                 "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
        if dtype not in names:
            raise ValueError(f"dtype {dtype!r} is not one of {', '.join(names)}, 'auto' or a torch.dtype")
        return names[dtype]
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point torch.dtype, a name or 'auto', got {dtype!r}")
    return dtype


def load_pretrained(cls, name_or_path, dtype=None, device=None, attn_implementation="auto", revision=None):
    check_backend(attn_implementation)
    ckpt = resolve(name_or_path, revision)
    config = GPT2Config.from_json_file(ckpt.config_file)
    with torch.device("meta"):
        model = cls(config)
    load_weights(model, ckpt.weight_files, dtype=dtype, device=device)
    model.set_attn_implementation(attn_implementation)
    model.name_or_path = ckpt.source
    return model.eval()  # as transformers: dropout off until .train()


def load_weights(model: nn.Module, files: list[str], dtype=None, device=None) -> None:
    """Fill `model`'s parameters (meta or real) from HF weight files, strictly; see the module doc."""
    from .model import GPT2Model
    config = model.config
    expected = {_canonical(n): n for n, _ in model.named_parameters()}  # canonical -> our name
    head_optional = isinstance(model, GPT2Model) or config.tie_word_embeddings
    if head_optional:
        expected.pop("lm_head.weight", None)
    params = dict(model.named_parameters())

    sources = [_TensorSource(f) for f in files]
    plan, unexpected, seen = [], [], set()
    for src in sources:
        for key in src.keys():
            canon = _canonical(key)
            if key.endswith(IGNORED_SUFFIXES) or (canon == "lm_head.weight" and head_optional):
                continue  # mask buffers; a head that is wte itself (or that GPT2Model does not have)
            if canon not in expected:
                unexpected.append(f"{key} (in {os.path.basename(src.path)})")
                continue
            shape = src.shape(key)
            if canon.endswith(CONV1D_SUFFIXES):
                shape = shape[::-1]
            want = tuple(params[expected[canon]].shape)
            if shape != want:
                raise CheckpointError(
                    f"tensor {key!r} in {src.path} has shape {_hf_shape(canon, shape)} but this config needs "
                    f"{_hf_shape(canon, want)} (n_embd={config.n_embd}, n_inner={config.inner_dim}, "
                    f"vocab_size={config.vocab_size}, n_positions={config.n_positions}): config.json and the "
                    "weights do not belong together")
            plan.append((src, key, canon))
            seen.add(canon)
    if unexpected:
        raise CheckpointError(f"unexpected tensor(s) not part of a GPT-2 with this config: {_names(unexpected)}")
    missing = sorted(set(expected) - seen)
    if missing:
        raise CheckpointError(f"missing tensor(s) in {', '.join(os.path.basename(f) for f in files)}: "
                              f"{_names(missing)} (config.json says n_layer={config.n_layer}; nanogpt2 never "
                              "initialises a missing weight at random)")

    first = sources[0].get(plan[0][1]) if plan else None
    target = _resolve_dtype(dtype, first.dtype if first is not None else torch.float32)
    device = torch.device(device) if device is not None else torch.device("cpu")
    for src, key, canon in plan:
        t = src.get(key)
        if canon.endswith(CONV1D_SUFFIXES):
            t = t.t()
        t = t.to(device=device, dtype=target).contiguous()
        module_name, _, attr = expected[canon].rpartition(".")
        module = model.get_submodule(module_name)
        module._parameters[attr] = nn.Parameter(t, requires_grad=module._parameters[attr].requires_grad)
    if hasattr(model, "tie_weights"):
        model.tie_weights()


def _hf_shape(canon: str, shape) -> str:
    return f"{list(shape[::-1])} (HF Conv1D [in, out])" if canon.endswith(CONV1D_SUFFIXES) else str(list(shape))


def _names(names: list[str], limit: int = 8) -> str:
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


# ---- writing ------------------------------------------------------------------------------------

def _parse_size(size) -> int:
    if isinstance(size, int):
        return size
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    s = str(size).strip().upper()
    for unit, mult in units.items():
        if s.endswith(unit) and s[: -len(unit)].strip().replace(".", "", 1).isdigit():
            return int(float(s[: -len(unit)]) * mult)
    raise ValueError(f"max_shard_size {size!r}: give bytes as an int or a string like '5GB', '500MB'")


def hf_state_dict(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) in Hugging Face's layout: Conv1D weights transposed, tied lm_head left out."""
    tied = getattr(model.config, "tie_word_embeddings", True)
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and tied:
            continue
        if name.endswith(CONV1D_SUFFIXES):
            t = t.t()
        yield name, t.detach()


def save_pretrained(model: nn.Module, save_directory, max_shard_size="5GB") -> None:
    from safetensors.torch import save_file

    from .lora import lora_modules
    adapters = list(lora_modules(model))
    if adapters:   # their keys (c_attn.base_layer.weight, lora_A ...) would make a checkpoint nobody can load
        raise ValueError(f"the model has unmerged LoRA adapters ({', '.join(adapters[:3])}"
                         f"{', ...' if len(adapters) > 3 else ''}): call nanogpt2.lora.merge_lora(model) first to "
                         "save a plain checkpoint, or nanogpt2.lora.save_adapter(model, dir) to save the adapters")
    limit = _parse_size(max_shard_size)
    os.makedirs(save_directory, exist_ok=True)
    config = model.config.to_dict()
    config["architectures"] = [type(model).__name__]
    config["dtype"] = str(model.dtype).replace("torch.", "")
    with open(os.path.join(save_directory, "config.json"), "w", encoding="utf-8") as f:
        json.dump(dict(sorted(config.items())), f, indent=2)
        f.write("\n")

    shards, current, size = [], [], 0
    for name, t in hf_state_dict(model):
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > limit:
            shards.append(current)
            current, size = [], 0
        current.append((name, t))
        size += nbytes
    shards.append(current)
    for stale in (SAFE_SINGLE, SAFE_INDEX, TORCH_BIN):  # never leave an older format next to the new one
        if os.path.exists(os.path.join(save_directory, stale)):
            os.remove(os.path.join(save_directory, stale))

    if len(shards) == 1:
        save_file({n: t.contiguous() for n, t in shards[0]}, os.path.join(save_directory, SAFE_SINGLE),
                  metadata={"format": "pt"})
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: t.contiguous() for n, t in shard}, os.path.join(save_directory, fname), metadata={"format": "pt"})
        for n, t in shard:
            weight_map[n] = fname
            total += t.numel() * t.element_size()
    with open(os.path.join(save_directory, SAFE_INDEX), "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
