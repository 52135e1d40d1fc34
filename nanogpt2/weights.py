"""Hugging Face checkpoint I/O: read weight files strictly into a model, map names, write them back.

Where the files are is files.py's job; which class to build is the caller's (model.py passes itself in: this
module never imports the model). The mapping to transformers' layout is four transposes per block and a tie (see model.py); loading is
strict where transformers is lenient: a missing, unexpected or mis-shaped tensor is an error naming it,
never a silently random-initialised weight. The model is built on the meta device and each tensor is
materialised once, in its final dtype and device, so loading needs about one model's size of memory.
"""
from __future__ import annotations

import ctypes
import json
import math
import os
import pickle
import re
import zipfile
from typing import Iterator

import torch
import torch.nn as nn

from . import quantization
from .config import GPT2Config
from .dtypes import dtype_from_name, dtype_name
from .files import SAFE_INDEX, SAFE_SINGLE, TORCH_BIN, CheckpointError, resolve

# HF's Conv1D layers store weight [in, out]; ours are nn.Linear [out, in]: transpose on read and write.
CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# Buffers old checkpoints carry (the causal mask and its fill value); we rebuild neither.
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")


# glibc's malloc_trim, or None (other C libraries): see _release_freed_heap
try:
    _MALLOC_TRIM = ctypes.CDLL(None).malloc_trim   # the running process's symbols: glibc's on Linux
    _MALLOC_TRIM.argtypes, _MALLOC_TRIM.restype = [ctypes.c_size_t], ctypes.c_int
except (OSError, AttributeError, TypeError):   # no such symbol (macOS, musl); Windows: CDLL(None) raises TypeError
    _MALLOC_TRIM = None
TRIM_BYTES = 64 << 20  # trim once this many bytes of read buffers have been freed since the last trim


