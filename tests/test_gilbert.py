"""Gilbert token order and block-neighbour matrix: upstream test vectors, bijection, locality, brute-force parity."""
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vidattn import gilbert
from vidattn.gilbert import block_neighbours, gilbert_inverse, gilbert_order

SMALL = settings(max_examples=50, deadline=None)
dim = st.integers(1, 12)


def _coords(perm, rows, cols):
    """(t, r, c) of each curve cell, as an [N, 3] tensor."""
    return torch.stack([perm // (rows * cols), (perm // cols) % rows, perm % cols], dim=1)


def _steps(frames, rows, cols):
    """|difference| of (t, r, c) between consecutive curve cells, [N-1, 3]."""
    c = _coords(gilbert_order(frames, rows, cols), rows, cols)
    return (c[1:] - c[:-1]).abs()


# --- an independent oracle: the curve index of one cell (the xyz2d form), by descending into sub-boxes ----------

def _sgn(v):
    return (v > 0) - (v < 0)


def _vadd(*vs):
    return tuple(sum(v[k] for v in vs) for k in range(3))


def _contains(q, s, *axes):
    """Whether cell q lies in the box at corner s spanned by the axis vectors (which may point backwards)."""
    ext = _vadd(*axes)
    return all((s[k] + ext[k] < q[k] <= s[k]) if ext[k] < 0 else (s[k] <= q[k] < s[k] + ext[k]) for k in range(3))


def _xyz2d(q, s, a, b, c):
    lens = [abs(sum(v)) for v in (a, b, c)]
    units = [tuple(map(_sgn, v)) for v in (a, b, c)]
    for i in range(3):  # a straight run along the only long axis (or a single cell)
        if all(n == 1 for j, n in enumerate(lens) if j != i):
            return sum(units[i][k] * (q[k] - s[k]) for k in range(3))
    halves = []
    for v, n, u in zip((a, b, c), lens, units):
        h = tuple(x // 2 for x in v)
        halves.append(_vadd(h, u) if abs(sum(h)) % 2 and n > 2 else h)
    (a2, b2, c2), (w, h, d), (da, db, dc) = halves, lens, units
    neg = lambda v: tuple(-x for x in v)  # noqa: E731
    ar, br, cr = _vadd(a, neg(a2)), _vadd(b, neg(b2)), _vadd(c, neg(c2))
    if 2 * w > 3 * h and 2 * w > 3 * d:
        boxes = [(s, a2, b, c), (_vadd(s, a2), ar, b, c)]
    elif 3 * h > 4 * d:
        boxes = [(s, b2, c, a2), (_vadd(s, b2), a, br, c), (_vadd(s, a, neg(da), b2, neg(db)), neg(b2), c, neg(ar))]
    elif 3 * d > 4 * h:
        boxes = [(s, c2, a2, b), (_vadd(s, c2), a, b, cr), (_vadd(s, a, neg(da), c2, neg(dc)), neg(c2), neg(ar), b)]
    else:
        boxes = [(s, b2, c2, a2), (_vadd(s, b2), c, a2, br), (_vadd(s, b2, neg(db), c, neg(dc)), a, neg(b2), neg(cr)),
                 (_vadd(s, a, neg(da), b2, c, neg(dc)), neg(c), neg(ar), br),
                 (_vadd(s, a, neg(da), b2, neg(db)), neg(b2), c2, neg(ar))]
    offset = 0
    for k, (corner, x, y, z) in enumerate(boxes):
        if k == len(boxes) - 1 or _contains(q, corner, x, y, z):
            return offset + _xyz2d(q, corner, x, y, z)
        offset += abs(sum(x) * sum(y) * sum(z))


def _oracle_order(frames, rows, cols):
    perm = [None] * (frames * rows * cols)
    for t in range(frames):
        for r in range(rows):
            for c in range(cols):
                i = _xyz2d((c, r, t), (0, 0, 0), (cols, 0, 0), (0, rows, 0), (0, 0, frames))
                assert perm[i] is None, "oracle maps two cells to one index"
                perm[i] = (t * rows + r) * cols + c
    return perm


# --- the order ------------------------------------------------------------------------------------------------

def test_upstream_vectors():
    assert gilbert_order(2, 3, 4).tolist() == [0, 12, 13, 1, 5, 17, 16, 4, 8, 20, 21, 9, 10, 22, 23, 11, 7, 19, 18, 6,
                                               2, 14, 15, 3]
    assert gilbert_order(3, 4, 6)[:24].tolist() == [0, 24, 25, 1, 2, 26, 27, 3, 9, 33, 32, 8, 7, 31, 30, 6, 12, 18,
                                                    42, 36, 37, 43, 19, 13]
    perm = gilbert_order(13, 30, 52)
    assert perm.dtype == torch.long and perm.shape == (13 * 30 * 52,)
    assert perm[:12].tolist() == [0, 1560, 1561, 1, 53, 1613, 1612, 52, 104, 105, 157, 156]
    assert perm[-6:].tolist() == [1662, 102, 50, 1610, 1611, 51]
    assert int((torch.arange(perm.numel()) * perm).sum()) == 2090944371282


@pytest.mark.parametrize("shape", [(1, 1, 1), (1, 1, 7), (3, 1, 1), (1, 5, 1), (2, 2, 1), (5, 5, 1), (3, 3, 3),
                                   (4, 7, 9), (5, 4, 4), (2, 9, 16)])
def test_matches_cell_index_oracle(shape):
    assert gilbert_order(*shape).tolist() == _oracle_order(*shape)


@SMALL
@given(dim, dim, dim)
def test_matches_cell_index_oracle_random(frames, rows, cols):
    assert gilbert_order(frames, rows, cols).tolist() == _oracle_order(frames, rows, cols)


@SMALL
@given(st.integers(1, 20), st.integers(1, 20), st.integers(1, 20))
def test_bijection(frames, rows, cols):
    perm = gilbert_order(frames, rows, cols)
    assert perm.dtype == torch.long
    assert torch.equal(perm.sort().values, torch.arange(frames * rows * cols))


@pytest.mark.parametrize("shape", [(1, 1, 7), (3, 1, 1), (2, 45, 80), (13, 30, 52), (21, 45, 80)])
def test_bijection_named_grids(shape):
    n = shape[0] * shape[1] * shape[2]
    assert torch.equal(gilbert_order(*shape).sort().values, torch.arange(n))


def test_lines_are_raster():
    assert gilbert_order(1, 1, 7).tolist() == list(range(7))
    assert gilbert_order(3, 1, 1).tolist() == [0, 1, 2]
    assert gilbert_order(1, 4, 1).tolist() == [0, 1, 2, 3]


def _starts_at_origin(frames, rows, cols):
    """The curve starts at cell (0, 0, 0) unless cols == 1 < frames, rows (the first sub-boxes are then empty)."""
    starts = gilbert_order(frames, rows, cols)[0] == 0
    return bool(starts) == (cols > 1 or frames == 1 or rows == 1)


even_or_one = st.sampled_from([1, 2, 4, 6, 8, 10])


@SMALL
@given(even_or_one, even_or_one, even_or_one)
def test_even_grids_take_unit_steps(frames, rows, cols):
    steps = _steps(frames, rows, cols)
    assert bool((steps.sum(1) == 1).all())
    assert _starts_at_origin(frames, rows, cols)


@SMALL
@given(st.integers(1, 25), st.integers(1, 25), st.booleans())
def test_flat_grids_are_26_connected(a, b, one_frame):
    """With a single frame or a single row every step is to a 26-neighbour (odd sizes: sometimes diagonal)."""
    frames, rows, cols = (1, a, b) if one_frame else (a, 1, b)
    steps = _steps(frames, rows, cols)
    assert steps.numel() == 0 or int(steps.max()) <= 1


@SMALL
@given(st.integers(1, 16), st.integers(1, 16), st.integers(1, 16))
def test_odd_grids_jump_at_most_four(frames, rows, cols):
    """Odd axes make the curve jump; exhaustively over all grids up to 24^3 the longest step is 4 (Chebyshev)."""
    steps = _steps(frames, rows, cols)
    assert steps.numel() == 0 or int(steps.max()) <= 4
    assert _starts_at_origin(frames, rows, cols)


def test_known_jumps():
    """Documented non-adjacent steps of upstream's curve (not a bug of ours: it is the reference order)."""
    cheb = _steps(32, 45, 80).amax(1)
    assert int(cheb.max()) == 2 and int((cheb > 1).sum()) == 32
    assert int(_steps(13, 30, 52).max()) == 1
    assert int(_steps(5, 5, 1).max()) == 3
    assert gilbert_order(3, 3, 1).tolist() == [7, 6, 8, 5, 2, 1, 4, 3, 0]  # cols == 1: does not start at 0


@SMALL
@given(dim, dim, dim)
def test_inverse(frames, rows, cols):
    perm, inv = gilbert_order(frames, rows, cols), gilbert_inverse(frames, rows, cols)
    n = frames * rows * cols
    assert inv.dtype == torch.long
    assert torch.equal(inv[perm], torch.arange(n))
    assert torch.equal(perm[inv], torch.arange(n))
    x = torch.randn(n)
    assert torch.equal(x[perm][inv], x)


def test_results_are_copies():
    perm, inv = gilbert_order(2, 3, 4), gilbert_inverse(2, 3, 4)
    nb = block_neighbours(2, 3, 4, block_size=5)
    perm.zero_(), inv.zero_(), nb.zero_()
    assert gilbert_order(2, 3, 4)[1] == 12
    assert gilbert_inverse(2, 3, 4)[12] == 1
    assert bool(block_neighbours(2, 3, 4, block_size=5).diagonal().all())


@pytest.mark.parametrize("fn", [gilbert_order, gilbert_inverse, block_neighbours])
@pytest.mark.parametrize("pos,name", [(0, "frames"), (1, "rows"), (2, "cols")])
@pytest.mark.parametrize("bad", [0, -3, 2.0, True, "4", None])
def test_rejects_bad_sizes(fn, pos, name, bad):
    args = [2, 3, 4]
    args[pos] = bad
    with pytest.raises(ValueError, match=name):
        fn(*args)


@pytest.mark.parametrize("bad", [0, -1, 1.5, False])
def test_rejects_bad_block_size(bad):
    with pytest.raises(ValueError, match="block_size"):
        block_neighbours(2, 3, 4, block_size=bad)


def test_accepts_integer_like():
    assert torch.equal(gilbert_order(torch.tensor(2), 3, 4), gilbert_order(2, 3, 4))


# --- neighbour blocks -----------------------------------------------------------------------------------------

def _brute_neighbours(frames, rows, cols, block_size):
    """Straight from the definition: token adjacency (Chebyshev <= 1) pooled over curve-order blocks."""
    perm = gilbert_order(frames, rows, cols)
    n = perm.numel()
    xyz = _coords(perm, rows, cols)  # coordinates of the i-th curve token
    adj = ((xyz[:, None, :] - xyz[None, :, :]).abs().amax(-1) <= 1).double()
    member = torch.zeros(n, -(-n // block_size), dtype=torch.double)
    member[torch.arange(n), torch.arange(n) // block_size] = 1
    return (member.T @ adj @ member) > 0


@SMALL
@given(st.integers(1, 6), st.integers(1, 7), st.integers(1, 8), st.integers(1, 40))
def test_neighbours_brute_force(frames, rows, cols, block_size):
    got = block_neighbours(frames, rows, cols, block_size=block_size)
    n = frames * rows * cols
    assert got.dtype == torch.bool and got.shape == (-(-n // block_size),) * 2
    assert torch.equal(got, _brute_neighbours(frames, rows, cols, block_size))
    assert torch.equal(got, got.T) and bool(got.diagonal().all())


def test_neighbours_edge_block_sizes():
    assert block_neighbours(3, 4, 5, block_size=1000).tolist() == [[True]]
    # block_size 1: the token adjacency itself, in curve order
    assert torch.equal(block_neighbours(2, 3, 4, block_size=1), _brute_neighbours(2, 3, 4, 1))
    # a 1-D grid in blocks of 2: each block touches exactly its two neighbours
    nb = block_neighbours(1, 1, 10, block_size=2)
    assert torch.equal(nb, (torch.arange(5)[:, None] - torch.arange(5)[None]).abs() <= 1)


def test_neighbours_reference_13x30x52():
    nb = block_neighbours(13, 30, 52, block_size=128)
    assert nb.shape == (159, 159)
    assert int(nb.sum()) == 2393


@pytest.mark.parametrize("shape,nblk,mean,pct", [((32, 45, 80), 900, 18.7, 2.08), ((21, 45, 80), 591, 17.3, 2.93)])
def test_neighbours_reference_means(shape, nblk, mean, pct):
    nb = block_neighbours(*shape)
    assert nb.shape == (nblk, nblk)
    true = int(nb.sum())
    assert round(true / nblk, 1) == mean
    assert round(100 * true / nblk ** 2, 2) == pct
    assert torch.equal(nb, nb.T)


def test_speed_720p_grid():
    """32x45x80 (115,200 tokens): order well under 2 s, neighbours under 1 s (loose bounds for slow CI boxes)."""
    gilbert._order_cached.cache_clear(), gilbert._inverse_cached.cache_clear(), gilbert._neighbours_cached.cache_clear()
    t0 = time.perf_counter()
    gilbert_order(32, 45, 80)
    t1 = time.perf_counter()
    block_neighbours(32, 45, 80, block_size=128)
    t2 = time.perf_counter()
    assert t1 - t0 < 3.0, f"gilbert_order took {t1 - t0:.2f} s"
    assert t2 - t1 < 3.0, f"block_neighbours took {t2 - t1:.2f} s"
    t3 = time.perf_counter()
    gilbert_order(32, 45, 80), block_neighbours(32, 45, 80)
    assert time.perf_counter() - t3 < 0.5  # cached
