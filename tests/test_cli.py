"""The vidattn command: generate on the tiny model, bench attention, --help, bad input; README examples run."""
import json
import re
from pathlib import Path

import pytest

from vidattn.cli import COMMANDS, build_parser, main

ROOT = Path(__file__).resolve().parents[1]


def test_every_command_has_help(capsys):
    for argv in [[], *[[c] for c in COMMANDS], ["bench", "attention"], ["mask", "radial"], ["mask", "rectified"],
                 ["mask", "window"]]:
        with pytest.raises(SystemExit) as exit_:
            main([*argv, "--help"])
        assert exit_.value.code == 0
        assert "usage: vidattn" in capsys.readouterr().out


def test_generate_tiny_radial_writes_playable_mp4(tmp_path, capsys):
    imageio = pytest.importorskip("imageio.v3")
    out = tmp_path / "fox.mp4"
    rc = main(["generate", "--model", "tiny", "--method", "radial", "--block-size", "16", "--frames", "33",
               "--steps", "2", "--seed", "3", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert str(out) in printed and "density" in printed
    frames = imageio.imread(out)
    assert frames.shape[0] == 33 and frames.shape[-1] == 3
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["method"]["method"] == "radial" and meta["method"]["block_size"] == 16
    assert meta["settings"]["frames"] == 33 and meta["request"]["seed"] == 3
    assert meta["attention"]["sparse_calls"] > 0 and 0 < meta["attention"]["sparse_density"] < 1
    assert {"torch", "diffusers", "vidattn"} <= set(meta["versions"])
    assert meta["timings"]["generate_s"] > 0
    # nothing already written is lost
    before = out.read_bytes()
    assert main(["generate", "--model", "tiny", "--out", str(out)]) == 2
    assert "exists" in capsys.readouterr().err and out.read_bytes() == before


@pytest.mark.parametrize("argv, option", [
    (["--frames", "10"], "--frames"),
    (["--height", "70"], "--height"),
    (["--width", "0"], "--width"),
    (["--method", "magic"], "method"),
    (["--method", "radial", "--decay", "-1"], "decay"),
    (["--method", "radial", "--preset", "nope"], "preset"),
    (["--steps", "0"], "--steps"),
    (["--method", "rectified", "--drop-rate", "1.5"], "drop_rate"),
    (["--method", "rectified", "--top-p", "0"], "top_p"),
    (["--method", "radial", "--drop-rate", "0.5"], "drop_rate"),
    (["--method", "rectified", "--preset", "nope"], "preset"),
    (["--out", "x.avi"], "--out"),
])
def test_generate_bad_values_name_the_option(tmp_path, capsys, argv, option):
    argv = [*argv] if "--out" in argv else [*argv, "--out", str(tmp_path / "v.mp4")]
    assert main(["generate", "--model", "tiny", *argv]) == 2
    assert option in capsys.readouterr().err
    assert not (tmp_path / "v.mp4").exists()


def test_bench_attention_runs_and_appends(tmp_path, capsys):
    md = tmp_path / "bench.md"
    rc = main(["bench", "attention", "--frames", "4", "--height", "8", "--width", "16", "--heads", "1",
               "--head-dim", "16", "--block-size", "32", "--method", "radial", "--backends", "torch,reference",
               "--repeats", "1", "--append", str(md)])
    assert rc == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 4x8x16")]
    assert len(rows) == 2
    text = md.read_text()
    assert "Command: `vidattn bench attention" in text and "| 4x8x16 | 512 | radial |" in text
    errors = [float(row.split("|")[-2]) for row in rows]
    assert max(errors) <= 1e-5  # each backend against SDPA with the pattern's boolean mask


def test_bench_reference_rows_equal_the_full_reference():
    import torch

    from vidattn.bench import masked_sdpa_rows
    from vidattn.kernels import BlockPattern, WindowPredicate
    from vidattn.kernels.reference import reference_attention

    g = torch.Generator().manual_seed(0)
    s = 150
    p = BlockPattern.from_block_mask(torch.rand(10, 10, generator=g) < 0.5, q_len=s, kv_len=s, block_q=16,
                                     partial=torch.rand(10, 10, generator=g) < 0.5,
                                     predicate=WindowPredicate.inward(2, 5, 15, 1, 2), kv_lens=torch.tensor([s, 140]))
    bitmap = p.block_bitmap()
    bitmap[..., 0] = True  # every query keeps a key
    p = BlockPattern.from_block_mask(bitmap, q_len=s, kv_len=s, block_q=16, partial=p.partial_bitmap() & bitmap,
                                     predicate=p.predicate, kv_lens=p.kv_lens)
    q, k, v = (torch.randn(2, 2, s, 8, generator=g) for _ in range(3))
    rows = torch.tensor([0, 7, 15, 16, 80, 149])
    ref = reference_attention(q, k, v, p)[0][:, :, rows]
    assert (masked_sdpa_rows(q, k, v, p, rows) - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("argv, option", [
    (["--density", "1.5"], "--density"), (["--backends", "gpu"], "--backends"), (["--geometry", "x"], "--geometry"),
    (["--heads", "0"], "--heads"),
])
def test_bench_bad_values(capsys, argv, option):
    assert main(["bench", "attention", *argv]) == 2
    assert option in capsys.readouterr().err


def test_readme_python_examples_run(tmp_path, monkeypatch):
    """Every ```python block of the README runs as written (offline, tiny model)."""
    monkeypatch.chdir(tmp_path)
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert len(blocks) >= 3
    for code in blocks:
        exec(compile(code, "README.md", "exec"), {"__name__": "readme"})


def test_parser_builds_without_heavy_imports():
    assert build_parser().prog == "vidattn"


def test_pipeline_factors_and_defaults_follow_the_pipeline():
    from types import SimpleNamespace

    from vidattn.pipelines.generate import _pipeline_factors, call_defaults
    from vidattn.pipelines.tiny import tiny_hunyuan_pipeline

    mochi_like = SimpleNamespace(vae_temporal_scale_factor=6, vae_spatial_scale_factor=8,
                                 transformer=SimpleNamespace(config=SimpleNamespace(patch_size=2)))
    assert _pipeline_factors(mochi_like) == (6, 16)
    assert call_defaults(tiny_hunyuan_pipeline())["num_frames"] == 129


def test_generate_tiny_rectified_writes_video(tmp_path, capsys):
    out = tmp_path / "r.mp4"
    rc = main(["generate", "--model", "tiny", "--method", "rectified", "--preset", "wan-t2v", "--drop-rate", "0.8",
               "--dense-steps", "0", "--dense-layers", "1", "--block-size", "16", "--frames", "33", "--steps", "2",
               "--out", str(out)])
    assert rc == 0 and out.stat().st_size > 0
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["method"]["method"] == "rectified" and meta["method"]["drop_rate"] == 0.8
    assert meta["method"]["dense_layers"] == 1 and meta["method"]["first_frame"] == "corner"
    assert meta["attention"]["sparse_calls"] > 0 and 0 < meta["attention"]["sparse_density"] < 1


def test_mask_rectified_prints_and_draws(tmp_path, capsys):
    png = tmp_path / "sel.png"
    assert main(["mask", "rectified", "--model", "hunyuan", "--drop-rate", "0.8", "--png", str(png)]) == 0
    printed = capsys.readouterr().out
    assert "head 1" in printed and "gilbert order" in printed and png.stat().st_size > 0
    assert main(["mask", "rectified", "--head", "9"]) == 2
    assert "--head" in capsys.readouterr().err
    assert main(["mask", "rectified", "--drop-rate", "1"]) == 2
    assert "--drop-rate" in capsys.readouterr().err


def test_generate_tiny_freeswim_writes_target_size(tmp_path, capsys):
    imageio = pytest.importorskip("imageio.v3")
    out = tmp_path / "hi.mp4"
    rc = main(["generate", "--model", "tiny", "--method", "freeswim", "--height", "128", "--width", "128",
               "--frames", "9", "--steps", "4", "--mode", "cache", "--cache-steps", "2", "--out", str(out)])
    assert rc == 0
    frames = imageio.imread(out)
    assert frames.shape[:3] == (9, 128, 128)
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["method"]["method"] == "freeswim" and meta["method"]["base_rows"] == 4
    assert meta["settings"]["freeswim"]["mode"] == "cache" and meta["settings"]["height"] == 128
    assert meta["attention"]["sparse_calls"] > 0


@pytest.mark.parametrize("argv, option", [
    (["--method", "freeswim", "--height", "120"], "--height"),
    (["--method", "freeswim", "--base-height", "70"], "--base-height"),
    (["--method", "freeswim", "--cache-steps", "0"], "--cache-steps"),
    (["--method", "freeswim", "--strength", "1.5"], "--strength"),
    (["--method", "freeswim", "--tiles", "8"], "--tiles"),
    (["--method", "radial", "--mode", "cache"], "--mode"),
])
def test_generate_freeswim_bad_values(tmp_path, capsys, argv, option):
    assert main(["generate", "--model", "tiny", *argv, "--out", str(tmp_path / "v.mp4")]) == 2
    assert option in capsys.readouterr().err
    assert not (tmp_path / "v.mp4").exists()
