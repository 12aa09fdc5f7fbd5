"""Fidelity benchmark: the structured q/k/v generator, the fidelity rows and `vidattn bench attention --method
rectified --fidelity`."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vidattn.cli import main
from vidattn.fidelity import fidelity_rows, relative_l2, rope_3d, structured_qkv

GRID = (8, 16, 24)  # 3,072 tokens, 48 blocks of 64


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(a, b, dim=-1)


def test_generator_is_deterministic_per_seed():
    a = structured_qkv(3, 4, 6, 2, 16, text=5, batch=2, seed=7)
    b = structured_qkv(3, 4, 6, 2, 16, text=5, batch=2, seed=7)
    c = structured_qkv(3, 4, 6, 2, 16, text=5, batch=2, seed=8)
    for x, y, z in zip(a, b, c):
        assert x.shape == (2, 2, 3 * 4 * 6 + 5, 16) and x.dtype == torch.float32
        assert torch.equal(x, y)
        assert not torch.allclose(x, z)
    assert structured_qkv(3, 4, 6, 1, 16, dtype=torch.bfloat16)[0].dtype == torch.bfloat16


def test_generator_has_spatio_temporal_locality():
    """Keys of neighbouring tokens (one step along t, y or x) are more similar than keys far apart, and attention
    puts more mass near the query than a uniform spread would."""
    f, r, c = GRID
    q, k, _ = structured_qkv(f, r, c, 2, 64, seed=0)
    kg = k[0].reshape(2, f, r, c, 64)
    far = _cos(kg[:, : f // 2, : r // 2, : c // 2], kg[:, f // 2:, r // 2:, c // 2:]).mean()
    for near in (_cos(kg[:, 1:], kg[:, :-1]), _cos(kg[:, :, 1:], kg[:, :, :-1]), _cos(kg[:, :, :, 1:],
                                                                                          kg[:, :, :, :-1])):
        assert near.mean() > far + 0.2, (float(near.mean()), float(far))
    # attention mass within Chebyshev distance 2 of the query, against its share of the keys
    t, y, x = torch.meshgrid(*(torch.arange(n) for n in GRID), indexing="ij")
    pos = torch.stack([t.flatten(), y.flatten(), x.flatten()], -1)
    rows = torch.arange(0, f * r * c, 97)
    near = (pos[rows, None, :] - pos[None, :, :]).abs().amax(-1) <= 2
    attn = torch.softmax(q[0, :, rows] @ k[0].transpose(-1, -2) / 8, -1)
    mass = (attn * near).sum(-1).mean()
    assert mass > 5 * near.float().mean(), (float(mass), float(near.float().mean()))


def test_rope_is_a_relative_rotation():
    """Wan-style 3-D RoPE: rotate(q)_i · rotate(k)_j depends only on the offset p_j - p_i (same q, k content)."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 1, 1, 24, generator=g, dtype=torch.float64)
    grid = (3, 4, 5)
    n = 3 * 4 * 5
    qa, kb = rope_3d(a.expand(1, n, 24), *grid)[0], rope_3d(b.expand(1, n, 24), *grid)[0]
    dots = qa @ kb.T
    idx = lambda t, y, x: (t * 4 + y) * 5 + x  # noqa: E731
    assert torch.allclose(dots[idx(0, 0, 0), idx(1, 2, 3)], dots[idx(1, 1, 1), idx(2, 3, 4)])
    assert torch.allclose(qa.norm(dim=-1), a.norm().expand(n))


@pytest.fixture(scope="module")
def small_rows():
    q, k, v = structured_qkv(*GRID, 2, 64, seed=0)
    return fidelity_rows(q, k, v, GRID, block_size=64, repeats=1, warmup=1)


def test_rectified_error_is_below_plain_sparse_at_every_drop_rate(small_rows):
    by = {(r.method, r.drop_rate): r for r in small_rows}
    assert [r.method for r in small_rows] == ["dense"] + ["plain", "rectified"] * 3 + ["radial"]
    assert by[("dense", None)].error == 0.0 and by[("dense", None)].density == 1.0
    for drop in (0.75, 0.85, 0.9):
        plain, rect = by[("plain", drop)], by[("rectified", drop)]
        assert plain.density == rect.density < 1
        assert rect.error < plain.error, (drop, rect.error, plain.error)
        assert rect.selection_seconds is not None and plain.selection_seconds is None
    errors = [by[("plain", d)].error for d in (0.75, 0.85, 0.9)]
    assert errors == sorted(errors)  # fewer blocks, larger error
    radial = by[("radial", None)]
    assert 0 < radial.density < 1 and 0 < radial.error < 1


