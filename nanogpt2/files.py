"""Where a checkpoint's files are: a name or path -> config.json and the weight files. No tensors here.

Tried in this order:
  1. a local directory (config.json + model.safetensors | model.safetensors.index.json + shards |
     pytorch_model.bin);
  2. a model bundled with nanogpt2 (nanogpt2/assets/models/<name>/, e.g. "shakespeare-tiny");
  3. a Hugging Face hub id ("gpt2", "openai-community/gpt2-medium", ...) through huggingface_hub, which
     honours HF_HOME / HF_HUB_OFFLINE and its cache.

Both config.py (GPT2Config.from_pretrained) and weights.py (reading and writing tensors) build on this module;
it imports nothing of nanogpt2's.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Callable, Optional

BUNDLED_DIR = os.path.join(os.path.dirname(__file__), "assets", "models")
SAFE_SINGLE, SAFE_INDEX, TORCH_BIN = "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: the message names the file or tensor and what was expected."""


class HubUnavailable(CheckpointError):
    """A hub id whose config.json is neither in the local huggingface_hub cache nor reachable (offline, no
    network). GPT2Config.from_pretrained answers a preset name's with the preset; nothing else is forgiven."""


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
        return shards_from_index(os.path.join(directory, SAFE_INDEX))
    if os.path.isfile(os.path.join(directory, TORCH_BIN)):
        return [os.path.join(directory, TORCH_BIN)]
    return None


def shards_from_index(index_file: str, fetch: Optional[Callable[[str], str]] = None) -> list[str]:
    """The shard files a model.safetensors.index.json names (its `weight_map` values), each checked to be a
    plain file name inside the index's directory: an index is data a user may have been handed, and a name
    like "../x" or "/etc/passwd" must not make nanogpt2 read outside the checkpoint."""
    try:
        with open(index_file, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{index_file} is not a valid safetensors index (needs a 'weight_map' of tensor name "
                              f"-> shard file name): {type(e).__name__}: {e}") from None
    directory = os.path.dirname(index_file)
    files = []
    for shard in shards:
        if (not isinstance(shard, str) or not shard or os.path.basename(shard) != shard
                or shard in (".", "..") or os.sep in shard or "/" in shard):
            raise CheckpointError(f"{index_file} names shard {shard!r}, which is not a plain file name in the "
                                  f"checkpoint directory {directory} (shards must sit next to the index)")
        path = fetch(shard) if fetch else os.path.join(directory, shard)
        if not os.path.isfile(path):
            raise CheckpointError(f"{index_file} lists shard {shard!r}, which is missing from {directory}")
        files.append(path)
    return files


def resolve(name_or_path: str, revision: Optional[str] = None, weights: bool = True) -> Checkpoint:
    """Find config.json and the weight files for a directory, a bundled name or a hub id. `weights=False` finds
    config.json only (weight_files empty): reading a hub model's config then downloads nothing else."""
    name = os.fspath(name_or_path)
    tried = []
    if os.path.isdir(os.path.expanduser(name)):
        directory = os.path.expanduser(name)
        config_file = os.path.join(directory, "config.json")
        files = _local_weight_files(directory) if weights else []
        if not os.path.isfile(config_file) or files is None:
            raise CheckpointError(f"{directory} is not a GPT-2 checkpoint directory: it needs config.json and one of "
                                  f"{SAFE_SINGLE}, {SAFE_INDEX} (+ shards) or {TORCH_BIN}; it has "
                                  f"{sorted(os.listdir(directory))}")
        return Checkpoint(name, directory, config_file, files)
    tried.append(f"local directory {name!r}: does not exist")
    if name in bundled_models():
        directory = os.path.join(BUNDLED_DIR, name)
        files = _local_weight_files(directory) if weights else []
        return Checkpoint(name, directory, os.path.join(directory, "config.json"), files)
    tried.append(f"bundled models {bundled_models()}: not among them")
    if _looks_like_path(name):
        raise CheckpointError(f"cannot load {name!r}: " + "; ".join(tried))
    return _resolve_hub(name, revision, tried, weights)


def _resolve_hub(repo_id: str, revision: Optional[str], tried: list[str], weights: bool) -> Checkpoint:
    # a dependency; imported here because it takes ~0.3 s
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import EntryNotFoundError, LocalEntryNotFoundError

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
        error = HubUnavailable if isinstance(e, LocalEntryNotFoundError) else CheckpointError
        raise error(f"cannot load {repo_id!r}:\n  - " + "\n  - ".join(tried) + f"\n{hint}") from None
    if not weights:
        return Checkpoint(repo_id, os.path.dirname(config_file), config_file, [])
    errors = []
    for filename in (SAFE_SINGLE, SAFE_INDEX, TORCH_BIN):
        try:
            path = fetch(filename)
        except EntryNotFoundError as e:   # this format is not in the repo (or not cached): try the next, report all
            errors.append(f"{filename}: {type(e).__name__}")   # (anything else, e.g. a network error, raises)
            continue
        files = shards_from_index(path, fetch) if filename == SAFE_INDEX else [path]
        return Checkpoint(repo_id, os.path.dirname(config_file), config_file, files)
    raise CheckpointError(f"hub model {repo_id!r} has config.json but no weights could be fetched "
                          f"({'; '.join(errors)})")
