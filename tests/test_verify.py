"""`nanogpt2 verify`: every check passes on a correct model, and a bug planted in one path is reported at the
first named point it reaches (in forward order), by the check that can see it, with exit status 1."""
import os
import subprocess
import sys

import pytest
import torch

import nanogpt2.attention
import nanogpt2.generation
import nanogpt2.model
from nanogpt2 import GPT2Config, GPT2LMHeadModel
from nanogpt2.cache import KVCache
from nanogpt2.hooks import HookRegistry
from nanogpt2.reference import INSTALL_HINT
from nanogpt2.verify import VerifyError, verify

# head dim 16, so the triton kernels (run by Triton's interpreter on CPU, see conftest.py) take part
TINY = dict(n_layer=3, n_embd=64, n_head=4)

# `python -m nanogpt2 ...` in an interpreter where `import transformers` fails as it does when the package is not
# installed (ModuleNotFoundError with name "transformers"): a finder put ahead of the real ones refuses it.
# runpy.run_module(alter_sys=True) is what `-m` does; argv after the -c program is the command line.
WITHOUT_TRANSFORMERS = """
import runpy, sys

class NotInstalled:
    def find_spec(self, name, path=None, target=None):
        if name == "transformers":
            raise ModuleNotFoundError("No module named 'transformers'", name="transformers")
        return None  # every other module: the real finders

sys.meta_path.insert(0, NotInstalled())
runpy.run_module("nanogpt2", run_name="__main__", alter_sys=True)
"""


def cli_without_transformers(*args):
    return subprocess.run([sys.executable, "-c", WITHOUT_TRANSFORMERS, *args], capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, HF_HUB_OFFLINE="1"), cwd=os.path.expanduser("~"))


@pytest.fixture(scope="module")
def nanogpt2_checkpoint(tmp_path_factory):
    """A tiny GPT-2 saved by nanogpt2 itself (no transformers involved), with the real vocabulary so any prompt
    encodes."""
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("nanogpt2-model")
    GPT2LMHeadModel(GPT2Config(vocab_size=50257, n_positions=64, n_embd=32, n_layer=1, n_head=2)).save_pretrained(
        directory)
    return str(directory)


def first_divergences(out: str) -> dict[str, str]:
    """check -> the point named on its 'first divergence' line."""
    found = {}
    for line in out.splitlines():
        if line.startswith("verify: ") and "first divergence at " in line:
            check = line.split()[1]
            found[check] = line.split("first divergence at ")[1].split(":")[0]
    return found


def summary(out: str, check: str) -> str:
    return next(line for line in out.splitlines() if line.startswith(check + " "))


