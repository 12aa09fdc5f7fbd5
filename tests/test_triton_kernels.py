"""Triton block-sparse kernels vs the dense-mask reference.

On machines without CUDA the kernels run under ``TRITON_INTERPRET=1`` (set by conftest.py) on tiny shapes; the
``gpu``-marked tests run real sizes on CUDA. Tolerance rule (FlashAttention's): with the ground truth computed in
float64, ``|kernel - truth| <= 2 * |reference in the kernel's dtype - truth| + atol``.
"""
from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
if not CUDA and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs CUDA, or TRITON_INTERPRET=1 before triton is imported", allow_module_level=True)

from vidattn.kernels import BlockPattern, Epilogue, WindowPredicate, sparse_attention
from vidattn.kernels.reference import reference_attention
from vidattn.kernels.triton_attention import triton_sparse_attention

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}
SMALL = settings(max_examples=40, deadline=None, derandomize=True,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def make_pattern(seed: int, q_len: int, kv_len: int, bq: int, bkv: int, groups=(1, 1), density: float = 0.5,
                 predicate=None, partial_frac: float = 0.5, kv_lens=None) -> BlockPattern:
    g = torch.Generator().manual_seed(seed)
    shape = (*groups, cdiv(q_len, bq), cdiv(kv_len, bkv))
    mask = torch.rand(shape, generator=g) < density
    partial = (torch.rand(shape, generator=g) < partial_frac) if predicate is not None else None
    return BlockPattern.from_block_mask(mask, q_len=q_len, kv_len=kv_len, block_q=bq, block_kv=bkv,
                                        partial=partial, predicate=predicate, kv_lens=kv_lens)


def make_qkv(seed: int, b: int, h: int, sq: int, sk: int, d: int, dtype: torch.dtype, layout: str = "bshd",
             requires_grad: bool = False):
    """(B, H, S, D) tensors: views of BSHD storage (``bshd``) or contiguous BHSD."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for s in (sq, sk, sk):
        x = torch.randn(b, s, h, d, generator=g).to(DEVICE, dtype)
        x = x.transpose(1, 2) if layout == "bshd" else x.transpose(1, 2).contiguous()
        out.append(x.requires_grad_(requires_grad))
    return out


def assert_rule(got: torch.Tensor, truth: torch.Tensor, lowp: torch.Tensor, atol: float, what: str) -> None:
    err = (got.double() - truth.double()).abs().max().item()
    base = (lowp.double() - truth.double()).abs().max().item()
    assert err <= 2 * base + atol, f"{what}: error {err:.3g} > 2 * {base:.3g} + {atol}"


def check_forward(q, k, v, pattern, *, epilogue=None, **kw) -> None:
    """Output against the rule and LSE against the float64 reference (same -inf rows)."""
    out, lse = triton_sparse_attention(q, k, v, pattern, return_lse=True, epilogue=epilogue, **kw)
    assert out.dtype == q.dtype and out.shape == q.shape and lse.dtype == torch.float32
    truth, lse_truth = reference_attention(q.double(), k.double(), v.double(), pattern, return_lse=True)
    lowp, _ = reference_attention(q, k, v, pattern)
    if epilogue is not None:
        truth = epilogue.apply(truth, pattern.block_q)
        lowp = epilogue.apply(lowp, pattern.block_q)
    assert_rule(out, truth, lowp, ATOL[q.dtype], "out")
    torch.testing.assert_close(lse.double(), lse_truth.double(), atol=1e-4, rtol=1e-4)


def check_backward(q, k, v, pattern, *, lse_grad: bool = False, epilogue=None, **kw) -> None:
    """dQ, dK, dV of ``sum(out * g) [+ sum(lse * g2)]`` against the rule."""
    g = torch.Generator().manual_seed(7)
    go = torch.randn(q.shape, generator=g).to(q.device)
    gl = torch.randn(q.shape[:3], generator=g).to(q.device)

    def loss(out, lse):
        val = (out.double() * go).sum()
        return val + (lse.double() * gl).sum() if lse_grad else val

    out, lse = triton_sparse_attention(q, k, v, pattern, return_lse=lse_grad, epilogue=epilogue, **kw)
    grads = torch.autograd.grad(loss(out, lse), (q, k, v))
    refs = {}
    for name, dtype in (("truth", torch.float64), ("lowp", q.dtype)):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        r_out, r_lse = reference_attention(*leaves, pattern, return_lse=lse_grad)
        if epilogue is not None:
            r_out = epilogue.apply(r_out, pattern.block_q)
        refs[name] = torch.autograd.grad(loss(r_out, r_lse), leaves)
    for name, got, truth, lowp in zip(("dq", "dk", "dv"), grads, refs["truth"], refs["lowp"]):
        assert got.shape == truth.shape
        assert_rule(got, truth, lowp, 10 * ATOL[q.dtype], name)


# ----------------------------------------------------------------------------------------------- forward
@SMALL
@given(b=st.integers(1, 2), h=st.integers(1, 2), q_len=st.integers(1, 100), kv_len=st.integers(1, 100),
       bq=st.sampled_from([16, 32]), bkv=st.sampled_from([16, 32]), d=st.sampled_from([16, 32, 24]),
       dtype=st.sampled_from(list(DTYPES)), layout=st.sampled_from(["bshd", "bhsd"]),
       per_batch=st.booleans(), per_head=st.booleans(), density=st.floats(0.2, 1.0), seed=st.integers(0, 2**16))
def test_forward_random_patterns(b, h, q_len, kv_len, bq, bkv, d, dtype, layout, per_batch, per_head, density,
                                 seed):
    pattern = make_pattern(seed, q_len, kv_len, bq, bkv, (b if per_batch else 1, h if per_head else 1), density)
    check_forward(*make_qkv(seed, b, h, q_len, kv_len, d, DTYPES[dtype], layout), pattern)


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_forward_ragged_cross_attention_113_203(dtype):
    pattern = make_pattern(1, 113, 203, 32, 16, (1, 2), 0.6)
    check_forward(*make_qkv(1, 1, 2, 113, 203, 32, DTYPES[dtype]), pattern)


@pytest.mark.parametrize("d", [64, 128, 48])
def test_forward_head_dims(d):
    pattern = make_pattern(2, 50, 70, 32, 32, density=0.7)
    check_forward(*make_qkv(2, 1, 1, 50, 70, d, torch.float16), pattern)


def test_forward_kv_lens_and_empty_sample():
    kv_lens = torch.tensor([90, 17, 0], dtype=torch.int32)
    pattern = make_pattern(3, 45, 90, 16, 32, (1, 1), 0.8, kv_lens=kv_lens)
    q, k, v = make_qkv(3, 3, 1, 45, 90, 16, torch.float32)
    check_forward(q, k, v, pattern)
    out, lse = triton_sparse_attention(q, k, v, pattern, return_lse=True)
    assert out[2].abs().max() == 0 and torch.isneginf(lse[2]).all()


@settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(frames=st.integers(1, 2), height=st.integers(2, 5), width=st.integers(2, 6), half_h=st.integers(0, 2),
       half_w=st.integers(0, 2), inward=st.booleans(), text_first=st.integers(0, 9), text_last=st.integers(0, 9),
       dtype=st.sampled_from(["fp32", "fp16"]), per_head=st.booleans(), seed=st.integers(0, 2**16))
def test_forward_window_predicate(frames, height, width, half_h, half_w, inward, text_first, text_last, dtype,
                                  per_head, seed):
    pred = WindowPredicate.inward(frames, height, width, half_h, half_w, video_start=text_first, inward=inward)
    s = text_first + pred.video_tokens + text_last
    pattern = make_pattern(seed, s, s, 16, 16, (1, 2 if per_head else 1), 0.8, predicate=pred, partial_frac=0.7)
    check_forward(*make_qkv(seed, 1, 2, s, s, 16, DTYPES[dtype]), pattern)


def test_forward_epilogue_through_dispatcher():
    pattern = make_pattern(4, 70, 70, 32, 32, (1, 2), 0.6)
    q, k, v = make_qkv(4, 2, 2, 70, 70, 32, torch.float16)
    g = torch.Generator().manual_seed(4)
    ep = Epilogue(scale=torch.rand(2, 2, 3, generator=g).to(DEVICE) + 0.5,
                  bias=torch.randn(2, 2, 3, 32, generator=g).to(DEVICE, torch.float16))
    check_forward(q, k, v, pattern, epilogue=ep)
    out = sparse_attention(*(t.transpose(1, 2) for t in (q, k, v)), pattern, backend="triton", layout="bshd",
                           epilogue=ep)
    direct, _ = triton_sparse_attention(q, k, v, pattern, epilogue=ep)
    assert out.is_contiguous() and torch.equal(out, direct.transpose(1, 2))


def test_output_follows_input_layout():
    pattern = make_pattern(5, 40, 40, 16, 16)
    for layout in ("bshd", "bhsd"):
        q, k, v = make_qkv(5, 1, 2, 40, 40, 16, torch.float32, layout)
        out, lse = triton_sparse_attention(q, k, v, pattern)
        assert lse is None
        assert (out.transpose(1, 2) if layout == "bshd" else out).is_contiguous()


def test_subtiles_match_whole_blocks():
    pred = WindowPredicate.inward(2, 4, 6, 1, 1, video_start=5)
    pattern = make_pattern(6, 59, 59, 32, 32, (1, 1), 0.9, predicate=pred, kv_lens=torch.tensor([50]))
    q, k, v = make_qkv(6, 1, 1, 59, 59, 16, torch.float32, requires_grad=True)
    whole, lse_w = triton_sparse_attention(q, k, v, pattern, return_lse=True)
    sub, lse_s = triton_sparse_attention(q, k, v, pattern, return_lse=True, tile=(16, 16))
    torch.testing.assert_close(sub, whole, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(lse_s, lse_w, atol=1e-6, rtol=1e-5)
    g_whole = torch.autograd.grad(whole.sum(), (q, k, v))
    g_sub = torch.autograd.grad(sub.sum(), (q, k, v))
    for a, b in zip(g_sub, g_whole):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------- backward
@settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(b=st.integers(1, 2), q_len=st.integers(1, 80), kv_len=st.integers(1, 80), bq=st.sampled_from([16, 32]),
       bkv=st.sampled_from([16, 32]), dtype=st.sampled_from(list(DTYPES)), layout=st.sampled_from(["bshd", "bhsd"]),
       per_batch=st.booleans(), per_head=st.booleans(), use_kv_lens=st.booleans(), density=st.floats(0.3, 1.0),
       seed=st.integers(0, 2**16))
def test_backward_random_patterns(b, q_len, kv_len, bq, bkv, dtype, layout, per_batch, per_head, use_kv_lens, density,
                                  seed):
    kv_lens = torch.randint(0, kv_len + 1, (b,), generator=torch.Generator().manual_seed(seed)) if use_kv_lens \
        else None
    groups = (b if per_batch else 1, 2 if per_head else 1)
    pattern = make_pattern(seed, q_len, kv_len, bq, bkv, groups, density, kv_lens=kv_lens)
    check_backward(*make_qkv(seed, b, 2, q_len, kv_len, 16, DTYPES[dtype], layout, requires_grad=True), pattern)


@settings(max_examples=20, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(frames=st.integers(1, 2), height=st.integers(2, 4), width=st.integers(2, 5), half=st.integers(0, 1),
       inward=st.booleans(), text=st.integers(0, 9), bq=st.sampled_from([16, 32]), bkv=st.sampled_from([16, 32]),
       dtype=st.sampled_from(["fp32", "fp16"]), seed=st.integers(0, 2**16))
def test_backward_window_predicate(frames, height, width, half, inward, text, bq, bkv, dtype, seed):
    pred = WindowPredicate.inward(frames, height, width, half, half + 1, video_start=text, inward=inward)
    s = text + pred.video_tokens + 5
    pattern = make_pattern(seed, s, s, bq, bkv, (1, 2), 0.8, predicate=pred, partial_frac=0.7)
    check_backward(*make_qkv(seed, 1, 2, s, s, 16, DTYPES[dtype], requires_grad=True), pattern)


def test_backward_window_predicate_and_lse_gradient():
    pred = WindowPredicate.inward(2, 3, 5, 1, 1, video_start=4)
    s = 4 + pred.video_tokens + 6
    mask = torch.rand(1, 2, cdiv(s, 16), cdiv(s, 16), generator=torch.Generator().manual_seed(8)) < 0.5
    mask[..., 0] = True  # every query keeps a key: the reference's logsumexp gradient is then finite
    pattern = BlockPattern.from_block_mask(mask, q_len=s, kv_len=s, block_q=16, partial=mask, predicate=pred)
    check_backward(*make_qkv(8, 1, 2, s, s, 32, torch.float32, requires_grad=True), pattern, lse_grad=True)


def test_backward_with_epilogue_fp16():
    pattern = make_pattern(9, 48, 64, 16, 32, (1, 1), 0.7)
    g = torch.Generator().manual_seed(9)
    ep = Epilogue(scale=torch.rand(1, 2, 3, generator=g).to(DEVICE) + 0.5,
                  bias=torch.randn(1, 2, 3, 16, generator=g).to(DEVICE))
    check_backward(*make_qkv(9, 1, 2, 48, 64, 16, torch.float16, requires_grad=True), pattern, epilogue=ep)


def test_empty_rows_and_unattended_keys_give_zeros():
    mask = torch.tensor([[1, 0, 0], [0, 0, 0], [1, 0, 1]], dtype=torch.bool)
    pattern = BlockPattern.from_block_mask(mask, q_len=40, kv_len=40, block_q=16)
    q, k, v = make_qkv(10, 1, 1, 40, 40, 16, torch.float32, requires_grad=True)
    out, lse = triton_sparse_attention(q, k, v, pattern, return_lse=True)
    assert out[:, :, 16:32].abs().max() == 0 and torch.isneginf(lse[:, :, 16:32]).all()
    dq, dk, dv = torch.autograd.grad(out.sum(), (q, k, v))
    assert all(torch.isfinite(t).all() for t in (dq, dk, dv))
    assert dq[:, :, 16:32].abs().max() == 0
    assert dk[:, :, 16:32].abs().max() == 0 and dv[:, :, 16:32].abs().max() == 0


# ----------------------------------------------------------------------------------------------- refusals
def _qkv_small(d=16, dtype=torch.float32):
    return make_qkv(0, 1, 1, 32, 32, d, dtype)


def test_rejects_unsupported_block_sizes_and_tiles():
    with pytest.raises(ValueError, match="block_q=24"):
        triton_sparse_attention(*_qkv_small(), BlockPattern.full(32, block_q=24))
    with pytest.raises(ValueError, match="block_kv=8"):
        triton_sparse_attention(*_qkv_small(), BlockPattern.full(32, block_q=16, block_kv=8))
    with pytest.raises(ValueError, match="BLOCK_N=32"):
        triton_sparse_attention(*_qkv_small(), BlockPattern.full(32, block_q=16), tile=(16, 32))


def test_rejects_large_head_dim():
    with pytest.raises(ValueError, match="head_dim=320"):
        triton_sparse_attention(*_qkv_small(320), BlockPattern.full(32, block_q=16))


def test_rejects_other_predicates():
    mask = torch.ones(2, 2, dtype=torch.bool)
    pattern = BlockPattern.from_block_mask(mask, q_len=32, kv_len=32, block_q=16, predicate=lambda q, kv: q >= kv)
    with pytest.raises(NotImplementedError, match="function"):
        triton_sparse_attention(*_qkv_small(), pattern)


def test_rejects_epilogue_tensor_gradients():
    q, k, v = make_qkv(0, 1, 1, 32, 32, 16, torch.float32, requires_grad=True)
    ep = Epilogue(scale=torch.ones(1, 1, 2, device=DEVICE, requires_grad=True), bias=torch.zeros(1, 1, 2, 16,
                                                                                                  device=DEVICE))
    with pytest.raises(ValueError, match="epilogue"):
        triton_sparse_attention(q, k, v, BlockPattern.full(32, block_q=16), epilogue=ep)


def test_rejects_mismatched_dtypes():
    q, k, v = _qkv_small()
    with pytest.raises(ValueError, match="dtype"):
        triton_sparse_attention(q, k.half(), v, BlockPattern.full(32, block_q=16))


# ----------------------------------------------------------------------------------------------- GPU, real sizes
WAN = {"frames": 21, "height": 30, "width": 52, "heads": 12, "d": 128}  # 32,760 tokens


def band_random_pattern(s: int, block: int, heads: int, density: float, seed: int = 0, kv_lens=None):
    nb = cdiv(s, block)
    g = torch.Generator().manual_seed(seed)
    idx = torch.arange(nb)
    band = (idx[:, None] - idx[None, :]).abs() <= 2
    mask = band[None, None] | (torch.rand(1, heads, nb, nb, generator=g) < density)
    return BlockPattern.from_block_mask(mask.cuda(), q_len=s, kv_len=s, block_q=block, kv_lens=kv_lens)


def rows_reference(q, k, v, pattern, rows, dtype):
    """Masked attention of the query rows ``rows`` only (float ``dtype``), with autograd; no dense S x S mask."""
    kv = torch.arange(pattern.kv_len, device=q.device)
    mask = pattern.block_bitmap()[:, :, rows // pattern.block_q][..., kv // pattern.block_kv]
    if pattern.partial is not None:
        pm = pattern.partial_bitmap()[:, :, rows // pattern.block_q][..., kv // pattern.block_kv]
        mask = mask & (~pm | pattern.predicate.to(q.device)(rows[:, None], kv[None, :]))
    if pattern.kv_lens is not None:
        mask = mask & (kv[None, :] < pattern.kv_lens.to(q.device)[:, None])[:, None, None, :]
    mask = mask.expand(q.shape[0], q.shape[1], -1, -1)
    has = mask.any(-1, keepdim=True)
    qs, ks, vs = (t.to(dtype) for t in (q[:, :, rows], k, v))
    out = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask | ~has)
    return torch.where(has, out, torch.zeros((), dtype=dtype, device=q.device))


@pytest.mark.gpu
@pytest.mark.parametrize("density", [0.1, 0.5])
def test_gpu_forward_wan_shape_bf16(density):
    s = WAN["frames"] * WAN["height"] * WAN["width"]
    q, k, v = make_qkv(0, 1, WAN["heads"], s, s, WAN["d"], torch.bfloat16)
    pattern = band_random_pattern(s, 128, WAN["heads"], density)
    out, lse = triton_sparse_attention(q, k, v, pattern, return_lse=True)
    rows = torch.randint(0, s, (256,), device="cuda")
    truth = rows_reference(q, k, v, pattern, rows, torch.float32)
    lowp = rows_reference(q, k, v, pattern, rows, torch.bfloat16)
    assert_rule(out[:, :, rows], truth, lowp, ATOL[torch.bfloat16], "out")
    assert torch.isfinite(lse).all()


@pytest.mark.gpu
def test_gpu_forward_window_predicate_video_with_text():
    pred = WindowPredicate.inward(4, 30, 52, 6, 10, video_start=0)
    s = pred.video_tokens + 256
    nb = cdiv(s, 128)
    mask = torch.rand(1, 1, nb, nb, generator=torch.Generator().manual_seed(1)) < 0.6
    pattern = BlockPattern.from_block_mask(mask.cuda(), q_len=s, kv_len=s, block_q=128, partial=mask.cuda(),
                                           predicate=pred, kv_lens=torch.tensor([s - 100], device="cuda"))
    q, k, v = make_qkv(1, 1, 8, s, s, 128, torch.bfloat16)
    out, _ = triton_sparse_attention(q, k, v, pattern)
    rows = torch.randint(0, s, (512,), device="cuda")
    assert_rule(out[:, :, rows], rows_reference(q, k, v, pattern, rows, torch.float32),
                rows_reference(q, k, v, pattern, rows, torch.bfloat16), ATOL[torch.bfloat16], "out")


@pytest.mark.gpu
def test_gpu_backward_wan_shape_bf16_sampled_rows():
    """Loss on 128 sampled rows: dQ there, and dK/dV everywhere, equal the row reference's; runs are bitwise equal."""
    s = WAN["frames"] * WAN["height"] * WAN["width"]
    q, k, v = make_qkv(2, 1, WAN["heads"], s, s, WAN["d"], torch.bfloat16, requires_grad=True)
    pattern = band_random_pattern(s, 128, WAN["heads"], 0.25, seed=2)
    rows = torch.randperm(s, device="cuda")[:128]
    go = torch.randn(1, WAN["heads"], 128, WAN["d"], device="cuda")
    runs = []
    for _ in range(2):
        out, _ = triton_sparse_attention(q, k, v, pattern)
        runs.append(torch.autograd.grad((out[:, :, rows].float() * go).sum(), (q, k, v)))
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    refs = []
    for dtype in (torch.float32, torch.bfloat16):
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        ref = rows_reference(*leaves, pattern, rows, dtype)
        refs.append(torch.autograd.grad((ref.float() * go).sum(), leaves))
    dq, dk, dv = runs[0]
    assert_rule(dq[:, :, rows], refs[0][0][:, :, rows], refs[1][0][:, :, rows], 1e-2, "dq")
    assert_rule(dk, refs[0][1], refs[1][1], 1e-2, "dk")
    assert_rule(dv, refs[0][2], refs[1][2], 1e-2, "dv")


@pytest.mark.gpu
def test_gpu_backward_8k_dense_reference_bf16():
    s, h = 8192, 4
    kv_lens = torch.tensor([s - 300], device="cuda")
    pattern = band_random_pattern(s, 128, h, 0.3, seed=3, kv_lens=kv_lens)
    check_backward(*make_qkv(3, 1, h, s, s, 128, torch.bfloat16, requires_grad=True), pattern)


# ---------------------------------------------------------------------------------------------- launch configs
@pytest.mark.parametrize("kind", ["fwd", "dkdv", "dq"])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("blocks", [(128, 128), (64, 64), (64, 128), (128, 64), (16, 32)])
def test_fit_configs_are_launchable(kind, head_dim, dtype, blocks):
    from vidattn.kernels.triton_attention import SMEM_LIMIT_SM90, fit_configs, smem_estimate

    bq, bkv = blocks
    configs = fit_configs(kind, block_q=bq, block_kv=bkv, head_dim=head_dim, dtype=dtype)
    assert configs and len(set(configs)) == len(configs)
    elt = torch.empty((), dtype=dtype).element_size()
    for c in configs:
        assert bq % c.block_m == 0 and bkv % c.block_n == 0 and c.block_m >= 16 and c.block_n >= 16
        row_tile = c.block_n if kind == "dkdv" else c.block_m
        assert row_tile > 64 or c.warps == 4
        assert smem_estimate(kind, c, max(16, head_dim), elt) <= SMEM_LIMIT_SM90
        assert c.stages >= 1


def test_fit_configs_keep_128_row_tiles_on_hopper_shapes():
    from vidattn.kernels.triton_attention import fit_configs

    dkdv = fit_configs("dkdv", block_q=128, block_kv=128, head_dim=128, dtype=torch.bfloat16)
    dq = fit_configs("dq", block_q=128, block_kv=128, head_dim=128, dtype=torch.bfloat16)
    assert (32, 128, 8) in {(c.block_m, c.block_n, c.warps) for c in dkdv}
    assert (128, 64, 8) in {(c.block_m, c.block_n, c.warps) for c in dq}
    assert any(c.block_m == 64 and c.warps == 4 for c in dq)


def test_every_fitted_config_gives_the_same_result():
    """Each fitted tile shape of each kernel, launched explicitly, matches the reference (forward and backward)."""
    from vidattn.kernels.triton_attention import KernelConfig, fit_configs

    torch.manual_seed(3)
    b, h, s, d = 1, 2, 200, 32
    q, k, v = (torch.randn(b, h, s, d, dtype=torch.float32, requires_grad=True) for _ in range(3))
    pattern = BlockPattern.from_block_mask(torch.rand(4, 4) < 0.6, q_len=s, kv_len=s, block_q=64)
    ref_out = reference_attention(q, k, v, pattern)[0]
    ref_grads = torch.autograd.grad(ref_out.square().sum(), (q, k, v))
    seen = set()
    for kind in ("fwd", "dkdv", "dq"):
        for cfg in fit_configs(kind, block_q=64, block_kv=64, head_dim=d, dtype=torch.float16):
            tile = (cfg.block_m, cfg.block_n)
            if (kind, tile) in seen:
                continue
            seen.add((kind, tile))
            out, _ = triton_sparse_attention(q, k, v, pattern, configs={kind: KernelConfig(*tile, 4, 1)})
            grads = torch.autograd.grad(out.square().sum(), (q, k, v))
            assert torch.allclose(out, ref_out, atol=1e-5), (kind, tile)
            for g, rg in zip(grads, ref_grads):
                assert torch.allclose(g, rg, atol=1e-4), (kind, tile)
    assert len(seen) >= 4


def test_configs_are_validated():
    q, k, v = _qkv_small()
    pattern = BlockPattern.full(32, block_q=16)
    with pytest.raises(ValueError, match="configs keys"):
        triton_sparse_attention(q, k, v, pattern, configs={"bwd": (16, 16, 4, 1)})
    with pytest.raises(ValueError, match="dividing the pattern block"):
        triton_sparse_attention(q, k, v, pattern, configs={"fwd": (32, 16, 4, 1)})
    with pytest.raises(ValueError, match="warps"):
        triton_sparse_attention(q, k, v, pattern, configs={"fwd": (16, 16, 3, 1)})


def test_rejects_non_positive_scale():
    with pytest.raises(ValueError, match="positive softmax scale"):
        triton_sparse_attention(*_qkv_small(), BlockPattern.full(32, block_q=16), scale=0.0)


@pytest.mark.parametrize("tiles", [(2, 3), (4, 4)])
@pytest.mark.parametrize("text", [0, 5])
def test_forward_backward_window_in_tiled_order(tiles, text):
    """The window predicate read through a spatial-tile order (order table in-kernel) matches the reference."""
    from vidattn import TokenLayout, TextSegment
    from vidattn.kernels import PermutedPredicate
    from vidattn.token_order import sequence_permutation

    frames, h, w = 2, 6, 8
    layout = TokenLayout(frames, h, w, text=TextSegment(text, "first") if text else None)
    perm, _ = sequence_permutation(layout, f"tiles{tiles[0]}x{tiles[1]}")
    window = WindowPredicate.inward(frames, h, w, 1, 2, video_start=layout.video_start)
    pred = PermutedPredicate(window, perm)
    s = layout.seq_len
    nb = -(-s // 16)
    pattern = BlockPattern.from_block_mask(torch.ones(nb, nb, dtype=torch.bool), q_len=s, kv_len=s, block_q=16,
                                           predicate=pred)
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, s, 16, requires_grad=True) for _ in range(3))
    ref, _ = reference_attention(q, k, v, pattern)
    out, _ = triton_sparse_attention(q, k, v, pattern)
    assert torch.allclose(out, ref, atol=1e-5)
    g_ref = torch.autograd.grad(ref.square().sum(), (q, k, v))
    g = torch.autograd.grad(out.square().sum(), (q, k, v))
    for a, b in zip(g, g_ref):
        assert torch.allclose(a, b, atol=1e-4)
    # and it is not the raster window: the order matters
    raster = BlockPattern.from_block_mask(torch.ones(nb, nb, dtype=torch.bool), q_len=s, kv_len=s, block_q=16,
                                          predicate=window)
    assert not torch.equal(raster.to_dense(), pattern.to_dense())
