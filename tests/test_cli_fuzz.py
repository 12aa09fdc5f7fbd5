"""Fuzzing the command line (issue 10): hypothesis draws argument vectors for ``generate`` and ``mask radial |
rectified | window`` — valid and invalid values, missing values, unknown flags, odd paths (missing parents, files
in place of folders, read-only folders, folders in place of files, names with spaces and unicode) — and runs them
in-process through ``vidattn.cli.main``.

Each run: no traceback (no exception escapes ``main`` but argparse's ``SystemExit``), exit code 0 or 2, a failed
run leaves no file or folder behind, and a refused run takes well under a few seconds and never reaches the model
load. ``generate``'s model load and video are replaced by a stand-in that applies the pipeline's own post-load
checks (so a vector the validation passes but the pipeline would refuse fails the test) and writes placeholder
files; the real tiny-model runs are in ``test_cli.py`` and ``test_bad_inputs.py``.
"""
import os
import stat
import sys
import tempfile
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vidattn.cli import main

REFUSED_WITHIN_S = 5.0  # refused runs take milliseconds; generous for loaded CI machines
SCALE = float(os.environ.get("VIDATTN_FUZZ_SCALE", "1"))  # more examples for a longer local fuzzing session
FUZZ = settings(deadline=None, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large])

NUMBERS = ["0", "-1", "nan", "inf", "-inf", "1e309", "abc", "", " ", "１７", "3.5"]
PATH_KINDS = ["plain", "unicode", "missing_parents", "file_as_folder", "read_only", "is_folder", "existing",
              "wrong_suffix", "empty", "nul", "sidecar_exists"]


def _values(*good, bad=()):
    return st.sampled_from([*good, *bad])


GENERATE = {
    "--method": _values("dense", "full", "radial", "rectified", "freeswim", bad=("magic", "", "Radial")),
    "--preset": _values("wan-1x", "wan-2x", "wan-t2v", "hunyuan", "wan-1.3b", bad=("nope", "")),
    "--dense-steps": _values("0", "1", "2", "12", bad=("-1", "x", "1.5")),
    "--dense-layers": _values("0", "1", "2", bad=("-2", "two")),
    "--dense-last-steps": _values("0", "1", bad=("-1",)),
    "--decay": _values("0.5", "1", "0.2", bad=("0", "-1", "nan", "inf")),
    "--drop-rate": _values("0", "0.5", "0.8", bad=("1", "1.5", "-0.1", "nan")),
    "--top-p": _values("0.3", "1", bad=("0", "2", "nan")),
    "--first-frame": _values("corner", "frame0", "off", bad=("none", "")),
    "--no-gapr": None,
    "--base-height": _values("32", "64", bad=("70", "0", "-16", "x")),
    "--base-width": _values("32", "64", bad=("70", "0", "-16")),
    "--mode": _values("cache", "nocache", bad=("never",)),
    "--cache-steps": _values("1", "2", bad=("0", "-1")),
    "--strength": _values("0.5", "0.7", "1", bad=("0", "1.5", "nan")),
    "--tiles": _values("2x2", "1x4", bad=("8", "0x1", "x", "٣x٣", "2x")),
    "--block-size": _values("16", "32", "128", bad=("0", "-1", "x")),
    "--backend": _values("auto", "torch", "reference", "flex", bad=("triton", "gpu", "")),
    "--model": _values("tiny", "tiny-bench", "<wan-folder>", bad=("tinyy", "<empty-folder>", "<missing-folder>",
                                                                  "nobody/no-such-model", "<file>")),
    "--frames": _values("1", "9", "17", "33", bad=("10", "0", "-3", "2")),
    "--height": _values("16", "64", "128", bad=("70", "0", "-16", "8")),
    "--width": _values("16", "64", "96", bad=("100", "0", "-64")),
    "--steps": _values("1", "2", "4", bad=("0", "-1")),
    "--guidance": _values("1", "5", "0", bad=("-1", "nan", "inf")),
    "--seed": _values("0", "3", "-1", str(2 ** 63), bad=(str(2 ** 64), "x")),
    "--fps": _values("8", "16", bad=("0", "-5")),
    "--device": _values("cpu", "cpu:0", bad=("cuda", "cuda:3", "banana", "meta", "mps", "")),
    "--dtype": _values("float32", "bfloat16", "float16", bad=("int8",)),
    "--out": "path:.mp4",
    "--overwrite": None,
    "--prompt": st.text(max_size=20),
    "--negative-prompt": st.text(max_size=10),
}

