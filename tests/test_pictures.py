"""vidattn.pictures (readable mask pictures) and vidattn.video_metrics (PSNR/SSIM), against brute-force references."""
from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from vidattn.layout import TextSegment, TokenLayout
from vidattn.patterns.radial import radial_pattern
from vidattn import pictures as P
from vidattn.token_order import order_permutation
from vidattn.video_metrics import gaussian_window, psnr, ssim


@pytest.mark.parametrize("text, order", [(None, "raster"), (TextSegment(7, "first"), "raster"),
                                         (TextSegment(9, "last"), "gilbert"), (None, "tiles2x2")])
def test_token_frames_matches_brute_force(text, order):
    layout = TokenLayout(3, 4, 6, text=text, order=order)
    found = order_permutation(order, 3, 4, 6)
    perm = list(range(layout.video_tokens)) if found is None else found[0].tolist()
    video = [raster // layout.tokens_per_frame for raster in perm]
    text_part = [-1] * layout.text_tokens
    expected = text_part + video if layout.video_start else video + text_part
    assert P.token_frames(layout).tolist() == expected


@pytest.mark.parametrize("text, block", [(None, 8), (TextSegment(10, "last"), 12), (TextSegment(5, "first"), 7)])
def test_distance_density_equals_token_level_count(text, block):
    layout = TokenLayout(10, 4, 8, text=text)
    pattern = radial_pattern(layout, decay=0.3, block_size=block, sink_frames=0, decimation_threshold=4)
    dense = pattern.to_dense()[0, 0].numpy()
    frames = P.token_frames(layout)
    video = frames >= 0
    dist = np.abs(frames[:, None] - frames[None, :])
    pair = video[:, None] & video[None, :]
    expected = [dense[pair & (dist == d)].mean() for d in range(layout.frames)]
    got = P.distance_density(P.pattern_values(pattern) > 0, frames, frames, block)
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    assert got[0] == 1.0 and got.min() < 1.0  # own frame always kept; something skipped far away


def test_pool_blocks_keeps_every_kept_block_and_the_mean():
    rng = np.random.default_rng(0)
    values = (rng.random((1003, 517)) < 0.001).astype(float)
    values[-1, -1] = 1.0  # in a ragged corner group
    factor = P.pool_factor(values.shape, 256)
    pooled = P.pool_blocks(values, factor)
    assert factor == 4 and pooled.shape == (251, 130)
    groups = np.zeros(pooled.shape, bool)
    rows, cols = np.nonzero(values)
    groups[rows // factor, cols // factor] = True
    assert np.array_equal(pooled > 0, groups)
    assert pooled[-1, -1] == pytest.approx(1 / 3)  # the ragged corner group holds 3 x 1 blocks, one kept
    even = values[:1000, :516]
    assert math.isclose(P.pool_blocks(even, factor).mean(), even.mean())
    assert P.pool_blocks(np.ones((1, 1)), 1).shape == (1, 1)


def test_frame_starts_only_for_contiguous_frames():
    raster = P.token_frames(TokenLayout(3, 2, 2, text=TextSegment(4, "first")))
    assert P.frame_starts(raster).tolist() == [4, 8, 12]
    assert P.frame_starts(P.token_frames(TokenLayout(3, 4, 4, order="gilbert"))) is None


def _lines(axis_lines, colour):
    from matplotlib.colors import same_color

    return [line for line in axis_lines if same_color(line.get_color(), colour)]


def test_mask_figure_axes_frames_text_colour_and_size():
    layout = TokenLayout(5, 4, 4, text=TextSegment(16, "last"))
    pattern = radial_pattern(layout, block_size=8, sink_frames=0)
    title = f"radial: density {pattern.density():.3f}\ndecay 1"
    fig = P.pattern_figure(layout, pattern, title)
    mask_ax, curve_ax = fig.axes
    assert mask_ax.get_xlabel() == "key frame" and mask_ax.get_ylabel() == "query frame"
    assert [t.get_text() for t in mask_ax.get_xticklabels()] == ["0", "1", "2", "3", "4"]
    assert len(_lines(mask_ax.lines, P.FRAME_LINE)) == 2 * (layout.frames - 1)  # boundaries on both axes
    assert fig._suptitle.get_text().startswith("radial: density")
    np.testing.assert_allclose(curve_ax.lines[0].get_ydata(),
                               P.distance_density(P.pattern_values(pattern) > 0, P.token_frames(layout),
                                                  P.token_frames(layout), 8))
    pixels = P.render(fig)
    blue = np.all(np.abs(pixels.astype(int) - (P.TEXT_ON * 255).astype(int)) <= 2, axis=-1)
    assert blue.sum() > 500, "text rows/columns drawn in their own colour"
    plain = P.render(P.pattern_figure(TokenLayout(5, 4, 4), radial_pattern(TokenLayout(5, 4, 4), block_size=8), "x"))
    assert not np.all(np.abs(plain.astype(int) - (P.TEXT_ON * 255).astype(int)) <= 2, axis=-1).any()
    huge = P.render(P.mask_figure(np.eye(3000), np.arange(3000) // 300, np.arange(3000) // 300, 1, "big"))
    assert huge.shape == pixels.shape == plain.shape and 400 <= pixels.shape[0] <= 700


def test_gilbert_mask_is_labelled_in_tokens():
    layout = TokenLayout(4, 4, 4, order="gilbert")
    frames = P.token_frames(layout)
    fig = P.mask_figure(np.ones((4, 4)), frames, frames, 16, "t")
    assert "curve order" in fig.axes[0].get_xlabel() and not _lines(fig.axes[0].lines, P.FRAME_LINE)


def test_core_import_does_not_load_matplotlib():
    code = ("import sys, vidattn, vidattn.pictures, vidattn.video_metrics, vidattn.commands.mask, vidattn.demo; "
            "assert 'matplotlib' not in sys.modules and 'gradio' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_mask_png_without_matplotlib_is_a_usage_error(tmp_path, monkeypatch, capsys):
    import importlib.util

    from vidattn.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    png = tmp_path / "m.png"
    assert main(["mask", "radial", "--frames", "17", "--height", "64", "--width", "64", "--model", "wan",
                 "--png", str(png)]) == 2
    assert "argument --png" in capsys.readouterr().err and not png.exists()


# ------------------------------------------------------------------------------------------------ PSNR / SSIM
def _ssim_brute(a: np.ndarray, b: np.ndarray, size: int) -> float:
    """SSIM by its definition: every valid window position, weighted moments in plain Python loops."""
    w = gaussian_window(size).numpy()
    luma = np.array([0.299, 0.587, 0.114])
    values = []
    for fa, fb in zip(a.astype(float) @ luma, b.astype(float) @ luma):
        for i in range(fa.shape[0] - size + 1):
            for j in range(fa.shape[1] - size + 1):
                x, y = fa[i:i + size, j:j + size], fb[i:i + size, j:j + size]
                mx, my = (w * x).sum(), (w * y).sum()
                vx, vy = (w * x * x).sum() - mx ** 2, (w * y * y).sum() - my ** 2
                cxy = (w * x * y).sum() - mx * my
                c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
                values.append((2 * mx * my + c1) * (2 * cxy + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2)))
    return float(np.mean(values))


def test_psnr_and_ssim_against_definitions():
    rng = np.random.default_rng(1)
    a = rng.integers(0, 256, (2, 16, 14, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-20, 21, a.shape), 0, 255).astype(np.uint8)
    mse = ((a.astype(float) - b) ** 2).mean()
    assert math.isclose(psnr(a, b), 10 * math.log10(255 ** 2 / mse))
    assert psnr(a, a) == math.inf and ssim(a, a) == pytest.approx(1.0)
    assert ssim(a, b) == pytest.approx(_ssim_brute(a, b, 11), rel=1e-9)
    small = a[:, :6, :8]
    assert ssim(small, b[:, :6, :8]) == pytest.approx(_ssim_brute(small, b[:, :6, :8], 6), rel=1e-9)
    noisier = np.clip(a.astype(int) + rng.integers(-60, 61, a.shape), 0, 255).astype(np.uint8)
    assert ssim(a, noisier) < ssim(a, b) < 1 and psnr(a, noisier) < psnr(a, b)
    with pytest.raises(ValueError):
        psnr(a, b[:1])


def test_difference_and_layer_figures():
    a = np.zeros((8, 10, 3), np.uint8)
    b = a.copy()
    b[2:4, 3:6] = 90
    fig = P.difference_figure(a, b, "diff")
    data = fig.axes[0].images[0].get_array()
    assert data.shape == (8, 10) and data.max() == 90 and data[0, 0] == 0
    bars = P.layer_density_figure([0.5, None, 1.0]).axes[0].patches
    assert [bar.get_height() for bar in bars][::2] == [0.5, 1.0] and math.isnan(bars[1].get_height())
    assert torch.is_tensor(torch.zeros(1))  # torch stays importable next to the Agg canvas
