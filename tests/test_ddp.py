"""DDP: `torchrun --nproc_per_node=2 tools/train.py` (gloo on CPU) gives the weights a single process gets with
the same global batch: each rank reads its own half of every global batch, gradients are averaged. The same holds
across "nodes": two torchrun launchers rendezvousing on localhost (--nnodes 2 --node_rank 0/1), as on a cluster.
The launch helpers here serve tests/test_fsdp.py too."""
import dataclasses
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from nanogpt2.train import TrainConfig, build_model, train

from test_train import tiny_cfg

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCHRUN = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
needs_torchrun = pytest.mark.skipif(not os.path.exists(TORCHRUN), reason="torchrun not installed")


def flags(cfg: TrainConfig) -> list[str]:
    """tools/train.py's command line for `cfg`: every option that differs from its default (so a torchrun run
    and an in-process train(cfg) are given the very same options)."""
    out = []
    for f in dataclasses.fields(TrainConfig):
        value = getattr(cfg, f.name)
        if value == f.default:
            continue
        name = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            out.append(name if value else "--no-" + name[2:])
        else:
            out += [name, str(value)]
    return out


def torchrun(cfg: TrainConfig, nproc: int, cwd, launcher=("--standalone",), timeout=240):
    """Run tools/train.py with `cfg` under torchrun (one thread per process); returns its log. The run must
    succeed. `launcher`: torchrun's own flags before --nproc_per_node."""
    cmd = [TORCHRUN, *launcher, f"--nproc_per_node={nproc}", os.path.join(REPO, "tools", "train.py"), *flags(cfg)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=str(cwd),
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    return log


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_weights_close(a: dict, b: dict, atol=2e-5):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=atol, rtol=1e-4, msg=k)


@needs_torchrun
def test_two_gloo_processes_match_one_process(tmp_path):
    common = dict(max_steps=4, dropout=0.0, grad_accum=2, eval_interval=2, lr=1e-2, warmup_steps=1)
    single = tiny_cfg(tmp_path, batch_size=4, out_dir=str(tmp_path / "single"), **common)  # 4 x 2 x 1 sequences
    train(single)

    ddp = dataclasses.replace(single, batch_size=2, out_dir=str(tmp_path / "ddp"))  # 2 x 2 x 2 sequences
    log = torchrun(ddp, 2, tmp_path)
    assert log.count("model: ") == 1  # only rank 0 reports (and writes)
    assert "batch 2x2x2 sequences" in log and "DDP over 2 processes" in log

    a = load_file(os.path.join(single.out_dir, "model.safetensors"))
    assert_weights_close(a, load_file(os.path.join(ddp.out_dir, "model.safetensors")))
    # and the runs did train (4 steps at lr 1e-2 move the weights far beyond that tolerance)
    init = build_model(single).state_dict()  # the same seeded initialisation
    assert (a["transformer.h.0.attn.c_attn.weight"] - init["transformer.h.0.attn.c_attn.weight"].t()).abs().max() > 1e-3


@needs_torchrun
def test_two_nodes_of_one_process_match_one_process(tmp_path):
    """Multi-node as docs/TRAINING.md gives it: one torchrun per machine, --nnodes 2 and its --node_rank, both
    pointed at node 0's address (here 127.0.0.1); each node runs one process."""
    single = tiny_cfg(tmp_path, batch_size=4, max_steps=3, dropout=0.0, eval_interval=3, lr=1e-2, warmup_steps=1,
                      out_dir=str(tmp_path / "single"))
    train(single)
    nodes = dataclasses.replace(single, batch_size=2, out_dir=str(tmp_path / "nodes"))
    port = free_port()
    launchers = [("--nnodes=2", f"--node_rank={rank}", "--master_addr=127.0.0.1", f"--master_port={port}")
                 for rank in (0, 1)]
    cmds = [[TORCHRUN, *launcher, "--nproc_per_node=1", os.path.join(REPO, "tools", "train.py"), *flags(nodes)]
            for launcher in launchers]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=str(tmp_path),
                              env=env) for cmd in cmds]
    try:
        logs = [p.communicate(timeout=240)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-4000:]
    assert "batch 2x2x2 sequences" in logs[0] and "model: " not in logs[1]  # node 1 holds rank 1: silent
    assert_weights_close(load_file(os.path.join(single.out_dir, "model.safetensors")),
                         load_file(os.path.join(nodes.out_dir, "model.safetensors")))
