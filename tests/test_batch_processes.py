"""Batch generation across processes, on the tiny model: a run killed after its first video resumes to completion
(no item missing, none twice), and ``torchrun --nproc_per_node 2`` (gloo, CPU) writes the same videos, byte for
byte, as one process."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vidattn.cli import main

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--model", "tiny", "--frames", "17", "--height", "32", "--width", "32", "--guidance", "1"]
PROMPTS = "a red fox\na blue car\na green tree\na white boat\n"


def _env() -> dict:
    # one thread per process in both runs: CPU results must not depend on how many threads split a reduction
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _cli(*args: str) -> list:
    return [sys.executable, "-m", "vidattn", "generate", *args]


def _manifest(folder: Path) -> list:
    return [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines()]


def test_killed_run_resumes_to_completion(tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text(PROMPTS)
    out = tmp_path / "run"
    argv = [*FAST, "--steps", "3", "--method", "dense", "--prompts", str(prompts), "--out", str(out)]
    proc = subprocess.Popen(_cli(*argv), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    try:
        while not list(out.glob("0000*.json")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        still_running = proc.poll() is None
        proc.kill()
    finally:
        proc.wait()
    assert still_running, "the run ended before it could be killed mid-way"
    first = sorted(p.stem for p in out.glob("0000*.json"))
    assert 1 <= len(first) < 4 and not (out / "manifest.jsonl").exists()
    kept = {name: (out / f"{name}.mp4").stat().st_mtime_ns for name in first}

    assert main(["generate", *argv, "--resume"]) == 0
    capsys.readouterr()
    rows = _manifest(out)[:-1]
    names = [r["name"] for r in rows]
    assert names == ["00000-a-red-fox", "00001-a-blue-car", "00002-a-green-tree", "00003-a-white-boat"]
    assert all(r["status"] == "ok" for r in rows)
    assert sorted(p.stem for p in out.glob("*.mp4")) == names == sorted(p.stem for p in out.glob("0*.json"))
    assert {r["name"] for r in rows if r["rendered"] == "earlier run"} == set(first)
    assert {name: (out / f"{name}.mp4").stat().st_mtime_ns for name in first} == kept, "finished items redone"
    assert not list(out.glob(".*")), "temporary files of the killed run left behind"


def test_two_processes_write_the_same_videos_as_one(tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip("torchrun is not installed next to this Python")
    prompts = tmp_path / "p.txt"
    prompts.write_text(PROMPTS)
    argv = [*FAST, "--steps", "1", "--method", "radial", "--block-size", "4", "--decay", "0.2", "--prompts",
            str(prompts), "--seed", "11"]
    one, two = tmp_path / "one", tmp_path / "two"
    launch = [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "vidattn", "generate"]
    runs = [subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for cmd in (_cli(*argv, "--out", str(one)), [*launch, *argv, "--out", str(two)])]
    logs = [p.communicate(timeout=300)[0] for p in runs]
    assert [p.returncode for p in runs] == [0, 0], logs[1][-3000:] + logs[0][-2000:]
    videos = sorted(p.name for p in one.glob("*.mp4"))
    assert len(videos) == 4 and videos == sorted(p.name for p in two.glob("*.mp4"))
    for name in videos:
        assert (one / name).read_bytes() == (two / name).read_bytes(), name
    ranks = {json.loads((two / name).with_suffix(".json").read_text())["batch"]["rank"] for name in videos}
    assert ranks == {0, 1}
    keys = ("index", "name", "prompt", "seed", "status", "density")
    assert [[r.get(k) for k in keys] for r in _manifest(one)] == [[r.get(k) for k in keys] for r in _manifest(two)]
    assert (two / "report.md").is_file() and not list(two.glob(".*"))