GEOMETRY = {
    "--frames": _values("1", "5", "9", "13", "17", "25", bad=("4", "0", "-1", "x")),
    "--height": _values("32", "64", "96", "128", bad=("100", "0", "-32", "x")),
    "--width": _values("32", "64", "128", bad=("48", "0", "-64")),
}
MASK_RADIAL = {
    **GEOMETRY,
    "--model": _values("wan", "hunyuan", "cogvideox", "ltx", "mochi", bad=("sora", "")),
    "--decay": _values("0.5", "1", bad=("0", "-1", "nan", "inf")),
    "--block-size": _values("16", "64", "128", bad=("0", "-1")),
    "--sink-frames": _values("0", "1", "2", bad=("5", "-1")),
    "--d1-full": None,
    "--no-d1-full": None,
    "--decimation-threshold": _values("0", "16", "128", bad=("-1", "nan", "inf")),
    "--text-len": _values("0", "16", "256", bad=("-1",)),
    "--png": "path:.png",
    "--overwrite": None,
}
MASK_WINDOW = {
    **GEOMETRY,
    "--base-height": _values("32", "64", bad=("48", "0", "-32")),
    "--base-width": _values("32", "64", bad=("40", "0")),
    "--model": _values("wan", "ltx", bad=("hunyuan",)),
    "--tiles": _values("2x2", "1x4", "3x5", bad=("8", "0x1", "x", "٣x٣")),
    "--temporal": _values("0", "1", "2", bad=("-1",)),
    "--inward": None,
    "--no-inward": None,
    "--block-size": _values("16", "64", bad=("0", "-1")),
    "--png": "path:.png",
    "--overwrite": None,
}
MASK_RECTIFIED = {
    "--model": _values("wan", "hunyuan", "cogvideox", "ltx", "mochi", bad=("sora",)),
    "--latent-frames": _values("1", "2", "3", bad=("0", "-1")),
    "--latent-height": _values("2", "4", bad=("0", "-2", "1")),
    "--latent-width": _values("2", "4", "6", bad=("0", "-4")),
    "--drop-rate": _values("0", "0.5", "0.9", bad=("1", "-0.1", "nan")),
    "--top-p": _values("0.3", "1", bad=("0", "nan")),
    "--block-size": _values("8", "16", bad=("0", "-1")),
    "--head": _values("0", "1", bad=("2", "-1")),
    "--seed": _values("0", "1", "-1", bad=(str(2 ** 64),)),
    "--png": "path:.png",
    "--overwrite": None,
}
REQUIRED = {"radial": ("--frames", "--height", "--width", "--model"),
            "window": ("--frames", "--height", "--width", "--base-height", "--base-width"), "rectified": ()}


