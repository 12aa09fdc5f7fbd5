"""sm_90a compile check (benchmarks/sm90_compile_check.py) on a CPU-only machine.

The end-to-end test compiles every fitted launch config of the forward, dK/dV and dQ kernels (and the delta kernel)
for Hopper with the Triton wheel's CUDA backend and ptxas, in ``--quick`` mode (head dim 128, bf16: about 20 s with
a warm Triton cache, 1-2 minutes cold on 2 cores; the full run takes several minutes). It is skipped when the
installed Triton has no CUDA backend or ptxas. The row checks and exit codes are also unit-tested on synthetic rows.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "sm90_compile_check.py"


def _load():
    spec = importlib.util.spec_from_file_location("sm90_compile_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


check = _load()


def _row(**kw) -> dict:
    row = {"kernel": "dkdv", "block_m": 64, "block_n": 128, "warps": 8, "stages": 2, "dtype": "bf16", "head_dim": 128,
           "predicate": True, "epilogue": False, "dlse": False, "registers": 200, "stack_bytes": 0, "spill_stores": 0,
           "spill_loads": 0, "spill_bytes": 0, "smem_bytes": 100000, "smem_estimate": 147456, "smem_limit": 232448,
           "ptxas_warnings": [], "wgmma": 8, "mma_sync": 0, "cubin_registers": 200, "error": None, "compile_s": 1.0}
    row.update(kw)
    return row


# ------------------------------------------------------------------------------------------ unit tests (no compile)
def test_problems_accepts_a_clean_row():
    assert check.problems([_row()]) == []


@pytest.mark.parametrize("bad, needle", [
    (dict(spill_stores=8, spill_loads=8, spill_bytes=16, registers=255, cubin_registers=255), "spills"),
    (dict(smem_bytes=232449, smem_estimate=240000), "over the sm_90 limit"),
    (dict(smem_bytes=150000), "above smem_estimate"),
    (dict(error="PTXASError: boom"), "compile failed"),
    (dict(cubin_registers=168), "registers"),
])
def test_problems_flags_each_failure(bad, needle):
    found = check.problems([_row(), _row(**bad)])
    assert len(found) == 1 and needle in found[0], found


def test_problems_skips_estimate_when_none():
    assert check.problems([_row(kernel="delta", smem_bytes=256, smem_estimate=None)]) == []


def test_parse_ptxas_log():
    log = ("ptxas info    : Compiling entry function 'k' for 'sm_90a'\n"
           "ptxas info    : Function properties for k\n"
           "    56 bytes stack frame, 68 bytes spill stores, 76 bytes spill loads\n"
           "ptxas info    : Used 255 registers, used 1 barriers, 56 bytes cumulative stack size\n"
           "ptxas warning : (C7515) Potential Performance Loss: wgmma.mma_async instructions are serialized\n")
    got = check.parse_ptxas(log)
    assert got["registers"] == 255 and got["stack_bytes"] == 56
    assert got["spill_stores"] == 68 and got["spill_loads"] == 76
    assert len(got["ptxas_warnings"]) == 1 and "wgmma" in got["ptxas_warnings"][0]


def _fake_run(monkeypatch, rows: list[dict]) -> None:
    """Make ``main`` plan ``rows`` and 'compile' each to itself (no Triton, no ptxas)."""
    if "TRITON_INTERPRET" in os.environ:  # main() drops it for the real run; restore it for the other tests
        monkeypatch.setenv("TRITON_INTERPRET", os.environ["TRITON_INTERPRET"])
    env = {"triton": "x", "ptxas": "ptxas", "ptxas_version": "0", "ptxas_flags": "-v", "cuobjdump": None}
    monkeypatch.setattr(check, "check_environment", lambda: env)
    monkeypatch.setattr(check, "plan", lambda quick, env: [{"row": r} for r in rows])
    monkeypatch.setattr(check, "compile_job", lambda job: dict(job["row"]))


def test_exit_status_nonzero_when_a_row_spills(monkeypatch, capsys):
    _fake_run(monkeypatch, [_row(), _row(stages=3, spill_stores=12, spill_loads=12, spill_bytes=24)])
    assert check.main(["--json", "--jobs", "1"]) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and json.loads(lines[-1])["summary"]["spilling"] == 1


def test_exit_status_zero_and_summary_last(monkeypatch, capsys):
    _fake_run(monkeypatch, [_row(), _row(kernel="fwd", block_m=128, block_n=64)])
    assert check.main(["--jobs", "1"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith("sm_90a compile check") and out[-1].endswith("OK")
    assert "max registers 200" in out[-1]


def test_exit_status_2_without_cuda_backend(monkeypatch, capsys):
    _fake_run(monkeypatch, [])

    def no_backend():
        raise check.EnvironmentProblem("triton 0 has no CUDA backend")
    monkeypatch.setattr(check, "check_environment", no_backend)
    assert check.main([]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no CUDA backend" in err[0]


# ------------------------------------------------------------------------------------------ end to end (compiles)
@pytest.fixture(scope="module")
def quick_run():
    try:
        check.check_environment()
    except check.EnvironmentProblem as exc:
        pytest.skip(f"cannot compile for sm_90a here: {exc}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, str(SCRIPT), "--json", "--quick"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=900, check=False)
    if res.returncode == 2:
        pytest.skip(f"cannot compile for sm_90a here: {res.stderr.strip()}")
    lines = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    assert lines and "summary" in lines[-1], res.stdout[-2000:] + res.stderr[-2000:]
    return res, [r for r in lines if "kernel" in r], lines[-1]["summary"]


@pytest.mark.slow
def test_quick_run_covers_every_fitted_config(quick_run):
    import torch
    from vidattn.kernels.triton_attention import fit_configs

    _, rows, _ = quick_run
    for kind in ("fwd", "dkdv", "dq"):
        fitted = {tuple(c) for c in fit_configs(kind, block_q=128, block_kv=128, head_dim=128, dtype=torch.bfloat16)}
        for pred in (False, True):
            got = {(r["block_m"], r["block_n"], r["warps"], r["stages"]) for r in rows
                   if r["kernel"] == kind and r["predicate"] == pred and not r["epilogue"]}
            assert got == fitted, (kind, pred, got, fitted)
    assert sum(r["kernel"] == "fwd" and r["epilogue"] for r in rows) == 2
    assert {(r["block_m"], r["dlse"]) for r in rows if r["kernel"] == "delta"} == {(64, False), (64, True)}
    assert {(r["dtype"], r["head_dim"]) for r in rows} == {("bf16", 128)}


@pytest.mark.slow
def test_quick_run_fields(quick_run):
    _, rows, summary = quick_run
    assert summary["kernels"] == len(rows)
    for r in rows:
        assert not r["error"], r
        for name in check.INT_FIELDS:
            assert isinstance(r[name], int) and not isinstance(r[name], bool), (name, r)
        assert isinstance(r["predicate"], bool) and r["dtype"] == "bf16"
        assert r["kernel"] == "delta" or isinstance(r["smem_estimate"], int)


@pytest.mark.slow
def test_quick_run_no_spills_smem_within_limit_and_estimate(quick_run):
    res, rows, summary = quick_run
    problems = check.problems(rows)
    assert not problems, "\n".join(problems)
    for r in rows:
        assert r["spill_bytes"] == 0 and r["smem_bytes"] <= r["smem_limit"] == 232448
    assert res.returncode == 0 and summary["ok"], res.stderr[-2000:]
