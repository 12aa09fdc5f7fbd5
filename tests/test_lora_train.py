"""LoRA training end to end on the tiny Wan model (CPU): loss, adapter files, stock-pipeline loading, exact resume,
two processes, user errors, the training benchmark."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from vidattn.cli import main as cli_main
from vidattn.lora.synthetic import moving_shape_clip, write_moving_shapes

# tiny geometry: 9 frames at 32 x 32 px -> 3 latent frames x 2 x 2 tokens
GEOMETRY = ["--model", "tiny", "--frames", "9", "--height", "32", "--width", "32", "--rank", "8", "--block-size", "4",
            "--dense-layers", "1", "--max-sequence-length", "16", "--learning-rate", "5e-3", "--seed", "0"]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """6 moving-shape clips with captions, one corrupt file and one clip too short for 9 frames."""
    from vidattn.pipelines.video_io import write_video

    folder = tmp_path_factory.mktemp("lora_data")
    write_moving_shapes(folder, 6, 12, 32, 32)
    (folder / "corrupt.mp4").write_bytes(b"not a video at all" * 50)
    (folder / "corrupt.txt").write_text("a blue car moves")
    write_video(moving_shape_clip(3, 32, 32, (255, 0, 0), (1.0, 1.0)), folder / "short.mp4")
    (folder / "short.txt").write_text("a red sun falls")
    return folder


def _train(data: Path, out: Path, *extra: str, capsys=None) -> int:
    return cli_main(["train-lora", "--data", str(data), "--output-dir", str(out), *GEOMETRY, *extra])


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(dataset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lora_run") / "run"
    assert _train(dataset, out, "--max-steps", "30", "--checkpointing-steps", "10", "--validation-prompt",
                  "a red car moves", "--validation-steps", "30", "--validation-inference-steps", "1") == 0
    return out


def _eval_loss(pipe, cache_dir: Path) -> float:
    """Mean flow-matching loss over the cached clips at fixed sigmas and noise (no randomness left)."""
    from vidattn.lora.cache import LatentCache
    from vidattn.lora.objective import flow_matching_loss

    cache = LatentCache(cache_dir)
    batch = cache.batch(list(range(len(cache))))
    gen = torch.Generator().manual_seed(123)
    losses = []
    with torch.no_grad():
        for sigma in (0.3, 0.6, 0.9):
            noise = torch.randn(batch["latents"].shape, generator=gen)
            sigmas = torch.full((len(cache),), sigma)
            losses.append(float(flow_matching_loss(pipe.transformer, batch["latents"], batch["text"], sigmas, noise,
                                                   1000)))
    return sum(losses) / len(losses)


def _stock_pipeline():
    import diffusers

    from vidattn.pipelines.tiny import tiny_wan_pipeline

    return tiny_wan_pipeline("toy", pipeline_cls=diffusers.WanPipeline)


def test_lora_train_lowers_loss_and_writes_outputs(trained, dataset):
    log = _log(trained)
    assert [r["step"] for r in log] == list(range(1, 31))
    assert all(np.isfinite(r["loss"]) and r["lr"] > 0 for r in log)
    assert (trained / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in trained.glob("checkpoint-*")) == ["checkpoint-10", "checkpoint-20", "checkpoint-30"]
    assert len(list((trained / "validation").glob("step-000030-0.mp4"))) == 1
    meta = json.loads((trained / "lora_config.json").read_text())
    assert (meta["rank"], meta["alpha"], meta["method"], meta["frames"]) == (8, 8.0, "radial", 9)
    assert meta["targets"] == ["to_q", "to_k", "to_v", "to_out.0"]
    assert all(".attn1." in name for name in meta["target_modules"])
    assert meta["attention"]["sparse_calls"] >= 30 and set(meta["attention"]["dense_reasons"]) == {"dense layer"}
    index = json.loads((trained / "cache" / "index.json").read_text())
    assert len(index["samples"]) == 6
    assert sorted(Path(p).name for p, _ in index["skipped"]) == ["corrupt.mp4", "short.mp4"]
    # the trained adapter lowers the loss on the training clips at fixed noise (measured, not the noisy log)
    pipe = _stock_pipeline()
    before = _eval_loss(pipe, trained / "cache")
    pipe.load_lora_weights(str(trained))
    after = _eval_loss(pipe, trained / "cache")
    assert after < 0.9 * before, (before, after)


def test_lora_adapter_loads_into_stock_pipeline_and_changes_output(trained):
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file

    settings = dict(prompt="a red car moves", num_frames=9, height=32, width=32, num_inference_steps=2,
                    output_type="np")
    pipe = _stock_pipeline()
    base = pipe(**settings, generator=torch.Generator().manual_seed(0)).frames[0]
    pipe.load_lora_weights(str(trained))
    (name,) = pipe.transformer.peft_config  # the adapter name load_lora_weights chose
    loaded = get_peft_model_state_dict(pipe.transformer, adapter_name=name)
    saved = load_file(str(trained / "pytorch_lora_weights.safetensors"))
    assert len(loaded) == len(saved) == 2 * 4 * 2  # A and B, 4 projections, 2 blocks
    for key, value in saved.items():
        assert torch.equal(loaded[key.removeprefix("transformer.")], value)
    adapted = pipe(**settings, generator=torch.Generator().manual_seed(0)).frames[0]
    assert np.abs(adapted - base).max() > 1e-3


def test_lora_resume_reproduces_the_uninterrupted_losses(trained, dataset, tmp_path):
    out = tmp_path / "resumed"
    out.mkdir()
    shutil.copytree(trained / "checkpoint-10", out / "checkpoint-10")
    shard = next((trained / "cache").glob("shard-*.safetensors"))
    built = shard.stat().st_mtime_ns
    assert _train(dataset, out, "--max-steps", "30", "--checkpointing-steps", "10", "--resume", "latest",
                  "--cache-dir", str(trained / "cache")) == 0
    assert shard.stat().st_mtime_ns == built  # the cache was reused, not rebuilt
    resumed = _log(out)
    assert [r["step"] for r in resumed] == list(range(11, 31))
    assert [r["loss"] for r in resumed] == [r["loss"] for r in _log(trained)[10:]]
    from safetensors.torch import load_file

    a, b = (load_file(str(d / "pytorch_lora_weights.safetensors")) for d in (out, trained))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_lora_two_processes_match_one_process_with_doubled_batch(trained, dataset, tmp_path):
    from safetensors.torch import load_file

    common = ["--max-steps", "3", "--checkpointing-steps", "0", "--cache-dir", str(trained / "cache")]
    one = tmp_path / "one"
    assert _train(dataset, one, "--train-batch-size", "2", *common) == 0
    two = tmp_path / "two"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node", "2", "--master_port", str(_free_port()),
           "-m", "vidattn.lora.train", "--data", str(dataset), "--output-dir", str(two), *GEOMETRY,
           "--train-batch-size", "1", *common]
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _, err = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both workers (their own session)
        pytest.fail(f"2-process run timed out: {proc.communicate()[1][-3000:]}")
    assert proc.returncode == 0, err[-3000:]
    meta = json.loads((two / "lora_config.json").read_text())
    assert meta["processes"] == 2 and meta["global_batch"] == 2
    assert meta["replicas"]["identical"] is True and len(meta["replicas"]["checksums"]) == 2
    np.testing.assert_allclose([r["loss"] for r in _log(two)], [r["loss"] for r in _log(one)], rtol=1e-5)
    w1, w2 = load_file(str(one / "pytorch_lora_weights.safetensors")), load_file(str(two / "pytorch_lora_weights.safetensors"))
    for key in w1:
        torch.testing.assert_close(w2[key], w1[key], rtol=1e-4, atol=1e-6)


def test_lora_checkpointing_accumulation_warmup_and_bf16(trained, dataset, tmp_path):
    """Gradient checkpointing gives the plain run's losses; warm-up then cosine shows in the logged lr; bf16
    autocast trains to finite losses."""
    common = ["--max-steps", "4", "--checkpointing-steps", "0", "--cache-dir", str(trained / "cache"),
              "--gradient-accumulation-steps", "2", "--lr-scheduler", "cosine", "--lr-warmup-steps", "2"]
    plain, recomputed, bf16 = tmp_path / "plain", tmp_path / "gc", tmp_path / "bf16"
    assert _train(dataset, plain, *common) == 0
    assert _train(dataset, recomputed, *common, "--gradient-checkpointing") == 0
    assert _train(dataset, bf16, *common, "--mixed-precision", "bf16") == 0
    losses = [r["loss"] for r in _log(plain)]
    np.testing.assert_allclose([r["loss"] for r in _log(recomputed)], losses, rtol=1e-6)
    assert [r["position"] for r in _log(plain)] == [2, 4, 6, 8]  # two micro-batches per step
    np.testing.assert_allclose([r["lr"] for r in _log(plain)], [2.5e-3, 5e-3, 2.5e-3, 0], rtol=1e-6, atol=1e-12)
    bf = [r["loss"] for r in _log(bf16)]
    assert all(np.isfinite(bf)) and bf != losses and abs(bf[0] - losses[0]) < 0.05


@pytest.mark.parametrize("case", ["missing data", "no captions", "all unusable", "frames", "resume", "earlier run"])
def test_lora_user_errors_name_the_option_and_write_nothing(case, dataset, tmp_path, capsys):
    out = tmp_path / "out"
    data, extra, option = dataset, [], None
    if case == "missing data":
        data, option = tmp_path / "nowhere", "--data"
    elif case == "no captions":
        data, option = tmp_path / "bare", "--data"
        data.mkdir()
        (data / "x.mp4").write_bytes(b"x")
    elif case == "all unusable":
        data, option = tmp_path / "short", "--data"
        data.mkdir()
        for name in ("short.mp4", "short.txt", "corrupt.mp4", "corrupt.txt"):
            shutil.copy(dataset / name, data / name)
    elif case == "frames":
        extra, option = ["--frames", "10"], "--frames"
    elif case == "resume":
        extra, option = ["--resume", "latest"], "--resume"
    else:
        out.mkdir()
        (out / "log.jsonl").write_text("{}\n")
        option = "--output-dir"
    code = _train(data, out, *extra)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith(f"vidattn train-lora: error: argument {option}:"), err
    assert "Traceback" not in "\n".join(err)
    if case != "earlier run":
        assert not out.exists()


@pytest.mark.parametrize("case", ["data", "foreign", "output"])
def test_lora_cache_dir_never_clears_other_files(case, dataset, tmp_path, capsys):
    """The reviewer's repro (--cache-dir naming the data) and a folder of other files are refused before anything
    is written; the files stay."""
    data = tmp_path / "data"
    shutil.copytree(dataset, data)
    (data / "notes.md").write_text("notes")
    out, cache = tmp_path / "out", {"data": data, "foreign": tmp_path / "mine", "output": tmp_path / "out"}[case]
    if case == "foreign":
        cache.mkdir()
        (cache / "notes.md").write_text("notes")
    before = sorted((p.name, p.read_bytes()) for p in cache.iterdir()) if cache.exists() else None
    code = _train(data, out, "--cache-dir", str(cache), "--max-steps", "1")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("vidattn train-lora: error: argument --cache-dir:"), err
    assert (sorted((p.name, p.read_bytes()) for p in cache.iterdir()) if cache.exists() else None) == before
    assert (data / "notes.md").read_text() == "notes" and not out.exists()


@pytest.mark.parametrize("change", ["learning rate", "logit std", "processes", "rng file"])
def test_lora_resume_refuses_changed_settings(change, trained, dataset, tmp_path, capsys):
    out = tmp_path / "out"
    checkpoint = out / "checkpoint-10"
    shutil.copytree(trained / "checkpoint-10", checkpoint)
    extra, option = {"learning rate": (["--learning-rate", "1e-3"], "--learning-rate"),
                     "logit std": (["--logit-std", "2"], "--logit-std")}.get(change, ([], "--resume"))
    if change == "processes":
        state = json.loads((checkpoint / "state.json").read_text())
        (checkpoint / "state.json").write_text(json.dumps({**state, "processes": 2}))
    elif change == "rng file":
        (checkpoint / "rng_state_0.pt").unlink()
    code = _train(dataset, out, "--max-steps", "30", "--resume", "latest", "--cache-dir", str(trained / "cache"),
                  *extra)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith(f"vidattn train-lora: error: argument {option}:"), err
    assert {"learning rate": "0.001", "logit std": "2.0", "processes": "2 process",
            "rng file": "rng_state_0.pt"}[change] in err[-1]
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-10"]


def test_lora_finished_run_can_be_extended_and_a_stale_cache_is_rebuilt(trained, dataset, tmp_path):
    """Default --checkpointing-steps (500) still leaves a checkpoint at --max-steps, so --resume latest with a
    larger --max-steps continues; a stale vidattn cache is rebuilt in place, other files in it kept."""
    cache = tmp_path / "cache"
    shutil.copytree(trained / "cache", cache)
    index = json.loads((cache / "index.json").read_text())
    index["settings"]["frames"] = 5
    (cache / "index.json").write_text(json.dumps(index))
    (cache / "notes.md").write_text("notes")
    out = tmp_path / "out"
    assert _train(dataset, out, "--max-steps", "1", "--cache-dir", str(cache)) == 0
    assert json.loads((cache / "index.json").read_text())["settings"]["frames"] == 9
    assert (cache / "notes.md").read_text() == "notes"
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-1"]
    assert _train(dataset, out, "--max-steps", "2", "--cache-dir", str(cache), "--resume", "latest") == 0
    assert [r["step"] for r in _log(out)] == [1, 2]
    meta = json.loads((out / "lora_config.json").read_text())
    assert meta["timesteps"]["flow_shift"] > 0


def test_lora_bench_train_table(tmp_path, capsys):
    table = tmp_path / "bench.md"
    assert cli_main(["bench", "train", "--model", "tiny", "--frame-scales", "1,2", "--steps", "1", "--warmup", "0",
                     "--block-size", "16", "--rank", "4", "--in-process", "--append", str(table)]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 17") or line.startswith("| 33")]
    assert len(rows) == 4
    by = {(r.split("|")[1].strip(), r.split("|")[3].strip()): r.split("|") for r in rows}
    assert by[("17 (1x)", "dense")][6].strip() == "1.00x"
    assert float(by[("33 (2x)", "radial")][4]) < float(by[("17 (1x)", "radial")][4]) < 1.0  # density falls
    text = table.read_text()
    assert "vidattn bench train --model tiny" in text and "s / step" in text
