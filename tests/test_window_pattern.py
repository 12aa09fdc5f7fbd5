"""FreeSwim's inward window (spec freeswim.md §2.2, §5) against a brute-force twin written from the spec text: the
worked example, window sizes, the truncated ablation, temporal windows, text, token orders, exact block
classification, composition with radial, the token predicates on the torch / flex backends, and the CLI."""
from __future__ import annotations

import pickle
import time

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vidattn.kernels import BlockPattern, WindowPredicate, available_backends, sparse_attention
from vidattn.kernels.predicates import PermutedPredicate, TemporalWindowPredicate
from vidattn.kernels.reference import reference_attention
from vidattn.layout import TextSegment, TokenLayout
from vidattn.patterns import radial_pattern
from vidattn.patterns import window as window_module
from vidattn.patterns.window import window_bounds, window_pattern, window_token_density
from vidattn.token_order import order_permutation

pytestmark = pytest.mark.filterwarnings("ignore:.*flex_attention called without torch.compile.*")


# ---------------------------------------------------------------------------------------------------- spec twin
def spec_axis(n: int, d: int, inward: bool) -> np.ndarray:
    """bool ``(n, n)``: ``[q, k]`` kept along one axis, spec §2.2 line by line."""
    keep = np.zeros((n, n), dtype=bool)
    for q in range(n):
        if inward:
            k_len = min(2 * d + 1, n)
            start = min(max(q - d, 0), n - k_len)
            for k in range(n):
                keep[q, k] = start <= k <= start + k_len - 1
        else:
            for k in range(n):
                keep[q, k] = q - d <= k <= q + d
    return keep


def upstream_axis(n: int, d: int, inward: bool) -> np.ndarray:
    """Upstream's arithmetic form: [q - d - ext_near, q + d + ext_far] with the extensions 0 when truncated."""
    keep = np.zeros((n, n), dtype=bool)
    for q in range(n):
        far = max(0, d - q) if inward else 0
        near = max(0, d + q - n + 1) if inward else 0
        for k in range(n):
            keep[q, k] = q - d - near <= k <= q + d + far
    return keep


