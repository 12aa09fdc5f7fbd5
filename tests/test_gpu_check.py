"""The GPU check works on a CPU machine: ``bash benchmarks/gpu_check.sh --dry-run`` runs every step at tiny size
(triton interpreter), writes at most 8 files, validates every fitted config of every kernel and prints the summary
last; a failed install stops it with a message; the CLIs parse their arguments."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks" / "gpu_bench.py"
VALIDATE = ROOT / "benchmarks" / "gpu_validate.py"
CHECK = ROOT / "benchmarks" / "gpu_check.sh"
FILES = {"environment.txt", "precompile.txt", "validate.txt", "gpu_bench.md", "gpu_bench.json", "profile.txt",
         "summary.txt", "gpu_check.log"}
needs_bash = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils' timeout")


def _run(script: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(script), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, check=False, env=env)


def _check(tmp: Path, *, python: str, extra_env: dict | None = None, timeout: int = 300):
    env = {**os.environ, "OUT": str(tmp), "PYTHON": python, **(extra_env or {})}
    env.pop("TRITON_INTERPRET", None)  # the script sets it itself for --dry-run
    return subprocess.run(["bash", str(CHECK), "--dry-run"], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, check=False, env=env)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """One full dry run shared by the tests below (about 50 s on two cores)."""
    out = tmp_path_factory.mktemp("gpu_check_out")
    res = _check(out, python=sys.executable)
    return res, out


# ---------------------------------------------------------------------------------------------------- the dry run
@needs_bash
def test_dry_run_succeeds_within_the_file_limit(dry_run):
    res, out = dry_run
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= 8, files
    assert {p.name for p in files} == FILES


@needs_bash
def test_dry_run_prints_the_summary_last(dry_run):
    res, out = dry_run
    stdout = res.stdout.rstrip()
    summary = (out / "summary.txt").read_text().rstrip()
    assert "GPU CHECK SUMMARY" in summary
    assert stdout.endswith(summary), stdout[-1500:]
    assert stdout.index("GPU CHECK SUMMARY") > stdout.index("== 5. profile")
    for step in ("env ok", "validate ok", "precompile ok", "bench ok", "extra ok", "profile ok", "all steps ok"):
        assert step in summary, summary
    assert "fwd+bwd" in summary and "all-ones" in summary and "radial" in summary
    # gpu_check.log holds everything printed
    assert (out / "gpu_check.log").read_text().rstrip().endswith(summary)


@needs_bash
def test_dry_run_validates_every_fitted_config_of_every_kernel(dry_run):
    pytest.importorskip("triton")
    from vidattn.kernels.triton_attention import KernelConfig, fit_configs

    res, out = dry_run
    text = (out / "validate.txt").read_text()
    assert re.search(r"^VALIDATION PASS: \d+ runs passed, 0 failed, 0 skipped", text, re.M), text[-2000:]
    run_re = re.compile(r"^RUN \S+ (\S+)\s+(\w+) d=(\d+) .*blocks=(\d+)x(\d+) fwd=(\S+) dkdv=(\S+) dq=(\S+) \|.*"
                        r"\| [\d.]+s PASS$", re.M)
    seen: dict = {}
    cases = set()
    for m in run_re.finditer(text):
        case, dt, d, bq, bkv = m.group(1), m.group(2), int(m.group(3)), int(m.group(4)), int(m.group(5))
        cases.add(case)
        for kind, cfg in zip(("fwd", "dkdv", "dq"), m.groups()[5:]):
            bm, bn, w, st = map(int, re.fullmatch(r"(\d+)x(\d+)w(\d+)s(\d+)", cfg).groups())
            seen.setdefault((dt, d, bq, bkv, kind), set()).add(KernelConfig(bm, bn, w, st))
    assert cases >= {"bhsd-radial", "bshd-radial", "per-head-random", "per-batch-random", "kv-lens",
                     "window-predicate", "epilogue", "d64-fp16"}
    assert {(k[0], k[1]) for k in seen} == {("fp16", 128), ("fp16", 64)}
    import torch

    for (dt, d, bq, bkv, kind), got in seen.items():
        want = set(fit_configs(kind, block_q=bq, block_kv=bkv, head_dim=d, dtype=getattr(torch, {"fp16": "float16",
                               "bf16": "bfloat16"}[dt])))
        assert got == want, (dt, d, kind, got ^ want)
        assert len(want) >= 3  # the real tile variety (128x64, 64x128, 32x128, ...), not one degenerate tile


@needs_bash
def test_dry_run_benchmark_profile_precompile_and_ceilings(dry_run):
    _, out = dry_run
    rows = json.loads((out / "gpu_bench.json").read_text())["rows"]
    assert rows[0]["shape"] == "hunyuan" and rows[-1]["shape"] == "wan"  # HunyuanVideo first
    combos = {(r["shape"], r["pattern"], r["backend"], r["pass"]) for r in rows}
    for shape in ("hunyuan", "wan"):
        for pattern in ("radial", "all-ones", "random 25%"):
            for backend in ("sdpa flash", "triton", "flex"):
                for pass_ in ("fwd", "fwd+bwd"):
                    assert (shape, pattern, backend, pass_) in combos
    timed = [r for r in rows if r["backend"] == "triton" and r["ms"]]
    assert len(timed) == 12 and all(r["efficiency"] is not None for r in timed)
    assert "| triton |" in (out / "gpu_bench.md").read_text()
    prof = (out / "profile.txt").read_text()
    assert "## triton radial fwd+bwd" in prof and "## sdpa flash (dense) fwd+bwd" in prof
    assert "compiled-kernel resources" in prof
    pre = (out / "precompile.txt").read_text()
    assert "FLEX_COMPILE hunyuan fwd" in pre
    assert "('validate', 0, 0) done" in pre and "('bench', 'hunyuan', 0) done" in pre
    env = (out / "environment.txt").read_text()
    assert "CEILING matmul" in env and "CEILING copy" in env and "install: vidattn.kernels imports" in env


@needs_bash
def test_dry_run_has_the_rectified_and_window_rows(dry_run):
    """Step 4b: rectified (end to end and selection alone, drop 0.75 and 0.9) on both shapes, FreeSwim's window at
    1080p and 4K in raster (triton) and tiled order, each against SDPA flash; in the json, the md and the summary,
    without disturbing the main rows."""
    res, out = dry_run
    assert "== 4b. extra rows" in res.stdout
    data = json.loads((out / "gpu_bench.json").read_text())
    assert data["rows"][-1]["shape"] == "wan"  # the main rows are kept as they were
    extra = data["extra_rows"]
    assert all(r["ms"] for r in extra), [(r["pattern"], r["backend"], r["note"]) for r in extra if not r["ms"]]
    combos = {(r["section"], r["shape"], r["pattern"], r["backend"]) for r in extra}
    for shape in ("wan", "hunyuan"):
        assert ("rectified", shape, "dense", "sdpa flash") in combos
        for drop in ("0.75", "0.9"):
            for backend in ("triton (selection+kernel)", "selection only"):
                assert ("rectified", shape, f"rectified drop {drop}", backend) in combos
    for shape in ("freeswim-1080p", "freeswim-4k"):
        window = [r for r in extra if r["section"] == "window" and r["shape"] == shape and r["backend"] != "sdpa flash"]
        assert {r["order"] for r in window} == {"raster", "tiles4x4"}
        assert next(r for r in window if r["order"] == "raster")["backend"] == "triton"
        assert all(0 < r["token_density"] <= r["density"] <= 1 and r["speedup"] for r in window)
    md = (out / "gpu_bench.md").read_text()
    assert md.count("## Extra rows") == 1 and "| window | FreeSwim" in md and "| rectified |" in md
    assert md.index("| triton |") < md.index("## Extra rows")  # after the main table
    summary = (out / "summary.txt").read_text()
    assert "extra rows, fwd" in summary and "freeswim-4k" in summary and "% of sdpa" in summary


# ---------------------------------------------------------------------------------------------------- install
def _fake_python(tmp: Path, body: str) -> str:
    path = tmp / "fake-python"
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return str(path)


@needs_bash
def test_failed_install_stops_the_check_with_a_message(tmp_path):
    out = tmp_path / "out"
    py = _fake_python(tmp_path, 'echo "fake python cannot run $*" >&2\nexit 1\n')
    res = _check(out, python=py, timeout=60)
    assert res.returncode != 0
    assert "gpu_check: STOP: 'pip install --no-deps -e .' failed" in res.stdout
    assert res.stdout.rstrip().splitlines()[-1].startswith("gpu_check: STOP")
    assert not (out / "validate.txt").exists() and not (out / "summary.txt").exists()


@needs_bash
def test_install_that_does_not_make_the_package_importable_stops_too(tmp_path):
    out = tmp_path / "out"
    py = _fake_python(tmp_path, 'if [ "$1" = "-m" ]; then echo "pip: installed"; exit 0; fi\n'
                                'echo "ModuleNotFoundError: No module named vidattn.kernels" >&2\nexit 1\n')
    res = _check(out, python=py, timeout=60)
    assert res.returncode != 0
    assert "still fails" in res.stdout and "No module named vidattn.kernels" in res.stdout
    assert not (out / "validate.txt").exists()


@needs_bash
def test_gpu_run_without_a_cuda_device_stops_before_installing(tmp_path):
    """Without --dry-run on a machine with no GPU: 'no CUDA device', non-zero, and pip is never called."""
    import shutil

    if shutil.which("nvidia-smi"):
        pytest.skip("this machine has nvidia-smi")
    out = tmp_path / "out"
    log = tmp_path / "calls.txt"
    py = _fake_python(tmp_path, f'echo "$*" >> {log}\nexit 1\n')  # torch "does not import", pip would fail
    env = {**os.environ, "OUT": str(out), "PYTHON": py}
    env.pop("TRITON_INTERPRET", None)
    res = subprocess.run(["bash", str(CHECK)], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
                         env=env)
    assert res.returncode == 4
    assert "gpu_check: STOP: no CUDA device" in res.stdout
    assert "pip" not in (log.read_text() if log.exists() else "")
    assert not (out / "validate.txt").exists()


# ---------------------------------------------------------------------------------------------------- CLIs
def test_gpu_bench_help():
    res = _run(BENCH, "--help")
    assert res.returncode == 0, res.stderr
    for flag in ("--dry-run", "--shapes", "--densities", "--reps", "--out", "--budget-s", "--ceilings", "--profile",
                 "--summary", "--extra", "--extra-rows", "--drop-rates", "--window-frames"):
        assert flag in res.stdout


def test_gpu_bench_rejects_unknown_shape():
    res = _run(BENCH, "--dry-run", "--shapes", "sd3")
    assert res.returncode != 0 and "unknown shape" in res.stderr


def test_gpu_bench_rejects_unknown_extra_rows_and_bad_drop_rates():
    res = _run(BENCH, "--extra", "--dry-run", "--extra-rows", "radial")
    assert res.returncode != 0 and "unknown extra rows" in res.stderr
    res = _run(BENCH, "--extra", "--dry-run", "--drop-rates", "1.5")
    assert res.returncode != 0 and "--drop-rates" in res.stderr


def test_summary_lists_extra_rows_without_torch(tmp_path):
    def r(section, shape, pattern, backend, ms, dense_ms, **more):
        return {"section": section, "shape": shape, "pattern": pattern, "backend": backend, "ms": ms,
                "dense_ms": dense_ms, "speedup": dense_ms / ms if ms and backend != "sdpa flash" else None,
                "density": 0.48, "note": "" if ms else "skipped: time budget", **more}
    extra = [r("window", "freeswim-4k", "dense", "sdpa flash", 10.0, 10.0),
             r("window", "freeswim-4k", "window raster", "triton", 4.0, 10.0, token_density=0.05),
             r("rectified", "wan", "rectified drop 0.9", "selection only", 0.5, 10.0, overhead=True),
             r("window", "freeswim-1080p", "window tiles8x16", "flex", None, None)]
    (tmp_path / "gpu_bench.json").write_text(json.dumps({"dry_run": False, "rows": [], "extra_rows": extra}))
    res = _run(BENCH, "--summary", "--out", str(tmp_path))
    assert res.returncode == 0, res.stderr
    line = next(x for x in res.stdout.splitlines() if "window raster" in x)
    assert "speedup 2.50x" in line and "token 0.050" in line
    assert "5.0 % of sdpa" in res.stdout and "skipped: time budget" in res.stdout


def test_gpu_validate_help_and_rejects_unknown_case():
    res = _run(VALIDATE, "--help")
    assert res.returncode == 0 and "--precompile-shard" in res.stdout and "--budget-s" in res.stdout
    res = _run(VALIDATE, "--dry-run", "--cases", "nope")
    assert res.returncode != 0 and "unknown cases" in res.stderr


def test_summary_verdicts_from_rows(tmp_path):
    """The summary needs no torch, and judges the targets: fwd eff >= 0.9, fwd+bwd >= 0.7, all-ones <= 1.10."""
    def r(pattern, density, backend, pass_, ms, dense_ms):
        eff = dense_ms / ms * density if backend != "sdpa flash" else None
        return {"shape": "hunyuan", "pattern": pattern, "density": density, "backend": backend, "pass": pass_,
                "ms": ms, "efficiency": eff, "ratio": ms / dense_ms if backend != "sdpa flash" else None,
                "first_s": None}
    rows = [r("radial", 0.25, "sdpa flash", "fwd", 100.0, 100.0), r("radial", 0.25, "triton", "fwd", 27.0, 100.0),
            r("radial", 0.25, "sdpa flash", "fwd+bwd", 300.0, 300.0),
            r("radial", 0.25, "triton", "fwd+bwd", 150.0, 300.0),
            r("all-ones", 1.0, "sdpa flash", "fwd", 100.0, 100.0), r("all-ones", 1.0, "triton", "fwd", 105.0, 100.0)]
    (tmp_path / "gpu_bench.json").write_text(json.dumps({"dry_run": False, "rows": rows}))
    (tmp_path / "validate.txt").write_text("VALIDATION PASS: 48 runs passed, 0 failed, 0 skipped (budget) of 48\n")
    res = _run(BENCH, "--summary", "--out", str(tmp_path), "--steps", "validate ok 1s")
    assert res.returncode == 0, res.stderr
    text = res.stdout
    assert "validation: PASS: 48 runs passed" in text
    radial = next(line for line in text.splitlines() if line.startswith("hunyuan  radial"))
    assert "fwd ok" in radial and "fwd+bwd MISS" in radial  # 0.93 >= 0.9; 0.5 < 0.7
    ones = next(line for line in text.splitlines() if line.startswith("hunyuan  all-ones"))
    assert "fwd time/sdpa 1.05 ok" in ones
    assert (tmp_path / "summary.txt").read_text().strip() == text.strip()


def test_precompile_shards_cover_every_task_once():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_validate
    finally:
        sys.path.pop(0)
    tasks = [("flex", s, p) for s in ("a", "b") for p in ("fwd", "fwd+bwd")]
    tasks += [("validate", c, i) for c in range(8) for i in range(4)]
    tasks += [("bench", s, i) for s in ("a", "b") for i in range(4)]
    for n in (1, 2, 5, 12):
        shards = [gpu_validate.shard_of(tasks, i, n) for i in range(n)]
        flat = [t for s in shards for t in s]
        assert sorted(flat) == sorted(tasks), n
    shards = [gpu_validate.shard_of(tasks, i, 12) for i in range(12)]
    assert all(len(s) == 1 and s[0][0] == "flex" for s in shards[:4])  # each cold FlexAttention compile alone


@needs_bash
def test_gpu_check_script_syntax_and_help():
    res = subprocess.run(["bash", "-n", str(CHECK)], capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr
    res = subprocess.run(["bash", str(CHECK), "--help"], capture_output=True, text=True, check=False)
    assert res.returncode == 0 and "--dry-run" in res.stdout and "8 at most" in res.stdout
