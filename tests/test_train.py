"""Training (nanogpt2/train.py and the modules it builds on: data, optim, loss, checkpoint, memory; tools/train.py):
tokenization cache, clear errors on too little data, the command line built from TrainConfig, optimizer groups and
schedule, bitwise resume (plain and after Ctrl-C) from a state file loaded with weights_only=True, refusal of a
state file carrying a pickle payload, LoRA runs, and the activation memory gradient checkpointing saves. Tiny
models (2 layers, width 32) on a few KB of text."""
import os
import random
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import nanogpt2
from nanogpt2 import CheckpointError, GPT2Config, GPT2LMHeadModel, get_tokenizer
from nanogpt2.checkpoint import STATE_FILE, rng_state, set_rng_state
from nanogpt2.data import SequenceSampler, Split, load_tokens, split_tokens, tokenize_file, unigram_cross_entropy
from nanogpt2.loss import autocast_dtype, cpu_has_native_bf16
from nanogpt2.memory import saved_activation_bytes
from nanogpt2.optim import WarmupCosine, build_optimizer
from nanogpt2.train import TrainConfig, build_parser, parse_args, train

from conftest import hf_quiet

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAKESPEARE = os.path.join(os.path.dirname(nanogpt2.__file__), "assets", "data", "tinyshakespeare.txt")


# Words that are single GPT-2 tokens with ids < 512 (" the" = 262, ...): text made of them lets the tests
# train models with a 512-entry vocabulary, 100x cheaper than GPT-2's 50257 (the head dominates tiny models).
WORDS = [" the", " to", " of", " and", " is", " on", " that", " for", " he", " it", " you", " with", " as", " we",
         " was", " at", " are", " or", " not", " by", " from", " have", " this"]
VOCAB = 512


def text_file(tmp_path, sentences=64, name="data.txt"):
    """Eight made-up sentences in a seeded random order, one per line: ~430 tokens, all ids < VOCAB."""
    rng = random.Random(0)
    pool = ["".join(rng.choice(WORDS) for _ in range(rng.randint(4, 9))) + "\n" for _ in range(8)]
    text = "".join(rng.choice(pool) for _ in range(sentences))
    assert max(get_tokenizer().encode_ordinary(text)) < VOCAB
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def tiny_cfg(tmp_path, **overrides):
    """~430 tokens: 11 training sequences of 33 tokens, so 6 steps of 4 sequences cross two epochs."""
    kw = dict(data=text_file(tmp_path), cache_dir=str(tmp_path / "cache"), n_layer=2, n_head=2, n_embd=32,
              vocab_size=VOCAB, block_size=32, batch_size=2, grad_accum=2, max_steps=6, eval_interval=2, eval_iters=2,
              log_interval=1, warmup_steps=2, lr=3e-3, dropout=0.1, out_dir=str(tmp_path / "out"), device="cpu", seed=7,
              dtype="float32")
    kw.update(overrides)
    return TrainConfig(**kw)


def weights(out_dir):
    return load_file(os.path.join(out_dir, "model.safetensors"))


def assert_bitwise_equal(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k}: max |diff| {(a[k].float() - b[k].float()).abs().max():.3g}"


def scramble_rngs():
    """A resumed run must restore every RNG from the checkpoint, not inherit this process's state."""
    torch.manual_seed(12345)
    np.random.seed(12345)
    random.seed(12345)


def optimizer_tensors(out_dir):
    state = torch.load(os.path.join(out_dir, STATE_FILE), weights_only=True)  # plain data: no pickled objects
    return {f"{i}.{k}": v for i, s in state["optimizer"]["state"].items() for k, v in s.items()}


# ---- data -----------------------------------------------------------------------------------------

def test_chunked_tokenization_equals_whole_text_and_cache_is_keyed_by_mtime(tmp_path):
    text = ("First Citizen:\nBefore we proceed,  \n\nhear me speak.\n\n\nAll:\nSpeak, speak. héllo — 123\n" * 40
            + "no newline at the end")
    path = tmp_path / "t.txt"
    path.write_text(text, encoding="utf-8")
    cache = str(tmp_path / "cache")
    out = tokenize_file(str(path), cache, chunk_chars=50, verbose=False)  # many chunks, cut only where safe
    assert load_tokens(out).tolist() == get_tokenizer().encode_ordinary(text)
    mtime = os.stat(out).st_mtime_ns
    assert tokenize_file(str(path), cache, verbose=False) == out and os.stat(out).st_mtime_ns == mtime  # reused
    path.write_text(text + " more", encoding="utf-8")
    out2 = tokenize_file(str(path), cache, verbose=False)
    assert out2 != out and load_tokens(out2).tolist() == get_tokenizer().encode_ordinary(text + " more")


