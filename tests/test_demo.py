"""The demo without a browser: the form from the method registry, request checks, generation on the tiny model
(per-layer densities, mask pictures, one pipeline per model), the dense comparison and the command line."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from vidattn.demo.engine import DemoError, Pipelines, Request, check_request, generate
from vidattn.demo.form import NO_PRESET, START_KNOBS, knob_fields, parse_knobs, preset_values
from vidattn.methods import METHODS, MethodSpec
from vidattn.processors.radial import RADIAL_PRESETS, RadialProcessor


# ---------------------------------------------------------------------------------------------------- the form
def test_form_follows_the_registry(monkeypatch):
    class Toy(RadialProcessor):
        def __init__(self, strength: float = 0.25, label: str = "x", *, flag: bool = False, **kwargs):
            super().__init__(**kwargs)

    monkeypatch.setitem(METHODS, "toy", MethodSpec("toy", Toy, presets={"p": {"strength": 0.5, "flag": True}},
                                                   knobs=("strength", "label", "flag", "backend")))
    fields = {f.name: f for f in knob_fields("toy")}
    assert [(f.kind, f.default) for f in fields.values()] == [("float", 0.25), ("text", "x"), ("bool", False),
                                                            ("choice", "auto")]
    assert "triton" in fields["backend"].choices
    assert preset_values("toy", "p") == [0.5, "x", True, "auto"]
    assert parse_knobs("toy", ["0.75", "y", 1, "torch"]) == {"strength": 0.75, "label": "y", "flag": True,
                                                             "backend": "torch"}


def test_form_presets_and_parsing_for_registered_methods():
    names = [f.name for f in knob_fields("radial")]
    assert names == list(METHODS["radial"].knobs)
    wan = preset_values("radial", "wan-1x")
    assert wan[names.index("decay")] == RADIAL_PRESETS["wan-1x"]["decay"]
    assert preset_values("radial", NO_PRESET)[names.index("block_size")] == START_KNOBS["block_size"]
    sink = next(f for f in knob_fields("radial") if f.name == "sink_frames")
    assert sink.optional and sink.default is None
    values = preset_values("radial", NO_PRESET)
    assert "sink_frames" not in parse_knobs("radial", values)
    with pytest.raises(ValueError, match="dense_steps"):
        parse_knobs("radial", [values[0], 1.5, *values[2:]])
    tiles = [f.name for f in knob_fields("freeswim")].index("tiles")
    free = preset_values("freeswim", NO_PRESET)
    free[tiles] = "4x8"
    assert parse_knobs("freeswim", free)["tiles"] == (4, 8)


def test_page_values_become_a_request(tmp_path):
    from vidattn.demo.app import SETTINGS, DemoApp

    app = DemoApp(Pipelines("cpu", torch.float32), tmp_path)
    knobs = [f.default for f in app.order]
    knobs[app.order.index(next(f for f in app.order if (f.method, f.name) == ("radial", "decay")))] = 0.5
    knobs[app.order.index(next(f for f in app.order if (f.method, f.name) == ("rectified", "drop_rate")))] = 0.9
    settings = dict(frames=17.0, height=64, width=64, steps=2, seed=3, guidance=4.5, layer=1, head=0)
    values = ["fox", "", " tiny ", "radial", NO_PRESET, *[settings[k] for k in SETTINGS], *knobs]
    request = app.request(values)
    assert (request.model, request.method, request.preset, request.frames, request.seed, request.guidance,
            request.layer) == ("tiny", "radial", None, 17, 3, 4.5, 1)
    assert request.knobs["decay"] == 0.5 and "drop_rate" not in request.knobs and "sink_frames" not in request.knobs
    values[5] = 17.5
    with pytest.raises(DemoError, match="Frames: must be a whole number"):
        app.request(values)


# ---------------------------------------------------------------------------------------------------- checks
@pytest.mark.parametrize("request_, words", [
    (Request("p", height=63), ["Height", "multiple of 16"]),
    (Request("p", frames=4), ["Frames", "4k+1"]),
    (Request("p", model="tinny"), ["Model", "did you mean 'tiny'"]),
    (Request("p", method="radial", knobs={"decay": 0.0}), ["Knobs", "decay"]),
    (Request("p", method="nope"), ["Method", "radial"]),
    (Request("p", method="radial", preset="wan-9x"), ["Preset", "wan-1x"]),
])
def test_bad_requests_are_one_line_messages(request_, words):
    with pytest.raises(DemoError) as err:
        check_request(request_)
    message = str(err.value)
    assert all(w in message for w in words) and "\n" not in message and "Traceback" not in message


def test_model_a_method_does_not_support(tmp_path):
    folder = tmp_path / "13-model"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(DemoError, match="Model"):
        check_request(Request("p", model=str(folder), method="radial"))


def test_method_that_does_not_support_the_model(monkeypatch):
    import dataclasses

    from vidattn.demo import engine

    unknown = dataclasses.replace(engine.v.check_model("tiny"), family=None, class_name="OtherVideoPipeline")
    monkeypatch.setattr(engine.v, "check_model", lambda value: unknown)
    with pytest.raises(DemoError, match="Method radial does not support OtherVideoPipeline"):
        check_request(Request("p", method="radial"))
    with pytest.raises(DemoError, match="Method freeswim does not support this model"):
        check_request(Request("p", model="elsewhere", method="freeswim"))
    assert check_request(Request("p", method="dense")).processor.method == "dense"


# ---------------------------------------------------------------------------------------------------- runs
@pytest.fixture(scope="module")
def pipelines():
    return Pipelines("cpu", torch.float32)


def test_generate_records_layers_and_the_mask(pipelines, tmp_path):
    steps = []
    checked = check_request(Request("a fox", method="rectified", knobs={"block_size": 16, "drop_rate": 0.8},
                                    layer=1, head=1))
    out = generate(checked, pipelines, tmp_path, lambda done, total, desc: steps.append((done, total, desc)))
    assert out.video.exists() and out.frames.shape == (17, 64, 64, 3) and out.frames.dtype == np.uint8
    summary = out.summary
    calls_per_layer = summary["calls"] / len(out.layer_densities)
    assert len(out.layer_densities) == pipelines.get("tiny")[0].transformer.config.num_layers
    assert sum(out.layer_densities) * calls_per_layer / summary["calls"] == pytest.approx(
        summary["computed_fraction"])
    assert out.mask is not None and out.mask.shape[0] >= 400 and "layer 1, head 1" in out.mask_note
    assert out.attention_seconds is not None and out.seconds > 0
    assert steps[-1][:2] == (2, 2) and "denoising step 2/2" in steps[-1][2]
    dense = generate(check_request(Request("a fox", method="dense")), pipelines, tmp_path)
    assert dense.mask is None and "no sparse" in dense.mask_note and dense.layer_densities == [1.0, 1.0]
    assert pipelines.loads == 1, "one pipeline per model, reused"


def test_dense_layers_show_in_the_per_layer_densities(pipelines, tmp_path):
    checked = check_request(Request("a fox", method="radial", knobs={"block_size": 16, "dense_layers": 1}, layer=0))
    out = generate(checked, pipelines, tmp_path)
    assert out.layer_densities[0] == 1.0 and out.layer_densities[1] < 1.0
    assert out.mask is None and "Layer 0 ran no sparse" in out.mask_note


def test_out_of_memory_is_a_message(pipelines, tmp_path, monkeypatch):
    from vidattn.demo import engine

    def boom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")

    monkeypatch.setattr(engine, "_call", boom)
    with pytest.raises(DemoError, match="Out of memory: try fewer frames"):
        generate(check_request(Request("a fox", method="radial", knobs={"block_size": 16})), pipelines, tmp_path)
    assert engine.vidattn.installed(pipelines.get("tiny")[0]) is None, "the processor is removed after a failure"


def test_compare_full_against_dense(pipelines, tmp_path):
    from vidattn.demo.compare import compare
    from vidattn.video_metrics import psnr, ssim

    result = compare(check_request(Request("a fox", method="full", knobs={"block_size": 16})), pipelines, tmp_path)
    assert result.dense.video != result.method.video
    assert result.psnr == psnr(result.dense.frames, result.method.frames) and result.psnr > 40
    assert result.ssim == pytest.approx(ssim(result.dense.frames, result.method.frames)) and result.ssim > 0.99
    assert math.isclose(result.speedup, result.dense.seconds / result.method.seconds)
    assert result.difference.ndim == 3 and result.frame == 8


def test_freeswim_refines_at_the_target_size(pipelines, tmp_path):
    """FreeSwim in the demo: base generation at the tiny model's base size, refinement at twice that with the window
    (its own pipeline class, loaded once next to the stock one), the window's mask drawn for the chosen layer."""
    checked = check_request(Request("a fox", method="freeswim", height=128, width=128,
                                    knobs={"block_size": 16, "base_rows": 2, "base_cols": 2}))
    assert checked.pipeline_cls is not None and checked.freeswim["base_height"] < 128
    out = generate(checked, pipelines, tmp_path)
    assert out.frames.shape == (17, 128, 128, 3)
    assert out.summary["sparse_calls"] > 0 and out.summary["computed_fraction"] < 1
    assert out.mask is not None and "layer 0" in out.mask_note
    from vidattn.demo.compare import compare

    loads = pipelines.loads
    result = compare(checked, pipelines, tmp_path)  # dense side: FreeSwim's direct baseline on the same pipeline
    assert pipelines.loads == loads and result.dense.frames.shape == (17, 128, 128, 3)
    assert list(pipelines._pipes) == [("tiny", "FreeSwimPipeline")]  # the stock pipeline was dropped, not kept
    assert result.dense.summary["sparse_calls"] == 0 and 0 < result.ssim < 1


