"""Checkpoint I/O: round trips with transformers both ways, shards, .bin fallback, the hub cache layout, and
strict errors that name the file or tensor."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from nanogpt2 import CheckpointError, GPT2Config, GPT2LMHeadModel, GPT2Model

from nanogpt2.reference import hf_quiet


def same_logits(a, b, ids):
    torch.testing.assert_close(a(ids).logits, b(ids).logits, atol=1e-5, rtol=0)


def test_save_pretrained_loads_in_transformers(tmp_path):
    transformers = hf_quiet()
    torch.manual_seed(0)
    ours = GPT2LMHeadModel(GPT2Config(vocab_size=120, n_positions=32, n_embd=48, n_layer=2, n_head=3,
                                      n_inner=100, activation_function="relu")).eval()
    ours.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
    theirs = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    same_logits(ours, theirs, torch.randint(0, 120, (2, 10)))
    back = GPT2LMHeadModel.from_pretrained(tmp_path)  # and back again, bit for bit
    for (n, p), (_, q) in zip(ours.state_dict().items(), back.state_dict().items()):
        assert torch.equal(p, q), n


def test_sharded_save_and_load_both_ways(tmp_path):
    transformers = hf_quiet()
    torch.manual_seed(0)
    ours = GPT2LMHeadModel(GPT2Config(vocab_size=120, n_positions=32, n_embd=48, n_layer=3, n_head=3)).eval()
    ours.save_pretrained(tmp_path, max_shard_size="40KB")
    files = sorted(os.listdir(tmp_path))
    assert "model.safetensors.index.json" in files and "model.safetensors" not in files
    assert sum(f.endswith(".safetensors") for f in files) > 2
    ids = torch.randint(0, 120, (2, 10))
    same_logits(ours, GPT2LMHeadModel.from_pretrained(tmp_path), ids)
    same_logits(ours, transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval(), ids)


def test_pytorch_bin_fallback_and_prefixless_keys_and_buffers(tmp_path):
    transformers = hf_quiet()
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=90, n_positions=16, n_embd=32, n_layer=2,
                                                              n_head=2)).eval()
    hf.config.save_pretrained(tmp_path)
    # an old-style checkpoint: no "transformer." prefix, causal-mask buffers, a .bin pickle
    sd = {k.removeprefix("transformer."): v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    for i in range(2):
        sd[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 16, 16))
        sd[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(sd, tmp_path / "pytorch_model.bin")
    same_logits(GPT2LMHeadModel.from_pretrained(tmp_path), hf, torch.randint(0, 90, (1, 7)))


def test_gpt2model_and_lmhead_read_each_others_checkpoints(tmp_path, hf_checkpoint):
    directory, hf = hf_checkpoint(seed=1)
    base = GPT2Model.from_pretrained(directory)
    base.save_pretrained(tmp_path / "base")
    assert not any(k.startswith("transformer.") for k in load_file(tmp_path / "base" / "model.safetensors"))
    lm = GPT2LMHeadModel.from_pretrained(tmp_path / "base")
    same_logits(lm, hf, torch.randint(0, 101, (2, 5)))


def test_dtype_and_attn_implementation_arguments(hf_checkpoint):
    directory, _ = hf_checkpoint()
    m = GPT2LMHeadModel.from_pretrained(directory, dtype=torch.bfloat16, attn_implementation="eager")
    assert m.dtype == torch.bfloat16 and m.attn_implementation == "eager" and not m.training
    assert m.lm_head.weight is m.transformer.wte.weight
    assert GPT2LMHeadModel.from_pretrained(directory, dtype="auto").dtype == torch.float32
    with pytest.raises(ValueError, match="attn_implementation 'flash' is not one of"):
        GPT2LMHeadModel.from_pretrained(directory, attn_implementation="flash")
    with pytest.raises(ValueError, match="dtype 'float8'"):
        GPT2LMHeadModel.from_pretrained(directory, dtype="float8")


def test_untied_head_round_trip(tmp_path):
    transformers = hf_quiet()
    torch.manual_seed(0)
    ours = GPT2LMHeadModel(GPT2Config(vocab_size=60, n_positions=16, n_embd=32, n_layer=1, n_head=2,
                                      tie_word_embeddings=False)).eval()
    assert ours.lm_head.weight is not ours.transformer.wte.weight
    ours.save_pretrained(tmp_path)
    assert "lm_head.weight" in load_file(tmp_path / "model.safetensors")
    ids = torch.randint(0, 60, (1, 6))
    same_logits(ours, GPT2LMHeadModel.from_pretrained(tmp_path), ids)
    same_logits(ours, transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval(), ids)


def test_config_round_trip_keeps_unknown_keys(tmp_path, hf_checkpoint):
    directory, hf = hf_checkpoint(n_inner=70)
    cfg = GPT2Config.from_pretrained(directory)
    assert cfg.n_inner == 70 and cfg.vocab_size == 101
    with open(os.path.join(directory, "config.json")) as f:
        raw = json.load(f)
    raw["task_specific_params"] = {"text-generation": {"do_sample": True}}
    cfg = GPT2Config.from_dict(raw)
    cfg.save_pretrained(tmp_path)
    with open(tmp_path / "config.json") as f:
        again = json.load(f)
    assert again["task_specific_params"] == raw["task_specific_params"] and again["model_type"] == "gpt2"
    assert GPT2Config.from_pretrained("gpt2-medium").n_layer == 24  # preset, offline


# ---- the hub, offline, through huggingface_hub's cache layout --------------------------------------

HUB_SCRIPT = """
import sys, torch
from nanogpt2 import GPT2LMHeadModel, CheckpointError
m = GPT2LMHeadModel.from_pretrained("someorg/tiny-gpt2")
print("loaded", m.config.n_layer, float(m(torch.tensor([[1, 2, 3]])).logits.sum()))
try:
    GPT2LMHeadModel.from_pretrained("someorg/not-there")
