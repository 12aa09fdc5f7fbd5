"""Training on the CPU: the rectangle path's gradients (forward by rectangles, fused flash backward per rectangle fed
the global output and log-sum-exp) against autograd through SDPA with the pattern's dense boolean mask."""
from __future__ import annotations

import pytest
import torch

from vidattn.kernels import BlockPattern, cpu_autograd, sparse_attention
from vidattn.layout import TextSegment, TokenLayout
from vidattn.patterns import radial_pattern
from vidattn.patterns.window import window_pattern


def _grads(fn, q, k, v, g):
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out = fn(q, k, v)
    out.backward(g)
    return out.detach(), q.grad, k.grad, v.grad


def _dense_masked(pattern: BlockPattern, scale=None):
    def fn(q, k, v):
        mask = pattern.to_dense(q.shape[0])  # (B|1, H|1, Sq, Skv)
        keep = mask.any(-1, keepdim=True)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask | ~keep, scale=scale)
        return torch.where(keep, out, torch.zeros((), dtype=out.dtype))
    return fn


def _patterns():
    layout = TokenLayout(5, 4, 6, text=TextSegment(9, "last"))
    radial = radial_pattern(layout, block_size=16)
    blocks = torch.rand(2, 3, 9, 9, generator=torch.Generator().manual_seed(4)) < 0.4
    blocks[1, :, 2, :] = False
    blocks[1, :, 2, 5] = True  # sample 1 keeps 20 keys: this block row attends to nothing there
    per_head = BlockPattern.from_block_mask(blocks, q_len=130, kv_len=130, block_q=16, block_kv=16,
                                            kv_lens=torch.tensor([130, 20]))
    window = window_pattern(TokenLayout(2, 10, 12, order="tiles2x4"), base_rows=4, base_cols=6, block_size=16)
    shared = torch.rand(1, 1, 9, 9, generator=torch.Generator().manual_seed(5)) < 0.4
    shared[0, 0, 2, :] = False
    shared[0, 0, 2, 5] = True  # keys 80..95: past sample 1's 20 keys, so its rows of this block row see nothing
    one_sided = BlockPattern.from_block_mask(shared, q_len=130, kv_len=130, block_q=16, block_kv=16,
                                             kv_lens=torch.tensor([130, 20]))
    return [
        ("radial", radial),
        ("head-shared, rows empty for one sample", one_sided),
        ("radial+text lens", radial.with_kv_lens(torch.tensor([layout.video_tokens + 9, layout.video_tokens + 3]))),
        ("per-sample per-head, empty rows", per_head),
        ("window tiles", window),
    ]


@pytest.mark.parametrize("name, pattern", _patterns(), ids=[n for n, _ in _patterns()])
def test_gradients_match_dense_masked_sdpa(name, pattern):
    gen = torch.Generator().manual_seed(0)
    b, h = 2, 3
    q, k, v = (torch.randn(b, h, pattern.q_len, 16, generator=gen) for _ in range(3))
    g = torch.randn(b, h, pattern.q_len, 16, generator=gen)
    ref = _grads(_dense_masked(pattern), q, k, v, g)
    for threads in (1, 2):  # 1: one loop of calls; 2: two workers with their own buffers (when enough calls)
        torch.set_num_threads(threads)
        try:
            ours = _grads(lambda q, k, v: sparse_attention(q, k, v, pattern, backend="torch"), q, k, v, g)
        finally:
            torch.set_num_threads(2)
        for a, r, what in zip(ours, ref, ("out", "dq", "dk", "dv")):
            assert torch.isfinite(a).all(), (what, threads)
            assert (a - r).abs().max().item() <= 2e-5, (what, threads)


def test_rectangle_path_is_taken_and_the_gather_path_is_not(monkeypatch):
    from vidattn.kernels import torch_backend

    pattern = _patterns()[0][1]
    monkeypatch.setattr(torch_backend, "_gather_forward", lambda *a, **kw: pytest.fail("gather path used"))
    q, k, v = (torch.randn(1, 2, pattern.q_len, 16, requires_grad=True) for _ in range(3))
    sparse_attention(q, k, v, pattern, backend="torch").sum().backward()
    assert q.grad is not None and k.grad.abs().sum() > 0


@pytest.mark.parametrize("name, pattern", _patterns()[1:3], ids=[n for n, _ in _patterns()[1:3]])
def test_python_rectangles_without_the_extension(monkeypatch, name, pattern):
    """No extension: the Python path's calls, on worker threads with their own buffers, give the same gradients."""
    from vidattn.kernels import cpu_ext, torch_backend

    gen = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(2, 3, pattern.q_len, 16, generator=gen) for _ in range(3))
    g = torch.randn(2, 3, pattern.q_len, 16, generator=gen)
    fn = lambda q, k, v: sparse_attention(q, k, v, pattern, backend="torch")  # noqa: E731
    with_ext = _grads(fn, q, k, v, g)
    monkeypatch.setattr(cpu_ext, "cpu_extension", lambda: False)
    monkeypatch.setattr(torch_backend, "cpu_extension", lambda: False)
    workers = []
    real = cpu_autograd._backward_calls
    monkeypatch.setattr(cpu_autograd, "_backward_calls", lambda *a: workers.append(1) or real(*a))
    without = _grads(fn, q, k, v, g)
    assert len(workers) == torch.get_num_threads()  # the calls were split over the worker threads
    for a, r in zip(without, with_ext):
        assert (a - r).abs().max().item() <= 1e-5


@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 6e-2), (torch.float16, 1e-2)])
def test_half_precision_gradients(dtype, tol):
    pattern = _patterns()[0][1]
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, pattern.q_len, 32, generator=gen) for _ in range(3))
    g = torch.randn(1, 2, pattern.q_len, 32, generator=gen)
    ours = _grads(lambda q, k, v: sparse_attention(q, k, v, pattern, backend="torch"),
                  *(t.to(dtype) for t in (q, k, v)), g.to(dtype))
    ref = _grads(_dense_masked(pattern), q, k, v, g)
    for a, r in zip(ours, ref):
        assert a.dtype == dtype and (a.float() - r).abs().max().item() <= tol


def test_lse_requests_keep_the_gather_path():
    """A differentiable log-sum-exp is only given by the gather path (ring merges in training would need it)."""
    pattern = _patterns()[0][1]
    q, k, v = (torch.randn(1, 2, pattern.q_len, 16, requires_grad=True) for _ in range(3))
    out, lse = sparse_attention(q, k, v, pattern, backend="torch", return_lse=True)
    lse.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()
