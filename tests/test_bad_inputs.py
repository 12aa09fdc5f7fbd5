"""Issue 10's table of bad inputs: each fails before any model is loaded or picture computed, as one line
``vidattn <command>: error: argument <option>: ...`` with exit code 2, and writes nothing.

Every row failed on the code before the validation layer (``vidattn/validation.py``): a traceback, an error only
after the model was loaded, a message naming the Python knob, an empty list, or an overwritten picture.
"""
import json
import os
import sys
import time
from pathlib import Path

import pytest

from vidattn.cli import main

MASK_RADIAL = ["mask", "radial", "--frames", "5", "--height", "64", "--width", "64", "--model", "wan"]
MASK_WINDOW = ["mask", "window", "--frames", "5", "--height", "64", "--width", "64", "--base-height", "32",
               "--base-width", "32"]
MASK_RECTIFIED = ["mask", "rectified", "--latent-frames", "2", "--latent-height", "4", "--latent-width", "4"]
TINY = ["generate", "--model", "tiny"]
CUDA = pytest.importorskip("torch").cuda.is_available()


def _wan_folder(root: Path, name: str = "wan", class_name: str = "WanPipeline", vae: dict = None,
                transformer: dict = None) -> Path:
    """A diffusers folder with configs only (no weights): enough for checks that must not load weights."""
    folder = root / name
    (folder / "vae").mkdir(parents=True)
    (folder / "transformer").mkdir()
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": class_name, "_diffusers_version": "0.35.0", "vae": ["diffusers", "AutoencoderKLWan"],
        "transformer": ["diffusers", "WanTransformer3DModel"]}))
    (folder / "vae" / "config.json").write_text(json.dumps(vae or {"scale_factor_temporal": 4,
                                                                    "scale_factor_spatial": 8}))
    (folder / "transformer" / "config.json").write_text(json.dumps(transformer or {"patch_size": [1, 2, 2],
                                                                                   "num_layers": 30}))
    return folder


def _setup(kind: str, tmp: Path) -> dict:
    """Files a case needs; returns the placeholders for its argument vector."""
    values = {"tmp": str(tmp)}
    if kind == "file":
        (tmp / "afile").write_text("not a folder")
    elif kind == "dir.mp4":
        (tmp / "clip.mp4").mkdir()
    elif kind == "dir.png":
        (tmp / "pic.png").mkdir()
    elif kind == "png":
        (tmp / "pic.png").write_bytes(b"keep me")
    elif kind == "json":
        (tmp / "v.json").write_text("{}")
    elif kind == "wan":
        values["model"] = str(_wan_folder(tmp))
    elif kind == "ltx":
        values["model"] = str(_wan_folder(tmp, "ltx", "LTXPipeline",
                                          vae={"spatial_compression_ratio": 32, "temporal_compression_ratio": 8},
                                          transformer={"patch_size": 1, "num_layers": 28}))
    elif kind == "sd":
        values["model"] = str(_wan_folder(tmp, "sd", "StableDiffusionPipeline"))
    elif kind == "custom":
        values["model"] = str(_wan_folder(tmp, "custom", "NoSuchVideoPipeline"))
    elif kind == "empty":
        (tmp / "empty").mkdir()
    elif kind == "weights":
        (tmp / "weights.safetensors").write_bytes(b"\0" * 16)
    return values


UNWRITABLE = "/proc/vidattn-test/v.mp4"  # a folder nobody (root included) can create

