"""``vidattn generate`` over a prompt list on the tiny model, in-process: files, manifest, report and contact sheet,
comparison against dense (speedup, PSNR, SSIM against the decoded videos), resume, failing items, LoRA, and bad
input refused before any model load."""
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest

from vidattn.cli import main
from vidattn.pipelines.video_io import read_video
from vidattn.video_metrics import ssim

FAST = ["--model", "tiny", "--frames", "17", "--height", "32", "--width", "32", "--steps", "1", "--guidance", "1"]
RADIAL = ["--method", "radial", "--block-size", "4", "--decay", "0.2"]


def _items(folder: Path) -> dict:
    return {p.stem: p for p in folder.glob("*.mp4")}


def _manifest(folder: Path) -> list:
    return [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines()]


def _files(root: Path) -> dict:
    return {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def test_batch_compare_report_resume(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# three prompts\na red fox in the snow\n\na blue car\na green tree\n")
    out = tmp_path / "run"
    argv = ["generate", *FAST, *RADIAL, "--prompts", str(prompts), "--seed", "5", "--out", str(out), "--compare",
            "dense"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    names = ["00000-a-red-fox-in-the-snow", "00001-a-blue-car", "00002-a-green-tree"]
    assert sorted(_items(out)) == names and sorted(_items(out / "dense")) == names
    rows = _manifest(out)
    assert [r["kind"] for r in rows] == ["item"] * 3 + ["summary"]
    for i, (name, row) in enumerate(zip(names, rows)):
        meta = json.loads((out / f"{name}.json").read_text())
        assert row["status"] == "ok" and row["seed"] == 5 + i and meta["request"]["seed"] == 5 + i
        assert meta["batch"]["line"] == [2, 4, 5][i] and meta["request"]["prompt"] == row["prompt"]
        assert 0 < meta["attention"]["sparse_density"] < 1 and meta["compare"]["dense_attention"]["sparse_calls"] == 0
        assert {"load_s", "generate_s", "write_s", "compare_s", "metrics_s"} <= set(meta["timings"])
        assert {"torch", "diffusers", "vidattn"} <= set(meta["versions"])
        ours, ref = read_video(out / f"{name}.mp4"), read_video(out / "dense" / f"{name}.mp4")
        mse = np.mean((ours.astype(np.float64) - ref.astype(np.float64)) ** 2)
        assert mse > 0 and row["psnr_db"] == pytest.approx(10 * math.log10(255 ** 2 / mse))
        assert 0 < row["ssim"] < 1 and row["ssim"] == pytest.approx(ssim(ours, ref), abs=1e-12)
        assert row["density"] == meta["attention"]["computed_fraction"]
        assert row["speedup"] == pytest.approx(meta["compare"]["dense_generate_s"] / meta["timings"]["generate_s"],
                                               rel=1e-3)
        assert name in printed
    summary = rows[-1]
    assert summary["ok"] == 3 and summary["mean_psnr_db"] == pytest.approx(np.mean([r["psnr_db"] for r in rows[:3]]))
    report = (out / "report.md").read_text()
    assert all(f"| {name} | ok |" in report for name in names) and "contact_sheet.png" in report
    sheet = read_png(out / "contact_sheet.png")
    assert sheet.shape[0] == 3 * (96 + 14) and sheet.shape[1] == 6 * 96 + 8

    # a finished run is resumed without rendering anything
    before = _files(out)
    assert main([*argv, "--resume"]) == 0
    assert all(_files(out)[p] == t for p, t in before.items() if p.suffix in (".mp4", ".json"))
    assert {r["rendered"] for r in _manifest(out)[:3]} == {"earlier run"}
    # a truncated video and a missing sidecar are rendered again, to the same bytes
    original = {n: (out / f"{n}.mp4").read_bytes() for n in names}
    (out / f"{names[1]}.mp4").write_bytes(original[names[1]][:500])
    (out / f"{names[2]}.json").unlink()
    assert main([*argv, "--resume"]) == 0
    assert [r["rendered"] for r in _manifest(out)[:3]] == ["earlier run", "this run", "this run"]
    assert {n: (out / f"{n}.mp4").read_bytes() for n in names} == original
    capsys.readouterr()
    # no silent mixing: an earlier run needs --resume, and other settings are refused
    assert "total time ratio" in printed and "mean of items" in printed
    assert "(total time ratio)" in report and "| **mean of items** |" in report
    assert main(argv) == 2 and "--resume" in capsys.readouterr().err
    assert main([*argv, "--decay", "0.5", "--resume"]) == 2
    assert "other settings" in capsys.readouterr().err
    assert not list(out.glob(".*")), "temporary or per-process files left behind"


def read_png(path: Path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path))


def test_batch_item_equals_single_video(tmp_path, capsys):
    """Item 1 of a batch with base seed 6 is the single-video command's output at seed 7, byte for byte."""
    out = tmp_path / "run"
    assert main(["generate", *FAST, "--prompt", "a fox", "--prompt", "a boat", "--seed", "6", "--out", str(out)]) == 0
    single = tmp_path / "one.mp4"
    assert main(["generate", *FAST, "--prompt", "a boat", "--seed", "7", "--out", str(single)]) == 0
    assert (out / "00001-a-boat.mp4").read_bytes() == single.read_bytes()
    assert (out / "00000-a-fox.mp4").read_bytes() != single.read_bytes()
    capsys.readouterr()


def test_failing_items_are_reported_and_the_rest_render(tmp_path, capsys, monkeypatch):
    from vidattn.pipelines import generate

    real = generate.render

    def render(loaded, request, processor, freeswim=None):
        if request.prompt == "boom":
            raise RuntimeError("CUDA out of memory. Tried to allocate 9 GiB")
        return real(loaded, request, processor, freeswim)

    monkeypatch.setattr(generate, "render", render)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a fox", "id": "fox", "seed": 3}\n{"prompt": "a car", "num_frames": 10}\n'
                       '{"prompt": "boom"}\n{"prompt": "a tree", "height": 40}\n')
    out = tmp_path / "run"
    assert main(["generate", *FAST, "--prompts", str(prompts), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "3 of 4 items failed" in err and "line 2, field 'num_frames'" in err and "out of memory" in err
    assert "line 4, field 'height'" in err and "Traceback" not in err
    rows = _manifest(out)
    assert [r["status"] for r in rows[:4]] == ["ok", "failed", "failed", "failed"]
    assert sorted(p.name for p in out.iterdir()) == ["contact_sheet.png", "fox.json", "fox.mp4", "manifest.jsonl",
                                                     "report.md"]
    assert json.loads((out / "fox.json").read_text())["request"]["seed"] == 3
    assert "## Failed items" in (out / "report.md").read_text()
    # --overwrite renders every item again (the failed ones fail again)
    old = (out / "fox.json").stat().st_mtime_ns
    assert main(["generate", *FAST, "--prompts", str(prompts), "--out", str(out), "--overwrite"]) == 1
    assert (out / "fox.json").stat().st_mtime_ns != old and _manifest(out)[0]["rendered"] == "this run"
    capsys.readouterr()


def _save_lora(folder: Path) -> None:
    import torch
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from vidattn.pipelines.tiny import tiny_wan_pipeline

    pipe = tiny_wan_pipeline("toy")
    pipe.transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                            target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    with torch.no_grad():  # a clearly visible adapter
        for name, param in pipe.transformer.named_parameters():
            if "lora_B" in name:
                param.mul_(50.0)
    type(pipe).save_lora_weights(folder, transformer_lora_layers=get_peft_model_state_dict(pipe.transformer))


def test_lora_adapter_changes_the_video_and_scale_zero_does_not(tmp_path, capsys):
    pytest.importorskip("peft")
    lora = tmp_path / "adapter"
    _save_lora(lora)
    outs = {}
    for key, extra in (("lora", ["--lora", str(lora)]), ("zero", ["--lora", str(lora / os.listdir(lora)[0]),
                                                                  "--lora-scale", "0"]),
                       ("plain", ["--vae-tiling"])):
        outs[key] = tmp_path / f"{key}.mp4"
        assert main(["generate", *FAST, "--prompt", "a fox", *extra, "--out", str(outs[key])]) == 0, extra
    capsys.readouterr()
    assert outs["lora"].read_bytes() != outs["plain"].read_bytes()
    assert outs["zero"].read_bytes() == outs["plain"].read_bytes()
    meta = json.loads(outs["lora"].with_suffix(".json").read_text())
    assert meta["request"]["lora"] == str(lora) and meta["request"]["lora_scale"] == 1.0
    assert json.loads(outs["plain"].with_suffix(".json").read_text())["request"]["vae_tiling"] is True


def test_a_file_that_is_no_adapter_is_a_lora_error(tmp_path, capsys):
    """Junk bytes (one video) and a safetensors file without LoRA keys (a batch) stop with one line naming --lora,
    exit 2, and leave no output behind (the batch's folder, created by this run, is removed again)."""
    pytest.importorskip("peft")
    from safetensors.torch import save_file
    import torch

    junk, wrong = tmp_path / "junk.safetensors", tmp_path / "wrong.safetensors"
    junk.write_text("junk\n")
    save_file({"foo.weight": torch.zeros(2, 2)}, str(wrong))
    single = tmp_path / "y.mp4"
    assert main(["generate", *FAST, "--prompt", "a fox", "--lora", str(junk), "--out", str(single)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("vidattn generate: error: argument --lora: cannot load") and "Traceback" not in err[-1]
    assert not single.exists() and not single.with_suffix(".json").exists()
    out = tmp_path / "runs" / "wl"
    assert main(["generate", *FAST, "--prompt", "a", "--prompt", "b", "--lora", str(wrong), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "argument --lora: cannot load" in err and "LoRA" in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()


def test_resume_compares_the_adapter_content_and_the_pixel_settings(tmp_path, capsys):
    """The adapter file rewritten in place, --vae-tiling or another --lora-scale: --resume refuses, naming the
    setting that changed (as for any other setting); the unchanged run resumes."""
    pytest.importorskip("peft")
    from vidattn.pipelines.batch import weights_digest

    lora, out = tmp_path / "adapter", tmp_path / "run"
    _save_lora(lora)
    argv = ["generate", *FAST, "--prompt", "a", "--prompt", "b", "--lora", str(lora), "--out", str(out)]
    assert main(argv) == 0
    meta = json.loads((out / "00000-a.json").read_text())
    identity = meta["batch"]["identity"]
    assert identity["lora_sha256"] == weights_digest(lora) and identity["device_type"] == "cpu"
    assert identity["vae_tiling"] is False and identity["model_source"].startswith("built-in tiny")
    assert identity["lora_scale"] == 1.0 and "model_revision" in identity
    capsys.readouterr()
    for extra, field in ((["--vae-tiling"], "vae_tiling"), (["--lora-scale", "0.5"], "lora_scale")):
        assert main([*argv, "--resume", *extra]) == 2
        assert f"other settings ({field})" in capsys.readouterr().err
    weights = next(lora.iterdir())
    original = weights.read_bytes()
    weights.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))  # same name, size and path; other content
    assert main([*argv, "--resume"]) == 2
    assert "other settings (lora_sha256)" in capsys.readouterr().err
    weights.write_bytes(original)  # the same adapter again: resumes without rendering
    assert main([*argv, "--resume"]) == 0
    assert {r["rendered"] for r in _manifest(out)[:2]} == {"earlier run"}
    capsys.readouterr()


def _bad_cases(tmp: Path) -> list:
    (tmp / "empty.txt").write_text("# nothing\n")
    (tmp / "bad.jsonl").write_text('{"prompt": "ok"}\n{"prompt": "x", "seed": 1.5}\n')
    (tmp / "binary.txt").write_bytes(b"\xff\xfe\xfa")
    (tmp / "ok.txt").write_text("a fox\n")
    (tmp / "afile").write_text("x")
    (tmp / "big.jsonl").write_text(f'{{"prompt": "a fox", "seed": {2 ** 64 - 1}}}\n')
    ok = ["--prompts", str(tmp / "ok.txt")]
    return [
        (["--prompts", str(tmp / "none.txt")], "--prompts", "no such file"),
        (["--prompts", str(tmp / "empty.txt")], "--prompts", "no prompts"),
        (["--prompts", str(tmp / "binary.txt")], "--prompts", "UTF-8"),
        (["--prompts", str(tmp / "bad.jsonl")], "--prompts", "line 2, field 'seed'"),
        ([*ok, "--method", "magic"], "--method", "radial"),
        ([*ok, "--method", "radial", "--preset", "nope"], "--preset", "wan-1x"),
        ([*ok, "--method", "radial", "--drop-rate", "0.5"], "--drop-rate", "--decay"),
        ([*ok, "--frames", "10"], "--frames", "4k+1"),
        ([*ok, "--height", "40"], "--height", "multiple of 16"),
        ([*ok, "--out", str(tmp / "afile")], "--out", "is a file"),
        ([*ok, "--out", str(tmp / "afile" / "sub")], "--out", "is a file"),
        ([*ok, "--out", str(tmp / "x.mp4")], "--out", "folder"),
        ([*ok, "--lora", str(tmp / "no-adapter")], "--lora", "no file or folder"),
        ([*ok, "--lora", str(tmp / "ok.txt")], "--lora", ".safetensors"),
        ([*ok, "--lora-scale", "0.5"], "--lora-scale", "--lora"),
        ([*ok, "--offload", "model", "--device", "cpu"], "--offload", "CUDA"),
        ([*ok, "--resume", "--overwrite"], "--resume", "--overwrite"),
        ([*ok, "--compare", "dense"], "--compare", "sparse"),
        ([*ok, "--prompt", "a cat"], "--prompt", "not both"),
        ([*ok, "--num-videos-per-prompt", "0"], "--num-videos-per-prompt", ">= 1"),
        # every item's seed is checked up front: a row seed + copy, and --seed + index (the item's seed is named)
        (["--prompts", str(tmp / "big.jsonl"), "--num-videos-per-prompt", "2"], "--prompts",
         "big.jsonl line 1, field 'seed': video 2 of this row gets seed 18446744073709551616"),
        (["--prompt", "a", "--prompt", "b", "--seed", str(2 ** 64 - 1)], "--seed",
         "item 1 (prompt 2) gets seed 18446744073709551616"),
    ]


def test_bad_batch_input_is_one_line_before_any_load(tmp_path, capsys, monkeypatch):
    from vidattn.pipelines import generate

    def refuse(*args, **kwargs):
        raise AssertionError("a pipeline was loaded for an invalid command line")

    monkeypatch.setattr(generate, "load_pipeline", refuse)
    monkeypatch.chdir(tmp_path)
    for argv, option, fragment in _bad_cases(tmp_path):
        before = _files(tmp_path)
        rc = main(["generate", "--model", "tiny", *argv])
        out, err = capsys.readouterr()
        lines = err.strip().splitlines()
        assert rc == 2 and len(lines) == 1 and lines[0].startswith(f"vidattn generate: error: argument {option}"), \
            (argv, err)
        assert fragment in err and "Traceback" not in err and err.count("argument ") == 1, (argv, err)
        assert _files(tmp_path) == before and not (tmp_path / "outputs").exists(), (argv, "files were written")


def test_freeswim_compares_against_direct_dense_generation(tmp_path, capsys):
    """FreeSwim's reference is the direct baseline: the stock pipeline straight at the target size with dense
    attention, from the same seed; the dense video is the single-video dense generation at that size."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red fox\n")
    out, size = tmp_path / "fs", ["--height", "64", "--width", "64"]
    fs = ["--method", "freeswim", "--base-height", "32", "--base-width", "32", "--strength", "1"]
    assert main(["generate", *FAST, *size, *fs, "--prompts", str(prompts), "--out", str(out), "--compare",
                 "dense"]) == 0
    meta = json.loads((out / "00000-a-red-fox.json").read_text())
    assert meta["compare"]["reference"] == "direct dense generation at the target size"
    assert meta["compare"]["dense_attention"]["sparse_calls"] == 0 and meta["attention"]["sparse_calls"] > 0
    dense = read_video(out / "dense" / "00000-a-red-fox.mp4")
    assert dense.shape[1:3] == (64, 64) and read_video(out / "00000-a-red-fox.mp4").shape == dense.shape
    single = tmp_path / "direct.mp4"
    assert main(["generate", *FAST, *size, "--method", "dense", "--prompt", "a red fox", "--out", str(single)]) == 0
    assert np.array_equal(read_video(single), dense)


def test_compare_warms_up_each_attention_kind_before_the_first_timed_item(tmp_path, capsys, monkeypatch):
    """One untimed single-step render per kind (method, dense) comes first, so one-time costs do not land in the
    first item's speedup; the timed renders use the requested steps."""
    from vidattn.pipelines import generate as gen

    seen, real = [], gen.render
    monkeypatch.setattr(gen, "render", lambda loaded, request, processor, freeswim=None: seen.append(
        (request.steps, processor.method)) or real(loaded, request, processor, freeswim))
    prompts = tmp_path / "p.txt"
    prompts.write_text("a fox\na cat\n")
    argv = ["generate", *FAST[:-4], "--steps", "2", "--guidance", "1", *RADIAL, "--prompts", str(prompts),
            "--out", str(tmp_path / "run"), "--compare", "dense"]
    assert main(argv) == 0
    assert seen[:2] == [(1, "radial"), (1, "dense")]
    assert seen[2:] == [(2, "radial"), (2, "dense")] * 2
