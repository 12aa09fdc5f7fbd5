"""Test processors, run helpers and attention-case strategies shared by the tests."""
from contextlib import contextmanager

import torch
from hypothesis import strategies as st

import vidattn
from vidattn import BlockPattern, DenseProcessor, SparseAttentionProcessor
from vidattn.kernels import WindowPredicate, torch_backend


class RandomBlocks(SparseAttentionProcessor):
    """A static random block pattern (column 0 and the diagonal always kept) with a token band on half its blocks."""

    method = "random-test"

    def __init__(self, block_size=16, **kw):
        super().__init__(**kw)
        self.block_size = block_size

    def pattern(self, layout, q, k):
        g = torch.Generator().manual_seed(layout.seq_len)
        n = -(-layout.seq_len // self.block_size)
        mask = (torch.rand(n, n, generator=g) < 0.5) | torch.eye(n, dtype=torch.bool)
        mask[:, 0] = True
        return BlockPattern.from_block_mask(mask, q_len=layout.seq_len, kv_len=layout.seq_len,
                                            block_q=self.block_size, partial=torch.rand(n, n, generator=g) < 0.5,
                                            predicate=lambda qi, ki: (qi - ki).abs() <= 40)


class PerturbedDense(DenseProcessor):
    """Dense mode with q scaled by 1 + 1e-3: the exactness comparison must notice it."""

    def attend(self, q, k, v, layout, dense_fn):
        return super().attend(q * (1 + 1e-3), k, v, layout, dense_fn)


def run_model(model, inputs):
    """One forward pass without autograd; the model's first output."""
    with torch.no_grad():
        return model(**inputs)[0]


def run_applied(model, inputs, processor):
    """:func:`run_model` with ``processor`` installed by ``vidattn.apply`` and removed afterwards; returns
    ``(output, applied instance)``."""
    inst = vidattn.apply(model, processor)
    try:
        return run_model(model, inputs), inst
    finally:
        vidattn.remove(model)


def max_diff(a, b):
    return (a - b).abs().max().item()


def run_with_shared_processor(model, inputs, proc, modules=None):
    """:func:`run_model` with one processor instance installed by hand, as a diffusers user would, then the stock
    processors restored: ``model.set_attn_processor(proc)``, or ``m.processor = proc`` on each of ``modules`` (for
    models without ``set_attn_processor``, e.g. Mochi)."""
    if modules is None:
        stock = dict(model.attn_processors)
        model.set_attn_processor(proc)
    else:
        stock = [m.processor for m in modules]
        for m in modules:
            m.processor = proc
    try:
        return run_model(model, inputs)
    finally:
        if modules is None:
            model.set_attn_processor(dict(stock))
        else:
            for m, p in zip(modules, stock):
                m.processor = p


def generate_patched(pipe, processor, owner, name, make_patch, **call):
    """Apply ``processor`` to ``pipe`` and generate "a fox" (numpy output, seed 0, ``call`` kwargs) with
    ``owner.name`` replaced by ``make_patch(original)``; restores the attribute, removes the processor and returns
    the applied instance."""
    inst = vidattn.apply(pipe, processor)
    original = getattr(owner, name)
    setattr(owner, name, make_patch(original))
    try:
        pipe("a fox", output_type="np", generator=torch.Generator().manual_seed(0), **call)
    finally:
        setattr(owner, name, original)
        vidattn.remove(pipe)
    return inst


@st.composite
def attention_cases(draw, per_head=True):
    """Random shapes, ragged lengths, partial window blocks, per-sample key lengths and per-head patterns."""
    b = draw(st.integers(1, 2))
    h = draw(st.integers(1, 3))
    d = draw(st.sampled_from([8, 16]))
    frames, height, width = draw(st.integers(1, 3)), draw(st.integers(2, 5)), draw(st.integers(2, 6))
    text = draw(st.integers(0, 9))
    s = frames * height * width + text
    bq = draw(st.sampled_from([4, 8, 16]))
    bk = draw(st.sampled_from([4, 8, 16]))
    hp = draw(st.sampled_from([1, h])) if per_head else 1
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    nq, nk = -(-s // bq), -(-s // bk)
    bitmap = torch.rand(1, hp, nq, nk, generator=g) < draw(st.floats(0.2, 1.0))
    pred = None
    partial = None
    if draw(st.booleans()):
        pred = WindowPredicate.inward(frames, height, width, draw(st.integers(0, 2)), draw(st.integers(0, 2)))
        partial = torch.rand(1, hp, nq, nk, generator=g) < 0.5
    kv_lens = None
    if text and draw(st.booleans()):
        kv_lens = torch.tensor([s - draw(st.integers(0, text)) for _ in range(b)])
    p = BlockPattern.from_block_mask(bitmap, q_len=s, kv_len=s, block_q=bq, block_kv=bk, partial=partial,
                                     predicate=pred, kv_lens=kv_lens)
    q, k, v = (torch.randn(b, h, s, d, generator=g) for _ in range(3))
    return q, k, v, p


def assert_lse_close(lse, ref):
    assert torch.equal(torch.isinf(lse), torch.isinf(ref))
    finite = torch.isfinite(ref)
    assert (lse[finite] - ref[finite]).abs().max().item() <= 1e-5 if finite.any() else True


@contextmanager
def python_loop():
    """The torch backend as it runs where the CPU extension cannot be built."""
    original = torch_backend.cpu_extension
    torch_backend.cpu_extension = lambda: False
    try:
        yield
    finally:
        torch_backend.cpu_extension = original


@contextmanager
def threads(n):
    """``n`` intra-op threads inside the block."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
