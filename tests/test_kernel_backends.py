"""Every CPU backend against the reference (SDPA with the pattern's dense boolean mask)."""
import warnings
from contextlib import nullcontext

import pytest
import torch
from hypothesis import given, settings

from vidattn.kernels import BlockPattern, Epilogue, WindowPredicate, sparse_attention
from vidattn.kernels.flex_backend import flex_sparse_attention
from vidattn.kernels.reference import reference_attention

from helpers import assert_lse_close as _close_lse
from helpers import attention_cases as cases
from helpers import python_loop, threads

warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
warnings.filterwarnings("ignore", message=".*return_lse is deprecated.*")


@settings(max_examples=40, deadline=None)
@given(cases())
def test_torch_backend_matches_reference(case):
    q, k, v, p = case
    ref, ref_lse = reference_attention(q, k, v, p, return_lse=True)
    out, lse = sparse_attention(q, k, v, p, backend="torch", return_lse=True)
    assert (out - ref).abs().max().item() <= 1e-5
    _close_lse(lse, ref_lse)


@settings(max_examples=20, deadline=None)
@given(cases())
def test_torch_backend_gradients_match_reference(case):
    q, k, v, p = case
    grads = []
    for fn in (lambda *a: reference_attention(*a, p)[0], lambda *a: sparse_attention(*a, p, backend="torch")):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = fn(*leaves)
        (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
        grads.append([out.detach()] + [torch.zeros_like(t) if t.grad is None else t.grad for t in leaves])
    for a, b in zip(*grads):
        assert (a - b).abs().max().item() <= 1e-5


@settings(max_examples=20, deadline=None)
@given(cases(per_head=False))
def test_flex_eager_matches_reference(case):
    q, k, v, p = case
    ref, ref_lse = reference_attention(q, k, v, p, return_lse=True)
    out, lse = flex_sparse_attention(q, k, v, p, return_lse=True, compiled=False)
    assert (out - ref).abs().max().item() <= 1e-5
    _close_lse(lse, ref_lse)


def test_flex_compiled_matches_reference():
    """One fixed shape through compiled FlexAttention (the CPU C++ template; ~30 s to compile)."""
    g = torch.Generator().manual_seed(0)
    s = 3 * 4 * 8 + 5
    pred = WindowPredicate.inward(3, 4, 8, 1, 2)
    bitmap = torch.rand(-(-s // 16), -(-s // 16), generator=g) < 0.6
    p = BlockPattern.from_block_mask(bitmap, q_len=s, kv_len=s, block_q=16, partial=bitmap, predicate=pred)
    p = p.with_kv_lens(torch.tensor([s, s - 3]))
    q, k, v = (torch.randn(2, 2, s, 16, generator=g) for _ in range(3))
    ref, _ = reference_attention(q, k, v, p)
    out = sparse_attention(q, k, v, p, backend="flex")
    assert (out - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_all_ones_pattern_is_dense_attention(backend):
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 3, 203, 32, generator=g) for _ in range(3))
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    out = sparse_attention(q, k, v, BlockPattern.full(203, block_q=64), backend=backend)
    assert (out - dense).abs().max().item() <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_within_reference_error(dtype):
    """Error of the kernel <= 2x the error of the reference computed in the same precision (+ small atol)."""
    g = torch.Generator().manual_seed(2)
    s = 113
    bitmap = torch.rand(4, 4, generator=g) < 0.6
    bitmap[:, 0] = True
    p = BlockPattern.from_block_mask(bitmap, q_len=s, kv_len=s, block_q=32)
    q, k, v = (torch.randn(1, 2, s, 32, generator=g) for _ in range(3))
    ref32, _ = reference_attention(q, k, v, p)
    ref_lp, _ = reference_attention(q.to(dtype), k.to(dtype), v.to(dtype), p)
    out = sparse_attention(q.to(dtype), k.to(dtype), v.to(dtype), p, backend="torch")
    assert out.dtype == dtype
    ref_err = (ref_lp.float() - ref32).abs().max().item()
    assert (out.float() - ref32).abs().max().item() <= 2 * ref_err + 1e-3


def test_bshd_layout_and_epilogue():
    g = torch.Generator().manual_seed(3)
    s, bq = 50, 16
    p = BlockPattern.from_block_mask(torch.rand(4, 4, generator=g) < 0.7, q_len=s, kv_len=s, block_q=bq)
    q, k, v = (torch.randn(2, s, 3, 8, generator=g) for _ in range(3))
    epi = Epilogue(torch.rand(2, 3, 4, generator=g), torch.randn(2, 3, 4, 8, generator=g))
    out = sparse_attention(q, k, v, p, layout="bshd", epilogue=epi)
    ref, _ = reference_attention(*(t.transpose(1, 2) for t in (q, k, v)), p)
    rows = torch.arange(s) // bq
    expect = ref * epi.scale[:, :, rows, None] + epi.bias[:, :, rows]
    assert out.shape == q.shape
    assert (out.transpose(1, 2) - expect).abs().max().item() <= 1e-5


def test_bad_inputs_are_named():
    p = BlockPattern.full(10, block_q=4)
    q = torch.randn(1, 1, 10, 8)
    with pytest.raises(ValueError, match="backend"):
        sparse_attention(q, q, q, p, backend="nope")
    with pytest.raises(ValueError, match="layout"):
        sparse_attention(q, q, q, p, layout="sbhd")
    with pytest.raises(ValueError, match="q_len"):
        sparse_attention(q, q, q, BlockPattern.full(12, block_q=4))


@pytest.mark.parametrize("extension", [True, False])
@pytest.mark.parametrize("inference", [False, True])
def test_torch_backend_worker_threads_match_reference(inference, extension):
    """Many query chunks on two threads: the extension's tasks, or the Python loop's worker threads (one
    single-threaded kernel call per chunk and run)."""
    g = torch.Generator().manual_seed(4)
    s = 37 * 8 + 5
    bitmap = torch.rand(38, 38, generator=g) < 0.3
    pred = WindowPredicate.inward(2, 10, 15, 2, 3, video_start=1)
    partial = torch.rand(38, 38, generator=g) < 0.3
    p = BlockPattern.from_block_mask(bitmap, q_len=s, kv_len=s, block_q=8, partial=partial, predicate=pred,
                                     kv_lens=torch.tensor([s, s - 4]))
    q, k, v = (torch.randn(2, 2, s, 16, generator=g) for _ in range(3))
    ref, ref_lse = reference_attention(q, k, v, p, return_lse=True)
    with threads(2), torch.inference_mode(inference), (nullcontext() if extension else python_loop()):
        out, lse = sparse_attention(q, k, v, p, backend="torch", return_lse=True)
    assert (out - ref).abs().max().item() <= 1e-5
    _close_lse(lse, ref_lse)