# (id, setup, argv, fragments expected in the one-line error, fragments that must be absent)
CASES = [
    # 2, 3. bench: device and backends refused before any timing
    ("bench-backend-triton-cpu", "", ["bench", "attention", "--device", "cpu", "--backends", "triton", "--quick"],
     ["argument --backends", "backends for cpu"], []),
    ("bench-device-unknown", "", ["bench", "attention", "--device", "gpu0", "--quick"], ["argument --device"], []),
    # 1. --out checked before the model loads
    ("out-parent-is-file", "file", [*TINY, "--out", "{tmp}/afile/v.mp4"], ["argument --out", "is a file"], []),
    ("out-is-folder", "dir.mp4", [*TINY, "--out", "{tmp}/clip.mp4"], ["argument --out", "is a folder"], []),
    ("out-unwritable", "", [*TINY, "--out", UNWRITABLE], ["argument --out", "cannot"], []),
    ("out-sidecar-exists", "json", [*TINY, "--out", "{tmp}/v.mp4"], ["argument --out", "v.json", "--overwrite"],
     []),
    ("out-nul", "", [*TINY, "--out", "{tmp}/a\0b.mp4"], ["argument --out", "NUL"], []),
    # 2. a backend that cannot run on the device, with the list of those that can
    ("backend-triton-cpu", "", [*TINY, "--method", "radial", "--device", "cpu", "--backend", "triton", "--out",
                                "{tmp}/v.mp4"], ["argument --backend", "backends for cpu: auto, reference, torch"],
     []),
    ("backend-unknown", "", [*TINY, "--method", "radial", "--backend", "gpu", "--out", "{tmp}/v.mp4"],
     ["argument --backend", "must be one of auto"], []),
    # 3. devices
    ("device-unknown", "", [*TINY, "--device", "banana", "--out", "{tmp}/v.mp4"],
     ["argument --device", "not a torch device", "cpu"], []),
    ("device-cuda-missing", "", [*TINY, "--device", "cuda", "--out", "{tmp}/v.mp4"], ["argument --device", "cuda"],
     []),
    ("device-meta", "", [*TINY, "--device", "meta", "--out", "{tmp}/v.mp4"], ["argument --device", "cpu"], []),
    # 4. models: what was tried and what is accepted, in one line
    ("model-misspelt", "", [*TINY[:1], "--model", "tinyy", "--out", "{tmp}/v.mp4"],
     ["argument --model", "did you mean 'tiny'", "accepted: tiny, tiny-bench"], []),
    ("model-hub-offline", "", [*TINY[:1], "--model", "vidattn-test/no-such-model", "--out", "{tmp}/v.mp4"],
     ["argument --model", "hub cache", "accepted:"], []),
    ("model-folder-without-index", "empty", [*TINY[:1], "--model", "{tmp}/empty", "--out", "{tmp}/v.mp4"],
     ["argument --model", "has no model_index.json"], []),
    ("model-missing-folder", "", [*TINY[:1], "--model", "{tmp}/nowhere/model", "--out", "{tmp}/v.mp4"],
     ["argument --model", "there is no folder"], []),
    ("model-file", "weights", [*TINY[:1], "--model", "{tmp}/weights.safetensors", "--out", "{tmp}/v.mp4"],
     ["argument --model", "is a file"], []),
    ("model-not-video", "sd", [*TINY[:1], "--model", "{model}", "--out", "{tmp}/v.mp4"],
     ["argument --model", "not a text-to-video pipeline"], []),
    ("model-unknown-class", "custom", [*TINY[:1], "--model", "{model}", "--out", "{tmp}/v.mp4"],
     ["argument --model", "NoSuchVideoPipeline", "does not provide"], []),
    # 5. --png: a non-PNG name, a folder, an existing file without --overwrite (each mask command)
    ("png-jpg", "", [*MASK_RADIAL, "--png", "{tmp}/m.jpg"], ["argument --png", ".png"], []),
    ("png-folder", "dir.png", [*MASK_RADIAL, "--png", "{tmp}/pic.png"], ["argument --png", "is a folder"], []),
    ("png-parent-file", "file", [*MASK_WINDOW, "--png", "{tmp}/afile/m.png"], ["argument --png", "is a file"], []),
    ("png-exists-radial", "png", [*MASK_RADIAL, "--png", "{tmp}/pic.png"], ["argument --png", "--overwrite"], []),
    ("png-exists-window", "png", [*MASK_WINDOW, "--png", "{tmp}/pic.png"], ["argument --png", "--overwrite"], []),
    ("png-exists-rectified", "png", [*MASK_RECTIFIED, "--png", "{tmp}/pic.png"], ["argument --png", "--overwrite"],
     []),
    # 7. frame count and size from the model's config, before its weights are loaded
    ("frames-tiny", "", [*TINY, "--frames", "10", "--out", "{tmp}/v.mp4"], ["argument --frames", "4k+1"], []),
    ("frames-config", "wan", [*TINY[:1], "--model", "{model}", "--frames", "10", "--out", "{tmp}/v.mp4"],
     ["argument --frames", "4k+1"], []),
    ("height-config", "wan", [*TINY[:1], "--model", "{model}", "--height", "100", "--out", "{tmp}/v.mp4"],
     ["argument --height", "multiple of 16"], []),
    ("frames-ltx-config", "ltx", [*TINY[:1], "--model", "{model}", "--frames", "13", "--out", "{tmp}/v.mp4"],
     ["argument --frames", "8k+1"], []),
    ("width-ltx-config", "ltx", [*TINY[:1], "--model", "{model}", "--width", "48", "--out", "{tmp}/v.mp4"],
     ["argument --width", "multiple of 32"], []),
    ("freeswim-no-refinement", "", [*TINY, "--method", "freeswim", "--strength", "0.2", "--out", "{tmp}/v.mp4"],
     ["argument --strength", "no refinement step"], []),
    # 8. options, not Python knobs; no empty lists
    ("block-size-option", "", [*TINY, "--method", "radial", "--block-size", "0", "--out", "{tmp}/v.mp4"],
     ["argument --block-size"], []),
    ("decay-option", "", [*TINY, "--method", "radial", "--decay", "-1", "--out", "{tmp}/v.mp4"],
     ["argument --decay"], []),
    ("dense-steps-option", "", [*TINY, "--method", "radial", "--dense-steps", "-1", "--out", "{tmp}/v.mp4"],
     ["argument --dense-steps"], []),
    ("drop-rate-option", "", [*TINY, "--method", "rectified", "--drop-rate", "1.5", "--out", "{tmp}/v.mp4"],
     ["argument --drop-rate"], []),
    ("dense-takes-nothing", "", [*TINY, "--method", "dense", "--decay", "0.5", "--out", "{tmp}/v.mp4"],
     ["argument --decay", "none of the attention options"], ["[]"]),
    ("dense-backend", "", [*TINY, "--method", "dense", "--backend", "torch", "--out", "{tmp}/v.mp4"],
     ["argument --backend"], ["[]"]),
    ("dense-no-presets", "", [*TINY, "--method", "dense", "--preset", "wan-1x", "--out", "{tmp}/v.mp4"],
     ["argument --preset", "no presets"], ["[]"]),
    ("method-unknown", "", [*TINY, "--method", "magic", "--out", "{tmp}/v.mp4"],
     ["argument --method", "radial"], []),
    ("radial-takes", "", [*TINY, "--method", "radial", "--top-p", "0.5", "--out", "{tmp}/v.mp4"],
     ["argument --top-p", "--decay"], []),
    ("mask-block-size", "", [*MASK_RADIAL, "--block-size", "0"], ["argument --block-size: must be >= 1"],
     ["block_size must"]),
    ("mask-sink-frames", "", [*MASK_RADIAL, "--sink-frames", "9"], ["argument --sink-frames", "latent frames"], []),
    ("mask-rectified-latent", "", [*MASK_RECTIFIED[:2], "--latent-height", "0"], ["argument --latent-height"], []),
    ("mask-rectified-drop", "", [*MASK_RECTIFIED, "--drop-rate", "1"], ["argument --drop-rate: must"], []),
    ("guidance-nan", "", [*TINY, "--guidance", "nan", "--out", "{tmp}/v.mp4"], ["argument --guidance", "finite"],
     []),
    ("seed-overflow", "", [*TINY, "--seed", str(2 ** 64), "--out", "{tmp}/v.mp4"], ["argument --seed"], []),
    ("mask-rectified-seed", "", [*MASK_RECTIFIED, "--seed", str(2 ** 64)], ["argument --seed"], []),
]


