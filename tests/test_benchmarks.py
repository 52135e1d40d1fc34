"""Every benchmark script runs end to end in its --quick mode (tiny shapes), so none of them rots.

No timing is asserted: speed goals live in the benchmarks' tables (BENCHMARKS.md), not in tests. What is
asserted is what a user of the scripts would notice: they exit 0, print the machine line and a table, and the
generation benchmarks' token-equality check passed (they refuse to print a speed otherwise).
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = sorted(f for f in os.listdir(os.path.join(ROOT, "benchmarks")) if f.endswith(".py") and f != "common.py")


def test_every_script_is_listed():
    assert set(SCRIPTS) >= {"attention.py", "decode.py", "generate.py", "hooks.py", "load_memory.py", "memory.py",
                            "patching.py", "prefill.py", "train_step.py"}


@pytest.mark.parametrize("script", SCRIPTS)
def test_quick_mode_runs(script, tmp_path):
    csv = tmp_path / "out.csv"
    cmd = [sys.executable, os.path.join("benchmarks", script), "--quick"]
    if script != "load_memory.py":
        cmd += ["--csv", str(csv)]
    env = dict(os.environ, TRITON_INTERPRET="1", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"{script} --quick failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    lines = [line for line in r.stdout.splitlines() if line.strip()]
    assert lines[0].startswith("#") and "torch" in lines[0], f"no machine line first:\n{r.stdout}"
    assert len(lines) >= 3, f"no table:\n{r.stdout}"
    if script != "load_memory.py":
        rows = csv.read_text().strip().splitlines()
        assert len(rows) >= 2, f"{script} wrote no CSV rows"


def test_train_step_fsdp_quick_runs(tmp_path):
    """--fsdp: DDP, FSDP and FSDP + offload each in 2 forked gloo processes, one table row per mode."""
    csv = tmp_path / "fsdp.csv"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, os.path.join("benchmarks", "train_step.py"), "--fsdp", "--quick", "--csv",
                        str(csv)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"train_step.py --fsdp --quick failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    rows = csv.read_text().strip().splitlines()
    assert [row.split(",")[0] for row in rows[1:]] == ["ddp", "fsdp", "fsdp+offload"], rows


def test_decode_bfloat16_quick_runs_its_near_tie_check():
    """bfloat16 decoding checks tokens against a float32 judge (rounding parts the sequences); it must pass."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, os.path.join("benchmarks", "decode.py"), "--quick", "--dtype", "bfloat16"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"decode.py --dtype bfloat16 failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    assert "bfloat16" in r.stdout and "refusing" not in r.stdout


def test_check_greedy_refuses_a_token_that_is_not_greedy():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import common
    finally:
        sys.path.pop(0)
    import torch
    import transformers
    torch.manual_seed(0)
    judge = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=32,
                                                                 n_layer=2, n_head=2, initializer_range=0.1)).eval()
    ids = torch.randint(0, 64, (2, 5))
    out = judge.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=6,
                         min_new_tokens=6, pad_token_id=0)
    common.check_greedy("greedy", out, out, 5, judge)           # the judge's own greedy tokens pass
    common.check_greedy("greedy", out, out.clone(), 5)          # float32: equal tokens pass
    bad = out.clone()
    with torch.no_grad():
        bad[1, 8] = judge(bad[:, :8]).logits[1, -1].argmin()    # the least likely token at one step
    with pytest.raises(SystemExit, match="refusing"):
        common.check_greedy("bad", bad, out, 5, judge)
    with pytest.raises(SystemExit, match="refusing"):
        common.check_greedy("bad", bad, out, 5)


def test_attention_rows_compare_graph_times_with_graph_times():
    """benchmarks/attention.py's ratios: "vs flash" from eager ms, "graph vs" from graph ms, rates from graph ms
    where measured. Fake (ms, graph ms, peak MiB, note) results: on CPU no row has a graph time to exercise this."""
    code = textwrap.dedent("""
        import json, sys
        sys.argv = ["attention.py", "--quick"]
        sys.path.insert(0, "benchmarks")
        import attention
        results = {"nanogpt2": (0.2, 0.05, 24.8, ""), "sdpa-flash": (0.1, 0.1, 30.0, ""),
                   "eager": (0.4, None, 99.0, "graph capture failed: x")}
        rows = attention._rows("forward", 2, 1024, 12, results, flops=2e9)
        print(json.dumps({r["impl"]: [r["vs_flash"], r["graph_vs_flash"], r["tflops"]] for r in rows}))
    """)
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads(r.stdout.strip().splitlines()[-1])
    assert rows["nanogpt2"] == [0.5, 2.0, pytest.approx(2e9 / 0.05e-3 / 1e12)]   # rate from the graph time
    assert rows["eager"] == [0.25, None, pytest.approx(2e9 / 0.4e-3 / 1e12)]      # no graph time: from ms
