"""A training run on disk: the weights, training_state.pt next to them, and the RNG states that make
`--resume` bitwise. File I/O only; what goes into the state (step, optimizer, ...) is the loop's business.

    out_dir/                                              one process or DDP
      config.json + model.safetensors                     full training: a Hugging Face checkpoint (fp32)
      adapter_config.json + adapter_model.safetensors     LoRA: a PEFT adapter (the base is --init-from)
      training_state.pt                                   step, data position, optimizer, scheduler, RNGs, ...

    out_dir/                                              --fsdp: sharded, written by every rank at once
      sharded/.metadata + __{rank}_0.distcp               torch.distributed.checkpoint (DCP): the trained weights
                                                          (all of them; LoRA: the adapters) and AdamW's state,
                                                          each rank writing the shard it holds
      config.json                                         the architecture, to rebuild the model to load into
      training_state.pt                                   as above, less the optimizer (it is in sharded/)

DCP stores where every piece of every tensor is, so a sharded checkpoint loads into any number of processes
(each reads the pieces of its new shard) or, for export, into one plain model with no process group at all.

training_state.pt is a torch.save'd dict of plain data only: tensors, numbers, strings, None, lists, tuples and
dicts. That is what lets `--resume` read it with torch.load(weights_only=True), which builds no other Python
object and so never runs code a file carries: a pickle can name any function to call while it loads
(`__reduce__`), and an --out-dir can come from anywhere. The RNG states are the reason this needs care:
numpy's and Python's are tuples holding ndarrays and long int tuples, stored here as int64 tensors and
turned back into exactly the same states. DCP's own loader is not that careful: it unpickles its .metadata file
and the non-tensor entries (the optimizer's lr, betas, ...) with full pickle, so sharded checkpoints are read
through _SafeReader and _SafeLoadPlanner below, which allow plain data and DCP's own metadata classes only.
"""
from __future__ import annotations

import io
import os
import pickle
import random
import re
import shutil
import warnings

import numpy as np
import torch
import torch.distributed
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint import CheckpointException, DefaultLoadPlanner, DefaultSavePlanner, FileSystemReader
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from .lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, has_lora, merge_lora, save_adapter
from .dtypes import dtype_from_name
from .files import SAFE_INDEX, SAFE_SINGLE, TORCH_BIN, CheckpointError
from .quantization import dequantize, is_quantized
from .shards import AtomicFile
from .weights import SHARD_NAME, load_plain_data

STATE_FILE = "training_state.pt"
SHARDED_DIR = "sharded"   # --fsdp: the torch.distributed.checkpoint folder inside out_dir
# what a plain (non-sharded) save leaves in out_dir, besides config.json and model-0000k-of-0000n.safetensors
# shards (weights.SHARD_NAME): a sharded save deletes them, so no loader ever finds another step's weights
PLAIN_FILES = (STATE_FILE, SAFE_SINGLE, SAFE_INDEX, TORCH_BIN, ADAPTER_CONFIG, ADAPTER_WEIGHTS)


# ---- RNG states as plain data ---------------------------------------------------------------------

def rng_state() -> dict:
    """This process's RNG states, as tensors and numbers (loadable with weights_only=True):
      torch   (5056,) uint8, torch.get_rng_state()
      cuda    one uint8 tensor per GPU (only when CUDA is available)
      numpy   MT19937: key (624,) int64 (uint32 values), pos, has_gauss, gauss, np.random.get_state()'s fields
      python  MT19937: internal (625,) int64 (624 uint32 words + the position), version, gauss_next"""
    np_state = np.random.get_state(legacy=False)  # {'bit_generator', 'state': {'key', 'pos'}, 'has_gauss', 'gauss'}
    version, internal, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"bit_generator": np_state["bit_generator"],
                  "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                  "pos": int(np_state["state"]["pos"]), "has_gauss": int(np_state["has_gauss"]),
                  "gauss": float(np_state["gauss"])},
        "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64),
                   "gauss_next": gauss_next},  # a float or None
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what rng_state() returned: afterwards every generator draws what it would have drawn then."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state({"bit_generator": n["bit_generator"],
                         "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]},
                         "has_gauss": n["has_gauss"], "gauss": n["gauss"]})
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"].tolist()), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def restore_rng_state(saved: list, rank: int, world_size: int, seed: int, step: int) -> None:
    """Continue this rank's random streams from a checkpoint's `saved` states (one per rank that saved it).
    Resumed on as many processes as saved it, rank r takes saved[r], and the run continues bitwise. On a
    different number, rank r's saved stream may not exist, and handing one stream to several ranks would give
    them identical dropout masks; so each rank is seeded afresh from (seed, step, rank) instead: deterministic,
    different on every rank, and a different (equally valid) sample from an uninterrupted run's."""
    if len(saved) == world_size:
        set_rng_state(saved[rank])
        return
    entropy = np.random.SeedSequence([seed, step, rank])   # mixes the three into independent-looking seeds
    torch_seed, numpy_seed, python_seed = (int(v) for v in entropy.generate_state(3))
    torch.manual_seed(torch_seed)                           # CPU and every CUDA device
    np.random.seed(numpy_seed)
    random.seed(python_seed)


