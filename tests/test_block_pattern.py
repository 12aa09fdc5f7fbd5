"""BlockPattern and TokenLayout: CSR construction, dense expansion, density, composition, predicates."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vidattn import TextSegment, TokenLayout
from vidattn.kernels import BlockPattern, WindowPredicate, window_starts


def _brute_dense(bitmap, partial, predicate, q_len, kv_len, bq, bk, kv_lens=None):
    """Token mask straight from the definition, one pair at a time."""
    bp, hp = bitmap.shape[:2]
    b = bp if kv_lens is None else len(kv_lens)
    out = torch.zeros(b, hp, q_len, kv_len, dtype=torch.bool)
    for bi in range(b):
        for h in range(hp):
            g = bitmap[bi if bp > 1 else 0, h]
            pg = partial[bi if bp > 1 else 0, h] if partial is not None else None
            for i in range(q_len):
                for j in range(kv_len):
                    keep = bool(g[i // bq, j // bk])
                    if keep and pg is not None and pg[i // bq, j // bk]:
                        keep = bool(predicate(torch.tensor(i), torch.tensor(j)))
                    if kv_lens is not None and j >= kv_lens[bi]:
                        keep = False
                    out[bi, h, i, j] = keep
    return out


@settings(max_examples=25, deadline=None)
@given(q_len=st.integers(1, 40), kv_len=st.integers(1, 40), bq=st.sampled_from([4, 8, 16]),
       bk=st.sampled_from([4, 8]), hp=st.sampled_from([1, 2]), seed=st.integers(0, 2**16))
def test_csr_round_trip_and_dense(q_len, kv_len, bq, bk, hp, seed):
    g = torch.Generator().manual_seed(seed)
    nq, nk = -(-q_len // bq), -(-kv_len // bk)
    bitmap = torch.rand(1, hp, nq, nk, generator=g) < 0.5
    p = BlockPattern.from_block_mask(bitmap, q_len=q_len, kv_len=kv_len, block_q=bq, block_kv=bk)
    assert torch.equal(p.block_bitmap(), bitmap)
    assert p.indptr.shape == (1, hp, nq + 1)
    for h in range(hp):
        for r in range(nq):
            row = p.indices[0, h, p.indptr[0, h, r]:p.indptr[0, h, r + 1]].tolist()
            assert row == sorted(row) == torch.nonzero(bitmap[0, h, r]).flatten().tolist()
    dense = p.to_dense()
    assert torch.equal(dense, _brute_dense(bitmap, None, None, q_len, kv_len, bq, bk))
    assert p.density() == pytest.approx(dense.double().mean().item(), abs=1e-9)


def test_partial_predicate_and_kv_lens_match_definition():
    pred = WindowPredicate.inward(2, 3, 4, 0, 1, video_start=2)  # 2 text tokens first, 24 video tokens
    q_len = kv_len = 26
    bitmap = torch.tensor([[1, 1, 0, 1], [0, 1, 1, 1], [1, 0, 1, 1], [1, 1, 1, 0]], dtype=torch.bool)[None, None]
    partial = torch.tensor([[1, 0, 0, 1], [0, 1, 0, 1], [1, 0, 0, 0], [0, 1, 1, 0]], dtype=torch.bool)[None, None]
    p = BlockPattern.from_block_mask(bitmap, q_len=q_len, kv_len=kv_len, block_q=7, block_kv=7, partial=partial,
                                     predicate=pred, kv_lens=torch.tensor([26, 20]))
    assert torch.equal(p.partial_bitmap(), partial & bitmap)
    assert torch.equal(p.to_dense(batch=2), _brute_dense(bitmap, partial, pred, q_len, kv_len, 7, 7, [26, 20]))


def test_window_predicate_worked_example():
    """FreeSwim spec §2.2: grid 6x8, d_h=1, d_w=2 (window 3x5)."""
    ys, kh = window_starts(6, 1)
    xs, kw = window_starts(8, 2)
    assert (kh, kw) == (3, 5)
    cases = {(0, 0): (0, 0), (0, 3): (0, 1), (2, 4): (1, 2), (5, 7): (3, 3), (3, 1): (2, 0)}
    for (y, x), (r0, c0) in cases.items():
        assert (int(ys[y]), int(xs[x])) == (r0, c0)
    pred = WindowPredicate.inward(1, 6, 8, 1, 2)
    q = torch.tensor(2 * 8 + 4)
    kept = [(int(k) // 8, int(k) % 8) for k in range(48) if pred(q, torch.tensor(k))]
    assert kept == [(y, x) for y in range(1, 4) for x in range(2, 7)]


def test_union_intersection():
    a = torch.tensor([[1, 0], [0, 1]], dtype=torch.bool)
    b = torch.tensor([[1, 1], [0, 0]], dtype=torch.bool)
    pa = BlockPattern.from_block_mask(a, q_len=8, kv_len=8, block_q=4)
    pb = BlockPattern.from_block_mask(b, q_len=8, kv_len=8, block_q=4)
    assert torch.equal((pa | pb).to_dense(), pa.to_dense() | pb.to_dense())
    assert torch.equal((pa & pb).to_dense(), pa.to_dense() & pb.to_dense())
    pred = WindowPredicate.inward(1, 2, 4, 0, 0)
    pw = BlockPattern.from_block_mask(b, q_len=8, kv_len=8, block_q=4, predicate=pred)
    assert torch.equal((pa | pw).to_dense(), pa.to_dense() | pw.to_dense())
    assert torch.equal((pa & pw).to_dense(), pa.to_dense() & pw.to_dense())
    with pytest.raises(ValueError, match="block sizes"):
        pa | BlockPattern.full(8, block_q=2)


def test_full_pattern_density_and_image():
    p = BlockPattern.full(130, block_q=64)
    assert p.density() == 1.0 and p.num_q_blocks == 3
    img = p.to_image()
    assert img.dtype == torch.uint8 and img.shape == (3, 3) and bool((img == 255).all())


@pytest.mark.parametrize("kwargs, match", [
    (dict(q_len=0, kv_len=4, block_q=4), "q_len"),
    (dict(q_len=4, kv_len=4, block_q=-1), "block_q"),
])
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BlockPattern.from_block_mask(torch.ones(1, 1, dtype=torch.bool), **kwargs)


def test_token_layout():
    lay = TokenLayout(3, 4, 5, text=TextSegment(7, "first"))
    assert (lay.video_tokens, lay.seq_len, lay.video_start, lay.text_start) == (60, 67, 7, 0)
    last = TokenLayout(3, 4, 5, text=TextSegment(7, "last", valid=(7, 3)))
    assert last.key_lengths() == (67, 63)
    assert hash(last.without_valid()) == hash(TokenLayout(3, 4, 5, text=TextSegment(7, "last")))
    with pytest.raises(ValueError, match="frames"):
        TokenLayout(0, 4, 5)
    with pytest.raises(ValueError, match="valid"):
        TextSegment(4, "last", valid=(5,))


def test_construction_checks_and_partial_dtype():
    bitmap = torch.tensor([[1, 0], [1, 1]], dtype=torch.bool)
    p = BlockPattern.from_block_mask(bitmap, q_len=8, kv_len=8, block_q=4)
    with pytest.raises(ValueError, match="indices"):
        BlockPattern(q_len=8, kv_len=8, block_q=4, block_kv=4, indptr=p.indptr, indices=p.indices + 5)
    with pytest.raises(ValueError, match="indptr"):
        BlockPattern(q_len=8, kv_len=8, block_q=4, block_kv=4, indptr=p.indptr.flip(-1), indices=p.indices)
    pred = WindowPredicate.inward(1, 2, 4, 0, 0)
    q = BlockPattern(q_len=8, kv_len=8, block_q=4, block_kv=4, indptr=p.indptr, indices=p.indices,
                     partial=torch.ones_like(p.indices), predicate=pred)
    assert q.partial.dtype == torch.bool


def test_union_refuses_one_sided_kv_lens():
    a = BlockPattern.full(8, block_q=4)
    with pytest.raises(ValueError, match="kv_lens"):
        a | a.with_kv_lens(torch.tensor([6]))
    both = a.with_kv_lens(torch.tensor([6])) & a  # intersection applies both masks: fine
    assert both.kv_lens.tolist() == [6]


@settings(max_examples=30, deadline=None)
@given(q_len=st.integers(1, 50), kv_len=st.integers(1, 50), bq=st.sampled_from([4, 8, 16]),
       bp=st.sampled_from([1, 2]), hp=st.sampled_from([1, 3]), density=st.floats(0.0, 1.0),
       seed=st.integers(0, 2**16))
def test_device_construction_equals_compact_csr(q_len, kv_len, bq, bp, hp, density, seed):
    """The sync-free builder lists the same blocks in the same order as from_block_mask; density_value agrees."""
    g = torch.Generator().manual_seed(seed)
    nq, nk = -(-q_len // bq), -(-kv_len // bq)
    bitmap = torch.rand(bp, hp, nq, nk, generator=g) < density
    lens = torch.randint(0, kv_len + 1, (bp,), generator=g) if bp > 1 else None
    compact = BlockPattern.from_block_mask(bitmap, q_len=q_len, kv_len=kv_len, block_q=bq, kv_lens=lens)
    wide = BlockPattern.from_block_mask_on_device(bitmap, q_len=q_len, kv_len=kv_len, block_q=bq, kv_lens=lens)
    assert torch.equal(wide.indptr, compact.indptr)
    assert wide.indices.shape[-1] == nq * nk
    for b in range(bp):
        for h in range(hp):
            n = int(compact.indptr[b, h, -1])
            assert torch.equal(wide.indices[b, h, :n], compact.indices[b, h, :n])
    assert torch.equal(wide.to_dense(), compact.to_dense())
    assert float(wide.density_value()) == pytest.approx(compact.density(), abs=1e-12)


def test_device_construction_checks_shape():
    with pytest.raises(ValueError, match="block_mask must have shape"):
        BlockPattern.from_block_mask_on_device(torch.ones(3, 3, dtype=torch.bool), q_len=8, kv_len=8, block_q=4)


def test_memo_is_shared_with_kv_lens_copies_only_when_structural():
    p = BlockPattern.full(32, block_q=8)
    built = []
    p.memo(("x",), lambda: built.append(1) or "plan")
    copy = p.with_kv_lens(torch.tensor([20]))
    assert copy.memo(("x",), lambda: built.append(2) or "other") == "plan"
    p.memo(("y",), lambda: "own", structural=False)
    assert copy.memo(("y",), lambda: "copy's", structural=False) == "copy's"
    assert built == [1]
