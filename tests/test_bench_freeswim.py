"""``vidattn bench freeswim``: the quick run prints the window rows (token and block density, raster and tiled) and
the per-step cost rows; the tiled order lowers the block density at real FreeSwim shapes; user errors exit 2 with
one line naming the option, before any work."""
from __future__ import annotations

import pytest

from vidattn import cli
from vidattn.bench_freeswim import parse_grid, step_costs, target_for, window_densities


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def test_quick_run_prints_window_and_step_rows(capsys, tmp_path):
    report = tmp_path / "bench.md"
    assert cli.main(["bench", "freeswim", "--quick", "--append", str(report)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    header = _cells(next(x for x in lines if x.startswith("| grid") and "token density" in x))
    assert "token density" in header and "block density" in header and "speedup" in header
    col = {name: i for i, name in enumerate(header)}
    rows = [_cells(x) for x in lines if x.startswith("| ") and len(_cells(x)) == len(header)
            and _cells(x)[0][0].isdigit()]
    for grid in ("2x12x20", "1x24x40"):
        mine = {r[col["order"]]: r for r in rows if r[0] == grid}
        assert set(mine) == {"dense", "raster", "tiles4x8"}, mine.keys()
        raster, tiled = mine["raster"], mine["tiles4x8"]
        assert raster[col["token density"]] == tiled[col["token density"]]  # a property of the window, not order
        for r in (raster, tiled):
            token, block = float(r[col["token density"]]), float(r[col["block density"]])
            assert 0 < token <= block <= 1
            assert float(r[col["max abs diff"]]) < 1e-4  # exact against the masked reference (tiled put back)
            assert r[col["speedup"]].endswith("x") and float(r[col["build (s)"]]) >= 0
    modes = {_cells(x)[3]: _cells(x) for x in lines if x.startswith("| 1x12x20 |")}
    assert set(modes) == {"direct", "nocache", "cache c=2", "cache c=5", "window only"}
    assert modes["direct"][-1] == "1.00x" and all(float(m[-2]) > 0 for m in modes.values())
    assert "target: cache mode with cache_steps=2" in out and "Calls (median s): direct" in out
    text = report.read_text()
    assert "### freeswim," in text and "Command: `vidattn bench freeswim --quick --append" in text
    assert "| 2x12x20 | 480 | 1 | tiles4x8 |" in text and "| 1x12x20 | 240 |" in text


@pytest.mark.parametrize("grid", [(2, 68, 120), (1, 135, 240)])
def test_tiled_block_density_is_below_raster_at_freeswim_shapes(grid):
    d = window_densities(*grid, base=(30, 52), tiles=(8, 16), block_size=128)
    assert d["token"] < d["tiled"] < d["raster"] <= 1
    if grid == (1, 135, 240):  # 4K: 5 % of the keys; raster blocks (~half a row) keep 4.6x that, tiles 1.8x
        assert d["token"] == pytest.approx(0.0507, abs=1e-3) and d["tiled"] < 0.5 * d["raster"]


@pytest.mark.parametrize("argv, option", [
    (["--grids", "2x68"], "--grids"),
    (["--grids", "2x68x120:0"], "--grids"),
    (["--base", "30"], "--base"),
    (["--tiles", "0x16"], "--tiles"),
    (["--heads", "0"], "--heads"),
    (["--head-dim", "63"], "--head-dim"),
    (["--block-size", "0"], "--block-size"),
    (["--repeats", "0"], "--repeats"),
    (["--warmup", "-1"], "--warmup"),
    (["--cache-steps", "2,0"], "--cache-steps"),
    (["--cache-steps", "two"], "--cache-steps"),
    (["--backends", "auto,cudnn"], "--backends"),
    (["--step-grid", "1x68x120:2"], "--step-grid"),
    (["--step-layers", "0"], "--step-layers"),
    (["--device", "tpu"], "--device"),
    (["--threads", "0"], "--threads"),
    (["--no-attention", "--step-grid", "none"], "--no-attention"),
])
def test_bad_values_exit_2_naming_the_option_before_any_work(argv, option, capsys, monkeypatch):
    import vidattn.bench_freeswim as bf

    def boom(*args, **kwargs):
        raise AssertionError("work started before the options were checked")

    monkeypatch.setattr(bf, "time_window", boom)
    monkeypatch.setattr(bf, "time_steps", boom)
    assert cli.main(["bench", "freeswim", "--quick", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("vidattn bench freeswim: error: ") and option in err, err


def test_step_costs_compose_the_modes():
    calls = {"direct": 1.0, "full": 1.1, "window_replay": 0.4, "window_own": 0.5}
    modes = step_costs(calls, (2, 5))
    assert modes["direct"] == pytest.approx(2.0)
    assert modes["nocache"] == pytest.approx(2 * (1.1 + 0.4))
    assert modes["cache c=2"] == pytest.approx((1.1 + 2 * 0.4 + 2 * 0.5) / 2)
    assert modes["cache c=5"] == pytest.approx((1.1 + 5 * 0.4 + 5 * 0.5) / 5)
    assert modes["window only"] == pytest.approx(1.0)


def test_grid_parsing_and_targets():
    assert parse_grid("2x68x120") == (2, 68, 120, None) and parse_grid("1x135x240:1") == (1, 135, 240, 1)
    for bad in ("2x68", "0x68x120", "2x68x120:0", "a"):
        with pytest.raises(ValueError):
            parse_grid(bad)
    assert target_for(68, 120, (30, 52)) == 1.5 and target_for(135, 240, (30, 52)) == 3.0
    assert target_for(30, 52, (30, 52)) is None