@st.composite
def argv_for(draw, options: dict, required: tuple = (), always: dict = None):
    """``[(flag, value-or-None-or-("path", suffix, kind)), ...]`` then the oddities: an unknown flag, a flag without
    its value, a repeated flag."""
    chosen = [f for f in required if draw(st.floats(0, 1)) < 0.93]
    chosen += draw(st.lists(st.sampled_from(sorted(options)), unique=True, max_size=6))
    items = []
    for flag in dict.fromkeys(chosen):
        spec = options[flag]
        if spec is None:
            items.append((flag, None))
        elif isinstance(spec, str):
            items.append((flag, ("path", spec.split(":", 1)[1], draw(st.sampled_from(PATH_KINDS)))))
        else:
            value = draw(spec if draw(st.floats(0, 1)) < 0.9 else st.sampled_from(NUMBERS))
            items.append((flag, value))
    for flag, value in (always or {}).items():
        if flag not in dict(items) and draw(st.floats(0, 1)) < 0.8:
            if value.startswith("path:"):
                value = ("path", value.split(":", 1)[1], "plain")
            items.append((flag, value))
    oddity = draw(st.sampled_from(["none"] * 7 + ["unknown", "missing_value", "repeat", "equals"]))
    return items, oddity


def _materialize(items, oddity, sandbox: Path) -> tuple[list, list]:
    """The argument vector, with its paths built in ``sandbox``; returns ``(argv, output paths)``."""
    argv, outputs = [], []
    for flag, value in items:
        if isinstance(value, tuple):
            value = _path(sandbox, value[1], value[2])
            outputs.append(Path(value))
        elif isinstance(value, str) and value.startswith("<"):
            value = _model(sandbox, value)
        argv += [flag] if value is None else [flag, value]
    if oddity == "unknown":
        argv.insert(len(argv) // 2, "--frobnicate")
    elif oddity == "missing_value" and items:
        flags = [f for f, v in items if v is not None]
        if flags:
            argv.append(flags[0])
    elif oddity == "repeat" and items:
        argv += [items[0][0]] + ([] if items[0][1] is None else ["1"])
    elif oddity == "equals":
        argv.append("--frames=abc")
    return argv, outputs


def _path(sandbox: Path, suffix: str, kind: str) -> str:
    if kind == "plain":
        return str(sandbox / f"out{suffix}")
    if kind == "unicode":
        return str(sandbox / "dossier avec espaces ü 文字" / f"clip é 🎬{suffix}")
    if kind == "missing_parents":
        return str(sandbox / "a" / "b c" / f"x{suffix}")
    if kind == "file_as_folder":
        (sandbox / "afile").write_text("x")
        return str(sandbox / "afile" / f"x{suffix}")
    if kind == "read_only":
        folder = sandbox / "ro"
        folder.mkdir(exist_ok=True)
        folder.chmod(stat.S_IRUSR | stat.S_IXUSR)
        return str(folder / f"x{suffix}")
    if kind == "is_folder":
        (sandbox / f"adir{suffix}").mkdir(exist_ok=True)
        return str(sandbox / f"adir{suffix}")
    if kind == "existing":
        (sandbox / f"exists{suffix}").write_bytes(b"old")
        return str(sandbox / f"exists{suffix}")
    if kind == "sidecar_exists":
        (sandbox / "side.json").write_text("{}")
        return str(sandbox / f"side{suffix}")
    if kind == "wrong_suffix":
        return str(sandbox / ("x.avi" if suffix == ".mp4" else "x.jpg"))
    if kind == "nul":
        return str(sandbox / f"a\0b{suffix}")
    return ""


def _model(sandbox: Path, token: str) -> str:
    import json

    if token == "<wan-folder>":
        folder = sandbox / "wan model"
        (folder / "vae").mkdir(parents=True, exist_ok=True)
        (folder / "transformer").mkdir(exist_ok=True)
        (folder / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline", "vae": ["diffusers", "x"],
                                                             "transformer": ["diffusers", "y"]}))
        (folder / "vae" / "config.json").write_text("{}")
        (folder / "transformer" / "config.json").write_text(json.dumps({"patch_size": [1, 2, 2], "num_layers": 2}))
        return str(folder)
    if token == "<empty-folder>":
        (sandbox / "empty").mkdir(exist_ok=True)
        return str(sandbox / "empty")
    if token == "<file>":
        (sandbox / "model.bin").write_bytes(b"x")
        return str(sandbox / "model.bin")
    return str(sandbox / "no" / "such" / "model")


