"""``vidattn --version`` and ``vidattn presets [METHOD]``: versions one per line, every preset with its knobs and
published generation settings, a one-line error for an unknown method, JSON, and no heavy imports."""
import json
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

import vidattn
from vidattn.cli import main
from vidattn.methods import METHODS

ROOT = Path(__file__).resolve().parents[1]


def _installed(name):
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def test_version_prints_vidattn_then_torch_diffusers_triton(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"vidattn {vidattn.__version__}", f"torch {_installed('torch')}",
                     f"diffusers {_installed('diffusers')}", f"triton {_installed('triton')}"]


def test_version_is_documented_in_help(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "--version" in out and "presets" in out


def test_presets_lists_every_method_and_preset(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    for name, spec in METHODS.items():
        assert f"\n{name}: " in f"\n{out}"
        for preset in spec.presets:
            assert f"  {preset} " in out
    assert "decay=0.2 dense_steps=12 dense_layers=1" in out  # radial wan-1x's knobs
    assert "--height 768 --width 1280 --frames 69 --steps 50 --guidance 5.0" in out  # and its published settings


def test_presets_of_one_method(capsys):
    assert main(["presets", "rectified"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("rectified: ") and "radial" not in out and "wan-1x" not in out
    rows = {line.split()[0]: line for line in out.splitlines()[1:] if line.startswith("  ") and line.split()}
    assert set(METHODS["rectified"].presets) <= set(rows)
    assert "drop_rate=0.75" in rows["wan-t2v"] and "--frames 81" in rows["wan-t2v"]
    assert "--steps 40" in rows["wan22"] and "--height" not in rows["wan22"]
    assert rows["wan-i2v"].rstrip().endswith("-")  # no published generation settings


def test_presets_of_a_method_without_presets(capsys):
    assert main(["presets", "dense"]) == 0
    assert "no presets" in capsys.readouterr().out


def test_presets_unknown_method_is_one_line_naming_the_argument(capsys):
    assert main(["presets", "magic"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1
    assert "METHOD" in lines[0] and "'magic'" in lines[0]
    assert all(name in lines[0] for name in METHODS)


def test_presets_json(capsys):
    assert main(["presets", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert list(data) == list(METHODS)
    for name, spec in METHODS.items():
        assert data[name]["knobs"] == list(spec.knobs)
        assert set(data[name]["presets"]) == set(spec.presets)
    wan = data["radial"]["presets"]["wan-1x"]
    assert wan["knobs"] == {"decay": 0.2, "dense_steps": 12, "dense_layers": 1}
    assert wan["generation"]["num_frames"] == 69
    assert main(["presets", "freeswim", "--json"]) == 0
    one = json.loads(capsys.readouterr().out)
    assert list(one) == ["freeswim"] and one["freeswim"]["presets"]["wan-14b"]["generation"]["width"] == 2560


def test_presets_presets_are_usable_by_generate():
    """Every listed knob is one the method accepts (so ``generate --preset`` applies all of it)."""
    for spec in METHODS.values():
        for preset in spec.presets.values():
            assert {k for k in preset if k != "generation"} <= set(spec.knobs)


def test_version_and_parser_import_nothing_heavy():
    code = ("import sys; from vidattn.cli import build_parser, versions; build_parser(); versions(); "
            "print(sorted(m for m in ('diffusers', 'transformers', 'vidattn.methods', 'PIL', 'imageio') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