def _files(root: Path) -> set:
    return {p for p in root.rglob("*")}


@pytest.fixture
def no_model_load(monkeypatch):
    """Loading a pipeline or running the tiny transformer forward fails the test: errors must come first."""
    from vidattn.pipelines import generate

    def refuse(*args, **kwargs):
        raise AssertionError("a pipeline was loaded for an invalid command line")

    monkeypatch.setattr(generate, "load_pipeline", refuse)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # as on a user's CPU machine


@pytest.mark.parametrize("case_id, setup, argv, expected, absent", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, no_model_load, case_id, setup, argv, expected, absent):
    if case_id == "device-cuda-missing" and CUDA:
        pytest.skip("this machine has CUDA")
    if case_id in ("backend-triton-cpu", "bench-backend-triton-cpu") and CUDA:
        pytest.skip("the check needs a machine without CUDA")
    if case_id == "out-unwritable" and not Path("/proc").is_dir():
        pytest.skip("needs /proc")
    values = _setup(setup, tmp_path)
    argv = [a.format(**values) for a in argv]
    before = _files(tmp_path)
    began = time.perf_counter()
    try:
        rc = main(argv)
    except SystemExit as exit_:  # argparse's own errors
        rc = exit_.code
    elapsed = time.perf_counter() - began
    out, err = capsys.readouterr()
    assert rc == 2, (out, err)
    assert "Traceback" not in out + err
    lines = err.strip().splitlines()
    command = " ".join(argv[:2]) if argv[0] in ("mask", "bench") else argv[0]
    assert len(lines) == 1 and lines[0].startswith(f"vidattn {command}: error: argument "), err
    for fragment in expected:
        assert fragment in err, (fragment, err)
    for fragment in absent:
        assert fragment not in err, (fragment, err)
    assert _files(tmp_path) == before, "a failed run left files behind"
    if setup == "png":
        assert (tmp_path / "pic.png").read_bytes() == b"keep me"
    assert elapsed < 20, f"{elapsed:.1f} s for a bad command line"