def _release_freed_heap() -> None:
    """Return the heap's free pages to the OS. Loading reads each tensor into memory of its own and, for a
    transposed Conv1D weight, a cast, or quantize-while-loading, frees it after copying: glibc keeps such holes
    for reuse, and smaller later allocations (the integer copies, the quantizer's chunks) split them, so the heap
    grows on: loading gpt2-xl with quantize="int8" peaked at 0.61x the checkpoint's bytes without this, of which
    only 0.25x was the model (benchmarks/load_memory.py, BENCHMARKS.md). malloc_trim(0) gives back every free
    page, also inside the heap; called every TRIM_BYTES of freed buffers, as each call walks the heap. Not glibc
    (macOS, musl, Windows): there is no such call, and nothing is done."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


# ---- reading ------------------------------------------------------------------------------------

def load_plain_data(path: str, mmap: bool = False):
    """torch.load(path) of tensors, numbers, strings, lists and dicts only (weights_only=True), on CPU. A file whose
    pickle asks to build any other object is refused with a CheckpointError naming the file and what it asked
    for, before that object is built: code a file carries never runs. (torch's own message would suggest
    weights_only=False, the one thing not to do with a file of unknown origin, so it is not passed on.)"""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        named = re.search(r"GLOBAL (\S+)", str(e))   # pickle's GLOBAL opcode names the function or class to call
        detail = f"it asks for {named.group(1)}" if named else f"torch: {str(e).splitlines()[0]}"
        raise CheckpointError(f"refusing to load {path}: it holds pickled Python objects other than tensors, "
                              f"numbers, strings, lists and dicts ({detail}), and building them could run code "
                              "from the file") from None


# safetensors' dtype names (https://github.com/huggingface/safetensors, format.md) -> torch
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


class _TensorSource:
    """Names, shapes and lazily read tensors of one weight file (safetensors, or a torch .bin).

    safetensors is read by hand, not memory-mapped: 8 bytes of header length (little-endian), a JSON header
    {name: {dtype, shape, data_offsets}}, then the raw bytes; each tensor is read into memory of its own, once.
    A mapping would keep every page it touched resident in this process until the file is closed, so loading
    (especially quantize-while-loading, which drops each float tensor as soon as it is quantized) would peak at
    the whole file on top of the model."""

    def __init__(self, path: str):
        self.path = path
        try:
            if path.endswith(".safetensors"):
                self._file = open(path, "rb")
                n = int.from_bytes(self._file.read(8), "little")
                header = json.loads(self._file.read(n))
                header.pop("__metadata__", None)
                self._entries, self._data_start = header, 8 + n
                self._keys = list(header)
            else:   # mmap (tensors stay on disk until used) needs torch's zip format (torch >= 1.6); older .bin
                # files are read whole, as transformers reads them
                self._sd = load_plain_data(path, mmap=zipfile.is_zipfile(path))
                self._keys = list(self._sd.keys())
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"cannot read weight file {path}: {type(e).__name__}: {e} - the file is truncated "
                                  "or corrupt; download or save it again") from None

    def keys(self) -> list[str]:
        return self._keys

    def shape(self, key: str) -> tuple[int, ...]:
        if hasattr(self, "_entries"):
            return tuple(self._entries[key]["shape"])
        return tuple(self._sd[key].shape)

    @property
    def owns_reads(self) -> bool:
        """Whether get() returns memory of its own, which dies with the tensor (safetensors); a .bin file's
        tensors belong to its loaded (or mapped) state dict."""
        return hasattr(self, "_entries")

    def dtype(self, key: str) -> torch.dtype:
        return self._dtype(key) if hasattr(self, "_entries") else self._sd[key].dtype

    def is_float(self, key: str) -> bool:
        return self.dtype(key).is_floating_point

    def _dtype(self, key: str) -> torch.dtype:
        name = self._entries[key]["dtype"]
        if name not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"tensor {key!r} in {self.path} has dtype {name}, which a GPT-2 checkpoint never "
                                  f"holds; readable: {', '.join(SAFETENSORS_DTYPES)}")
        return SAFETENSORS_DTYPES[name]

    def get(self, key: str) -> torch.Tensor:
        if not hasattr(self, "_entries"):
            return self._sd[key]
        entry, dtype = self._entries[key], self._dtype(key)
        begin, end = entry["data_offsets"]
        buf = torch.empty(end - begin, dtype=torch.uint8)
        self._file.seek(self._data_start + begin)
        got = self._file.readinto(memoryview(buf.numpy())) if end > begin else 0
        if got != end - begin or (end - begin) != dtype.itemsize * math.prod(entry["shape"]):
            raise CheckpointError(f"cannot read tensor {key!r} from {self.path}: {got} of {end - begin} bytes for "
                                  f"shape {entry['shape']} {entry['dtype']} - the file is truncated or corrupt")
        return buf.view(dtype).view(entry["shape"])


def _canonical(key: str) -> str:
    """A tensor's name without the "transformer." prefix, and a quantized layer's `qweight` under the file name
    `weight` (quantization.py: the file keeps the layer's HF name, so transformers refuses its integer shapes)."""
    key = key[len("transformer."):] if key.startswith("transformer.") else key
    return key[: -len("qweight")] + "weight" if key.endswith(".qweight") else key


def _resolve_dtype(dtype, checkpoint_dtype: torch.dtype) -> torch.dtype:
    """None: float32 (as transformers); "auto": the checkpoint's own; else a name or torch dtype (dtypes.py)."""
    if dtype is None:
        return torch.float32
    return checkpoint_dtype if dtype == "auto" else dtype_from_name(dtype)


def load_pretrained(cls, name_or_path, dtype=None, device=None, revision=None, quantize=None,
                    group_size=None) -> nn.Module:
    """A `cls(config)` (any module taking a GPT2Config, built on the meta device) filled from the checkpoint that
    `name_or_path` names (files.resolve), in eval mode, as transformers returns it. `quantize` ("int8" / "int4",
    quantization.py) quantizes each weight as it is read; a checkpoint saved quantized loads as it was saved."""
    ckpt = resolve(name_or_path, revision)
    config = GPT2Config.from_json_file(ckpt.config_file)
    saved = config.extra.get("quantization_config")
    if quantize is None and group_size is not None:
        raise ValueError(f"group_size={group_size!r} needs quantize=\"int4\"")
    with torch.device("meta"):
        model = cls(config)
    quantizer = None
    if saved is not None:
        mode, g = quantization.check_saved_config(saved, ckpt.config_file, quantize, group_size)
        quantization.build_quantized(model, mode, g)
    elif quantize is not None:
        quantizer = quantization.Quantizer(model, quantize, group_size)
    load_weights(model, ckpt.weight_files, dtype=dtype, device=device, quantizer=quantizer)
    if quantizer is not None:
        quantizer.finish(model)
    model.name_or_path = ckpt.source
    return model.eval()  # as transformers: dropout off until .train()


def load_weights(model: nn.Module, files: list[str], dtype=None, device=None, quantizer=None) -> None:
    """Fill `model`'s parameters (meta or real) from HF weight files, strictly; see the module doc. Integer
    tensors (a quantized checkpoint's) keep their dtype and nn.Linear layout; `quantizer` (quantization.Quantizer)
    is told after each module is filled."""
    config = model.config
    expected = {_canonical(n): n for n, _ in model.named_parameters()}  # canonical -> our name
    # a checkpoint's lm_head.weight is skipped when it is wte itself (tied) or the model has no head (GPT2Model)
    head_optional = "lm_head.weight" not in expected or config.tie_word_embeddings
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
            param = params[expected[canon]]
            if param.is_floating_point() != src.is_float(key):
                raise CheckpointError(f"tensor {key!r} in {src.path} is {'float' if src.is_float(key) else 'integer'} "
                                      f"but this model needs {'a float' if param.is_floating_point() else 'an integer'}"
                                      " tensor there: a quantized checkpoint needs the quantization_config its "
                                      "config.json was saved with (quantization.py)")
            shape = src.shape(key)
            if _conv1d(canon, param):
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

    # the checkpoint's own dtype ("auto"): its first float tensor's (a quantized one's integers say nothing)
    first = next((src.dtype(key) for src, key, _ in plan if src.is_float(key)), None)
    target = _resolve_dtype(dtype, first or torch.float32)
    device = torch.device(device) if device is not None else torch.device("cpu")
    freed = 0   # bytes of read buffers freed since the heap was last trimmed
    for src, key, canon in plan:
        read = src.get(key)
        param = params[expected[canon]]
        t = read.t() if _conv1d(canon, param) else read
        t = t.to(device=device, dtype=target if t.is_floating_point() else t.dtype).contiguous()
        copied = t.untyped_storage().data_ptr() != read.untyped_storage().data_ptr()
        module_name, _, attr = expected[canon].rpartition(".")
        module = model.get_submodule(module_name)
        module._parameters[attr] = nn.Parameter(t, requires_grad=param.requires_grad)
        del t
        if copied and src.owns_reads:                    # the read buffer dies here
            freed += read.nbytes
        if quantizer is not None:                        # a swapped layer dropped its float weight
            freed += quantizer.loaded(model, module_name)
        del read
        if freed >= TRIM_BYTES:
            _release_freed_heap()
            freed = 0
    quantization.repack(model)
    if hasattr(model, "tie_weights"):
        model.tie_weights()


def _conv1d(canon: str, param: torch.Tensor) -> bool:
    """HF stores these four as Conv1D [in, out]; a quantized checkpoint's integer ones are nn.Linear [out, in]."""
    return canon.endswith(CONV1D_SUFFIXES) and param.is_floating_point()


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
    """(name, tensor) in Hugging Face's layout: Conv1D weights transposed, tied lm_head left out (with its scales
    and zeros when quantized: they are wte's). Integer tensors keep nn.Linear's [out, in] (quantization.py)."""
    tied = getattr(model.config, "tie_word_embeddings", True)
    for name, t in model.state_dict().items():
        if name.startswith("lm_head.") and name != "lm_head.bias" and tied:
            continue
        if _conv1d(name, t):
            t = t.t()
        if name.endswith(".qweight"):
            name = name[: -len("qweight")] + "weight"
        yield name, t.detach()


def check_saveable(model: nn.Module) -> None:
    """Refuse a model that a plain checkpoint cannot represent. A module says so itself with an attribute
    `checkpoint_refusal`: a sentence on what to do instead. lora.LoRALinear has one (its keys, base_layer and
    lora_A/B, would make a checkpoint no GPT-2 loader accepts); process_weights sets one on the model."""
    refusing = [(name or type(model).__name__, m.checkpoint_refusal) for name, m in model.named_modules()
                if getattr(m, "checkpoint_refusal", None)]
    if refusing:
        names = ", ".join(name for name, _ in refusing[:3]) + (", ..." if len(refusing) > 3 else "")
        raise ValueError(f"cannot save a plain checkpoint of this model ({names}): {refusing[0][1]}")


# model-00001-of-00003.safetensors: the shard names transformers and save_pretrained below write
SHARD_NAME = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")


def _remove_previous_save(save_directory: str, written: set[str]) -> None:
    """Delete the weight files a previous save left (any format, any shard count) that this save did not write,
    so the directory holds exactly the new checkpoint: a stale shard beside a new index would be loaded by nobody
    yet look like part of it. Called after the new files are written, so a save that fails midway leaves the
    previous files whose names differ from the new ones."""
    for name in os.listdir(save_directory):
        if name in written:
            continue
        if name in (SAFE_SINGLE, SAFE_INDEX, TORCH_BIN) or SHARD_NAME.fullmatch(name):
            os.remove(os.path.join(save_directory, name))


def save_pretrained(model: nn.Module, save_directory, max_shard_size="5GB") -> None:
    from safetensors.torch import save_file

    check_saveable(model)
    limit = _parse_size(max_shard_size)
    os.makedirs(save_directory, exist_ok=True)
    config = model.config.to_dict()
    config["architectures"] = [type(model).__name__]
    config["dtype"] = dtype_name(model.dtype)
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

    if len(shards) == 1:
        save_file({n: t.contiguous() for n, t in shards[0]}, os.path.join(save_directory, SAFE_SINGLE),
                  metadata={"format": "pt"})
        _remove_previous_save(save_directory, {SAFE_SINGLE})
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
    _remove_previous_save(save_directory, {SAFE_INDEX, *weight_map.values()})