def _tree(root: Path) -> dict:
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            found[path] = path.read_bytes() if path.is_file() else None
    return found


def _run(argv: list, sandbox: Path, capsys) -> tuple[int, str, float]:
    cwd = os.getcwd()
    os.chdir(sandbox)  # generate's default --out is outputs/... under the working folder
    began = time.perf_counter()
    try:
        rc = main(argv)
    except SystemExit as exit_:  # argparse: bad or missing values, unknown flags
        rc = exit_.code
    except BaseException as err:  # noqa: BLE001 - the traceback a user would see
        raise AssertionError(f"vidattn {' '.join(map(repr, argv))} raised {type(err).__name__}: {err}") from err
    finally:
        os.chdir(cwd)
    elapsed = time.perf_counter() - began
    out, err = capsys.readouterr()
    return rc, out + err, elapsed


def _check(argv, outputs, sandbox, capsys, loads: list) -> int:
    before = _tree(sandbox)
    loads.clear()
    rc, printed, elapsed = _run(argv, sandbox, capsys)
    shown = f"vidattn {' '.join(map(repr, argv))}\n{printed}"
    assert rc in (0, 2), shown
    assert "Traceback" not in printed, shown
    if rc == 2:
        assert _tree(sandbox) == before, f"a failed run changed files\n{shown}"
        assert not loads, f"a refused command line reached the model load\n{shown}"
        assert elapsed < REFUSED_WITHIN_S, f"refused after {elapsed:.1f} s\n{shown}"
        error_lines = [line for line in printed.splitlines() if ": error: " in line]
        assert len(error_lines) == 1, shown
    else:
        for path in outputs:
            assert path.is_file() and path.stat().st_size > 0, shown
    return rc


@pytest.fixture
def sandboxes(tmp_path):
    made = []

    def new() -> Path:
        made.append(Path(tempfile.mkdtemp(dir=tmp_path)))
        return made[-1]

    yield new
    for root in made:  # read-only folders: make them removable
        for dirpath, _, _ in os.walk(root):
            os.chmod(dirpath, 0o700)


@pytest.fixture
def fake_generation(monkeypatch):
    """``generate_video`` replaced: the pipeline's own post-load checks, then placeholder mp4 and sidecar files."""
    from vidattn.pipelines import generate as gen
    from vidattn.pipelines import video_io
    from vidattn.pipelines.freeswim import FreeSwimRefineMixin
    from vidattn.pipelines.tiny import TINY_PRESETS

    loads = []

    class Shim(FreeSwimRefineMixin):
        freeswim_cell = 16
        freeswim_frame_step = 4

    def fake(request, processor, out, *, overwrite=False, method=None, freeswim=None, **kwargs):
        loads.append(request)
        defaults = TINY_PRESETS["bench" if request.model == "tiny-bench" else "toy"]
        if request.model not in ("tiny", "tiny-bench"):
            defaults = {"num_frames": 81, "height": 480, "width": 832, "num_inference_steps": 50,
                        "guidance_scale": 5.0}
        frames = request.frames or defaults["num_frames"]
        height, width = request.height or defaults["height"], request.width or defaults["width"]
        steps = request.steps or defaults["num_inference_steps"]
        gen.check_geometry(frames, height, width, 4, 16)  # what generate_video checks after the load
        if freeswim is not None:
            Shim().check_freeswim_inputs(height, width, freeswim["base_height"], freeswim["base_width"], frames,
                                         freeswim["strength"], freeswim["mode"], freeswim["cache_steps"], steps)
        video_io.atomic_write(out, overwrite, lambda tmp: tmp.write_bytes(b"mp4"))
        video_io.write_sidecar(Path(out).with_suffix(".json"), {"fake": True}, overwrite=overwrite)
        return {"video": str(out), "sidecar": str(Path(out).with_suffix(".json")),
                "settings": {"frames": frames, "height": height, "width": width, "steps": steps,
                             "device": request.device, "dtype": request.dtype},
                "timings": {"generate_s": 0.0, "attention_s": 0.0},
                "attention": {"sparse_calls": 0, "dense_calls": 0, "computed_fraction": None}}

    monkeypatch.setattr(gen, "generate_video", fake)

    def fake_batch(job, info, *, resume=False):  # a repeated --prompt is a batch (issue 11): checked, not rendered
        loads.append(job)
        return []

    from vidattn.pipelines import batch

    monkeypatch.setattr(batch, "run_batch", fake_batch)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # triton on CPU is refused, as on a user's machine
    return loads


