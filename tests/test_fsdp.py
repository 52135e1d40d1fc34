"""FSDP2 (--fsdp): sharded training across gloo processes gives the weights one unsharded process gets with the
same global batch; a sharded checkpoint saved by 2 processes resumes on 1 and on 3; tools/export_hf.py turns it into
a checkpoint transformers loads; one-process resume stays bitwise; LoRA, gradient checkpointing, CPU offload and
bf16 mixed precision compose with it; the tie lm_head = wte survives sharding; DCP files asking to build anything
but plain data are refused, damaged ones named; a resume on another process count seeds each rank apart. Tiny models
(2 layers, width 32) as in tests/test_train.py."""
import dataclasses
import os
import pickle
import re
import runpy
import shutil

import pytest
import torch
import torch.distributed
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file
from torch.distributed.checkpoint import DefaultLoadPlanner
from torch.distributed.tensor import DTensor

from nanogpt2 import CheckpointError, GPT2LMHeadModel
from nanogpt2.checkpoint import SHARDED_DIR, restore_rng_state, rng_state, sharded_checkpoint_keys
from nanogpt2.distributed import init_distributed
from nanogpt2.train import export_sharded, save, setup, train, train_step

from conftest import hf_quiet
from test_ddp import assert_weights_close, needs_torchrun, torchrun
from test_train import Payload, VOCAB, assert_bitwise_equal, scramble_rngs, tiny_cfg

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def no_process_group_left():
    """--fsdp in this process starts a process group of one (nanogpt2.distributed.init_distributed): end it."""
    yield
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def exported(out_dir, tmp_path, name):
    """The weights of a run's sharded checkpoint, through export_sharded (what tools/export_hf.py runs)."""
    export_sharded(str(out_dir), str(tmp_path / name))
    return load_file(str(tmp_path / name / "model.safetensors"))