def spec_mask(layout: TokenLayout, base_rows: int, base_cols: int, inward: bool = True,
              temporal: int | None = None) -> np.ndarray:
    """bool ``(S, S)`` token mask in ``layout.order``: video pairs keep the window, pairs with text are kept."""
    f, h, w = layout.frames, layout.height, layout.width
    my, mx = spec_axis(h, base_rows // 2, inward), spec_axis(w, base_cols // 2, inward)
    mt = np.ones((f, f), dtype=bool) if temporal is None else spec_axis(f, temporal, inward)
    n, v0 = layout.video_tokens, layout.video_start
    found = order_permutation(layout.order, f, h, w)
    raster = np.arange(n) if found is None else found[0].numpy()  # raster index of each video position
    t, y, x = raster // (h * w), raster % (h * w) // w, raster % w
    mask = np.ones((layout.seq_len, layout.seq_len), dtype=bool)
    mask[v0:v0 + n, v0:v0 + n] = mt[t][:, t] & my[y][:, y] & mx[x][:, x]
    return mask


def dense(pattern: BlockPattern) -> np.ndarray:
    return pattern.to_dense()[0, 0].numpy()


def assert_blocks_exact(pattern: BlockPattern, truth: np.ndarray) -> None:
    """Listed blocks hold a kept pair, full blocks hold only kept pairs, partial ones hold both kinds."""
    b, s = pattern.block_q, truth.shape[0]
    nb = -(-s // b)
    listed = pattern.block_bitmap()[0, 0].numpy()
    part = pattern.partial_bitmap()[0, 0].numpy()
    for i in range(nb):
        for j in range(nb):
            tile = truth[i * b:(i + 1) * b, j * b:(j + 1) * b]
            assert listed[i, j] == tile.any(), (i, j)
            if listed[i, j]:
                assert part[i, j] == (not tile.all()), (i, j)


# ---------------------------------------------------------------------------------------------------- the spec text
def test_axis_rule_matches_upstream_arithmetic_and_window_starts():
    for n in range(1, 12):
        for d in range(0, 7):
            for inward in (True, False):
                spec = spec_axis(n, d, inward)
                assert np.array_equal(spec, upstream_axis(n, d, inward))
                lo, hi = window_bounds(n, d, inward)
                k = np.arange(n)
                assert np.array_equal(spec, (k[None] >= lo.numpy()[:, None]) & (k[None] <= hi.numpy()[:, None]))


@pytest.mark.parametrize("query, rows, cols", [
    ((0, 0), (0, 2), (0, 4)),   # corner: shifted down and right, still 3x5
    ((0, 3), (0, 2), (1, 5)),   # top edge: shifted down only
    ((2, 4), (1, 3), (2, 6)),   # interior: centred
    ((5, 7), (3, 5), (3, 7)),   # bottom-right corner: shifted up and left
    ((3, 1), (2, 4), (0, 4)),   # left edge: shifted right
])
def test_worked_example_table(query, rows, cols):
    layout = TokenLayout(1, 6, 8)
    mask = dense(window_pattern(layout, base_rows=3, base_cols=4, block_size=8))  # d_h = 1, d_w = 2
    y, x = query
    kept = mask[y * 8 + x].reshape(6, 8)
    expected = np.zeros((6, 8), dtype=bool)
    expected[rows[0]:rows[1] + 1, cols[0]:cols[1] + 1] = True
    assert np.array_equal(kept, expected)


@pytest.mark.parametrize("frames, h, w, base_rows, base_cols", [(2, 6, 8, 2, 4), (3, 5, 9, 30, 4), (1, 9, 4, 4, 52),
                                                                (2, 7, 7, 6, 6)])
def test_every_query_sees_exactly_the_clamped_window_per_frame(frames, h, w, base_rows, base_cols):
    layout = TokenLayout(frames, h, w)
    mask = dense(window_pattern(layout, base_rows=base_rows, base_cols=base_cols, block_size=16))
    kh, kw = min(2 * (base_rows // 2) + 1, h), min(2 * (base_cols // 2) + 1, w)
    per_frame = mask.reshape(frames * h * w, frames, h, w)
    rows = per_frame.any(3).sum(2)   # (queries, frames): distinct rows kept in each frame
    cols = per_frame.any(2).sum(2)
    assert (rows == kh).all() and (cols == kw).all()
    assert (per_frame.sum((2, 3)) == kh * kw).all()  # a full rectangle in every frame
    assert window_token_density(layout, base_rows=base_rows, base_cols=base_cols) == pytest.approx(
        kh * kw / (h * w))
    assert mask.mean() == pytest.approx(kh * kw / (h * w))


def test_truncated_differs_only_at_borders():
    layout = TokenLayout(2, 9, 12)
    inward = dense(window_pattern(layout, base_rows=4, base_cols=6, block_size=32))
    truncated = dense(window_pattern(layout, base_rows=4, base_cols=6, inward=False, block_size=32))
    assert np.array_equal(truncated, spec_mask(layout, 4, 6, inward=False))
    differs = (inward != truncated).any(1).reshape(2, 9, 12)
    y, x = np.meshgrid(np.arange(9), np.arange(12), indexing="ij")
    interior = (y >= 2) & (y <= 6) & (x >= 3) & (x <= 8)
    assert not differs[:, interior].any()
    assert differs[:, ~interior].all()  # every border query loses part of its window when truncated
    assert (truncated <= inward).all()  # truncation only removes keys


# ---------------------------------------------------------------------------------------------------- brute force
@pytest.mark.parametrize("layout, base_rows, base_cols, inward, temporal, block", [
    (TokenLayout(2, 6, 8), 2, 4, True, None, 8),                                        # corners, edges, interior
    (TokenLayout(3, 3, 5), 30, 52, True, None, 16),                                     # axes shorter than window
    (TokenLayout(2, 3, 10), 30, 4, False, None, 7),                                     # truncated, short rows
    (TokenLayout(5, 4, 4), 2, 2, True, 1, 16),                                          # temporal, inward
    (TokenLayout(5, 4, 4), 2, 2, False, 1, 16),                                         # temporal, truncated
    (TokenLayout(4, 3, 3), 2, 2, True, 9, 5),                                           # temporal > frames
    (TokenLayout(2, 5, 6, text=TextSegment(7, "first")), 2, 4, True, None, 16),         # text first
    (TokenLayout(2, 5, 6, text=TextSegment(9, "last")), 2, 4, True, 0, 16),             # text last, t = 0
    (TokenLayout(2, 6, 8, order="tiles2x4"), 2, 4, True, None, 8),                      # tiled order
    (TokenLayout(2, 7, 9, text=TextSegment(5, "first"), order="tiles3x4"), 4, 2, False, 1, 16),
    (TokenLayout(2, 6, 8, order="gilbert"), 2, 4, True, None, 16),                      # any order works
])
def test_matches_spec_twin(layout, base_rows, base_cols, inward, temporal, block):
    pattern = window_pattern(layout, base_rows=base_rows, base_cols=base_cols, inward=inward, temporal=temporal,
                             block_size=block)
    truth = spec_mask(layout, base_rows, base_cols, inward, temporal)
    assert np.array_equal(dense(pattern), truth)
    assert_blocks_exact(pattern, truth)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(frames=st.integers(1, 3), h=st.integers(1, 7), w=st.integers(1, 9), base_rows=st.integers(1, 10),
       base_cols=st.integers(1, 12), inward=st.booleans(), temporal=st.sampled_from([None, 0, 1, 3]),
       text=st.sampled_from([None, ("first", 3), ("last", 11)]),
       order=st.sampled_from(["raster", "tiles2x3", "tiles4x4", "tiles1x5", "gilbert"]),
       block=st.sampled_from([1, 4, 7, 16, 32]))
def test_matches_spec_twin_hypothesis(frames, h, w, base_rows, base_cols, inward, temporal, text, order, block):
    layout = TokenLayout(frames, h, w, text=None if text is None else TextSegment(text[1], text[0]), order=order)
    pattern = window_pattern(layout, base_rows=base_rows, base_cols=base_cols, inward=inward, temporal=temporal,
                             block_size=block)
    truth = spec_mask(layout, base_rows, base_cols, inward, temporal)
    assert np.array_equal(dense(pattern), truth)
    assert_blocks_exact(pattern, truth)


@pytest.mark.parametrize("layout, temporal", [(TokenLayout(3, 7, 9, text=TextSegment(4, "first"), order="tiles2x3"), 1),
                                              (TokenLayout(2, 6, 11, order="gilbert"), None)])
def test_chunked_build_is_identical(monkeypatch, layout, temporal):
    """Tiny chunks exercise the loops over query-block chunks and interval chunks of large builds."""
    window_module._build.cache_clear()
    monkeypatch.setattr(window_module, "_CELLS_PER_CHUNK", 40)
    monkeypatch.setattr(window_module, "_INTERVALS_PER_CHUNK", 5)
    pattern = window_pattern(layout, base_rows=4, base_cols=6, temporal=temporal, block_size=8)
    window_module._build.cache_clear()
    truth = spec_mask(layout, 4, 6, True, temporal)
    assert np.array_equal(dense(pattern), truth)
    assert_blocks_exact(pattern, truth)


def test_predicate_classes():
    layout = TokenLayout(2, 6, 8, order="tiles2x4")
    p = window_pattern(layout, base_rows=2, base_cols=4, block_size=8)
    assert isinstance(p.predicate, PermutedPredicate) and isinstance(p.predicate.base, WindowPredicate)
    p = window_pattern(TokenLayout(3, 6, 8), base_rows=2, base_cols=4, temporal=0, block_size=8)
    assert isinstance(p.predicate, TemporalWindowPredicate)
    p = window_pattern(TokenLayout(3, 6, 8), base_rows=2, base_cols=4, block_size=8)
    assert type(p.predicate) is WindowPredicate  # the one the Triton kernel evaluates in-kernel
    # A window covering the whole grid has no partial block, hence no predicate.
    p = window_pattern(TokenLayout(2, 3, 4), base_rows=8, base_cols=8, block_size=8)
    assert p.partial is None and p.predicate is None and p.density() == 1.0
    # Out-of-range indices (padded tails of some kernels) are clamped, not read out of bounds.
    pred = window_pattern(layout, base_rows=2, base_cols=4, block_size=8).predicate
    assert pred(torch.tensor([layout.seq_len + 5]), torch.tensor([0])).shape == (1,)


# ---------------------------------------------------------------------------------------------------- composition
@pytest.mark.parametrize("layout, block", [(TokenLayout(4, 4, 6), 8), (TokenLayout(5, 3, 8), 16),
                                           (TokenLayout(3, 4, 5, text=TextSegment(6, "last")), 8),
                                           (TokenLayout(3, 4, 5, text=TextSegment(6, "first")), 16)])
def test_composes_with_radial(layout, block):
    window = window_pattern(layout, base_rows=2, base_cols=4, block_size=block)
    radial = radial_pattern(layout, block_size=block, sink_frames=0, decimation_threshold=8)
    both = window & radial
    truth = spec_mask(layout, 2, 4) & dense(radial)
    assert np.array_equal(dense(both), truth)
    assert np.array_equal(dense(radial & window), truth)
    assert both.density() <= min(window.density(), radial.density()) + 1e-12


def test_kv_lens_added_by_callers():
    layout = TokenLayout(2, 4, 4, text=TextSegment(6, "last", valid=(3, 6)))
    p = window_pattern(layout, base_rows=2, base_cols=2, block_size=8)
    assert p.kv_lens is None
    assert p is window_pattern(layout.without_valid(), base_rows=2, base_cols=2, block_size=8)  # cached
    masked = p.with_kv_lens(torch.tensor(layout.key_lengths())).to_dense(batch=2)
    truth = torch.from_numpy(spec_mask(layout, 2, 2))
    assert torch.equal(masked[1, 0], truth)
    assert torch.equal(masked[0, 0], truth & (torch.arange(layout.seq_len) < 32 + 3)[None])


def test_cache_and_pickle():
    layout = TokenLayout(2, 6, 8, order="tiles2x4")
    a = window_pattern(layout, base_rows=2, base_cols=4, block_size=8)
    assert a is window_pattern(layout, base_rows=3, base_cols=5, block_size=8)  # same half sizes
    assert a is not window_pattern(layout, base_rows=2, base_cols=4, block_size=8, inward=False)
    b = pickle.loads(pickle.dumps(a))
    assert torch.equal(a.to_dense(), b.to_dense())


@pytest.mark.parametrize("knobs, name", [
    (dict(base_rows=0, base_cols=4), "base_rows"), (dict(base_rows=2, base_cols=2.0), "base_cols"),
    (dict(base_rows=True, base_cols=4), "base_rows"), (dict(base_rows=2, base_cols=4, temporal=-1), "temporal"),
    (dict(base_rows=2, base_cols=4, block_size=0), "block_size"), (dict(base_rows=2, base_cols=4, inward=1), "inward"),
])
def test_invalid_knobs_name_the_parameter(knobs, name):
    with pytest.raises(ValueError, match=name):
        window_pattern(TokenLayout(1, 4, 4), **knobs)
    with pytest.raises(ValueError, match="layout"):
        window_pattern((1, 4, 4), base_rows=2, base_cols=2)


# ---------------------------------------------------------------------------------------------------- backends
@pytest.mark.parametrize("layout, temporal", [
    (TokenLayout(3, 6, 8, text=TextSegment(5, "first"), order="tiles2x4"), None),
    (TokenLayout(3, 6, 8, text=TextSegment(5, "last"), order="tiles3x4"), 1),
    (TokenLayout(4, 5, 6), 1),
])
def test_backends_match_reference(layout, temporal):
    pattern = window_pattern(layout, base_rows=2, base_cols=4, temporal=temporal, block_size=16)
    assert pattern.partial is not None
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, layout.seq_len, 16, generator=g) for _ in range(3))
    ref, ref_lse = reference_attention(q, k, v, pattern, return_lse=True)
    truth = torch.from_numpy(spec_mask(layout, 2, 4, True, temporal))
    assert torch.allclose(ref, torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=truth), atol=1e-5)
    backends = [b for b in available_backends("cpu") if b in ("torch", "flex")]
    assert "torch" in backends
    for name in backends:
        out, lse = sparse_attention(q, k, v, pattern, backend=name, return_lse=True)
        assert (out - ref).abs().max().item() <= 1e-5, name
        assert (lse - ref_lse).abs().max().item() <= 1e-4, name
    if "flex" in backends:
        from vidattn.kernels.flex_backend import flex_sparse_attention

        out, _ = flex_sparse_attention(q, k, v, pattern, compiled=False)
        assert (out - ref).abs().max().item() <= 1e-5
    if "triton" in available_backends("cpu"):  # interpreter: in-kernel predicates run, the others are refused
        try:
            out = sparse_attention(q, k, v, pattern, backend="triton")
        except NotImplementedError as err:
            assert "WindowPredicate" in str(err) and not isinstance(pattern.predicate, WindowPredicate)
        else:
            assert (out - ref).abs().max().item() <= 1e-4


def test_compiled_flex_reads_permuted_coordinates():
    if "flex" not in available_backends("cpu"):
        pytest.skip("FlexAttention is not available")
    layout = TokenLayout(2, 6, 8, text=TextSegment(5, "first"), order="tiles2x4")
    pattern = window_pattern(layout, base_rows=2, base_cols=4, temporal=0, block_size=16)
    assert isinstance(pattern.predicate, PermutedPredicate)
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, layout.seq_len, 16, generator=g) for _ in range(3))
    ref, _ = reference_attention(q, k, v, pattern)
    with torch.no_grad():
        out, _ = sparse_attention(q, k, v, pattern, backend="flex"), None
    assert (out - ref).abs().max().item() <= 1e-5


# ---------------------------------------------------------------------------------------------------- geometry
def test_tiles_lower_block_density_at_a_realistic_geometry():
    """2 x 68 x 120 latents (1088x1920 on Wan), 480x832 base (30 x 52), block 128; numbers in the report."""
    raster = window_pattern(TokenLayout(2, 68, 120), base_rows=30, base_cols=52)
    tiled = window_pattern(TokenLayout(2, 68, 120, order="tiles8x16"), base_rows=30, base_cols=52)
    token = window_token_density(TokenLayout(2, 68, 120), base_rows=30, base_cols=52)
    assert token == pytest.approx(31 * 53 / (68 * 120))
    assert token < tiled.density() < raster.density()
    assert raster.density() == pytest.approx(0.4806, abs=5e-4)
    assert tiled.density() == pytest.approx(0.3957, abs=5e-4)  # whole tiles first, edge tiles last
    assert tiled.partial_bitmap().sum() < raster.partial_bitmap().sum()


def test_1080p_builds_fast():
    layout = TokenLayout(21, 68, 120)
    window_module._build.cache_clear()
    began = time.perf_counter()
    pattern = window_pattern(layout, base_rows=30, base_cols=52)
    elapsed = time.perf_counter() - began
    assert pattern.num_q_blocks == 1339
    assert elapsed < 20, elapsed
    assert pattern.density() == pytest.approx(0.4808, abs=5e-4)
    window_module._build.cache_clear()