def _warm(capsys, sandbox):
    """Imports happen once, before the timed runs."""
    for argv in (["generate", "--model", "tiny", "--frames", "10"], ["mask", "rectified", "--head", "9"],
                 ["mask", "radial", "--frames", "0", "--height", "64", "--width", "64", "--model", "wan"]):
        _run(argv, sandbox, capsys)


OUTCOMES: dict = {}


def _count(command: str, rc: int) -> None:
    OUTCOMES.setdefault(command, {0: 0, 2: 0})[rc] += 1


@settings(FUZZ, max_examples=int(300 * SCALE))
@given(drawn=argv_for(GENERATE, always={"--model": "tiny", "--out": "path:.mp4"}))
def test_fuzz_generate(drawn, sandboxes, capsys, fake_generation):
    sandbox = sandboxes()
    if "generate" not in OUTCOMES:
        _warm(capsys, sandbox)
    argv, outputs = _materialize(*drawn, sandbox)
    rc = _check(["generate", *argv], outputs, sandbox, capsys, fake_generation)
    _count("generate", rc)
    if rc == 0:
        assert len(fake_generation) == 1


@pytest.mark.parametrize("method, options, examples", [("radial", MASK_RADIAL, 150), ("window", MASK_WINDOW, 150),
                                                       ("rectified", MASK_RECTIFIED, 60)])
def test_fuzz_mask(method, options, examples, sandboxes, capsys, fake_generation):
    @settings(FUZZ, max_examples=int(examples * SCALE))
    @given(drawn=argv_for(options, REQUIRED[method]))
    def run(drawn):
        sandbox = sandboxes()
        if f"mask {method}" not in OUTCOMES:
            _warm(capsys, sandbox)
        argv, outputs = _materialize(*drawn, sandbox)
        _count(f"mask {method}", _check(["mask", method, *argv], outputs, sandbox, capsys, fake_generation))

    run()


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX permissions")
def test_path_kinds_cover_the_issue(tmp_path):
    """Each odd path of the issue is among the drawn kinds."""
    assert {"missing_parents", "file_as_folder", "read_only", "unicode", "is_folder"} <= set(PATH_KINDS)
    assert _path(tmp_path, ".png", "unicode").endswith(".png") and " " in _path(tmp_path, ".png", "unicode")


BENCH_ATTENTION = {
    "--geometry": _values("bench-16k", "hunyuan-720p", bad=("4k", "")),
    "--frames": _values("1", "4", bad=("0", "-1", "x")),
    "--height": _values("8", "30", bad=("0", "-8")),
    "--width": _values("16", "52", bad=("0",)),
    "--method": _values("full", "band", "random", "radial", "rectified", bad=("magic",)),
    "--density": _values("0.1", "0.25,0.5", bad=("0", "1.5", "x", "")),
    "--drop-rates": _values("0.75", "0.75,0.9", bad=("1", "-0.1", "")),
    "--top-p": _values("0.3", "1", bad=("0", "nan")),
    "--decay": _values("0.5", "1", bad=("0", "-1")),
    "--block-size": _values("16", "64", bad=("0", "-1")),
    "--heads": _values("1", "2", bad=("0", "-1")),
    "--head-dim": _values("32", "64", bad=("0",)),
    "--backends": _values("auto", "torch", "torch,reference", bad=("triton", "gpu", "", ",")),
    "--device": _values("cpu", bad=("cuda", "gpu0", "cuda:7", "")),
    "--dtype": _values("float32", "bfloat16", bad=("float8",)),
    "--fidelity": None,
    "--quick": None,
}