def test_rows_match_the_public_functions():
    """The rectified row is rectified_attention on the Gilbert-ordered inputs; the radial row is radial attention
    on the raster order; errors are relative L2 over the video rows in the matching order."""
    from vidattn import TextSegment, TokenLayout, gilbert_order, radial_pattern, rectified_attention, sparse_attention

    grid, text = (4, 8, 12), 20
    q, k, v = structured_qkv(*grid, 1, 32, text=text, seed=3)
    rows = fidelity_rows(q, k, v, grid, drop_rates=[0.8], block_size=32, repeats=1, warmup=0)
    n = 4 * 8 * 12
    order = torch.cat([gilbert_order(*grid), torch.arange(n, n + text)])
    dense = F.scaled_dot_product_attention(q, k, v)
    qc, kc, vc = (x[:, :, order] for x in (q, k, v))
    rect = rectified_attention(qc, kc, vc, grid=grid, drop_rate=0.8, block_size=32)
    by = {r.method: r for r in rows}
    assert by["rectified"].error == pytest.approx(relative_l2(rect[:, :, :n], dense[:, :, order[:n]]), rel=1e-4)
    radial = sparse_attention(q, k, v, radial_pattern(TokenLayout(*grid, text=TextSegment(text)), block_size=32,
                                                      sink_frames=1))
    assert by["radial"].error == pytest.approx(relative_l2(radial[:, :, :n], dense[:, :, :n]), rel=1e-4)


def test_cli_rectified_fidelity_prints_the_rows(tmp_path, capsys):
    md = tmp_path / "bench.md"
    assert main(["bench", "attention", "--method", "rectified", "--fidelity", "--quick", "--drop-rates", "0.75,0.9",
                 "--append", str(md)]) == 0
    out = capsys.readouterr().out
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| 4x8x16 ")]
    assert [r[2].strip() for r in rows] == ["dense", "plain", "rectified", "plain", "rectified", "radial"]
    assert "rel L2 err" in out and "selection / dense" in out
    errors = {(r[2].strip(), r[3].strip()): float(r[5]) for r in rows}
    assert errors[("dense", "-")] == 0.0
    assert all(0 < e < 1 for key, e in errors.items() if key[0] != "dense")
    text = md.read_text()
    assert "### attention, rectified" in text and "| 4x8x16 | 512 |" in text
    assert "structured_qkv(seed=0, length=(4,8,8), locality=0.6)" in text


def test_cli_fidelity_with_a_static_pattern(capsys):
    assert main(["bench", "attention", "--method", "radial", "--fidelity", "--quick", "--backends", "torch"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("| 4x8x16 "))
    assert "rel L2 vs dense" in out and 0 < float(row.split("|")[-2]) < 1


@pytest.mark.parametrize("argv, option", [
    (["--drop-rates", "0.75,1.2"], "--drop-rates"), (["--drop-rates", "x"], "--drop-rates"),
    (["--drop-rates", ""], "--drop-rates"), (["--top-p", "0"], "--top-p"),
    (["--backends", "torch,flex"], "--backends"), (["--rows", "0"], "--rows"), (["--cols", "-1"], "--cols"),
    (["--head-dim", "31"], "--head-dim"), (["--heads", "0"], "--heads"), (["--warmup", "-1"], "--warmup"),
    (["--sink-frames", "99"], "--sink-frames"), (["--field-length", "4,8"], "--field-length"),
    (["--locality", "-1"], "--locality"), (["--geometry", "nope"], "--geometry"),
])
def test_cli_bad_values_exit_2_naming_the_option(capsys, argv, option):
    assert main(["bench", "attention", "--method", "rectified", "--fidelity", *argv]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and option in err[0] and "Traceback" not in captured.err
    assert captured.out == ""  # checked before any work: no table header
