"""Rectified SpaAttn (spec rectified.md §2.3-§2.8): selection, IPAR, GAPR, R and O_nc against a per-block loop twin
written from the spec text; the rectification identities; the assembled output against a masked dense reference;
backends, dtypes, padded text, validation."""
from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from vidattn.gilbert import block_neighbours, gilbert_order
from vidattn.kernels import available_backends, sparse_attention
from vidattn.patterns.rectified import (RectifiedStats, critical_pattern, rectified_attention,
                                        rectified_selection)

warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")


# ---------------------------------------------------------------------------------------------------- loop twin
def spec_selection(q, k, v, *, grid, drop_rate, top_p, block, neighbours, first_frame, gapr, text_valid, order):
    """Spec §2.3-§2.7 followed line by line, per (sample, head, video query block), in fp32.

    Returns ``(critical, gapr_ok, p_hat, R, O_nc)`` shaped like :class:`RectifiedStats`' fields.
    """
    q, k, v = q.float(), k.float(), v.float()
    bsz, heads, seq, d = q.shape
    frames, rows, cols = grid
    nv = frames * rows * cols
    n, nk = math.ceil(nv / block), math.ceil(seq / block)
    n_text = seq - nv
    joint = n_text > 0
    top_k = int((1 - drop_rate) * n)
    ncols = n + int(joint)
    crit = torch.zeros(bsz, heads, n, nk, dtype=torch.bool)
    ok = torch.zeros(bsz, heads, n, n, dtype=torch.bool)
    p_hat = torch.zeros(bsz, heads, n, ncols)
    R = torch.zeros(bsz, heads, n)
    O_nc = torch.zeros(bsz, heads, n, v.shape[-1])
    tokens = [list(range(m * block, min((m + 1) * block, nv))) for m in range(n)]
    c = torch.tensor([float(len(t)) for t in tokens])
    for b in range(bsz):
        tv = n_text if text_valid is None else int(text_valid[b])
        text_blocks = [j for j in range(nk)
                       if any(nv <= t < nv + tv for t in range(j * block, min((j + 1) * block, seq)))]
        for h in range(heads):
            qb = [q[b, h, t].mean(0) for t in tokens]
            kb = [k[b, h, t].mean(0) for t in tokens]
            vb = [v[b, h, t].mean(0) for t in tokens]
            aq = [(q[b, h, t] - qb[m]).abs().mean(0) for m, t in enumerate(tokens)]
            ak = [(k[b, h, t] - kb[m]).abs().mean(0) for m, t in enumerate(tokens)]
            k_text = k[b, h, nv:nv + tv]
            for i in range(n):
                raw_vid = torch.stack([qb[i] @ kb[m] for m in range(n)])
                raw_txt = k_text @ qb[i]
                P0 = torch.softmax(torch.cat([raw_vid, raw_txt]) / math.sqrt(d), 0)
                Sv, St = c @ P0[:n], P0[n:].sum()       # IPAR with valid counts c_m in place of B
                row = c * P0[:n] / (Sv + St)
                if joint:
                    row = torch.cat([row, (St / (Sv + St))[None]])
                p_hat[b, h, i] = row
                ranked = sorted(range(ncols), key=lambda j: (-float(row[j]), j))
                need = max(int((torch.cumsum(row[ranked], 0) <= top_p).sum()) + 1, top_k)
                for j in ranked[:need]:
                    if j < n:
                        crit[b, h, i, j] = True
                    elif tv > 0:                        # the text column: the block of the first text token
                        crit[b, h, i, nv // block] = True
                if neighbours is not None:
                    for j in range(n):
                        crit[b, h, i, j] |= bool(neighbours[i, j])
                for j in text_blocks:
                    crit[b, h, i, j] = True
                if first_frame == "corner" and i < n // frames:
                    crit[b, h, i, :n // frames] = True
                if first_frame == "frame0":
                    for t in range(nv):
                        if int(order[t]) < rows * cols:
                            crit[b, h, i, t // block] = True
                crit[b, h, i, i] = True
                r_i = row[n] if joint else torch.tensor(0.0)
                o_i = torch.zeros(v.shape[-1])
                for m in range(n):
                    gain, e_q, e_k = abs(qb[i] @ kb[m]), abs(aq[i] @ kb[m]), abs(qb[i] @ ak[m])
                    ok[b, h, i, m] = bool(gain > e_q + e_k)
                    keep = bool(crit[b, h, i, m]) or (gapr and not ok[b, h, i, m])
                    if keep:
                        r_i = r_i + row[m]
                    else:
                        o_i = o_i + row[m] * vb[m]
                R[b, h, i], O_nc[b, h, i] = r_i, o_i
    return crit, ok, p_hat, R, O_nc


# ---------------------------------------------------------------------------------------------------- inputs
GRIDS = [(2, 4, 6), (2, 3, 7), (3, 3, 5), (1, 4, 4)]


def make_qkv(seed, grid, n_text, block, *, batch=2, heads=2, d=8, spread=1.0, scale=1.0, dtype=torch.float32):
    """q, k, v with a per-block mean plus ``spread`` noise (so GAPR decisions go both ways)."""
    g = torch.Generator().manual_seed(seed)
    nv = grid[0] * grid[1] * grid[2]
    seq = nv + n_text
    blk = torch.arange(seq) // block

    def one():
        base = torch.randn(batch, heads, blk.max() + 1, d, generator=g)[:, :, blk]
        return (scale * (base + spread * torch.randn(batch, heads, seq, d, generator=g))).to(dtype)

    return one(), one(), one()


def random_neighbours(seed, n):
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(n, n, generator=g) < 0.3
    return m | m.T


@st.composite
def selection_cases(draw):
    grid = draw(st.sampled_from(GRIDS))
    block = draw(st.sampled_from([8, 16]))
    n_text = draw(st.sampled_from([0, 1, 5, 13, 20]))
    nv = grid[0] * grid[1] * grid[2]
    n = math.ceil(nv / block)
    seed = draw(st.integers(0, 2 ** 16))
    text_valid = None
    if n_text and draw(st.booleans()):
        text_valid = torch.tensor([draw(st.integers(0, n_text)), draw(st.integers(0, n_text))])
    kw = dict(
        grid=grid, block_size=block,
        drop_rate=draw(st.floats(0.0, 0.95)), top_p=draw(st.floats(0.01, 0.95)),
        first_frame=draw(st.sampled_from(["corner", "frame0", "off"])), gapr=draw(st.booleans()),
        neighbours=random_neighbours(seed, n) if draw(st.booleans()) else False,
        text_valid=text_valid, order=torch.randperm(nv, generator=torch.Generator().manual_seed(seed)))
    qkv = make_qkv(seed, grid, n_text, block, spread=draw(st.sampled_from([0.1, 0.5, 1.0])),
                   scale=draw(st.sampled_from([0.5, 1.0, 3.0])))
    return qkv, kw


def spec_of(qkv, kw):
    neighbours = kw["neighbours"] if kw["neighbours"] is not False else None
    return spec_selection(*qkv, grid=kw["grid"], drop_rate=kw["drop_rate"], top_p=kw["top_p"],
                          block=kw["block_size"], neighbours=neighbours, first_frame=kw["first_frame"],
                          gapr=kw["gapr"], text_valid=kw["text_valid"], order=kw["order"])


def assert_matches_spec(stats, expected, gapr):
    crit, ok, p_hat, R, O_nc = expected
    assert stats.critical.shape == crit.shape and torch.equal(stats.critical, crit)
    assert stats.p_hat.dtype == torch.float32
    torch.testing.assert_close(stats.p_hat, p_hat, rtol=1e-5, atol=1e-7)
    if gapr:
        assert torch.equal(stats.gapr_ok, ok)
    else:
        assert stats.gapr_ok is None
    torch.testing.assert_close(stats.R, R, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats.O_nc, O_nc, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------- vs the twin
@settings(max_examples=60, deadline=None, derandomize=True)
@given(selection_cases())
def test_selection_matches_spec_twin(case):
    qkv, kw = case
    stats = rectified_selection(*qkv, **kw)
    assert isinstance(stats, RectifiedStats)
    assert_matches_spec(stats, spec_of(qkv, kw), kw["gapr"])


@pytest.mark.parametrize("grid, block, n_text, text_valid", [
    ((2, 3, 7), 8, 0, None),                        # video only, ragged last block (2 of 8)
    ((2, 3, 7), 16, 13, torch.tensor([13, 0])),     # joint, ragged, one sample without text
    ((2, 4, 6), 16, 20, torch.tensor([3, 17])),     # block-aligned video, text spanning two blocks
])
@pytest.mark.parametrize("gapr", [True, False])
def test_selection_fixed_cases(grid, block, n_text, text_valid, gapr):
    qkv = make_qkv(7, grid, n_text, block, spread=0.5)
    n = math.ceil(grid[0] * grid[1] * grid[2] / block)
    kw = dict(grid=grid, block_size=block, drop_rate=0.5, top_p=0.3, first_frame="corner", gapr=gapr,
              neighbours=random_neighbours(3, n), text_valid=text_valid, order=None)
    stats = rectified_selection(*qkv, **kw)
    assert_matches_spec(stats, spec_of(qkv, kw), gapr)
    # The cases exercise both GAPR outcomes and both keep reasons.
    expected_ok = spec_of(qkv, kw)[1]
    assert expected_ok.any() and (~expected_ok).any()


def test_default_neighbours_and_order_come_from_the_gilbert_curve():
    grid, block = (4, 8, 8), 8                      # 32 blocks: neither rule covers everything
    qkv = make_qkv(11, grid, 5, block, batch=1, spread=0.5)
    kw = dict(grid=grid, block_size=block, drop_rate=0.95, top_p=0.05)
    default = rectified_selection(*qkv, **kw, first_frame="off").critical
    explicit = rectified_selection(*qkv, **kw, first_frame="off", neighbours=block_neighbours(*grid, block))
    without = rectified_selection(*qkv, **kw, first_frame="off", neighbours=False).critical
    assert torch.equal(default, explicit.critical) and not torch.equal(default, without)
    default = rectified_selection(*qkv, **kw, first_frame="frame0", neighbours=False).critical
    explicit = rectified_selection(*qkv, **kw, first_frame="frame0", neighbours=False, order=gilbert_order(*grid))
    assert torch.equal(default, explicit.critical) and not torch.equal(default, without)
    assert not default[..., :32].all()


def test_top_k_is_int_of_the_float_product():
    """Spec §2.5: top_k = int((1 - 0.8) * 900) = 179 (the product is 179.99...), not round() = 180."""
    grid, block = (1, 30, 30), 1
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, 900, 4, generator=g) for _ in range(3))
    stats = rectified_selection(q, k, v, grid=grid, block_size=block, drop_rate=0.8, top_p=1e-9,
                                neighbours=False, first_frame="off")
    top = torch.topk(stats.p_hat[0, 0], 179, dim=-1).indices
    expected = torch.zeros(900, 900, dtype=torch.bool).scatter(-1, top, True)
    expected |= torch.eye(900, dtype=torch.bool)
    assert torch.equal(stats.critical[0, 0], expected)


def test_cumsum_threshold_is_inclusive_and_ties_take_lower_columns():
    """Uniform P̂ = 1/4 (q = 0): cumsum 0.25, 0.5, ... exactly; #{cumsum <= 0.5} + 1 = 3 columns, the lowest ones."""
    q = torch.zeros(1, 1, 32, 4)
    k, v = torch.randn(2, 1, 1, 32, 4, generator=torch.Generator().manual_seed(0))
    stats = rectified_selection(q, k, v, grid=(1, 4, 8), block_size=8, drop_rate=0.99, top_p=0.5,
                                neighbours=False, first_frame="off")
    assert torch.equal(stats.p_hat, torch.full((1, 1, 4, 4), 0.25))
    expected = torch.eye(4, dtype=torch.bool)
    expected[:, :3] = True
    assert torch.equal(stats.critical[0, 0], expected)


def test_first_frame_rules():
    grid, block = (3, 4, 4), 8                      # 48 tokens, 6 blocks, F = 6 // 3 = 2
    qkv = make_qkv(5, grid, 0, block)
    kw = dict(grid=grid, block_size=block, drop_rate=0.0, top_p=1e-9, neighbours=False)
    kw["drop_rate"] = 0.99                          # top_k = 0: one selected block per row
    off = rectified_selection(*qkv, **kw, first_frame="off").critical[0, 0]
    corner = rectified_selection(*qkv, **kw, first_frame="corner").critical[0, 0]
    assert torch.equal(corner, off | torch.block_diag(torch.ones(2, 2, dtype=torch.bool),
                                                      torch.zeros(4, 4, dtype=torch.bool)))
    order = torch.arange(48).flip(0)                # frame-0 tokens (raster < 16) are the last 16: blocks 4, 5
    frame0 = rectified_selection(*qkv, **kw, first_frame="frame0", order=order).critical[0, 0]
    sink = torch.zeros(6, 6, dtype=torch.bool)
    sink[:, 4:] = True
    assert torch.equal(frame0, off | sink)


# ---------------------------------------------------------------------------------------------------- identities
@settings(max_examples=15, deadline=None, derandomize=True)
@given(selection_cases())
def test_rectification_identities(case):
    qkv, kw = case
    stats = rectified_selection(*qkv, **kw)
    nvb = stats.O_nc.shape[2]
    torch.testing.assert_close(stats.p_hat.sum(-1), torch.ones_like(stats.R))
    crit_v = stats.critical[..., :nvb]
    keep = crit_v if stats.gapr_ok is None else crit_v | ~stats.gapr_ok
    compensated = (stats.p_hat[..., :nvb] * ~keep).sum(-1)
    torch.testing.assert_close(stats.R + compensated, torch.ones_like(stats.R))
    assert (stats.R > 0).all() and (stats.R <= 1 + 1e-6).all()
    if kw["gapr"]:                                  # GAPR-rejected blocks are never compensated
        assert not (stats.p_hat[..., :nvb] * (~keep & ~stats.gapr_ok)).any()


def dense_token_mask(critical, block, nv, seq, kv_lens):
    """bool ``[B, H, nv, seq]`` straight from the block bitmap (independent of BlockPattern)."""
    rows, cols = torch.arange(nv) // block, torch.arange(seq) // block
    mask = critical[:, :, rows][..., cols]
    if kv_lens is not None:
        mask = mask & (torch.arange(seq)[None, :] < kv_lens[:, None])[:, None, None, :]
    return mask


def full_attention_probs(q, k, kv_lens):
    logits = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if kv_lens is not None:
        valid = torch.arange(k.shape[2])[None, :] < kv_lens[:, None]
        logits = logits.masked_fill(~valid[:, None, None, :], float("-inf"))
    return torch.softmax(logits, -1)


def test_true_critical_mass_makes_the_sparse_output_exact():
    """Spec §2.7: with R = the true full-attention mass of the critical keys, R·O_spa = critical part of full attn."""
    grid, block, n_text = (2, 3, 7), 8, 13
    q, k, v = make_qkv(21, grid, n_text, block, spread=0.7)
    nv, seq = 42, 42 + n_text
    tv = torch.tensor([9, 0])
    stats = rectified_selection(q, k, v, grid=grid, block_size=block, drop_rate=0.8, top_p=0.2, neighbours=False,
                                text_valid=tv)
    kv_lens = nv + tv
    pattern = critical_pattern(stats.critical, q_len=nv, kv_len=seq, block_size=block, kv_lens=kv_lens)
    mask = dense_token_mask(stats.critical, block, nv, seq, kv_lens)
    assert torch.equal(pattern.to_dense(2), mask)
    o_spa = sparse_attention(q[:, :, :nv], k, v, pattern, backend="torch")
    probs = full_attention_probs(q[:, :, :nv], k, kv_lens)
    true_mass = (probs * mask).sum(-1, keepdim=True)
    torch.testing.assert_close(true_mass * o_spa, (probs * mask) @ v, rtol=1e-5, atol=1e-6)
    assert (true_mass < 1 - 1e-3).any()             # the identity is not trivial: some mass was skipped


# ---------------------------------------------------------------------------------------------------- the output
def expected_output(q, k, v, stats, *, block, nv, kv_lens):
    """Spec §2.7 assembled densely: masked softmax over the critical tokens times R plus O_nc; text rows dense."""
    seq = q.shape[2]
    mask = dense_token_mask(stats.critical, block, nv, seq, kv_lens)
    o_spa = F.scaled_dot_product_attention(q[:, :, :nv].float(), k.float(), v.float(), attn_mask=mask)
    rows = torch.arange(nv) // block
    video = o_spa * stats.R[:, :, rows, None] + stats.O_nc[:, :, rows]
    if seq == nv:
        return video
    text = full_attention_probs(q[:, :, nv:], k, kv_lens) @ v.float()
    return torch.cat([video, text], dim=2)


FLEX = "flex" in available_backends("cpu")


@pytest.mark.parametrize("backend", ["torch", pytest.param("flex", marks=pytest.mark.skipif(
    not FLEX, reason="FlexAttention not available"))])
def test_output_matches_dense_reference_and_backends_agree(backend):
    grid, block, n_text = (2, 3, 7), 16, 13         # 42 video tokens: last video block ragged and mixed with text
    q, k, v = make_qkv(4, grid, n_text, block, spread=0.5)
    tv = torch.tensor([13, 0])
    kw = dict(grid=grid, block_size=block, drop_rate=0.7, top_p=0.3, neighbours=False, text_valid=tv)
    out, stats = rectified_attention(q, k, v, **kw, backend=backend, return_stats=True)
    ref = expected_output(q, k, v, stats, block=block, nv=42, kv_lens=42 + tv)
    assert out.shape == q.shape and out.dtype == q.dtype and torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(out, rectified_attention(q, k, v, **kw, backend="reference"), rtol=1e-5, atol=2e-6)


@settings(max_examples=15, deadline=None, derandomize=True)
@given(selection_cases())
def test_output_matches_dense_reference(case):
    qkv, kw = case
    out, stats = rectified_attention(*qkv, **kw, backend="torch", return_stats=True)
    nv = kw["grid"][0] * kw["grid"][1] * kw["grid"][2]
    kv_lens = None if kw["text_valid"] is None else nv + kw["text_valid"]
    ref = expected_output(*qkv, stats, block=kw["block_size"], nv=nv, kv_lens=kv_lens)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=2e-6)


def test_output_rows_are_convex_combinations_of_values():
    grid, block, n_text = (2, 4, 6), 16, 20
    q, k, _ = make_qkv(8, grid, n_text, block, spread=0.5)
    g = torch.Generator().manual_seed(8)
    v = torch.softmax(4 * torch.randn(2, 2, 68, 8, generator=g), -1)   # rows on the simplex
    tv = torch.tensor([20, 4])
    for gapr in (True, False):
        out = rectified_attention(q, k, v, grid=grid, block_size=block, drop_rate=0.8, top_p=0.2, gapr=gapr,
                                  neighbours=False, text_valid=tv, backend="torch")
        assert (out >= -1e-6).all()
        torch.testing.assert_close(out.sum(-1), torch.ones(2, 2, 68))


@pytest.mark.parametrize("grid, n_text", [((2, 4, 6), 0), ((2, 4, 6), 5), ((2, 3, 7), 13)])
def test_inputs_are_not_mutated(grid, n_text):
    q, k, v = make_qkv(9, grid, n_text, 8)
    tv = torch.tensor([n_text, 0]) if n_text else None
    copies = [t.clone() for t in (q, k, v)] + ([tv.clone()] if n_text else [])
    rectified_attention(q, k, v, grid=grid, block_size=8, text_valid=tv, neighbours=False, backend="torch")
    for t, c in zip((q, k, v, tv), copies):
        assert torch.equal(t, c)


def test_padded_text_never_contributes():
    grid, block, n_text = (2, 3, 7), 8, 13
    q, k, v = make_qkv(9, grid, n_text, block)
    tv = torch.tensor([5, 0])
    kw = dict(grid=grid, block_size=block, drop_rate=0.6, neighbours=False, text_valid=tv, backend="torch")
    out, stats = rectified_attention(q, k, v, **kw, return_stats=True)
    k2, v2 = k.clone(), v.clone()
    k2[0, :, 42 + 5:] = 50.0                        # padded text keys of sample 0, all of sample 1's text
    v2[0, :, 42 + 5:] = 1e4
    k2[1, :, 42:] = -50.0
    v2[1, :, 42:] = -1e4
    out2, stats2 = rectified_attention(q, k2, v2, **kw, return_stats=True)
    torch.testing.assert_close(out2, out, rtol=0, atol=1e-6)
    for a, b in zip((stats.critical, stats.R, stats.O_nc, stats.p_hat), (stats2.critical, stats2.R, stats2.O_nc,
                                                                        stats2.p_hat)):
        assert torch.equal(a, b)
    assert torch.equal(stats.p_hat[1, :, :, -1], torch.zeros(2, stats.p_hat.shape[2]))   # no valid text: P̂ = 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_give_the_fp32_decisions_of_the_upcast_values(dtype):
    grid, block, n_text = (2, 3, 7), 8, 13
    q, k, v = make_qkv(12, grid, n_text, block, spread=0.5, scale=3.0, dtype=dtype)
    kw = dict(grid=grid, block_size=block, drop_rate=0.75, top_p=0.3, neighbours=random_neighbours(1, 6),
              text_valid=torch.tensor([13, 2]))
    low = rectified_selection(q, k, v, **kw)
    high = rectified_selection(q.float(), k.float(), v.float(), **kw)
    for name in ("critical", "gapr_ok", "p_hat", "R", "O_nc"):
        assert torch.equal(getattr(low, name), getattr(high, name)), name
    assert low.R.dtype == torch.float32
    out = rectified_attention(q, k, v, **kw, backend="torch")
    assert out.dtype == dtype and torch.isfinite(out).all()


def test_video_only_sequence():
    grid, block = (2, 3, 7), 16
    q, k, v = make_qkv(13, grid, 0, block)
    out, stats = rectified_attention(q, k, v, grid=grid, block_size=block, neighbours=False, backend="torch",
                                     return_stats=True)
    assert stats.p_hat.shape == (2, 2, 3, 3) and stats.critical.shape == (2, 2, 3, 3)
    torch.testing.assert_close(out, expected_output(q, k, v, stats, block=block, nv=42, kv_lens=None),
                               rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("first_frame", ["corner", "frame0", "off"])
def test_selection_reads_no_tensor_values(first_frame):
    """On the meta device any host read (.item(), int(t), nonzero, data-dependent shapes) raises: the selection
    is fixed-size tensor work only, so it runs without a device synchronisation."""
    q = torch.empty(2, 3, 48 + 13, 8, device="meta")
    for neighbours in (None, False, torch.ones(3, 3, dtype=torch.bool, device="meta")):
        stats = rectified_selection(q, q, q, grid=(2, 4, 6), block_size=16, first_frame=first_frame,
                                    neighbours=neighbours, text_valid=torch.tensor([3, 0], device="meta"))
        assert stats.critical.shape == (2, 3, 3, 4) and stats.O_nc.shape == (2, 3, 3, 8)


# ---------------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize("bad, name", [
    (dict(drop_rate=1.0), "drop_rate"), (dict(drop_rate=-0.1), "drop_rate"), (dict(drop_rate=True), "drop_rate"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(top_p=float("nan")), "top_p"),
    (dict(block_size=0), "block_size"), (dict(block_size=8.0), "block_size"),
    (dict(first_frame="first"), "first_frame"), (dict(gapr=1), "gapr"),
    (dict(grid=(2, 4, 7)), "grid"), (dict(grid=(2, 4)), "grid"), (dict(grid=(0, 4, 6)), "grid"),
    (dict(text_valid=torch.tensor([3])), "text_valid"), (dict(text_valid=torch.tensor([3, 6])), "text_valid"),
    (dict(text_valid=torch.tensor([-1, 2])), "text_valid"), (dict(text_valid=torch.tensor([1.0, 2.0])), "text_valid"),
    (dict(neighbours=torch.ones(3, 3, dtype=torch.bool)), "neighbours"), (dict(neighbours=True), "neighbours"),
    (dict(order=torch.arange(47)), "order"), (dict(backend="cuda"), "backend"), (dict(return_stats=1), "return_stats"),
])
def test_validation_names_the_argument(bad, name):
    q, k, v = make_qkv(0, (2, 4, 6), 5, 8)
    kw = dict(grid=(2, 4, 6), block_size=8, neighbours=False)
    kw.update(bad)
    with pytest.raises(ValueError, match=name):
        rectified_attention(q, k, v, **kw)
    with pytest.raises(ValueError, match="q, k, v"):
        rectified_selection(q, k[:, :, :-1], v, grid=(2, 4, 6), block_size=8)