def test_split_sampler_and_unigram(tmp_path):
    tokens = np.arange(1000, dtype=np.uint16)
    train, val = split_tokens(tokens, 0.1, block_size=10)
    assert len(val.tokens) == 100 and val.tokens[0] == 900  # the last 10% is held out
    s = SequenceSampler(train, seed=0)
    idx = [s.index(k) for k in range(2 * train.num_sequences)]
    n = train.num_sequences
    assert sorted(idx[:n]) == sorted(idx[n:]) == list(range(n)) and idx[:n] != idx[n:]  # each epoch: a new order
    x, y = s.batch(5, 3)
    assert x.shape == y.shape == (3, 10) and torch.equal(x[:, 1:], y[:, :-1])  # y is x shifted by one
    assert SequenceSampler(train, seed=0).batch(5, 3)[0].tolist() == x.tolist()  # deterministic given (seed, k)
    with pytest.raises(ValueError, match="fewer than block_size"):
        split_tokens(tokens[:50], 0.1, block_size=10)
    # a unigram model fit on the same distribution: cross-entropy ~ log(#symbols)
    rng = np.random.default_rng(0)
    ce = unigram_cross_entropy(rng.integers(0, 64, 100_000), rng.integers(0, 64, 10_000), vocab_size=64)
    assert abs(ce - np.log(64)) < 0.01


def test_too_little_data_is_a_clear_error(tmp_path):
    """An empty or too-short text, or a --val-fraction that leaves a split without one sequence of block_size + 1
    tokens, stops the run with a ValueError naming the file, the counts and what would work (not numpy's "cannot
    mmap an empty file" or a ZeroDivisionError from the sampler)."""
    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(ValueError, match=re.escape(f"{empty} has 0 tokens, fewer than block_size + 1 = 33")):
        train(tiny_cfg(tmp_path, data=str(empty)))
    short = tmp_path / "short.txt"
    short.write_text(" the to of and is on that for he it", encoding="utf-8")  # 10 one-token words
    with pytest.raises(ValueError, match=re.escape(f"{short} has 10 tokens, fewer than block_size + 1 = 33 for one "
                                                   f"training sequence: use more text or a --block-size below 10")):
        train(tiny_cfg(tmp_path, data=str(short)))

    cfg = tiny_cfg(tmp_path)
    tokens = load_tokens(tokenize_file(cfg.data, cfg.cache_dir, verbose=False))
    n = len(tokens)
    with pytest.raises(ValueError, match=re.escape(f"{cfg.data}: --val-fraction 0.01 holds out {round(n * 0.01)} of its "
                                                   f"{n} tokens for validation, fewer than block_size + 1 = 33")) as e:
        train(tiny_cfg(tmp_path, val_fraction=0.01))
    at_least = float(re.search(r"a --val-fraction of at least ([\d.]+)", str(e.value)).group(1))
    assert split_tokens(tokens, at_least, 32)[1].num_sequences == 1  # the value the message proposes works
    with pytest.raises(ValueError, match=re.escape(f"{cfg.data}: --val-fraction 0.95 holds out {round(n * 0.95)} of "
                                                   f"its {n} tokens, leaving {n - round(n * 0.95)} to train on")) as e:
        train(tiny_cfg(tmp_path, val_fraction=0.95))
    at_most = float(re.search(r"a --val-fraction of at most ([\d.]+)", str(e.value)).group(1))
    assert split_tokens(tokens, at_most, 32)[0].num_sequences == 1
    with pytest.raises(ValueError, match=r"--val-fraction must be in \[0, 1\), got 1.0"):
        TrainConfig(data="x", val_fraction=1.0)

    with pytest.raises(ValueError, match=r"a split of 5 tokens has no sequence of block_size \+ 1 = 11"):
        SequenceSampler(Split(np.arange(5, dtype=np.uint16), block_size=10), seed=0)
    torn = tmp_path / "torn.uint16"
    torn.write_bytes(b"\x00\x01\x02")  # one and a half uint16 tokens: an interrupted copy
    with pytest.raises(ValueError, match=re.escape(f"{torn} has 3 bytes, not a whole number of 2-byte tokens")):
        load_tokens(str(torn))


