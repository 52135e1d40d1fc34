"""A training run on disk: the weights, training_state.pt next to them, and the RNG states that make
`--resume` bitwise. File I/O only; what goes into the state (step, optimizer, ...) is the loop's business.

    out_dir/
      config.json + model.safetensors                     full training: a Hugging Face checkpoint (fp32)
      adapter_config.json + adapter_model.safetensors     LoRA: a PEFT adapter (the base is --init-from)
      training_state.pt                                   step, data position, optimizer, scheduler, RNGs, ...

training_state.pt is a torch.save'd dict of plain data only: tensors, numbers, strings, None, lists, tuples and
dicts. That is what lets `--resume` read it with torch.load(weights_only=True), which builds no other Python
object and so never runs code a file carries: a pickle can name any function to call while it loads
(`__reduce__`), and an --out-dir can come from anywhere. The RNG states are the reason this needs care:
numpy's and Python's are tuples holding ndarrays and long int tuples, stored here as int64 tensors and
turned back into exactly the same states.
"""
from __future__ import annotations

import os
import random

import numpy as np
import torch
import torch.nn as nn

from .lora import has_lora, merge_lora, save_adapter
from .dtypes import dtype_from_name
from .files import CheckpointError
from .weights import load_plain_data

STATE_FILE = "training_state.pt"


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
    if has_lora(model):
        save_adapter(model, out_dir, base_model_name_or_path=adapter_base)
    else:
        model.save_pretrained(out_dir)
    tmp = os.path.join(out_dir, STATE_FILE + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, os.path.join(out_dir, STATE_FILE))


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
    in place (no second copy of a large model): call it when training is over."""
    if has_lora(model):
        merge_lora(model)
    model.to(dtype_from_name(dtype)).save_pretrained(directory)
