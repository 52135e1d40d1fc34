"""tools/gpu_check.py, the one command a session with a GPU runs (issue 13): the plan fits the device's window,
the runner goes on past a failing part and says which failed, and the plan runs on CPU (`make gpu-check DRY=1`).

The dry run here takes the parts the rest of the suite does not already run (the kernel and model test files,
and the benchmarks' --quick modes, are run by their own tests): the same runner and the same part commands.
"""
import importlib.util
import os
import shutil
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_tool(name):
    """tools/<name>.py as a module, without putting tools/ on sys.path."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module   # dataclasses and pickling look a module up by name
    spec.loader.exec_module(module)
    return module


gpu_check = _load_tool("gpu_check")
sync_check = _load_tool("sync_check")
PLAN, Part = gpu_check.PLAN, gpu_check.Part
PY = sys.executable
DRY_PARTS = "env,gpu-tests,sync-check,bench-train,profile"


def test_each_half_fits_the_deadline_and_the_deadline_the_device_limit():
    names = [p.name for p in PLAN]
    assert len(set(names)) == len(names)
    assert names[0] == "env", "the machine is recorded first"
    assert gpu_check.DEADLINE_S <= 570, "the summary must be written before the device tool's 600 s limit"
    assert {n for group in gpu_check.GROUPS.values() for n in group} == set(names), "every part is in a half"
    for group, parts in gpu_check.GROUPS.items():
        assert parts[0] == "env", group
        # 20 s to spare for the install and the preflight import before the deadline's clock starts
        assert sum(gpu_check.PARTS[n].budget_s for n in parts) <= gpu_check.DEADLINE_S - 20, group
    for p in PLAN:
        assert 0 < p.budget_s <= p.timeout_s, p.name
        assert all(w.startswith(p.name + ".") for w in p.writes), f"{p.name} writes {p.writes}"


def test_benchmarks_md_lists_the_plan_as_it_is():
    """BENCHMARKS.md's table of parts is what a session with a GPU reads first: it must not go stale."""
    with open(os.path.join(ROOT, "BENCHMARKS.md"), encoding="utf-8") as f:
        rows = {cells[1].strip(): cells[2:4] for cells in (line.split("|") for line in f) if len(cells) > 4}
    for p in PLAN:
        assert p.name in rows, f"BENCHMARKS.md has no row for part {p.name}"
        assert [c.strip() for c in rows[p.name]] == [str(p.budget_s), str(p.timeout_s)], p.name