# ---------------------------------------------------------------------------------------------------- command
def test_demo_command_help_and_checks(capsys):
    from vidattn.cli import main

    with pytest.raises(SystemExit) as done:
        main(["demo", "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert all(flag in text for flag in ("--share", "--server-name", "--server-port", "--model"))
    assert main(["demo", "--server-port", "70000"]) == 2
    assert "argument --server-port" in capsys.readouterr().err
    assert main(["demo", "--model", "tinny"]) == 2
    assert "argument --model" in capsys.readouterr().err


def test_a_taken_port_is_a_one_line_error(capsys):
    import socket

    from vidattn.cli import main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["demo", "--server-port", str(port)]) == 2
    err = capsys.readouterr().err
    assert "--server-port" in err and str(port) in err and "Traceback" not in err


def test_demo_command_passes_its_flags_to_gradio(monkeypatch):
    from vidattn.cli import main
    from vidattn.demo import app

    seen = {}

    class Blocks:
        def launch(self, **kwargs):
            seen.update(kwargs)

    monkeypatch.setattr(app, "build_app", lambda **kwargs: seen.update(build=kwargs) or Blocks())
    assert main(["demo", "--share", "--server-name", "0.0.0.0", "--server-port", "7999", "--device", "cpu"]) == 0
    assert (seen["share"], seen["server_name"], seen["server_port"]) == (True, "0.0.0.0", 7999)
    assert seen["build"]["device"] == "cpu" and seen["build"]["model"] == "tiny"


def test_python_m_vidattn_demo_help():
    done = subprocess.run([sys.executable, "-m", "vidattn.demo", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "--server-port" in done.stdout