def test_fuzz_bench_attention(sandboxes, capsys, fake_generation, monkeypatch):
    """bench attention: the measurements replaced by a stub (the fuzz is about the checks before them)."""
    from vidattn.commands import bench as bench_cmd

    ran = []
    monkeypatch.setattr(bench_cmd, "_run_patterns", lambda args, settings: ran.append(1) or [])
    monkeypatch.setattr(bench_cmd, "_run_rectified", lambda args, settings: ran.append(1) or [])

    @settings(FUZZ, max_examples=int(150 * SCALE))
    @given(drawn=argv_for(BENCH_ATTENTION))
    def run(drawn):
        sandbox = sandboxes()
        argv, outputs = _materialize(*drawn, sandbox)
        ran.clear()
        rc = _check(["bench", "attention", *argv], outputs, sandbox, capsys, fake_generation)
        assert rc == 2 or ran, "an accepted command line measured nothing"
        assert rc == 0 or not ran, "a refused command line started measuring"
        _count("bench attention", rc)

    run()


BENCH_FREESWIM = {
    "--grids": _values("1x12x20", "2x12x20:1", bad=("12x20", "0x1x1", "x", "")),
    "--base": _values("6x10", "4x4", bad=("6", "0x1", "x")),
    "--tiles": _values("4x4", "8x16", bad=("4", "0x4")),
    "--heads": _values("1", "2", bad=("0", "-1")),
    "--head-dim": _values("16", "32", bad=("0", "15")),
    "--block-size": _values("16", "32", bad=("0",)),
    "--backends": _values("auto", "torch", bad=("triton", "gpu", "")),
    "--device": _values("cpu", bad=("cuda", "gpu0", "")),
    "--repeats": _values("1", "3", bad=("0",)),
    "--warmup": _values("0", "1", bad=("-1",)),
    "--threads": _values("1", "2", bad=("0",)),
    "--step-grid": _values("none", "1x8x8", bad=("8x8", "1x8x8:2")),
    "--cache-steps": _values("2", "2,5", bad=("0", "x")),
    "--no-attention": None,
    "--quick": None,
}


def test_fuzz_bench_freeswim(sandboxes, capsys, fake_generation, monkeypatch):
    """bench freeswim: measurements stubbed; the checks before them must hold for any argument vector."""
    from vidattn.commands import bench_freeswim as fs_cmd

    ran = []
    monkeypatch.setattr(fs_cmd, "_attention", lambda args, settings, dtype: ran.append(1) or ([], []))
    monkeypatch.setattr(fs_cmd, "_steps", lambda args, settings, dtype: ran.append(1) or ([], []))

    @settings(FUZZ, max_examples=int(150 * SCALE))
    @given(drawn=argv_for(BENCH_FREESWIM))
    def run(drawn):
        sandbox = sandboxes()
        argv, outputs = _materialize(*drawn, sandbox)
        ran.clear()
        rc = _check(["bench", "freeswim", *argv], outputs, sandbox, capsys, fake_generation)
        assert rc == 0 or not ran, "a refused command line started measuring"
        _count("bench freeswim", rc)

    run()


def test_fuzz_reached_both_outcomes():
    """The strategies are not degenerate: each command had accepted and refused vectors (run after the fuzzers)."""
    if not OUTCOMES:
        pytest.skip("the fuzz tests did not run in this session")
    print("accepted / refused per command:", OUTCOMES)
    for command, counts in OUTCOMES.items():
        assert counts[0] > 0 and counts[2] > 0, (command, counts)
