"""The GPU check script and benchmark CLI work on a CPU machine (help, dry run, shell syntax)."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks" / "gpu_bench.py"
CHECK = ROOT / "benchmarks" / "gpu_check.sh"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCH), *args], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          check=False)


def test_gpu_bench_help():
    res = _run("--help")
    assert res.returncode == 0, res.stderr
    for flag in ("--dry-run", "--shapes", "--densities", "--reps", "--out"):
        assert flag in res.stdout


def test_gpu_bench_dry_run_prints_planned_rows():
    res = _run("--dry-run")
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "32760 tokens" in out and "115456 tokens" in out
    for name in ("dense flash SDPA", "triton", "flex (compiled)", "band 10%", "random/head 25%", "all-ones",
                 "fwd+bwd"):
        assert name in out
    assert out.count("| planned |") >= 2 * 2 * 7 * 2


def test_gpu_bench_rejects_unknown_shape():
    res = _run("--dry-run", "--shapes", "sd3")
    assert res.returncode != 0 and "unknown shape" in res.stderr


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_check_script_syntax():
    res = subprocess.run(["bash", "-n", str(CHECK)], capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr
