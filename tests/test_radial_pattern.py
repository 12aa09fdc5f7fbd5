"""Radial Attention's block mask (spec radial.md §2.2-§2.4) against a literal per-frame-pair twin, the §2.3 toy,
the log-growth law, validation, the ``vidattn mask radial`` command, a large build and ragged tails."""
from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vidattn.kernels import BlockPattern
from vidattn.layout import TextSegment, TokenLayout
from vidattn.patterns import RadialStats, radial_pattern, radial_stats
from vidattn.patterns import radial as radial_module
from vidattn.patterns.radial import MODEL_GEOMETRY, GeometryError


# ---------------------------------------------------------------------------------------------------- literal twin
def spec_block_mask(layout: TokenLayout, *, decay: float, block: int, sink: int, d1_full: bool, thr: float,
                    literal: bool = False) -> np.ndarray:
    """Spec §2.2 followed line by line: a token mask per frame pair, shrunk by the density vote, OR-ed in.

    ``literal``: upstream's canvas (``ceil(s/B)`` tiles from the frame's first block, columns' density over ``B``
    rows). Otherwise spec §2.2a: the pair's token mask at its real place in the sequence, voted on every block it
    touches, with the column density taken over the query frame's own rows in that block.
    """
    f, s, B = layout.frames, layout.tokens_per_frame, block
    S, v0, n = layout.seq_len, layout.video_start, layout.video_tokens

    def bl(x: int) -> int:
        return int(x).bit_length()

    P = 2 ** bl(s)

    def half_width(d: int) -> float:
        if d == 0:
            return s
        if d == 1:
            return s if d1_full else s // 2
        return max(P / 2 ** bl(d) * decay, B)

    def pair_kept(d: int) -> bool:
        if d <= 1:
            return True
        w0 = P / 2 ** bl(d)
        return w0 >= thr or d % int(thr / w0) == 0

    def vote(tile: np.ndarray, rows: int) -> bool:
        col_den = tile.sum(0) / rows
        nonzero = int((col_den > 0).sum())
        return nonzero > 0 and int((col_den > 1 / 3).sum()) / nonzero > 0.6

    nb = math.ceil(S / B)
    mask = np.zeros((nb, nb), dtype=bool)
    if layout.text_tokens:
        t0 = layout.text_start
        first, last = t0 // B, (t0 + layout.text_tokens - 1) // B
        mask[first:last + 1, :] = True
        mask[:, first:last + 1] = True
    k = np.arange(s)
    c = math.ceil(s / B)
    for i in range(f):
        for j in range(f):
            d = abs(i - j)
            if j < sink:
                local = np.ones((s, s), dtype=bool)
            else:
                local = (np.abs(k[:, None] - k[None, :]) <= half_width(d)) & pair_kept(d)
            gi, gj = v0 + i * s, v0 + j * s
            if literal:
                ro, co = gi % B, gj % B
                canvas = np.zeros((ro + c * B, co + c * B), dtype=bool)
                canvas[ro:ro + s, co:co + s] = local
                r0, c0 = gi // B, gj // B
                for bi in range(min(c, nb - r0)):
                    for bj in range(min(c, nb - c0)):
                        tile = canvas[bi * B:(bi + 1) * B, bj * B:(bj + 1) * B]
                        mask[r0 + bi, c0 + bj] |= vote(tile, B)
                continue
            tok = np.zeros((nb * B, nb * B), dtype=bool)
            tok[gi:gi + s, gj:gj + s] = local
            for bi in range(gi // B, (gi + s - 1) // B + 1):
                rows = min((bi + 1) * B, gi + s) - max(bi * B, gi)
                for bj in range(gj // B, (gj + s - 1) // B + 1):
                    mask[bi, bj] |= vote(tok[bi * B:(bi + 1) * B, bj * B:(bj + 1) * B], rows)
    assert n == f * s
    return mask


def bitmap(pattern: BlockPattern) -> np.ndarray:
    return pattern.block_bitmap()[0, 0].numpy()


def layout_of(frames: int, height: int, width: int, text: int = 0, position: str = "last") -> TokenLayout:
    return TokenLayout(frames, height, width, text=TextSegment(text, position) if text else None)


# ---------------------------------------------------------------------------------------------------- (a) twin
CASES = [  # frames, height, width, text, position, block, thr, d1_full, sink, decay
    (8, 4, 4, 0, "last", 4, 4, True, 1, 1.0),        # block-aligned frames
    (9, 5, 3, 0, "last", 4, 4, True, 0, 0.5),        # s = 15: misaligned
    (12, 3, 7, 0, "last", 8, 8, False, 1, 0.2),      # misaligned, half-width d = 1
    (7, 6, 5, 10, "first", 8, 16, True, 1, 1.0),     # text first shifts every frame
    (10, 4, 5, 13, "last", 16, 16, True, 0, 0.5),    # text last, ragged tail
    (20, 2, 3, 0, "last", 16, 128, True, 1, 1.0),    # s < B: many frames per block; THR = 128 decimates
    (18, 4, 4, 0, "last", 4, 4, False, 0, 0.2),      # decimation at d >= 8
]


@pytest.mark.parametrize("frames,height,width,text,position,block,thr,d1_full,sink,decay", CASES)
def test_matches_literal_spec_cases(frames, height, width, text, position, block, thr, d1_full, sink, decay):
    layout = layout_of(frames, height, width, text, position)
    got = radial_pattern(layout, decay=decay, block_size=block, sink_frames=sink, d1_full=d1_full,
                         decimation_threshold=thr)
    want = spec_block_mask(layout, decay=decay, block=block, sink=sink, d1_full=d1_full, thr=thr)
    np.testing.assert_array_equal(bitmap(got), want)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(frames=st.integers(1, 20), height=st.integers(1, 6), width=st.integers(1, 7),
       text=st.sampled_from([(0, "last"), (1, "first"), (7, "first"), (26, "first"), (3, "last"), (19, "last")]),
       block=st.sampled_from([4, 8, 16]), thr=st.sampled_from([4, 8, 16, 32, 128]), d1_full=st.booleans(),
       sink=st.integers(0, 1), decay=st.sampled_from([1.0, 0.5, 0.2]))
def test_matches_literal_spec_hypothesis(frames, height, width, text, block, thr, d1_full, sink, decay):
    layout = layout_of(frames, height, width, *text)
    got = radial_pattern(layout, decay=decay, block_size=block, sink_frames=sink, d1_full=d1_full,
                         decimation_threshold=thr)
    want = spec_block_mask(layout, decay=decay, block=block, sink=sink, d1_full=d1_full, thr=thr)
    np.testing.assert_array_equal(bitmap(got), want)
    literal = radial_pattern(layout, decay=decay, block_size=block, sink_frames=sink, d1_full=d1_full,
                             decimation_threshold=thr, literal=True)
    np.testing.assert_array_equal(bitmap(literal), spec_block_mask(layout, decay=decay, block=block, sink=sink,
                                                                   d1_full=d1_full, thr=thr, literal=True))
    if layout.video_start % block == 0 and layout.tokens_per_frame % block == 0:
        np.testing.assert_array_equal(want, bitmap(literal))  # block-aligned frames: the two rules agree


def test_ragged_tail_votes_over_existing_rows():
    """S = 33, B = 16: one tail token. The literal vote (over B rows) drops it from every pair; ours keeps its
    frame's blocks, so the tail query attends like its neighbours instead of nothing."""
    layout = TokenLayout(1, 3, 11)
    knobs = dict(decay=1.0, block=16, sink=0, d1_full=True, thr=16)
    literal = spec_block_mask(layout, literal=True, **knobs)
    assert not literal[-1].any()
    got = bitmap(radial_pattern(layout, block_size=16, decimation_threshold=16))
    assert got[-1].all() and got.all()


def test_frames_smaller_than_a_third_of_a_block_still_attend():
    """s = 4 tokens per frame, B = 16: no pair reaches the 1/3 column density, so the literal mask is empty."""
    layout = TokenLayout(6, 2, 2)
    knobs = dict(decay=1.0, block=16, sink=1, d1_full=True, thr=16)
    assert not spec_block_mask(layout, literal=True, **knobs).any()
    got = radial_pattern(layout, block_size=16, sink_frames=1, decimation_threshold=16)
    assert bitmap(got).diagonal().all()
    assert got.to_dense()[0, 0].any(1).all()


def test_pattern_equals_from_block_mask_and_stats_agree():
    layout = layout_of(9, 5, 3, 13, "last")
    got = radial_pattern(layout, block_size=8, sink_frames=1, decimation_threshold=8)
    ref = BlockPattern.from_block_mask(got.block_bitmap()[0, 0], q_len=layout.seq_len, kv_len=layout.seq_len,
                                       block_q=8, block_kv=8)
    assert torch.equal(got.indptr, ref.indptr) and torch.equal(got.indices, ref.indices)
    stats = radial_stats(layout, got)
    assert stats.total_density == pytest.approx(got.density())
    assert stats.keys_per_query == pytest.approx(got.keys_per_query())
    dense = got.to_dense()[0, 0]
    video = slice(layout.video_start, layout.video_start + layout.video_tokens)
    assert stats.video_density == pytest.approx(dense[video, video].float().mean().item())


def test_cached_per_layout_without_valid_lengths():
    a = TokenLayout(6, 4, 4, text=TextSegment(8, "last", valid=(3, 8)))
    b = TokenLayout(6, 4, 4, text=TextSegment(8, "last", valid=(8, 1)))
    p = radial_pattern(a, block_size=4, sink_frames=1, decimation_threshold=4)
    assert radial_pattern(b, block_size=4, sink_frames=1, decimation_threshold=4) is p
    assert radial_pattern(b, block_size=4, sink_frames=0, decimation_threshold=4) is not p
    assert radial_pattern(a, block_size=4, decimation_threshold=4) is \
        radial_pattern(a, block_size=4, sink_frames=0, decimation_threshold=4)


# ---------------------------------------------------------------------------------------------------- (b) §2.3 toy
TOY_ROWS = {  # query block -> key frames 0..7, four key blocks each (spec §2.3, with the frame-0 sink)
    0: "#### #### ###. ###. ##.. ##.. ##.. ##..",
    1: "#### #### #### #### ###. ###. ###. ###.",
    2: "#### #### #### #### .### .### .### .###",
    3: "#### #### .### .### ..## ..## ..## ..##",
    4: "#### #### #### ###. ###. ##.. ##.. ##..",
    5: "#### #### #### #### #### ###. ###. ###.",
    6: "#### #### #### #### #### .### .### .###",
    7: "#### #### #### .### .### ..## ..## ..##",
    12: "#### ###. #### #### #### ###. ###. ##..",
    15: "#### .### #### #### #### .### .### ..##",
    28: "#### ##.. ##.. ##.. ###. ###. #### ####",
    31: "#### ..## ..## ..## .### .### #### ####",
}


def _row(mask: np.ndarray, q: int) -> str:
    return " ".join("".join("#" if x else "." for x in mask[q, 4 * g:4 * g + 4]) for g in range(8))


def test_toy_example_rows_and_density():
    layout = TokenLayout(8, 4, 4)
    with_sink = bitmap(radial_pattern(layout, block_size=4, sink_frames=1, decimation_threshold=4))
    without = bitmap(radial_pattern(layout, block_size=4, sink_frames=0, decimation_threshold=4))
    assert with_sink.shape == (32, 32)
    for q, row in TOY_ROWS.items():
        assert _row(with_sink, q) == row, q
    # Without the sink, frame-0 keys follow the band like every other frame (q12: d = 3, q28: d = 7).
    assert _row(without, 12).split()[0] == "###." and _row(without, 28).split()[0] == "##.."
    assert round(with_sink.mean(), 3) == 0.867
    assert round(without.mean(), 3) == 0.840


def test_toy_decimation_with_sixteen_frames():
    mask = bitmap(radial_pattern(TokenLayout(16, 4, 4), block_size=4, sink_frames=0, decimation_threshold=4))
    q = slice(15 * 4, 16 * 4)
    for d in range(8, 16):
        kept = mask[q, (15 - d) * 4:(16 - d) * 4].any()
        assert kept == (d % 2 == 0), d


# ---------------------------------------------------------------------------------------------------- (c) growth
def test_keys_per_query_grow_like_log_frames():
    frames = [8, 12, 16, 24, 32, 48, 64, 96, 128]
    keys, density = [], []
    for f in frames:
        layout = TokenLayout(f, 32, 32)
        stats = radial_stats(layout, radial_pattern(layout, sink_frames=0))
        keys.append(stats.video_keys_per_query)
        density.append(stats.video_density)
    x = np.log2(frames)
    design = np.stack([np.ones_like(x), x], 1)
    coef, *_ = np.linalg.lstsq(design, np.array(keys), rcond=None)
    fit = design @ coef
    r2 = 1 - ((keys - fit) ** 2).sum() / ((keys - np.mean(keys)) ** 2).sum()
    assert coef[1] > 0 and r2 > 0.95, (coef, r2)
    assert all(a > b for a, b in zip(density, density[1:])), density
    assert keys[-1] / keys[0] < 0.5 * frames[-1] / frames[0]  # far from linear growth


# ---------------------------------------------------------------------------------------------------- (d) validation
@pytest.mark.parametrize("knobs,name", [
    (dict(decay=0.0), "decay"), (dict(decay=-1.0), "decay"), (dict(decay=float("inf")), "decay"),
    (dict(decay=float("nan")), "decay"), (dict(decay="1"), "decay"), (dict(decay=True), "decay"),
    (dict(block_size=0), "block_size"), (dict(block_size=1.5), "block_size"), (dict(block_size=True), "block_size"),
    (dict(decimation_threshold=0), "decimation_threshold"), (dict(decimation_threshold=-8), "decimation_threshold"),
    (dict(sink_frames=-1), "sink_frames"), (dict(sink_frames=5), "sink_frames"), (dict(sink_frames=1.0), "sink_frames"),
    (dict(d1_full=1), "d1_full"),
])
def test_invalid_knobs_name_the_parameter(knobs, name):
    with pytest.raises(ValueError, match=name):
        radial_pattern(TokenLayout(4, 2, 2), **knobs)


def test_invalid_layout_and_geometry():
    with pytest.raises(ValueError, match="layout"):
        radial_pattern((4, 2, 2))
    wan = MODEL_GEOMETRY["wan"]
    assert wan.latent_grid(81, 480, 832) == (21, 30, 52)
    assert MODEL_GEOMETRY["ltx"].latent_grid(121, 512, 704) == (16, 16, 22)
    assert MODEL_GEOMETRY["mochi"].layout(163, 480, 848).text == TextSegment(256, "last")
    assert MODEL_GEOMETRY["cogvideox"].layout(49, 480, 720).video_start == 226
    for args, param in [((80, 480, 832), "frames"), ((81, 470, 832), "height"), ((81, 480, 0), "width")]:
        with pytest.raises(GeometryError, match=param) as err:
            wan.latent_grid(*args)
        assert err.value.param == param
    with pytest.raises(GeometryError, match="text_len"):
        wan.layout(81, 480, 832, text_len=5)


# ---------------------------------------------------------------------------------------------------- (e) command
def _cli(argv: list[str]) -> int:
    from vidattn import cli

    return cli.main(argv)


def test_mask_command_prints_densities_and_writes_png(tmp_path, capsys):
    from PIL import Image

    png = tmp_path / "mask.png"
    assert _cli(["mask", "radial", "--frames", "33", "--height", "160", "--width", "256", "--model", "hunyuan",
                 "--block-size", "64", "--png", str(png)]) == 0
    out = capsys.readouterr().out
    assert "video 1440, text 256 (last), total 1696" in out
    assert "9 frames x 10 x 16" in out
    assert "video-video" in out and "whole sequence" in out and "keys per query" in out
    assert "sparsity" not in out
    with Image.open(png) as image:
        assert image.size[0] >= 900 and image.size[1] >= 400  # mask with frame axes and the distance curve


def test_mask_command_rejects_bad_sizes_and_has_help(capsys):
    assert _cli(["mask", "radial", "--frames", "80", "--height", "480", "--width", "832", "--model", "wan"]) == 2
    assert "--frames" in capsys.readouterr().err
    assert _cli(["mask", "radial", "--frames", "81", "--height", "720", "--width", "832", "--model", "ltx"]) == 2
    assert "--height" in capsys.readouterr().err
    assert _cli(["mask", "radial", "--frames", "81", "--height", "480", "--width", "832", "--model", "wan",
                 "--decay", "0"]) == 2
    assert "--decay" in capsys.readouterr().err
    with pytest.raises(SystemExit) as done:
        _cli(["mask", "radial", "--help"])
    assert done.value.code == 0
    assert "--decimation-threshold" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------- (f) large
def test_large_build_is_fast():
    layout = TokenLayout(128, 60, 60)
    radial_module._build.cache_clear()
    began = time.perf_counter()
    pattern = radial_pattern(layout, sink_frames=1)
    elapsed = time.perf_counter() - began
    assert pattern.num_q_blocks == 3600
    assert elapsed < 20, elapsed
    stats = radial_stats(layout, pattern)
    assert isinstance(stats, RadialStats) and 0 < stats.video_density < 0.2


# ---------------------------------------------------------------------------------------------------- (g) ragged
@pytest.mark.parametrize("text,position", [(0, "last"), (13, "last"), (11, "first")])
def test_ragged_tail_blocks_exist(text, position):
    layout = layout_of(3, 5, 7, text, position)
    pattern = radial_pattern(layout, block_size=16, decimation_threshold=16)
    nb = math.ceil(layout.seq_len / 16)
    assert layout.seq_len % 16 and pattern.num_q_blocks == pattern.num_kv_blocks == nb
    mask = bitmap(pattern)
    assert mask[-1].any() and mask[:, -1].any()
    assert pattern.to_dense()[0, 0, -1, -1]


# ---------------------------------------------------------------------------------------------------- (h) own frame
def _frame_span(layout: TokenLayout, i: int) -> tuple[int, int]:
    start = layout.video_start + i * layout.tokens_per_frame
    return start, start + layout.tokens_per_frame


def _whole_frames(layout: TokenLayout, sink: int, d1_full: bool) -> torch.Tensor:
    """bool ``(S, S)``: the pairs the design attends densely — own frame, sink key frames, adjacent (``d1_full``)."""
    frame = torch.full((layout.seq_len,), -1)
    for i in range(layout.frames):
        a, b = _frame_span(layout, i)
        frame[a:b] = i
    qf, kf = frame[:, None], frame[None, :]
    video = (qf >= 0) & (kf >= 0)
    reach = 1 if d1_full else 0
    return video & (((qf - kf).abs() <= reach) | (kf < sink))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(frames=st.integers(1, 9), height=st.integers(1, 9), width=st.integers(1, 13),
       text=st.sampled_from([(0, "last"), (5, "first"), (77, "first"), (226, "first"), (9, "last"), (130, "last")]),
       block=st.sampled_from([16, 32, 64, 128]), d1_full=st.booleans(), sink=st.integers(0, 1),
       decay=st.sampled_from([1.0, 0.2]), thr=st.sampled_from([16, 128]))
def test_every_query_attends_its_whole_frame(frames, height, width, text, block, d1_full, sink, decay, thr):
    """Spec §2.2a on the token mask: own frame, sink frames and (d1_full) adjacent frames are attended whole."""
    layout = layout_of(frames, height, width, *text)
    pattern = radial_pattern(layout, decay=decay, block_size=block, sink_frames=sink, d1_full=d1_full,
                             decimation_threshold=thr)
    dense = pattern.to_dense()[0, 0]
    required = _whole_frames(layout, sink, d1_full)
    assert bool(dense[required].all()), "a query misses keys of a frame the design attends whole"
    assert bool(dense.any(1).all())


def _worst_coverage(layout: TokenLayout, pattern: BlockPattern, reach: int) -> float:
    """Over all query blocks holding tokens of frame i and key frames j with |i - j| <= reach: the smallest
    fraction of frame j's keys inside the query block's kept blocks (block-level, for sequences too long to expand)."""
    block = pattern.block_q
    kept = pattern.block_bitmap()[0, 0].to(torch.float64)
    s, worst = layout.tokens_per_frame, 1.0
    for i in range(layout.frames):
        a, b = _frame_span(layout, i)
        rows = kept[a // block:(b - 1) // block + 1]
        for j in range(max(0, i - reach), min(layout.frames, i + reach + 1)):
            keys = radial_module._tokens_per_block(kept.shape[0], block, *_frame_span(layout, j)).to(torch.float64)
            worst = min(worst, float((rows @ keys).min()) / s)
    return worst


PUBLISHED = [  # model, frames, height, width (the families' published sizes; docs/benchmarks.md has the table)
    ("wan", 81, 480, 832), ("wan", 69, 768, 1280), ("hunyuan", 117, 768, 1280), ("hunyuan", 129, 720, 1280),
    ("cogvideox", 49, 480, 720), ("cogvideox", 81, 768, 1360), ("ltx", 161, 480, 704), ("ltx", 121, 512, 704),
    ("mochi", 163, 480, 848),
]


@pytest.mark.parametrize("block", [64, 128])
@pytest.mark.parametrize("model,frames,height,width", PUBLISHED)
def test_published_geometries_cover_own_and_adjacent_frames(model, frames, height, width, block):
    geometry = MODEL_GEOMETRY[model]
    layout = geometry.layout(frames, height, width)
    pattern = radial_pattern(layout, block_size=block, sink_frames=geometry.sink_frames)
    assert _worst_coverage(layout, pattern, reach=1) == 1.0
    literal = radial_pattern(layout, block_size=block, sink_frames=geometry.sink_frames, literal=True)
    aligned = layout.video_start % block == 0 and layout.tokens_per_frame % block == 0
    if aligned:
        assert torch.equal(literal.block_bitmap(), pattern.block_bitmap())
    else:  # the corrected rule only adds blocks to upstream's
        assert bool((pattern.block_bitmap() >= literal.block_bitmap()).all())


def test_literal_mask_misses_own_frame_where_frames_spill():
    """The upstream defect the default rule fixes (spec §2.2a): CogVideoX 1.5 at 81x768x1360, text first."""
    layout = MODEL_GEOMETRY["cogvideox"].layout(81, 768, 1360)
    literal = radial_pattern(layout, block_size=128, sink_frames=1, literal=True)
    assert _worst_coverage(layout, literal, reach=0) < 0.5
    with pytest.raises(ValueError, match="literal"):
        radial_pattern(layout, literal=1)