# ---- configuration --------------------------------------------------------------------------------

def test_command_line_is_built_from_the_dataclass():
    parser = build_parser()
    flags = {a.dest for a in parser._actions} - {"help"}
    assert flags == {f for f in TrainConfig.__dataclass_fields__}
    cfg = parse_args(["--data", "x.txt"])
    assert cfg == TrainConfig(data="x.txt")  # every default comes from TrainConfig
    cfg = parse_args(["--data", "x.txt", "--lora-r", "8", "--grad-checkpointing", "--block-size", "64",
                      "--init-from", "gpt2", "--lr", "1e-4", "--resume"])
    assert (cfg.lora_r, cfg.grad_checkpointing, cfg.block_size, cfg.init_from, cfg.lr, cfg.resume) == \
        (8, True, 64, "gpt2", 1e-4, True)
    with pytest.raises(ValueError, match="--max-steps must be >= 1, got 0"):
        TrainConfig(data="x", max_steps=0)
    with pytest.raises(ValueError, match="--lora-r must be >= 0"):
        TrainConfig(data="x", lora_r=-1)
    with pytest.raises(ValueError, match="--dtype 'fp8' is not one of"):
        TrainConfig(data="x", dtype="fp8")


def test_autocast_choice():
    cpu = torch.device("cpu")
    assert autocast_dtype("float32", cpu) is None
    assert autocast_dtype("bfloat16", cpu) is torch.bfloat16
    assert autocast_dtype(TrainConfig(data="x").dtype, cpu) is (torch.bfloat16 if cpu_has_native_bf16() else None)
    with pytest.raises(ValueError, match="--dtype 'float16' is not one of auto, float32, bfloat16"):
        autocast_dtype("float16", cpu)


def test_optimizer_decays_2d_weights_only():
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=2, n_head=2))
    opt = build_optimizer(model, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1, device=torch.device("cpu"))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert {names[id(p)] for p in no_decay["params"]} >= {"transformer.ln_f.weight", "transformer.h.0.attn.c_attn.bias"}
    assert "transformer.wte.weight" in {names[id(p)] for p in decay["params"]}
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))  # tied wte counted once


def test_warmup_cosine_schedule():
    f = WarmupCosine(warmup_steps=10, decay_steps=110, min_ratio=0.1)
    assert f(0) == pytest.approx(1 / 11) and f(9) == pytest.approx(10 / 11)
    assert f(10) == pytest.approx(1.0) and f(60) == pytest.approx(0.55) and f(110) == pytest.approx(0.1)
    assert f(500) == 0.1 and all(f(s) >= f(s + 1) for s in range(10, 200))


# ---- training and resuming ------------------------------------------------------------------------

def test_training_learns(tmp_path):
    result = train(tiny_cfg(tmp_path, max_steps=16, dropout=0.0, eval_interval=16, lr=1e-2))
    first, last = result.history[0][1], result.history[-1][1]
    assert first > 6.0 and last < 3.5, result.history  # from ln(512) = 6.24 (uniform) to well below
    assert result.val_loss < 4.0
    loaded = GPT2LMHeadModel.from_pretrained(str(tmp_path / "out"))  # the checkpoint is a plain HF checkpoint
    assert loaded.config.n_layer == 2 and loaded.config.n_positions == 32