# ---- saving and loading -------------------------------------------------------------------------

def save_checkpoint(out_dir: str, model: nn.Module, state: dict, adapter_base: str) -> None:
    """The weights in HF format (a PEFT adapter whose base is `adapter_base` if the model has LoRA layers),
    then `state` (plain data, see the module docstring) as training_state.pt, written last and through a
    rename, so a directory whose state file exists holds a complete checkpoint. The previous state file goes
    first: a save killed midway leaves a directory that --resume refuses, never new weights beside an old step's
    optimizer and RNG state."""
    os.makedirs(out_dir, exist_ok=True)
    if os.path.exists(os.path.join(out_dir, STATE_FILE)):
        os.remove(os.path.join(out_dir, STATE_FILE))
    _remove_tree(os.path.join(out_dir, SHARDED_DIR))  # an earlier --fsdp run's weights
    if has_lora(model):
        save_adapter(model, out_dir, base_model_name_or_path=adapter_base)
    else:
        model.save_pretrained(out_dir)
    _write_state(out_dir, state)


def _write_state(out_dir: str, state: dict) -> None:
    """training_state.pt, through a rename (AtomicFile): it appears complete or not at all."""
    with AtomicFile(os.path.join(out_dir, STATE_FILE)) as f:
        torch.save(state, f)


def _remove_tree(path: str) -> None:
    """Delete a folder of stale files, if there is one. A removal that fails raises (OSError names the file):
    a stale sharded/ left behind would be read by a later --resume or export as if it were this run's."""
    if os.path.isdir(path):
        shutil.rmtree(path)


def load_training_state(out_dir: str) -> dict:
    """training_state.pt of the run in `out_dir`, on CPU. Loaded with weights_only=True: a file holding any
    pickled object other than plain data is refused (CheckpointError) before that object is built, so code it
    carries never runs."""
    path = os.path.join(out_dir, STATE_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--resume: no {STATE_FILE} in {out_dir!r}; train without --resume first, or point "
                                f"--out-dir at the run to continue")
    try:
        return load_plain_data(path)
    except CheckpointError as e:
        raise CheckpointError(f"--resume: {e}. nanogpt2 writes plain data only; a state file from an older nanogpt2 "
                              "or from elsewhere cannot be resumed: start the run again without --resume") from None


def export_checkpoint(model: nn.Module, directory: str, dtype: str) -> None:
    """A plain HF checkpoint of `model` in `dtype` (a name in dtypes.DTYPES), LoRA folded in. Merges and casts `model`
    in place (no second copy of a large model): call it when training is over. A quantized base (--quantize) is
    dequantized first: the export is that base in float plus the adapters, loadable anywhere."""
    if is_quantized(model):
        dequantize(model)
    if has_lora(model):
        merge_lora(model)
    model.to(dtype_from_name(dtype)).save_pretrained(directory)


# ---- sharded checkpoints (--fsdp): torch.distributed.checkpoint ----------------------------------------

def trained_parameter_names(model: nn.Module) -> list[str]:
    """The parameters a sharded checkpoint holds: the trainable ones, each once. That is every weight in full
    training (named_parameters lists the tied lm_head.weight once, as transformer.wte.weight) and only the
    adapters under LoRA (the frozen base is --init-from's, rebuilt on resume as a plain LoRA run does)."""
    return [name for name, p in model.named_parameters() if p.requires_grad]