def test_verify_cli_on_local_checkpoint(hf_checkpoint):
    directory, _ = hf_checkpoint(seed=0, **TINY)
    r = subprocess.run([sys.executable, "-m", "nanogpt2", "verify", "--model", directory], capture_output=True,
                       text=True, timeout=300, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    for paths in ("vs transformers", "KVCache, one token a step vs prefill", "sdpa vs eager", "triton vs eager",
                  "bf16 vs fp32"):  # one summary line per comparison, each ok
        line = next((line for line in lines if paths in line), None)
        assert line is not None and line.rstrip().endswith("ok"), (paths, r.stdout)
    header = next(line for line in lines if line.startswith("point "))
    assert header.split()[1:] == ["transformers", "decode", "sdpa/eager", "triton/eager", "bf16"]
    for point in ("embed", "h.0", "h.1", "h.2", "ln_f", "logits", "loss"):  # one table row per block by default
        assert any(line.split()[0] == point and "FAIL" not in line for line in lines if line.strip()), point
    assert not any(line.startswith("h.0.mlp.post") for line in lines)
    assert "all points match" in r.stdout


def test_all_points_lists_every_named_point(hf_checkpoint, capsys):
    directory, _ = hf_checkpoint(seed=0, n_layer=2)
    assert verify(directory, checks=["transformers"], all_points=True) == 0
    out = capsys.readouterr().out
    rows = [line.split()[0] for line in out.splitlines() if line.startswith(("embed", "h.", "ln_f"))]
    assert rows == nanogpt2.model.GPT2LMHeadModel.from_pretrained(directory).activation_names()


def test_verify_fails_when_a_block_diverges(hf_checkpoint, monkeypatch, capsys):
    directory, _ = hf_checkpoint(seed=0)
    forward = nanogpt2.model.GPT2MLP.forward
    monkeypatch.setattr(nanogpt2.model.GPT2MLP, "forward", lambda self, x: forward(self, x) + 1e-3)
    assert verify(directory, checks=["transformers", "decode", "backend"]) == 1
    out = capsys.readouterr().out
    # added after the MLP's own hooks, the change first shows in block 0's residual stream
    assert first_divergences(out) == {"transformers": "h.0.resid_post"}
    assert "h.0.resid_post" in summary(out, "transformers")
    # both of nanogpt2's own paths carry the change, so they still agree with each other
    assert summary(out, "decode").rstrip().endswith("ok") and summary(out, "backend").rstrip().endswith("ok")
    assert any(line.startswith("h.0 ") and "FAIL" in line for line in out.splitlines())


def test_first_divergent_point_is_named_not_a_later_one(hf_checkpoint, monkeypatch, capsys):
    """A change at h.1.mlp.post spreads to every later point; verify must name h.1.mlp.post itself."""
    directory, _ = hf_checkpoint(seed=0)
    call = HookRegistry.__call__
    monkeypatch.setattr(HookRegistry, "__call__",
                        lambda self, name, x: call(self, name, x + 1e-3 if name == "h.1.mlp.post" else x))
    assert verify(directory, checks=["transformers"]) == 1
    out = capsys.readouterr().out
    assert first_divergences(out) == {"transformers": "h.1.mlp.post"}
    table = {line.split()[0]: line for line in out.splitlines() if line.startswith(("embed", "h.", "ln_f"))}
    assert "FAIL" not in table["h.0"] and "FAIL" in table["h.1"] and "FAIL" in table["ln_f"]


def test_decode_check_catches_a_cache_bug(hf_checkpoint, monkeypatch, capsys):
    """Cached values that come back wrong touch nothing before attention mixes them: h.0.attn.z."""
    directory, _ = hf_checkpoint(seed=0)
    update = KVCache.update

    def bad_update(self, layer, k, v):
        k_all, v_all = update(self, layer, k, v)
        return k_all, v_all * 1.01

    monkeypatch.setattr(KVCache, "update", bad_update)
    assert verify(directory, checks=["transformers", "decode"]) == 1
    out = capsys.readouterr().out
    assert first_divergences(out) == {"decode": "h.0.attn.z"}  # prefill (no cache) still matches transformers


def test_decode_check_runs_generates_own_step(hf_checkpoint, monkeypatch, capsys):
    """A bug only in the per-token step generate() runs (here: its positions one off) is caught by the decode
    check at the first point it touches, the embedding, while one forward still matches transformers."""
    directory, _ = hf_checkpoint(seed=0)
    positions = nanogpt2.generation.positions_from_mask
    monkeypatch.setattr(nanogpt2.generation, "positions_from_mask", lambda *a: positions(*a) + 1)
    assert verify(directory, checks=["transformers", "decode"]) == 1
    out = capsys.readouterr().out
    assert first_divergences(out) == {"decode": "embed"}


def test_backend_check_catches_a_backend_bug(hf_checkpoint, monkeypatch, capsys):
    directory, _ = hf_checkpoint(seed=0)
    eager = nanogpt2.attention._eager

    def bad_eager(*args, **kwargs):
        y, probs = eager(*args, **kwargs)
        return y + 1e-3, probs

    monkeypatch.setattr(nanogpt2.attention, "_eager", bad_eager)
    assert verify(directory, checks=["backend"], compare_backends=["eager", "sdpa"]) == 1
    out = capsys.readouterr().out
    assert first_divergences(out) == {"backend": "h.0.attn.z"}


def test_dtype_check_catches_a_low_precision_bug(hf_checkpoint, monkeypatch, capsys):
    """A bf16-only error (here: LayerNorm's epsilon lost in bf16) must exceed the bf16 tolerance at ln_1."""
    directory, _ = hf_checkpoint(seed=0)
    layer_norm = torch.nn.functional.layer_norm

    def bad_layer_norm(x, shape, weight=None, bias=None, eps=1e-5):
        out = layer_norm(x, shape, weight, bias, eps)
        return out * 1.2 if x.dtype == torch.bfloat16 else out

    monkeypatch.setattr(torch.nn.functional, "layer_norm", bad_layer_norm)
    assert verify(directory, checks=["dtype"]) == 1
    assert first_divergences(capsys.readouterr().out) == {"dtype": "h.0.ln_1"}


def test_bad_requests_name_the_value_and_the_choices(hf_checkpoint, monkeypatch):
    directory, _ = hf_checkpoint(seed=0)
    with pytest.raises(VerifyError, match=r"unknown backend 'flash'.*eager, sdpa, triton"):
        verify(directory, checks=["backend"], compare_backends=["eager", "flash"])
    with pytest.raises(VerifyError, match=r"unknown check.*'speed'.*transformers, decode, backend, dtype"):
        verify(directory, checks=["speed"])
    with pytest.raises(VerifyError, match=r"dtype 'fp32' is not a low precision.*bf16"):
        verify(directory, checks=["dtype"], dtype="fp32")
    with pytest.raises(VerifyError, match=r"at least two backends"):
        verify(directory, checks=["backend"], compare_backends=["sdpa"])
    monkeypatch.setattr(nanogpt2.attention, "triton_interpreting", lambda: False)  # a CPU without the interpreter
    with pytest.raises(VerifyError, match=r"lists triton, which cannot run here.*CUDA"):
        verify(directory, checks=["backend"], compare_backends=["sdpa", "triton"])


def test_cli_reports_bad_request_with_exit_status_2(hf_checkpoint):
    directory, _ = hf_checkpoint(seed=0)
    r = subprocess.run([sys.executable, "-m", "nanogpt2", "verify", "--model", directory, "--checks", "decode,oops"],
                       capture_output=True, text=True, timeout=300, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert r.returncode == 2 and "unknown check(s) ['oops']" in r.stderr, r.stdout + r.stderr


def test_cli_without_transformers_says_how_to_install_it():
    r = cli_without_transformers("verify")
    assert r.returncode == 2, r.stdout + r.stderr
    assert len(r.stderr.splitlines()) == 1 and INSTALL_HINT in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_cli_without_transformers_runs_what_does_not_need_it(nanogpt2_checkpoint):
    """Only the transformers check (and the default model) need transformers; generate never does."""
    r = cli_without_transformers("verify", "--model", nanogpt2_checkpoint, "--checks", "decode,backend,dtype",
                                 "--compare", "eager,sdpa")
    assert r.returncode == 0 and "all points match (3 comparisons)" in r.stdout, r.stdout + r.stderr
    r = cli_without_transformers("generate", "--model", nanogpt2_checkpoint, "--prompt", "Hello",
                                 "--max-new-tokens", "3")
    assert r.returncode == 0 and r.stdout.startswith("Hello"), r.stdout + r.stderr