def test_resume_is_bitwise_identical(tmp_path):
    straight = tiny_cfg(tmp_path, out_dir=str(tmp_path / "straight"))
    train(straight)
    # 3 steps, then resume to 6: the schedule's horizon is pinned with --lr-decay-steps so both runs share it
    part = tiny_cfg(tmp_path, out_dir=str(tmp_path / "resumed"), max_steps=3, lr_decay_steps=6)
    assert train(part).step == 3
    assert not torch.equal(weights(part.out_dir)["transformer.wte.weight"],
                           weights(straight.out_dir)["transformer.wte.weight"])
    scramble_rngs()
    result = train(tiny_cfg(tmp_path, out_dir=str(tmp_path / "resumed"), lr_decay_steps=6, resume=True))
    assert result.step == 6
    assert_bitwise_equal(weights(straight.out_dir), weights(part.out_dir))
    assert_bitwise_equal(optimizer_tensors(straight.out_dir), optimizer_tensors(part.out_dir))


def test_ctrl_c_saves_and_resume_matches_uninterrupted(tmp_path):
    """With bf16 autocast this time: CPU kernels are deterministic in any dtype."""
    straight = tiny_cfg(tmp_path, out_dir=str(tmp_path / "straight"), eval_interval=100, dtype="bfloat16")
    train(straight)
    cfg = tiny_cfg(tmp_path, out_dir=str(tmp_path / "interrupted"), eval_interval=100, dtype="bfloat16")

    def ctrl_c(step):
        if step == 4:
            signal.raise_signal(signal.SIGINT)  # as a terminal's Ctrl-C: the handler asks the loop to stop

    result = train(cfg, on_step=ctrl_c)
    assert result.interrupted and result.step == 4
    assert torch.load(os.path.join(cfg.out_dir, STATE_FILE), weights_only=True)["step"] == 4
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored
    scramble_rngs()
    train(tiny_cfg(tmp_path, out_dir=str(tmp_path / "interrupted"), eval_interval=100, dtype="bfloat16", resume=True))
    assert_bitwise_equal(weights(straight.out_dir), weights(cfg.out_dir))


def test_resume_refuses_a_different_run(tmp_path):
    train(tiny_cfg(tmp_path, max_steps=1))
    with pytest.raises(ValueError, match=r"--block-size 32 \(now 16\)"):
        train(tiny_cfg(tmp_path, block_size=16, resume=True))
    with pytest.raises(FileNotFoundError, match="no training_state.pt"):
        train(tiny_cfg(tmp_path, out_dir=str(tmp_path / "nothing"), resume=True))
    shakespeare = tmp_path / "s.txt"
    shakespeare.write_text("ROMEO: wherefore art thou\n" * 20, encoding="utf-8")
    with pytest.raises(ValueError, match=r"has token id \d+, out of range for vocab_size 512"):
        train(tiny_cfg(tmp_path, data=str(shakespeare), out_dir=str(tmp_path / "other")))


def test_rng_states_are_plain_data_and_restore_every_generator(tmp_path):
    """training_state.pt's RNG states load with weights_only=True and put torch, numpy and Python's random back
    exactly where they were, cached Gaussians included."""
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    np.random.normal(), random.gauss(0, 1)  # each now holds the second Gaussian of a pair (has_gauss, gauss_next)
    torch.save(rng_state(), tmp_path / "rng.pt")

    def draws():
        return (torch.rand(4).tolist(), torch.randn(2).tolist(), np.random.normal(size=3).tolist(),
                np.random.randint(0, 1 << 30, 3).tolist(), random.gauss(0, 1), random.random())

    expected = draws()
    scramble_rngs()
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert draws() == expected


def _leave_marker(path):
    """A pickle payload's effect, harmless here: an attacker's state file would run anything it names."""
    with open(path, "w") as f:
        f.write("the payload ran")


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # unpickling calls _leave_marker(marker)
        return _leave_marker, (str(self.marker),)


def test_resume_refuses_a_state_file_with_a_pickle_payload(tmp_path):
    cfg = tiny_cfg(tmp_path, max_steps=1)
    train(cfg)
    path = os.path.join(cfg.out_dir, STATE_FILE)
    state = torch.load(path, weights_only=True)
    marker = tmp_path / "payload-ran"
    state["metrics"]["note"] = Payload(marker)  # a real run's state file, one object slipped in
    torch.save(state, path)

    with pytest.raises(CheckpointError) as e:
        train(tiny_cfg(tmp_path, resume=True))
    message = str(e.value)
    assert f"refusing to load {path}" in message and "could run code" in message, message
    assert "_leave_marker" in message, message  # what the file asked to call
    assert "weights_only=False" not in message  # torch's advice to load it unsafely is not passed on
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the payload is live: an unsafe load runs it
    assert marker.read_text() == "the payload ran"


