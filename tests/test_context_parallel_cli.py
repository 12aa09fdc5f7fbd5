"""``vidattn generate --cp``: a 2-process torchrun (gloo) run of the tiny Wan writes one video (rank 0) equal to the
single-process video; a 4-process batch in two Ulysses groups of 2 writes the same files and byte-identical videos as
a 1-process batch; bad ``--cp`` values and launches are refused up front with one line and exit code 2."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from vidattn.cli import main
from vidattn.pipelines.video_io import read_video

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = ["--model", "tiny", "--method", "radial", "--block-size", "8", "--steps", "2", "--seed", "3"]


def _torchrun(tmp_path: Path, processes: int, argv: list) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes), "-m",
           "vidattn", "generate", *argv]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_generate_ring_two_processes_equals_one(tmp_path, capsys):
    """Ring with a dense first step: the dense calls gather the keys (the native backend has no log-sum-exp for
    diffusers' ring template)."""
    out = tmp_path / "cp" / "radial.mp4"
    settings = [*SETTINGS, "--dense-steps", "1"]
    done = _torchrun(tmp_path, 2, [*settings, "--cp", "ring:2", "--out", str(out)])
    assert done.stdout.count("video     ") == 1  # rank 0 reports and writes; rank 1 writes nothing
    assert sorted(p.name for p in out.parent.iterdir()) == ["radial.json", "radial.mp4"]
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["context_parallel"] == {"cp": "ring:2", "processes": 2}
    assert sidecar["attention"]["sparse_calls"] > 0 and sidecar["attention"]["sparse_density"] < 1
    assert sidecar["attention"]["dense_calls"] > 0

    ref = tmp_path / "one.mp4"
    assert main(["generate", *settings, "--out", str(ref)]) == 0
    a, b = read_video(out).astype(np.int16), read_video(ref).astype(np.int16)
    assert a.shape == b.shape and np.abs(a - b).max() <= 2


def test_batch_in_two_ulysses_groups_equals_one_process(tmp_path, capsys):
    """4 processes, ulysses:2: groups {0, 1} and {2, 3}; items 0 and 2 go to group 0 (written by rank 0), item 1 to
    group 1 (rank 2). Same files, byte-identical videos as one process without --cp, every item rendered once; a
    resumed run renders only the missing item."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red fox\na blue whale\na green tree\n")
    out, ref = tmp_path / "cp", tmp_path / "one"
    done = _torchrun(tmp_path, 4, [*SETTINGS, "--prompts", str(prompts), "--cp", "ulysses:2", "--out", str(out)])
    assert "4 processes in context-parallel groups of 2" in done.stdout
    assert main(["generate", *SETTINGS, "--prompts", str(prompts), "--out", str(ref)]) == 0
    names = sorted(p.name for p in ref.iterdir())
    assert sorted(p.name for p in out.iterdir()) == names  # no rank files left, nothing extra written
    videos = [n for n in names if n.endswith(".mp4")]
    assert len(videos) == 3 and all((out / n).read_bytes() == (ref / n).read_bytes() for n in videos)
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    items = [r for r in rows if r["kind"] == "item"]
    assert [(r["index"], r["status"], r["rendered"], r["rank"]) for r in items] == [
        (0, "ok", "this run", 0), (1, "ok", "this run", 2), (2, "ok", "this run", 0)]
    assert rows[-1]["kind"] == "summary" and rows[-1]["ok"] == 3
    sidecar = json.loads((out / "00001-a-blue-whale.json").read_text())
    assert sidecar["batch"]["rank"] == 2 and sidecar["context_parallel"] == {"cp": "ulysses:2", "processes": 2}

    # --resume: only group 1's item is missing; group 0 has nothing to render but still joins the mesh set-up
    (out / "00001-a-blue-whale.mp4").unlink()
    _torchrun(tmp_path, 4, [*SETTINGS, "--prompts", str(prompts), "--cp", "ulysses:2", "--out", str(out), "--resume"])
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [(r["status"], r["rendered"]) for r in rows if r["kind"] == "item"] == [
        ("ok", "earlier run"), ("ok", "this run"), ("ok", "earlier run")]
    assert sorted(p.name for p in out.iterdir()) == names
    assert all((out / n).read_bytes() == (ref / n).read_bytes() for n in videos)


def test_bad_cp_is_refused_before_any_work(tmp_path, capsys):
    out = tmp_path / "new" / "v.mp4"
    cases = [(["--cp", "ring:1"], "ulysses:N or ring:N"), (["--cp", "tree:2"], "ulysses:N or ring:N"),
             (["--cp", "ulysses:2"], "needs 2 processes"),
             (["--cp", "ring:2", "--prompt", "a", "--prompt", "b"], "1, not a multiple of 2")]
    for argv, words in cases:
        target = out.parent / "batch" if "--prompt" in argv else out  # a batch writes a folder
        assert main(["generate", "--model", "tiny", *argv, "--out", str(target)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("vidattn generate: error: argument --cp:") and words in err, err
        assert len(err.splitlines()) == 1
    assert not out.parent.exists()  # nothing half-written: the folder the output check made is gone


def test_cp_checks_the_model_and_sizes_up_front(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # as under torchrun: the checks run before any process group exists
    monkeypatch.setenv("RANK", "0")
    out = tmp_path / "new" / "v.mp4"
    cases = [(["--cp", "ring:2", "--method", "rectified"], "use ulysses:2"),
             (["--cp", "ring:2", "--method", "radial", "--block-size", "16"], "40 tokens per rank"),  # 5x4x4 tokens
             (["--cp", "ulysses:2", "--method", "radial", "--height", "48", "--width", "48"], "45 video tokens")]
    for argv, words in cases:
        assert main(["generate", "--model", "tiny", "--frames", "17", *argv, "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("vidattn generate: error: argument --cp:") and words in err, err
    assert not out.parent.exists()