@pytest.mark.parametrize("argv", [MASK_RADIAL, MASK_WINDOW, MASK_RECTIFIED], ids=["radial", "window", "rectified"])
def test_png_missing_folder_is_created_and_overwrite_replaces(tmp_path, capsys, argv):
    png = tmp_path / "new folder" / "süb" / "mask.png"
    assert main([*argv, "--png", str(png)]) == 0
    first = png.read_bytes()
    assert first.startswith(b"\x89PNG")
    assert main([*argv, "--png", str(png)]) == 2 and png.read_bytes() == first
    png.write_bytes(b"old")
    assert main([*argv, "--png", str(png), "--overwrite"]) == 0
    assert png.read_bytes().startswith(b"\x89PNG")
    assert not [p for p in png.parent.iterdir() if p.name.startswith(".")], "temporary files left behind"
    capsys.readouterr()


def test_out_missing_folders_are_created_and_removed_again_on_failure(tmp_path, capsys, no_model_load):
    out = tmp_path / "a" / "b" / "v.mp4"
    assert main([*TINY, "--frames", "10", "--out", str(out)]) == 2  # fails before the folders are made
    assert not (tmp_path / "a").exists()
    with pytest.raises(AssertionError, match="pipeline was loaded"):  # valid: reaches the (refused) model load
        main([*TINY, "--out", str(out)])
    assert not (tmp_path / "a").exists(), "folders made by the --out check stay after a failed run"
    capsys.readouterr()


def test_tiny_end_to_end_bfloat16_warning_and_sidecar(tmp_path, capsys):
    """Items 8 (dtype honoured), 9 (a preset that is dense on every call warns, console and sidecar) and 10 (what
    the sidecar records), on one real tiny-model run."""
    out = tmp_path / "out dir" / "fox ü.mp4"
    argv = [*TINY, "--method", "radial", "--preset", "wan-1x", "--dtype", "bfloat16", "--frames", "9",
            "--out", str(out)]
    assert main(argv) == 0
    printed, err = capsys.readouterr()
    assert "warning" in err and "--dense-steps 12" in err and "every attention call runs dense" in err
    assert "bfloat16" in printed
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["settings"]["dtype"] == "bfloat16"
    assert any("--dense-steps 12" in w for w in meta["warnings"])
    assert meta["command"].startswith("vidattn generate --model tiny") and "--preset wan-1x" in meta["command"]
    assert meta["timestamp"].endswith("+00:00")
    assert meta["backend"]["requested"] == "auto" and meta["backend"]["ran"] == {}  # every call dense
    assert meta["cpu_extension"]["used"] is False
    assert meta["method"]["sink_frames"] is None and meta["method"]["resolved"]["sink_frames"] == 1
    assert meta["settings"]["device"] == "cpu" and meta["settings"]["device_name"]
    assert meta["memory"]["peak"]["bytes"] > 0
    assert meta["model"]["kind"] == "tiny" and meta["model"]["source"]
    assert meta["timings"]["attention_s"] is not None  # measured on CPU


def test_sidecar_records_the_backend_that_ran(tmp_path, capsys):
    out = tmp_path / "v.mp4"
    assert main([*TINY, "--method", "radial", "--block-size", "16", "--frames", "9", "--out", str(out)]) == 0
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["backend"]["ran"] == {"torch": meta["attention"]["sparse_calls"]}
    assert isinstance(meta["cpu_extension"]["used"], bool)
    capsys.readouterr()


@pytest.mark.skipif(sys.platform != "linux" or os.geteuid() == 0, reason="root writes into read-only folders")
def test_out_read_only_folder(tmp_path, capsys, no_model_load):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        assert main([*TINY, "--out", str(folder / "v.mp4")]) == 2
        assert "cannot write" in capsys.readouterr().err
    finally:
        folder.chmod(0o700)


def test_video_kept_when_the_output_location_breaks_during_the_run(tmp_path, capsys, monkeypatch):
    """Item 1's last part: the computed video is never lost. The --out folder becomes unwritable after the checks
    (simulated); the video and its sidecar are saved elsewhere and the one-line error says where (exit 1)."""
    from vidattn.pipelines import video_io

    out = tmp_path / "v.mp4"
    original = video_io.write_video

    def failing(frames, path, *args, **kwargs):
        if Path(path) == out:
            raise PermissionError(13, "Permission denied", str(path))
        return original(frames, path, *args, **kwargs)

    import tempfile

    monkeypatch.setattr(video_io, "write_video", failing)
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    rc = main([*TINY, "--frames", "5", "--steps", "1", "--out", str(out)])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert rc == 1 and "Traceback" not in err and len(errors) == 1, err
    rescued = Path(errors[0].split("saved to ")[1].split(" instead")[0])
    assert rescued.is_file() and rescued.stat().st_size > 0 and rescued.with_suffix(".json").is_file()
    assert rescued.is_relative_to(tmp_path / "tmp")
    assert not out.exists()