def test_lora_run_saves_a_peft_adapter_and_a_merged_export(tmp_path, hf_checkpoint):
    transformers = hf_quiet()
    base_dir, base = hf_checkpoint(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=2)
    cfg = tiny_cfg(tmp_path, init_from=base_dir, lora_r=4, lora_alpha=8, lora_targets="c_attn,c_fc", max_steps=4,
                   lr=1e-2, export_dir=str(tmp_path / "merged"))
    train(cfg)
    files = set(os.listdir(cfg.out_dir))
    assert {"adapter_config.json", "adapter_model.safetensors", STATE_FILE} <= files and "model.safetensors" not in files
    adapter = load_file(os.path.join(cfg.out_dir, "adapter_model.safetensors"))
    assert len(adapter) == 2 * 2 * 2 and all(k.startswith("base_model.model.transformer.h.") for k in adapter)
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)  # B moved away from 0
    merged = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "merged").eval()
    ids = torch.randint(0, VOCAB, (1, 12))
    assert not torch.allclose(merged(ids).logits, base(ids).logits, atol=1e-4)  # the adapter is in the export
    # a LoRA run resumes bitwise as well
    part = tiny_cfg(tmp_path, init_from=base_dir, lora_r=4, lora_alpha=8, lora_targets="c_attn,c_fc", max_steps=2,
                    lr=1e-2, lr_decay_steps=4, out_dir=str(tmp_path / "part"))
    train(part)
    scramble_rngs()
    train(tiny_cfg(tmp_path, init_from=base_dir, lora_r=4, lora_alpha=8, lora_targets="c_attn,c_fc", max_steps=4,
                   lr=1e-2, lr_decay_steps=4, out_dir=str(tmp_path / "part"), resume=True))
    assert_bitwise_equal(adapter, load_file(os.path.join(part.out_dir, "adapter_model.safetensors")))


def test_gradient_checkpointing_saves_activation_memory_and_keeps_gradients():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=256, n_positions=128, n_embd=64, n_layer=4, n_head=4,
                                       resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)).train()
    x = torch.randint(0, 256, (4, 128))
    y = torch.roll(x, -1, dims=1)
    full = saved_activation_bytes(model, x, y)
    loss_grads = []
    for ckpt in (False, True):
        model.transformer.gradient_checkpointing = ckpt
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(x).logits.view(-1, 256), y.view(-1)).backward()
        loss_grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    checkpointed = saved_activation_bytes(model, x, y)
    assert checkpointed < 0.35 * full, (full, checkpointed)  # only block inputs, ln_f and the head remain
    for n in loss_grads[0]:
        torch.testing.assert_close(loss_grads[1][n], loss_grads[0][n], atol=1e-6, rtol=1e-5)


# ---- the script -----------------------------------------------------------------------------------

def test_script_runs_and_ctrl_c_exits_130_with_a_checkpoint(tmp_path):
    """`python tools/train.py` as a user runs it; SIGINT mid-run -> checkpoint, exit status 130."""
    data = tmp_path / "shakespeare.txt"
    with open(SHAKESPEARE, encoding="utf-8") as f:
        data.write_text(f.read(6000), encoding="utf-8")
    data = str(data)
    out = tmp_path / "out"
    cmd = [sys.executable, os.path.join(REPO, "tools", "train.py"), "--data", data, "--cache-dir", str(tmp_path / "c"),
           "--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16", "--batch-size", "2",
           "--max-steps", "100000", "--log-interval", "1", "--out-dir", str(out), "--device", "cpu"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=str(tmp_path),
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines, deadline = [], time.time() + 120
    try:
        for line in proc.stdout:  # wait until training is under way
            lines.append(line)
            if line.startswith("step") and "ms/step" in line or time.time() > deadline:
                break
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    log = "".join(lines) + rest
    assert proc.returncode == 130, log
    assert "interrupted: saved step" in log
    step = torch.load(out / STATE_FILE, weights_only=True)["step"]
    assert 1 <= step < 100000
    assert GPT2LMHeadModel.from_pretrained(str(out)).config.n_embd == 16
