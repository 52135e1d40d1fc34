"""DDP: `torchrun --nproc_per_node=2 tools/train.py` (gloo on CPU) gives the weights a single process gets with
the same global batch: each rank reads its own half of every global batch, gradients are averaged."""
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from nanogpt2.train import build_model, train

from test_train import VOCAB, tiny_cfg

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(shutil.which("torchrun") is None and not os.path.exists(
    os.path.join(os.path.dirname(sys.executable), "torchrun")), reason="torchrun not installed")
def test_two_gloo_processes_match_one_process(tmp_path):
    common = dict(max_steps=4, dropout=0.0, grad_accum=2, eval_interval=2, lr=1e-2, warmup_steps=1)
    single = tiny_cfg(tmp_path, batch_size=4, out_dir=str(tmp_path / "single"), **common)  # 4 x 2 x 1 sequences
    train(single)

    torchrun = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
    args = {"--data": single.data, "--cache-dir": single.cache_dir, "--n-layer": 2, "--n-head": 2, "--n-embd": 32,
            "--vocab-size": VOCAB, "--block-size": 32, "--batch-size": 2, "--grad-accum": 2, "--max-steps": 4,
            "--dropout": 0.0, "--eval-interval": 2, "--eval-iters": 2, "--lr": 1e-2, "--warmup-steps": 1,
            "--seed": single.seed, "--device": "cpu", "--dtype": "float32", "--out-dir": str(tmp_path / "ddp")}  # 2 x 2 x 2 sequences
    cmd = [torchrun, "--standalone", "--nproc_per_node=2", os.path.join(REPO, "tools", "train.py")]
    cmd += [str(x) for kv in args.items() for x in kv]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=str(tmp_path))
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert log.count("model: ") == 1  # only rank 0 reports (and writes)
    assert "batch 2x2x2 sequences" in log

    a = load_file(os.path.join(single.out_dir, "model.safetensors"))
    b = load_file(str(tmp_path / "ddp" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=2e-5, rtol=1e-4, msg=k)
    # and the runs did train (4 steps at lr 1e-2 move the weights far beyond that tolerance)
    init = build_model(single).state_dict()  # the same seeded initialisation
    assert (a["transformer.h.0.attn.c_attn.weight"] - init["transformer.h.0.attn.c_attn.weight"].t()).abs().max() > 1e-3
