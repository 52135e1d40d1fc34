"""`nanogpt2 verify`: the table, exit status 0 on agreement and non-zero on a real divergence."""
import os
import subprocess
import sys

import nanogpt2.model
from nanogpt2.verify import verify


def test_verify_cli_on_local_checkpoint(hf_checkpoint):
    directory, _ = hf_checkpoint(seed=0, n_layer=3)
    r = subprocess.run([sys.executable, "-m", "nanogpt2", "verify", "--model", directory], capture_output=True,
                       text=True, timeout=300, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    for point in ("embeddings", "block 0", "block 1", "block 2 + ln_f", "attention probs 2", "logits", "loss"):
        assert any(line.startswith(point) and line.rstrip().endswith("ok") for line in lines), point
    assert "all points match" in r.stdout


def test_verify_fails_when_a_block_diverges(hf_checkpoint, monkeypatch, capsys):
    directory, _ = hf_checkpoint(seed=0)
    forward = nanogpt2.model.GPT2MLP.forward
    monkeypatch.setattr(nanogpt2.model.GPT2MLP, "forward", lambda self, x: forward(self, x) + 1e-3)
    assert verify(directory) == 1
    out = capsys.readouterr().out
    assert "block 0" in out and "MISMATCH" in out and "exceed the tolerance" in out