# ---------------------------------------------------------------------------------------------------- CLI
def _cli(argv: list[str]) -> int:
    from vidattn.cli import main

    return main(argv)


def test_mask_window_command(tmp_path, capsys):
    from PIL import Image

    png = tmp_path / "window.png"
    assert _cli(["mask", "window", "--frames", "5", "--height", "1088", "--width", "1920", "--base-height", "480",
                 "--base-width", "832", "--tiles", "8x16", "--png", str(png)]) == 0
    out = capsys.readouterr().out
    assert "2 frames x 68 x 120" in out
    assert "31 x 53 cells over all 2 frames" in out
    assert "token density    0.2013" in out
    assert "raster           block density 0.4806" in out
    assert "tiles 8x16       block density 0.3957" in out
    assert "built in" in out
    with Image.open(png) as image:
        assert image.size[0] >= 900 and image.size[1] >= 400  # mask with frame axes and the distance curve
    assert _cli(["mask", "window", "--frames", "17", "--height", "512", "--width", "704", "--base-height", "256",
                 "--base-width", "352", "--model", "ltx", "--temporal", "0", "--no-inward"]) == 0
    out = capsys.readouterr().out
    assert "3 frames x 16 x 22" in out and "9 x 11 cells over 1 of 3 frames" in out and "truncated" in out


@pytest.mark.parametrize("extra, option", [
    (["--height", "1080"], "--height"), (["--frames", "80"], "--frames"), (["--base-height", "470"], "--base-height"),
    (["--base-width", "0"], "--base-width"), (["--tiles", "8y16"], "--tiles"), (["--tiles", "0x16"], "--tiles"),
    (["--temporal", "-1"], "--temporal"), (["--block-size", "0"], "--block-size"),
    (["--model", "ltx", "--width", "1936"], "--width"),
])
def test_mask_window_command_errors(extra, option, capsys):
    argv = {"--frames": "9", "--height": "256", "--width": "320", "--base-height": "128", "--base-width": "160"}
    for i in range(0, len(extra), 2):
        argv[extra[i]] = extra[i + 1]
    flat = ["mask", "window"] + [x for kv in argv.items() for x in kv]
    assert _cli(flat) == 2
    err = capsys.readouterr().err
    assert err.startswith("vidattn mask window: error: argument " + option) and err.count("\n") == 1, err


def test_mask_window_help(capsys):
    with pytest.raises(SystemExit) as done:
        _cli(["mask", "window", "--help"])
    assert done.value.code == 0
    assert "--base-height" in capsys.readouterr().out
