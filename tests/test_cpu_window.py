"""The CPU extension's windowed calls: partial blocks of a window predicate masked inside C++ from per-token tables
(``window_tables``), run on the worker threads with the full rectangles. The tables against the predicate (itself
checked against the spec twin in test_window_pattern.py), the extension's output against the dense reference, and
the program's structure (no partial run left to Python)."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vidattn.kernels import cpu_ext, sparse_attention, torch_backend
from vidattn.kernels.predicates import ALWAYS, WindowPredicate, window_tables
from vidattn.kernels.reference import reference_attention
from vidattn.layout import TextSegment, TokenLayout
from vidattn.patterns import radial_pattern
from vidattn.patterns.window import window_pattern

pytestmark = pytest.mark.skipif(not cpu_ext.cpu_extension(), reason="CPU extension unavailable")


def tables_mask(q_bounds: torch.Tensor, k_coords: torch.Tensor) -> torch.Tensor:
    """bool ``(Sq, Skv)`` from the tables, by the rule the C++ kernel applies."""
    b = q_bounds.long()[:, None, :]
    c = k_coords.long()[None, :, :]
    inside = torch.ones(b.shape[0], c.shape[1], dtype=torch.bool)
    for axis in range(3):
        inside &= (c[..., axis] >= b[..., 2 * axis]) & (c[..., axis] < b[..., 2 * axis + 1])
    return inside | (c[..., 0] == ALWAYS)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(frames=st.integers(1, 3), h=st.integers(1, 7), w=st.integers(1, 9), base_rows=st.integers(1, 10),
       base_cols=st.integers(1, 12), inward=st.booleans(), temporal=st.sampled_from([None, 0, 1, 3]),
       text=st.sampled_from([None, ("first", 3), ("last", 11)]),
       order=st.sampled_from(["raster", "tiles2x3", "tiles4x4", "gilbert"]))
def test_tables_reproduce_the_predicate(frames, h, w, base_rows, base_cols, inward, temporal, text, order):
    layout = TokenLayout(frames, h, w, text=None if text is None else TextSegment(text[1], text[0]), order=order)
    pattern = window_pattern(layout, base_rows=base_rows, base_cols=base_cols, inward=inward, temporal=temporal,
                             block_size=4)
    if pattern.predicate is None:  # the window holds the whole grid: nothing partial to mask
        return
    tables = window_tables(pattern.predicate, layout.seq_len, layout.seq_len)
    assert tables is not None
    idx = torch.arange(layout.seq_len)
    truth = pattern.predicate(idx[:, None], idx[None, :])
    assert torch.equal(tables_mask(*tables), truth)


def test_tables_refuse_other_predicates():
    assert window_tables(lambda q, k: q >= k, 8, 8) is None


CASES = [  # (layout, base rows, base cols, temporal, block, batch, heads, text lengths)
    (TokenLayout(2, 12, 20), 6, 8, None, 32, 1, 2, None),                                      # raster
    (TokenLayout(2, 12, 20, order="tiles4x8"), 6, 8, None, 32, 2, 3, None),                     # tiles
    (TokenLayout(3, 9, 14, text=TextSegment(11, "last")), 4, 6, 1, 16, 2, 2, (11, 4)),         # text, kv_lens
    (TokenLayout(2, 10, 16, text=TextSegment(7, "first"), order="tiles2x4"), 4, 6, None, 24, 1, 2, None),
    (TokenLayout(1, 40, 64), 10, 16, None, 64, 1, 1, None),                                     # several strips
]


@pytest.mark.parametrize("layout, rows, cols, temporal, block, batch, heads, text", CASES)
def test_windowed_calls_match_the_reference(layout, rows, cols, temporal, block, batch, heads, text):
    pattern = window_pattern(layout, base_rows=rows, base_cols=cols, temporal=temporal, block_size=block)
    if text is not None:
        pattern = pattern.with_kv_lens(torch.tensor([layout.video_tokens + n for n in text]))
    program = torch_backend._ext_program(pattern, batch, heads)
    assert program.tables is not None and int(program.calls[:, 8].sum()) > 0
    clean_end = layout.seq_len if text is None else layout.video_tokens + min(text)
    # Python keeps only the keys past the shortest sample's length (per-sample masks); no partial run otherwise
    assert all(k0 >= clean_end for *_, k0, _, part in program.masked if part)
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(batch, heads, layout.seq_len, 16, generator=g) for _ in range(3))
    ref, ref_lse = reference_attention(q, k, v, pattern, return_lse=True)
    for threads in (1, 2):
        torch.set_num_threads(threads)  # 1: one worker runs every call; 2: the tasks on two workers
        try:
            with torch.inference_mode():
                out, lse = sparse_attention(q, k, v, pattern, backend="torch", return_lse=True)
        finally:
            torch.set_num_threads(2)
        assert torch.isfinite(out).all()
        assert (out - ref).abs().max().item() <= 1e-5
        finite = torch.isfinite(ref_lse)
        assert torch.equal(finite, torch.isfinite(lse))
        assert (lse[finite] - ref_lse[finite]).abs().max().item() <= 1e-4


@pytest.mark.parametrize("dtype, tol", [(torch.float16, 5e-3), (torch.bfloat16, 3e-2)])
def test_windowed_calls_in_half_precision(dtype, tol):
    layout = TokenLayout(2, 10, 16, order="tiles2x4")
    pattern = window_pattern(layout, base_rows=4, base_cols=6, block_size=16)
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, layout.seq_len, 32, generator=g) for _ in range(3))
    ref = reference_attention(q, k, v, pattern)[0]
    with torch.inference_mode():
        out = sparse_attention(q.to(dtype), k.to(dtype), v.to(dtype), pattern, backend="torch")
    assert out.dtype == dtype
    assert (out.float() - ref).abs().max().item() <= tol


def test_window_and_radial_intersection_keeps_the_window_tables():
    layout = TokenLayout(4, 8, 8)
    pattern = window_pattern(layout, base_rows=4, base_cols=4, block_size=16) & radial_pattern(layout, block_size=16)
    assert window_tables(pattern.predicate, layout.seq_len, layout.seq_len) is not None
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, layout.seq_len, 16, generator=g) for _ in range(3))
    with torch.inference_mode():
        out = sparse_attention(q, k, v, pattern, backend="torch")
    assert (out - reference_attention(q, k, v, pattern)[0]).abs().max().item() <= 1e-5


def test_op_needs_tables_for_windowed_calls():
    q, k, v = (torch.randn(1, 1, 16, 8) for _ in range(3))
    acc, lse = torch.zeros(1, 1, 16, 8), torch.full((1, 1, 16), float("-inf"))
    call = torch.tensor([[0, 1, 0, 1, 0, 16, 0, 16, 1]])
    with pytest.raises(RuntimeError, match="need q_bounds and k_coords"):
        torch.ops.vidattn_cpu.runs_forward(q, k, v, acc, lse, torch.tensor([[0, 1]]), call, 1.0, 1)
    bad = torch.zeros(15, 6, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="int32 \\(Sq, 6\\)"):
        torch.ops.vidattn_cpu.runs_forward(q, k, v, acc, lse, torch.tensor([[0, 1]]), call, 1.0, 1, bad,
                                           torch.zeros(16, 3, dtype=torch.int32))


def test_rows_without_a_key_in_a_windowed_call_are_not_merged():
    """A window of one column: within one call most query rows keep no key there; they must stay untouched."""
    pred = WindowPredicate.inward(1, 1, 16, 0, 0)
    q_bounds, k_coords = window_tables(pred, 16, 16)
    q, k, v = (torch.randn(1, 1, 16, 8) for _ in range(3))
    acc, lse = torch.zeros(1, 1, 16, 8), torch.full((1, 1, 16), float("-inf"))
    call = torch.tensor([[0, 1, 0, 1, 0, 16, 0, 4, 1]])  # keys 0..3: only queries 0..3 keep one
    torch.ops.vidattn_cpu.runs_forward(q, k, v, acc, lse, torch.tensor([[0, 1]]), call, 1.0, 1, q_bounds, k_coords)
    assert torch.equal(acc[0, 0, :4], v[0, 0, :4]) and torch.isfinite(lse[0, 0, :4]).all()
    assert torch.equal(acc[0, 0, 4:], torch.zeros(12, 8)) and torch.isinf(lse[0, 0, 4:]).all()


@pytest.mark.parametrize("q_shard, kv_shard", [(0, 1), (1, 0), (1, 1)])
def test_ring_shards_of_a_window_stay_in_the_extension(q_shard, kv_shard):
    """A (query shard, key shard) pair of ring attention reads the window at global positions (ShiftedPredicate):
    its tables are the global ones' rows, so its partial blocks still run as windowed calls, exactly."""
    from vidattn.parallel import shard_pattern

    layout = TokenLayout(2, 8, 16, text=TextSegment(32, "last"), order="tiles2x4")  # 144 tokens per shard
    pattern = window_pattern(layout, base_rows=4, base_cols=6, block_size=16)
    shard = shard_pattern(pattern, q_shard, kv_shard, layout.seq_len // 2)
    assert shard is not None and shard.predicate is not None
    tables = window_tables(shard.predicate, shard.q_len, shard.kv_len)
    q_idx, kv_idx = torch.arange(shard.q_len)[:, None], torch.arange(shard.kv_len)[None, :]
    assert torch.equal(tables_mask(*tables), shard.predicate(q_idx, kv_idx))
    program = torch_backend._ext_program(shard, 1, 2)
    assert not program.masked and int(program.calls[:, 8].sum()) > 0
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 2, n, 16, generator=g) for n in (shard.q_len, shard.kv_len, shard.kv_len))
    with torch.inference_mode():
        out = sparse_attention(q, k, v, shard, backend="torch")
    assert (out - reference_attention(q, k, v, shard)[0]).abs().max().item() <= 1e-5