def test_list_prints_every_part_with_its_budget():
    r = subprocess.run([PY, "tools/gpu_check.py", "--list"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    for p in PLAN:
        line = next(line for line in r.stdout.splitlines() if line.startswith(p.name + " "))
        assert str(p.budget_s) in line and str(p.timeout_s) in line
    assert "total" in r.stdout and str(sum(p.budget_s for p in PLAN)) in r.stdout


def test_only_keeps_the_plan_order_and_names_the_valid_parts():
    assert [p.name for p in gpu_check.parse_only("bench-train, env")] == ["env", "bench-train"]
    assert [p.name for p in gpu_check.parse_only("tests")] == gpu_check.GROUPS["tests"]
    assert [p.name for p in gpu_check.parse_only("benchmarks,kernel-tests")][:2] == ["env", "kernel-tests"]
    with pytest.raises(Exception, match="unknown part 'bench-typo'.*the parts: env, kernel-tests"):
        gpu_check.parse_only("env,bench-typo")


@pytest.mark.parametrize("script_part", [p.name for p in PLAN if p.name.startswith("bench-")])
def test_every_gpu_flag_of_a_benchmark_part_is_an_option_of_its_script(script_part):
    """The GPU commands run only on the device: a misspelt flag there would cost device minutes."""
    part = gpu_check.PARTS[script_part]
    script = next(a for a in part.command if a.startswith("benchmarks/"))
    r = subprocess.run([PY, script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, TRITON_INTERPRET="1"))
    assert r.returncode == 0, r.stderr
    for flag in (a for a in part.command + (part.dry or ()) if a.startswith("--")):
        assert flag in r.stdout, f"{script} has no {flag}"


def fake(name, code, timeout_s=30, writes=()):
    return Part(name, f"fake part {name}", (PY, "-c", code), budget_s=1, timeout_s=timeout_s, writes=writes)


def test_a_failing_part_does_not_stop_the_plan(tmp_path):
    out = str(tmp_path)
    pid_file = tmp_path / "hangs.pid"
    parts = [
        fake("passes", "open(r'{out}/passes.csv', 'w').write('a\\n1\\n2\\n')", writes=("passes.csv",)),
        fake("fails", "print('something broke'); raise SystemExit(3)"),
        fake("hangs", f"import os, time; open(r'{pid_file}', 'w').write(str(os.getpid())); time.sleep(60)",
             timeout_s=2),
        fake("forgets", "print('no csv')", writes=("forgets.csv",)),
        fake("after", "print('still ran')"),
    ]
    results = gpu_check.run_plan(parts, out, deadline_s=None)
    status = {r.part.name: r.status for r in results}
    assert status == {"passes": "ok", "fails": "FAILED (exit 3)", "hangs": "TIMEOUT (2 s)",
                      "forgets": "MISSING forgets.csv", "after": "ok"}
    assert results[0].note == "2 rows in passes.csv"
    assert "something broke" in (tmp_path / "fails.log").read_text()
    with pytest.raises(ProcessLookupError):   # the hung part's process was stopped, not left running
        os.kill(int(pid_file.read_text()), 0)
    summary = (tmp_path / "summary.txt").read_text()
    for name, s in status.items():
        assert any(line.startswith(name) and s in line for line in summary.splitlines()), summary
    assert "3 failed" in summary and "failed: fails, hangs, forgets" in summary
    import tarfile
    with tarfile.open(tmp_path / "gpu-check.tar.gz") as tar:   # everything, in one file to carry away
        packed = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    assert packed["gpu-check/summary.txt"].decode() == summary
    assert b"something broke" in packed["gpu-check/fails.log"] and "gpu-check/passes.csv" in packed


def test_a_package_that_does_not_import_stops_the_run_with_a_summary(tmp_path, monkeypatch, capsys):
    """The preflight: every part would fail on the same import, so none runs; the summary (and its copy where
    --bundle-to says) records that, and the message says what to do."""
    monkeypatch.setattr(gpu_check, "PY", shutil.which("false") or "/bin/false")
    rc = gpu_check.main(["--out", str(tmp_path / "out"), "--bundle-to", str(tmp_path / "carry"), "--only", "tests"])
    assert rc == 2
    assert "cannot import nanogpt2.kernels" in capsys.readouterr().out
    summary = (tmp_path / "carry" / "summary.txt").read_text()
    assert summary.count("not run (import)") == len(gpu_check.GROUPS["tests"])
    assert (tmp_path / "carry" / "gpu-check.tar.gz").exists()


def test_parts_past_the_deadline_are_reported_not_run(tmp_path):
    results = gpu_check.run_plan([fake("late", "print(1)")], str(tmp_path), deadline_s=0)
    assert results[0].status == "not run (deadline)" and not results[0].ok
    assert "not run (deadline)" in (tmp_path / "summary.txt").read_text()


def test_a_part_leaves_the_later_parts_their_budgets():
    parts = [Part(n, "", ("true",), budget_s=b, timeout_s=t) for n, b, t in
             (("a", 10, 100), ("b", 20, 100), ("c", 30, 35))]
    limits = {part.name: limit for part, limit in gpu_check.time_limits(parts, deadline_s=100, dry=False)}
    assert 49 <= limits["a"] <= 50          # 100 s left, 20 + 30 s owed to b and c
    assert 69 <= limits["b"] <= 70          # no time passed: 100 left, 30 owed to c
    assert limits["c"] == 35                # its own timeout


@pytest.mark.gpu
def test_the_test_session_compiles_kernels_on_cuda():
    """tests/conftest.py leaves the interpreter off where CUDA exists, so the kernel tests compile."""
    from nanogpt2.kernels import _ops
    assert os.environ.get("TRITON_INTERPRET") == "0"
    assert not _ops.INTERPRET   # what every kernel module reads (kernels/__init__ exports functions, not modules)


def test_conftest_interprets_only_without_cuda():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = "import sys, os; sys.path.insert(0, 'tests'); import conftest; print(os.environ['TRITON_INTERPRET'])"
    r = subprocess.run([PY, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == ("0" if torch.cuda.is_available() else "1")


def test_sync_check_names_each_line_that_syncs(monkeypatch, capsys):
    """check()'s report, with CUDA's sync debug mode played by a stand-in: "error" raises at the first sync,
    "warn" warns at each, as torch.cuda.set_sync_debug_mode does."""
    mode = ["default"]

    def fake_mode(m):
        mode[0] = m
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", fake_mode)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)

    # the stand-in for a torch op that syncs, in a file outside the repository as torch's own code is
    torch_op = {}
    exec(compile("import warnings\n"
                 "def item(mode):\n"
                 "    if mode[0] == 'error': raise RuntimeError('called a synchronizing CUDA operation')\n"
                 "    if mode[0] == 'warn': warnings.warn('called a synchronizing CUDA operation')\n",
                 "<torch>", "exec"), torch_op)

    def syncing_step():
        for _ in range(2):
            torch_op["item"](mode)   # first site (twice: reported once)
        torch_op["item"](mode)       # second site

    assert sync_check.check("clean step", lambda: None)
    assert not sync_check.check("syncing step", syncing_step)
    out = capsys.readouterr().out
    assert "clean step" in out and "no host sync" in out
    assert "syncing step" in out and "HOST SYNC (2 sites)" in out
    assert "# first site" in out and "# second site" in out and "tests/test_gpu_check.py:" in out
    assert mode[0] == "default"


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_gpu_check_dry_runs_the_plan_on_cpu(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run(["make", "-s", "gpu-check", "DRY=1", f"ONLY={DRY_PARTS}", f"OUT={tmp_path}", f"PYTHON={PY}"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"{r.stdout[-6000:]}\n{r.stderr[-3000:]}"
    summary = (tmp_path / "summary.txt").read_text()
    assert "DRY=1" in summary
    for name in DRY_PARTS.split(","):
        row = next(line for line in summary.splitlines() if line.startswith(name + " "))
        assert " ok " in row, summary
        assert (tmp_path / f"{name}.log").exists()
    assert "torch" in (tmp_path / "env.log").read_text()
    assert "ran (no CUDA" in (tmp_path / "sync-check.log").read_text()
    assert len((tmp_path / "bench-train.csv").read_text().strip().splitlines()) >= 2
    assert (tmp_path / "gpu-tests.xml").exists()
    profile = (tmp_path / "profile.log").read_text()
    assert "## decode (per new token)" in profile and "## training step (per step)" in profile


def test_profile_sorts_kernel_names_by_kind():
    """tools/gpu_profile.py's one-line split (attention / matmul / other) by kernel names as the profiler reports
    them on Hopper: ours, cuBLAS's, inductor's."""
    gpu_profile = _load_tool("gpu_profile")
    kinds = {name: gpu_profile.kind(name) for name in (
        "_attn_fwd", "_attn_bwd_dkdv", "_decode_split_kernel", "_decode_merge_kernel",
        "pytorch_flash::flash_fwd_kernel",
        "nvjet_tst_128x64_64x4_1x2_h_bz_coopA_NNT", "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n", "_int8_gemv_kernel",
        "triton_tem_fused_mm_0", "triton_poi_fused_add_commit_0", "triton_red_fused_native_layer_norm_0")}
    assert kinds == {
        "_attn_fwd": "attention", "_attn_bwd_dkdv": "attention", "_decode_split_kernel": "attention",
        "_decode_merge_kernel": "attention", "pytorch_flash::flash_fwd_kernel": "attention",
        "nvjet_tst_128x64_64x4_1x2_h_bz_coopA_NNT": "matmul", "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n": "matmul",
        "_int8_gemv_kernel": "matmul", "triton_tem_fused_mm_0": "matmul",
        "triton_poi_fused_add_commit_0": "other", "triton_red_fused_native_layer_norm_0": "other"}


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_the_documented_device_command_keeps_the_parts_files_out_of_OUT(tmp_path):
    """The device tool sets $OUT and brings back 8 files: the documented command must write the parts' files to
    gpu-out and only the summary and the bundle to $OUT (make's `OUT ?=` would otherwise take the environment's)."""
    env = dict(os.environ, OUT=str(tmp_path / "device-out"))
    r = subprocess.run(["make", "-n", "gpu-check", "ONLY=tests", "OUT=gpu-out", f"BUNDLE_TO={env['OUT']}"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert '--out "gpu-out"' in r.stdout and f'--bundle-to "{env["OUT"]}"' in r.stdout, r.stdout
    with open(os.path.join(ROOT, "BENCHMARKS.md"), encoding="utf-8") as f:
        assert 'make gpu-check ONLY=tests OUT=gpu-out BUNDLE_TO="$OUT"' in f.read()