def _sharded_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """One flat dict of this rank's shards (DTensors: nothing is gathered), keyed by fully qualified parameter
    name, which is what lets a different number of ranks, or a different parameter order, load it:
        model.<param>                      the trained weights (trained_parameter_names)
        optimizer.state.<param>.<name>     AdamW's step, exp_avg, exp_avg_sq
        optimizer.param_groups             [{lr, betas, weight_decay, ..., params: [<param>, ...]}, ...]: plain data
    (torch's own flat layout, flatten_optimizer_state_dict, fails to load a param group without parameters,
    which LoRA's optimizer has: no 1-D weight trains.)"""
    msd, osd = get_state_dict(model, optimizer)
    keep = trained_parameter_names(model)
    missing = [k for k in keep if k not in msd]
    if missing:
        raise RuntimeError(f"the model's state dict lacks trained parameters {missing[:3]}")
    flat = {f"model.{k}": msd[k] for k in keep}
    for param, values in osd["state"].items():
        for name, value in values.items():
            flat[f"optimizer.state.{param}.{name}"] = value
    flat["optimizer.param_groups"] = osd["param_groups"]
    return flat


def _model_state(flat: dict) -> dict:
    return {k[len("model."):]: v for k, v in flat.items() if k.startswith("model.")}


def _optimizer_state(flat: dict) -> dict:
    """_sharded_state's optimizer entries as an optimizer state dict keyed by parameter name."""
    state: dict = {}
    for key, value in flat.items():
        if key.startswith("optimizer.state."):
            param, _, name = key[len("optimizer.state."):].rpartition(".")
            state.setdefault(param, {})[name] = value
    return {"state": state, "param_groups": flat["optimizer.param_groups"]}


def save_sharded_checkpoint(out_dir: str, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict,
                            master: bool) -> None:
    """Collective: every rank calls it. Each rank writes its shards of the trained weights and AdamW state
    into out_dir/sharded/ (no rank gathers the model); then rank 0 writes config.json and `state` (plain data:
    step, data position, scheduler, RNGs; the optimizer is in sharded/) as training_state.pt, last, so a
    directory whose state file exists holds a complete checkpoint. Rank 0 first removes the previous state
    file and sharded/ (a save from more ranks leaves __{rank}_0.distcp files this one would not overwrite) and
    the weight files of a plain save (from_pretrained(out_dir) must never find stale weights)."""
    path = os.path.join(out_dir, SHARDED_DIR)
    if master:
        os.makedirs(out_dir, exist_ok=True)
        for name in os.listdir(out_dir):
            if name in PLAIN_FILES or SHARD_NAME.fullmatch(name):
                os.remove(os.path.join(out_dir, name))
        _remove_tree(path)
    torch.distributed.barrier()
    dcp.save(_sharded_state(model, optimizer), checkpoint_id=path,
             planner=DefaultSavePlanner(flatten_state_dict=False))  # keys as _sharded_state made them
    if master:
        model.config.save_pretrained(out_dir)
        _write_state(out_dir, state)
    torch.distributed.barrier()