@needs_torchrun
def test_two_processes_match_one_and_resume_on_one_and_three(tmp_path):
    """12 sequences per step: 6 x 2 on one process, 3 x 2 x 2 on two, 2 x 2 x 3 on three. Two processes train 3
    steps with --fsdp and save; that checkpoint resumes to step 6 on one process and on three."""
    ref = tiny_cfg(tmp_path, batch_size=6, dropout=0.0, lr=1e-2, eval_interval=3, lr_decay_steps=6,
                   out_dir=str(tmp_path / "ref"))  # plain (unsharded) runs: the reference
    train(dataclasses.replace(ref, max_steps=3, out_dir=str(tmp_path / "ref3")))
    train(ref)

    two = dataclasses.replace(ref, batch_size=3, max_steps=3, fsdp=True, out_dir=str(tmp_path / "two"))
    log = torchrun(two, 2, tmp_path)
    assert "FSDP over 2 process(es)" in log and log.count("model: ") == 1
    assert sorted(os.listdir(os.path.join(two.out_dir, SHARDED_DIR))) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert "model.safetensors" not in os.listdir(two.out_dir)  # no rank gathered the model
    at3 = load_file(str(tmp_path / "ref3" / "model.safetensors"))
    assert_weights_close(at3, exported(two.out_dir, tmp_path, "two-hf"))
    shutil.copytree(two.out_dir, tmp_path / "one")

    one = dataclasses.replace(ref, fsdp=True, resume=True, out_dir=str(tmp_path / "one"))  # this process
    assert train(one).step == 6
    at6 = load_file(os.path.join(ref.out_dir, "model.safetensors"))
    assert_weights_close(at6, exported(one.out_dir, tmp_path, "one-hf"))
    assert (at6["transformer.wte.weight"] - at3["transformer.wte.weight"]).abs().max() > 1e-3  # it trained on

    three = dataclasses.replace(ref, batch_size=2, fsdp=True, resume=True, out_dir=two.out_dir,
                                export_dir=str(tmp_path / "three-hf"))
    log = torchrun(three, 3, tmp_path)
    assert "FSDP over 3 process(es); resuming at step 3" in log
    assert len(os.listdir(os.path.join(two.out_dir, SHARDED_DIR))) == 4  # .metadata + 3 shards, the 2 old ones gone
    assert_weights_close(at6, load_file(str(tmp_path / "three-hf" / "model.safetensors")))

    # tools/export_hf.py: a checkpoint transformers loads, with our logits
    transformers = hf_quiet()
    tool = runpy.run_path(os.path.join(REPO, "tools", "export_hf.py"), run_name="export_hf")
    assert tool["main"](["--checkpoint", two.out_dir, "--out", str(tmp_path / "cli-hf")]) == 0
    theirs = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "cli-hf").eval()
    ours = GPT2LMHeadModel.from_pretrained(str(tmp_path / "cli-hf")).eval()
    assert_bitwise_equal(load_file(str(tmp_path / "cli-hf" / "model.safetensors")),
                         load_file(str(tmp_path / "three-hf" / "model.safetensors")))
    ids = torch.randint(0, VOCAB, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("lora_r", [0, 4])
def test_one_process_resume_is_bitwise_and_equals_an_unsharded_run(tmp_path, lora_r):
    """--fsdp on one process (a group of one) runs the sharded code paths: sharded save, DCP load of weights,
    AdamW state and lr, on the meta-device skeleton (LoRA: on the rebuilt base, with gradient checkpointing).
    With dropout on, a run resumed at step 3 ends bitwise where an uninterrupted one does, and both bitwise
    where a run without --fsdp does."""
    lora = dict(lora_r=4, lora_targets="c_attn,c_fc", grad_checkpointing=True) if lora_r else {}
    plain = tiny_cfg(tmp_path, out_dir=str(tmp_path / "plain"), lr_decay_steps=6, lr=1e-2,
                     export_dir=str(tmp_path / "plain-hf"), **lora)
    train(plain)
    straight = dataclasses.replace(plain, fsdp=True, out_dir=str(tmp_path / "straight"), export_dir=None)
    train(straight)
    part = dataclasses.replace(straight, max_steps=3, out_dir=str(tmp_path / "part"))
    train(part)
    scramble_rngs()
    assert train(dataclasses.replace(straight, out_dir=part.out_dir, resume=True)).step == 6
    final = exported(straight.out_dir, tmp_path, "straight-hf")
    assert_bitwise_equal(final, exported(part.out_dir, tmp_path, "part-hf"))
    assert_bitwise_equal(load_file(str(tmp_path / "plain-hf" / "model.safetensors")), final)


def test_resume_and_export_refuse_a_mismatched_layout(tmp_path):
    with pytest.raises(ValueError, match="--fsdp-offload offloads FSDP's shards: it needs --fsdp"):
        tiny_cfg(tmp_path, fsdp_offload=True)
    plain = tiny_cfg(tmp_path, max_steps=1, out_dir=str(tmp_path / "plain"))
    train(plain)
    with pytest.raises(ValueError, match=r"--fsdp False \(now True\)"):
        train(dataclasses.replace(plain, fsdp=True, resume=True))
    with pytest.raises(FileNotFoundError, match="holds no sharded checkpoint"):
        export_sharded(plain.out_dir, str(tmp_path / "x"))
    sharded = dataclasses.replace(plain, fsdp=True, out_dir=str(tmp_path / "sharded"))
    train(sharded)
    with pytest.raises(ValueError, match=r"--fsdp True \(now False\)"):
        train(dataclasses.replace(sharded, fsdp=False, resume=True))


def test_tie_survives_sharding_and_bf16_computes_in_bf16_on_fp32_shards(tmp_path):
    """shard_model keeps lm_head.weight and wte.weight one (sharded) parameter, so the checkpoint holds it once;
    --dtype bfloat16 under FSDP all-gathers bf16 weights for compute (MixedPrecisionPolicy) while the shards and
    AdamW's state stay fp32; the run trains."""
    cfg = tiny_cfg(tmp_path, fsdp=True, dtype="bfloat16", dropout=0.0, lr=1e-2, max_steps=8)
    run = setup(cfg)
    model = run.model
    assert model.lm_head.weight is model.transformer.wte.weight and isinstance(model.lm_head.weight, DTensor)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    seen = []
    model.transformer.h[0].attn.c_attn.register_forward_pre_hook(lambda m, args: seen.append(m.weight.dtype))
    losses = [train_step(run).item() for _ in range(cfg.max_steps)]
    assert set(seen) == {torch.bfloat16}, seen
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(v.dtype == torch.float32 for s in run.optimizer.state.values() for k, v in s.items() if k != "step")
    assert losses[-1] < losses[0] - 1.0, losses
    save(run, {})
    keys = sharded_checkpoint_keys(cfg.out_dir)
    assert "model.transformer.wte.weight" in keys and "model.lm_head.weight" not in keys


@needs_torchrun
def test_lora_grad_checkpointing_and_offload_compose_with_fsdp(tmp_path):
    """Two processes, --fsdp --fsdp-offload --grad-checkpointing --lora-r 4: the merged export equals a plain
    one-process LoRA run's; the sharded checkpoint holds only the adapters (the base is --init-from's)."""
    ref = tiny_cfg(tmp_path, batch_size=4, max_steps=4, dropout=0.0, lr=1e-2, eval_interval=4, lora_r=4,
                   lora_targets="c_attn,c_fc", out_dir=str(tmp_path / "ref"), export_dir=str(tmp_path / "ref-hf"))
    train(ref)
    sharded = dataclasses.replace(ref, batch_size=2, fsdp=True, fsdp_offload=True, grad_checkpointing=True,
                                  out_dir=str(tmp_path / "sharded"), export_dir=str(tmp_path / "sharded-hf"))
    log = torchrun(sharded, 2, tmp_path)
    assert "FSDP over 2 process(es), shards offloaded to CPU" in log
    keys = sharded_checkpoint_keys(sharded.out_dir)
    weights = sorted(k for k in keys if k.startswith("model."))
    assert len(weights) == 2 * 2 * 2 and all(".lora_A." in k or ".lora_B." in k for k in weights), weights
    a = load_file(str(tmp_path / "ref-hf" / "model.safetensors"))
    assert_weights_close(a, load_file(str(tmp_path / "sharded-hf" / "model.safetensors")))  # LoRA merged in


def test_sharded_checkpoint_metadata_with_a_pickle_payload_is_refused(tmp_path):
    """DCP's .metadata is a pickle; it is read with only DCP's metadata classes allowed, so a payload's function
    is never called (torch's own FileSystemReader would call it)."""
    cfg = tiny_cfg(tmp_path, fsdp=True, max_steps=1)
    train(cfg)
    path = os.path.join(cfg.out_dir, SHARDED_DIR, ".metadata")
    marker = tmp_path / "payload-ran"
    with open(path, "wb") as f:
        pickle.dump({"metadata": Payload(marker)}, f)
    with pytest.raises(CheckpointError, match=r"refusing to load .*\.metadata: it asks for test_train\._leave_marker"):
        train(dataclasses.replace(cfg, max_steps=2, resume=True))
    with pytest.raises(CheckpointError, match="refusing to load"):
        export_sharded(cfg.out_dir, str(tmp_path / "x"))
    assert not marker.exists()


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # the control's one-process dcp.load
def test_an_optimizer_entry_with_a_pickle_payload_is_refused(tmp_path):
    """A sharded checkpoint's non-tensor entries (here the optimizer's param_groups, in __0_0.distcp) are read
    with weights_only=True: a payload planted there is refused, naming the entry, and never runs; torch's own
    planner, which unpickles them fully, would have run it."""
    cfg = tiny_cfg(tmp_path, fsdp=True, max_steps=1)
    run = setup(cfg)
    train_step(run)
    marker = tmp_path / "payload-ran"
    run.optimizer.param_groups[0]["note"] = Payload(marker)  # state_dict() copies every param-group key
    save(run, {})
    marker.unlink(missing_ok=True)                           # (copying the group may have called it: not a load)
    with pytest.raises(CheckpointError, match=r"refusing to load the entry 'optimizer\.param_groups' of a sharded "
                                              r"checkpoint: .* \(it asks for test_train\._leave_marker\)"):
        train(dataclasses.replace(cfg, max_steps=2, resume=True))
    assert not marker.exists()
    dcp.load({"optimizer.param_groups": []}, checkpoint_id=os.path.join(cfg.out_dir, SHARDED_DIR), no_dist=True,
             planner=DefaultLoadPlanner(flatten_state_dict=False))
    assert marker.exists()  # the control: the payload is real, and DCP's default loader runs it


def test_a_damaged_sharded_checkpoint_is_a_checkpoint_error(tmp_path):
    """dcp.load reports every failure as a CheckpointException, a BaseException that `except Exception` misses;
    a missing or truncated shard file reaches the user as a CheckpointError naming the folder, and
    tools/export_hf.py prints it as one line."""
    cfg = tiny_cfg(tmp_path, fsdp=True, max_steps=1)
    train(cfg)
    shard = os.path.join(cfg.out_dir, SHARDED_DIR, "__0_0.distcp")
    data = open(shard, "rb").read()
    os.remove(shard)
    folder = re.escape(repr(os.path.join(cfg.out_dir, SHARDED_DIR)))
    with pytest.raises(CheckpointError, match=f"cannot read the sharded checkpoint in {folder}: FileNotFoundError"):
        export_sharded(cfg.out_dir, str(tmp_path / "hf"))
    tool = runpy.run_path(os.path.join(REPO, "tools", "export_hf.py"), run_name="export_hf")
    with pytest.raises(SystemExit, match=f"^tools/export_hf.py: cannot read the sharded checkpoint in {folder}"):
        tool["main"](["--checkpoint", cfg.out_dir, "--out", str(tmp_path / "hf")])
    open(shard, "wb").write(data[:len(data) // 2])
    with pytest.raises(CheckpointError, match="EOFError .*a .distcp file ends early"):
        train(dataclasses.replace(cfg, max_steps=2, resume=True))


def test_resuming_on_another_number_of_processes_seeds_each_rank_apart():
    """Saved by 2 processes: resumed on 2, rank r continues its own saved stream; on 3, every rank is seeded from
    (seed, step, rank), so no two ranks share dropout masks (rank 0's saved state handed to all would)."""
    saved = []
    for r in range(2):
        torch.manual_seed(100 + r)
        saved.append(rng_state())

    def draws(rank, world, step=3):
        restore_rng_state(saved, rank, world, seed=7, step=step)
        return torch.rand(8)

    torch.manual_seed(101)
    rank1 = torch.rand(8)
    assert torch.equal(draws(1, 2), rank1)
    three = [draws(r, 3) for r in range(3)]
    assert not any(torch.equal(three[i], three[j]) for i in range(3) for j in range(i + 1, 3))
    assert torch.equal(draws(2, 3), three[2]) and not torch.equal(draws(2, 3, step=4), three[2])


def test_a_group_of_one_ignores_master_addr_without_rank(monkeypatch):
    """`python tools/train.py --fsdp` in a shell that exports MASTER_ADDR (but is not under torchrun: no RANK)
    starts an in-process group of one, rather than failing in env:// rendezvous for want of RANK."""
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    dist, _ = init_distributed("cpu", need_group=True)
    assert dist.world_size == 1 and torch.distributed.is_initialized() and torch.distributed.get_world_size() == 1