except CheckpointError as e:
    print("ERROR", e)
"""


def test_hub_id_resolves_from_offline_cache(tmp_path, hf_checkpoint):
    directory, hf = hf_checkpoint(seed=3)
    rev = "0123456789abcdef0123456789abcdef01234567"
    snap = tmp_path / "home" / "hub" / "models--someorg--tiny-gpt2" / "snapshots" / rev
    snap.mkdir(parents=True)
    for f in os.listdir(directory):
        os.link(os.path.join(directory, f), snap / f)
    (snap.parent.parent / "refs").mkdir()
    (snap.parent.parent / "refs" / "main").write_text(rev)
    env = dict(os.environ, HF_HOME=str(tmp_path / "home"), HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, "-c", HUB_SCRIPT], env=env, capture_output=True, text=True, timeout=120,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    expected = float(hf(torch.tensor([[1, 2, 3]])).logits.sum().detach())
    loaded = [line for line in r.stdout.splitlines() if line.startswith("loaded")][0].split()
    assert loaded[1] == "2" and abs(float(loaded[2]) - expected) < 1e-3
    err = r.stdout[r.stdout.index("ERROR"):]
    assert "someorg/not-there" in err and "local directory" in err and "hub" in err


# ---- strict loading: errors that name the file or tensor -------------------------------------------

@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    m = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=16, n_embd=32, n_layer=2, n_head=2))
    m.save_pretrained(tmp_path)
    return tmp_path


def rewrite(path, fn):
    sd = load_file(path / "model.safetensors")
    fn(sd)
    save_file(sd, path / "model.safetensors", metadata={"format": "pt"})


def test_missing_tensor_is_named(saved):
    rewrite(saved, lambda sd: sd.pop("transformer.h.1.mlp.c_fc.bias"))
    with pytest.raises(CheckpointError, match=r"missing tensor.*h\.1\.mlp\.c_fc\.bias"):
        GPT2LMHeadModel.from_pretrained(saved)


def test_unexpected_tensor_is_named(saved):
    rewrite(saved, lambda sd: sd.__setitem__("transformer.h.0.attn.q_proj.weight", torch.zeros(2)))
    with pytest.raises(CheckpointError, match=r"unexpected tensor.*h\.0\.attn\.q_proj\.weight"):
        GPT2LMHeadModel.from_pretrained(saved)


def test_misshaped_tensor_is_named(saved):
    rewrite(saved, lambda sd: sd.__setitem__("transformer.h.0.attn.c_attn.weight", torch.zeros(32, 90)))
    with pytest.raises(CheckpointError, match=r"h\.0\.attn\.c_attn\.weight.*shape \[32, 90\].*needs \[32, 96\]"):
        GPT2LMHeadModel.from_pretrained(saved)


def test_config_checkpoint_mismatch(saved):
    cfg = json.loads((saved / "config.json").read_text())
    cfg["n_layer"] = 3
    (saved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"missing tensor.*h\.2\..*n_layer=3"):
        GPT2LMHeadModel.from_pretrained(saved)
    cfg["n_layer"], cfg["n_embd"] = 2, 64
    (saved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="do not belong together"):
        GPT2LMHeadModel.from_pretrained(saved)


def test_truncated_safetensors_names_file(saved):
    path = saved / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*truncated or corrupt"):
        GPT2LMHeadModel.from_pretrained(saved)


def test_corrupt_safetensors_names_file(saved):
    (saved / "model.safetensors").write_bytes(b"\x00" * 7 + b"not a safetensors file at all")
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*truncated or corrupt"):
        GPT2LMHeadModel.from_pretrained(saved)


def test_unknown_path_and_incomplete_directory(tmp_path):
    with pytest.raises(CheckpointError, match="local directory .*does not exist"):
        GPT2LMHeadModel.from_pretrained(str(tmp_path / "nope" / "model"))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="not a GPT-2 checkpoint directory.*model.safetensors"):
        GPT2LMHeadModel.from_pretrained(tmp_path)


def test_unknown_hub_id_offline_says_what_was_tried(monkeypatch):
    with pytest.raises(CheckpointError) as e:
        GPT2LMHeadModel.from_pretrained("no-such-org/no-such-model-xyz")
    msg = str(e.value)
    assert "no-such-org/no-such-model-xyz" in msg and "bundled" in msg and "Hugging Face hub" in msg
    assert "local directory" in msg


def test_old_format_pytorch_bin_loads(tmp_path):
    """torch.save's pre-1.6 (non-zip) format cannot be memory-mapped; it is read whole, as transformers reads it,
    never reported as corrupt."""
    torch.manual_seed(0)
    ours = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=16, n_embd=32, n_layer=2, n_head=2)).eval()
    ours.config.save_pretrained(tmp_path)
    sd = {k: v.t().contiguous() if k.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")) else v
          for k, v in ours.state_dict().items() if k != "lm_head.weight"}
    torch.save(sd, tmp_path / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    same_logits(GPT2LMHeadModel.from_pretrained(tmp_path), ours, torch.randint(0, 50, (1, 7)))


def test_pickled_objects_in_a_bin_are_refused_and_never_run(tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    GPT2Config(vocab_size=50, n_positions=16, n_embd=32, n_layer=1, n_head=2).save_pretrained(tmp_path)
    torch.save({"wte.weight": torch.zeros(50, 32), "evil": Payload()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"refusing to load .*pytorch_model\.bin.*pickled Python objects.*io\.open"):
        GPT2LMHeadModel.from_pretrained(tmp_path)
    assert not marker.exists()


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/hostname", "sub/model.safetensors", ".."])
def test_index_naming_a_shard_outside_the_checkpoint_is_refused(tmp_path, shard):
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=16, n_embd=32, n_layer=1, n_head=2)).save_pretrained(
        tmp_path / "ckpt", max_shard_size="10KB")
    index = tmp_path / "ckpt" / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    first = next(iter(data["weight_map"]))
    data["weight_map"][first] = shard
    index.write_text(json.dumps(data))
    (tmp_path / "outside.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"names shard .* not a plain file name in the checkpoint directory"):
        GPT2LMHeadModel.from_pretrained(tmp_path / "ckpt")


def test_resaving_removes_the_previous_saves_shards(tmp_path):
    """Re-saving into a directory leaves exactly the new checkpoint: no stale shard of an earlier save."""
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=16, n_embd=32, n_layer=2, n_head=2)).eval()
    model.save_pretrained(tmp_path, max_shard_size="5KB")
    many = [f for f in os.listdir(tmp_path) if f.startswith("model-")]
    assert len(many) > 3
    (tmp_path / "notes.txt").write_text("mine")                 # not ours: left alone
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    fewer = sorted(f for f in os.listdir(tmp_path) if f.startswith("model-"))
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert fewer == sorted(set(index["weight_map"].values())) and len(fewer) < len(many)
    model.save_pretrained(tmp_path)                                # one file: no index, no shards left
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors", "notes.txt"]
    same_logits(GPT2LMHeadModel.from_pretrained(tmp_path), model, torch.randint(0, 50, (1, 5)))


def test_config_of_a_preset_name_falls_back_only_when_the_hub_is_unavailable(tmp_path, monkeypatch):
    """Offline and not cached, "gpt2-medium" is its preset; a broken local directory named "gpt2" is an error,
    never silently the preset."""
    assert GPT2Config.from_pretrained("gpt2-medium").n_layer == 24
    monkeypatch.chdir(tmp_path)
    (tmp_path / "gpt2").mkdir()
    with pytest.raises(CheckpointError, match="gpt2 is not a GPT-2 checkpoint directory"):
        GPT2Config.from_pretrained("gpt2")