def load_sharded_checkpoint(out_dir: str, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Collective: load out_dir/sharded/ into a sharded model and its optimizer, whatever the number of ranks
    that saved it: each rank reads the pieces that overlap its new shards. The model keeps its tie (values are
    copied into the existing parameters); weights the checkpoint does not hold by design (the frozen base under
    LoRA) are left as they are, while a trained weight the checkpoint lacks is an error."""
    reader = _checked_reader(out_dir)
    state = _sharded_state(model, optimizer)  # the targets: this rank's shards, read into in place
    _load(state, reader)
    set_state_dict(model, optimizer, model_state_dict=_model_state(state), optim_state_dict=_optimizer_state(state),
                   options=StateDictOptions(strict=False))


def read_sharded_weights(out_dir: str, model: nn.Module) -> None:
    """Load the weights of out_dir/sharded/ into a plain (unsharded, CPU) model of the same architecture, in
    place, in this process alone: no process group, no optimizer state read. What export does."""
    params = dict(model.named_parameters())
    targets = {f"model.{k}": params[k].detach() for k in trained_parameter_names(model)}
    reader = _checked_reader(out_dir)
    with warnings.catch_warnings():  # DCP warns that no_dist loads in one process: that is the point here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        _load(targets, reader, no_dist=True)


def _load(targets: dict, reader: "_SafeReader", **kw) -> None:
    """dcp.load through _SafeLoadPlanner, its failures as a CheckpointError naming the folder. dcp.load wraps
    whatever goes wrong on any rank (a missing or truncated __{rank}_0.distcp, a key the checkpoint lacks,
    _SafeLoadPlanner's refusal) in a CheckpointException, which derives from BaseException: `except Exception`
    would let it through as a traceback. The first rank's error is raised instead, ours as it is."""
    try:
        dcp.load(targets, storage_reader=reader, planner=_SafeLoadPlanner(flatten_state_dict=False), **kw)
    except CheckpointException as e:
        rank, (error, _) = min(e.failures.items(), key=lambda item: item[0])
        if isinstance(error, CheckpointError):
            raise error from None
        where = f" (rank {rank})" if rank else ""
        what = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
        if isinstance(error, EOFError):
            what += " (a .distcp file ends early: truncated, or copied while it was being written)"
        raise CheckpointError(f"cannot read the sharded checkpoint in {str(reader.path)!r}{where}: {what}") from None


def _checked_reader(out_dir: str) -> "_SafeReader":
    """A reader of out_dir/sharded/ whose metadata has been read once already: a missing or refused .metadata
    raises its own error here, rather than inside dcp.load, which retries a per-rank metadata file that does not
    exist either and reports that."""
    reader = _SafeReader(os.path.join(out_dir, SHARDED_DIR))
    reader.read_metadata()
    return reader


def is_sharded_checkpoint(out_dir: str) -> bool:
    return os.path.isfile(os.path.join(out_dir, SHARDED_DIR, ".metadata"))


def sharded_checkpoint_keys(out_dir: str) -> list[str]:
    """The entries of out_dir/sharded/ (model.<param>, optimizer.state.<param>.<name>, ...), from its metadata."""
    return sorted(_checked_reader(out_dir).read_metadata().state_dict_metadata)


# ---- reading DCP files without full pickle ------------------------------------------------------------------

class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's .metadata (FileSystemWriter pickle.dump's a Metadata) with an allowlist, in the spirit of
    torch.load(weights_only=True): a pickle can only build what it names (GLOBAL opcodes -> find_class), so
    answering only for the classes a Metadata is made of keeps any other function, the kind a payload calls,
    from being reached (the Python docs' "Restricting Globals"). Allowed: the classes *defined* in
    torch.distributed.checkpoint.metadata (its dataclasses Metadata, TensorStorageMetadata, ChunkStorageMetadata,
    ..., and the enum _MEM_FORMAT_ENCODING; not the names it imports, such as Enum or Any), filesystem's
    _StorageInfo, torch.Size, torch dtypes, layouts by name, OrderedDict and the pathlib paths.
    (torch's own restricted unpickler, torch._weights_only_unpickler, would be the better tool, but torch 2.13's
    does not read pickle protocol 4's FRAME opcode, which .metadata uses: "Unsupported operand 149".)"""
    ALLOWED = {("torch", "Size"), ("torch.serialization", "_get_layout"),  # a layout by name; weights_only allows it
               ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("collections", "OrderedDict"),
               ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"),
               ("pathlib", "PureWindowsPath")}

    def __init__(self, file, path: str):
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module == dcp_metadata.__name__:
            obj = getattr(dcp_metadata, name, None)
            if isinstance(obj, type) and obj.__module__ == dcp_metadata.__name__:  # defined there, not imported
                return obj
        raise CheckpointError(f"refusing to load {self.path}: it asks for {module}.{name}, which DCP metadata never "
                              "holds, and building it could run code from the file")


class _SafeReader(FileSystemReader):
    """FileSystemReader whose metadata is read by _MetadataUnpickler; tensors it reads with weights_only=True."""

    def read_metadata(self, *args, **kwargs):
        path = self._get_metadata_path(kwargs.get("rank"))
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no sharded checkpoint in {str(self.path)!r}: {os.path.basename(path)} is missing")
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(f, str(path)).load()
        if not isinstance(metadata, dcp_metadata.Metadata):
            raise CheckpointError(f"{path} holds a {type(metadata).__name__}, not DCP metadata")
        if metadata.storage_meta is None:
            metadata.storage_meta = dcp_metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _SafeLoadPlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner (use it with flatten_state_dict=False on a flat dict) whose non-tensor entries, the
    optimizer's lr, betas, eps, ..., are loaded with weights_only=True; DCP's own uses weights_only=False.
    They go into the caller's dict (original_state_dict): torch 2.13's own non-flattening branch writes them
    into self.state_dict, a copy that _flatten_sharded_tensors made, where the caller never sees them (the
    restored lr would silently be the fresh schedule's)."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        try:
            self.original_state_dict[read_item.dest_index.fqn] = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:
            named = re.search(r"GLOBAL (\S+)", str(e))  # what the pickle asked to call (torch's advice is not passed on)
            raise CheckpointError(f"refusing to load the entry {read_item.dest_index.fqn!r} of a sharded checkpoint: "
                                  f"it holds pickled Python objects other than plain data"
                                  + (f" (it asks for {named.group(1)})" if named else "")
                                  + ", and building them could run code from the file") from None
