"""Tests closing gaps found by mutation testing (planted bugs the rest of the suite let through).

1. The masked-pattern cache must be keyed by the per-sample valid text lengths, not only by the static layout:
   one installation, successive forwards whose text masks differ (HunyuanVideo, Mochi).
2. ``BlockPattern.transposed()`` must swap the arguments of its token predicate.
3. ``StepContext`` reduces per-token timesteps (Wan 2.2 TI2V: ``(B, seq)``, first-frame tokens at 0) by ``max``.
4. Ragged tails: ``kv_len`` and per-sample ``kv_lens`` of ``block - 1`` and ``2 * block - 1`` on every backend.
"""
import os

import pytest
import torch
import torch.nn.functional as F

import vidattn
from vidattn import FullProcessor, RadialProcessor, StepContext
from vidattn.kernels import BlockPattern, WindowPredicate, available_backends, sparse_attention
from vidattn.models import adapter_for_transformer
from vidattn.pipelines.tiny import tiny_transformer, tiny_transformer_inputs

from helpers import max_diff, python_loop, run_applied, run_model

pytestmark = [
    pytest.mark.filterwarnings("ignore:In CPU autocast"),  # diffusers' Mochi RoPE, on CPU
    pytest.mark.filterwarnings("ignore:.*flex_attention called without torch.compile"),
    pytest.mark.filterwarnings("ignore:.*return_lse is deprecated"),
]


# ------------------------------------------------------------------ 1. masked-pattern cache and valid text lengths
TEXT_LEN = 16
# Per-sample valid text lengths of successive forwards through ONE installation: the same static layout each time,
# the lengths flipped between the samples, then another pair (a negative prompt of another length).
# HunyuanVideo attends the padded text with per-sample key lengths: that is the masked-pattern cache. Mochi attends
# each sample on its valid text only (no padded keys, no key lengths): there the static-pattern cache sees a text
# segment whose length changes from call to call.
VALID_SEQUENCE = [(12, 8), (8, 12), (5, 16)]


def _with_valid(inputs, valid):
    """``inputs`` with the text mask replaced by prefixes of ``valid`` tokens per sample (same dtype)."""
    old = inputs["encoder_attention_mask"]
    mask = torch.arange(old.shape[1])[None, :] < torch.tensor(valid)[:, None]
    return dict(inputs, encoder_attention_mask=mask.to(old.dtype))


@pytest.fixture(scope="module", params=["hunyuan", "mochi"])
def family_model(request):
    family = request.param
    model = tiny_transformer(family)
    inputs = tiny_transformer_inputs(family, batch=2, text_len=TEXT_LEN)
    return family, model, inputs


def _one_installation(model, processor, batches):
    """Outputs of ``batches`` run one after the other through a single ``vidattn.apply`` installation."""
    inst = vidattn.apply(model, processor)
    try:
        return [run_model(model, b) for b in batches], inst
    finally:
        vidattn.remove(model)


def test_all_ones_pattern_follows_each_forwards_text_lengths(family_model):
    """All-ones pattern (block 48: ragged tail) over one installation: every forward equals the stock model with
    that forward's text mask, however the valid lengths moved between samples."""
    family, model, inputs = family_model
    batches = [_with_valid(inputs, valid) for valid in VALID_SEQUENCE]
    outs, inst = _one_installation(model, FullProcessor(block_size=48, backend="torch"), batches)
    layers = len(adapter_for_transformer(model).self_attention_modules(model))
    per_call = 2 if family == "mochi" else 1  # Mochi attends once per sample
    assert inst.stats.sparse_calls == len(batches) * layers * per_call and inst.stats.dense_calls == 0
    for valid, batch, out in zip(VALID_SEQUENCE, batches, outs):
        ref = run_model(model, batch)
        assert max_diff(out, ref) <= 1e-5, f"valid text lengths {valid}"
    # the masks really matter: the outputs of the first two forwards differ from each other
    assert max_diff(outs[0], outs[1]) > 1e-4


def test_sparse_pattern_follows_each_forwards_text_lengths(family_model):
    """A really sparse radial pattern (small blocks, every query covered) through one installation equals a fresh
    installation per forward (nothing cached from an earlier forward)."""
    family, model, inputs = family_model

    def radial():
        return RadialProcessor(block_size=16, backend="torch")

    batches = [_with_valid(inputs, valid) for valid in VALID_SEQUENCE]
    outs, inst = _one_installation(model, radial(), batches)
    assert 0 < inst.stats.summary()["sparse_density"] < 1 and inst.stats.dense_calls == 0
    for valid, batch, out in zip(VALID_SEQUENCE, batches, outs):
        fresh, _ = run_applied(model, batch, radial())
        assert max_diff(out, fresh) <= 1e-5, f"valid text lengths {valid}"
        assert max_diff(out, run_model(model, batch)) > 1e-4  # sparse: not the dense output


# ------------------------------------------------------------------ 2. transposed() swaps the predicate
def _asymmetric_window():
    # video of 2 x 2 x 7 tokens after one leading text token; 1 x 3 windows slide inward at the borders, so the
    # rule is not symmetric in (q, kv) (query x=0 keeps key x=2, query x=2 does not keep key x=0)
    return WindowPredicate.inward(2, 2, 7, 0, 1, video_start=1)


@pytest.mark.parametrize("predicate", [lambda q, k: (q - 2 * k) % 5 != 0, _asymmetric_window()],
                         ids=["modular", "window"])
@pytest.mark.parametrize("groups", [(1, 1), (2, 3)])
def test_transposed_swaps_the_token_predicate(predicate, groups):
    q_len, kv_len, bq, bk = 37, 23, 8, 4  # non-square, different blocks, ragged tails on both sides
    nq, nk = -(-q_len // bq), -(-kv_len // bk)
    g = torch.Generator().manual_seed(11)
    bitmap = torch.rand(*groups, nq, nk, generator=g) < 0.7
    partial = torch.rand(*groups, nq, nk, generator=g) < 0.6
    p = BlockPattern.from_block_mask(bitmap, q_len=q_len, kv_len=kv_len, block_q=bq, block_kv=bk,
                                     partial=partial, predicate=predicate)
    assert p.partial is not None
    t = p.transposed()
    assert (t.q_len, t.kv_len, t.block_q, t.block_kv, t.groups) == (kv_len, q_len, bk, bq, p.groups)
    assert torch.equal(t.block_bitmap(), p.block_bitmap().mT)
    assert torch.equal(t.partial_bitmap(), p.partial_bitmap().mT)
    dense = p.to_dense()
    assert dense.shape == (*groups, q_len, kv_len)
    assert torch.equal(t.to_dense(), dense.mT)
    # the check can tell: the same transposed blocks with the predicate NOT swapped give another mask
    unswapped = BlockPattern.from_block_mask(bitmap.mT, q_len=kv_len, kv_len=q_len, block_q=bk, block_kv=bq,
                                             partial=partial.mT, predicate=predicate)
    assert not torch.equal(unswapped.to_dense(), dense.mT)


# ------------------------------------------------------------------ 3. per-token timesteps reduce by max
SCHEDULE = (999.0, 750.0, 500.0, 250.0)


class _Pipe:
    def __init__(self, timesteps):
        self.scheduler = type("Sched", (), {"timesteps": torch.tensor(timesteps)})()


def _ti2v_timestep(t, batch=2, seq=24, first_frame=6):
    """Wan 2.2 TI2V's per-token timestep ``(B, seq)``: the conditioning first frame's tokens are at 0."""
    ts = torch.full((batch, seq), t)
    ts[:, :first_frame] = 0.0
    return ts


@pytest.mark.parametrize("with_pipeline", [False, True], ids=["counting", "scheduler"])
def test_per_token_timesteps_step_by_their_max(with_pipeline):
    pipe = _Pipe(SCHEDULE) if with_pipeline else None  # kept alive: the context holds a weak reference
    ctx = StepContext(pipeline=pipe)
    steps, branches, seen = [], [], []
    for t in SCHEDULE:
        for _ in range(2):  # CFG: conditional and unconditional call of one step
            ctx.observe(_ti2v_timestep(t), (2, 3, 4))
            steps.append(ctx.step)
            branches.append(ctx.branch)
            seen.append(ctx.timestep)
    assert steps == [0, 0, 1, 1, 2, 2, 3, 3]
    assert branches == [0, 1] * 4
    assert seen == [t for t in SCHEDULE for _ in range(2)]
    assert ctx.generations == 1 and ctx.calls == 8
    if with_pipeline:
        assert ctx.num_steps == len(SCHEDULE)


# ------------------------------------------------------------------ 4. ragged tails on every backend
BLOCK = 16  # the smallest block the triton backend takes
TAIL = (BLOCK - 1, 2 * BLOCK - 1)


def _backends():
    names = ["reference", "torch", "torch-python"]
    if "flex" in available_backends("cpu"):
        names.append("flex")
    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        try:
            import triton  # noqa: F401
            names.append("triton")
        except ImportError:
            pass
    return names


BACKENDS = _backends()


def _token_mask(bitmap, partial, predicate, q_len, kv_len, kv_lens, batch):
    """``(B, Hp, q_len, kv_len)`` boolean mask straight from the definition (independent of ``to_dense``)."""
    qi = torch.arange(q_len)[:, None]
    ki = torch.arange(kv_len)[None, :]
    mask = bitmap[:, :, qi // BLOCK, ki // BLOCK]
    if partial is not None:
        mask = mask & (~partial[:, :, qi // BLOCK, ki // BLOCK] | predicate(qi, ki))
    mask = mask.expand(batch, -1, -1, -1)
    if kv_lens is not None:
        mask = mask & (ki[None, None] < kv_lens[:, None, None, None])
    return mask


# (q_len, kv_len, per-sample kv_lens or None, with window predicate on partial blocks)
TAIL_CASES = [
    (13, BLOCK - 1, None, False),
    (29, 2 * BLOCK - 1, None, False),
    (2 * BLOCK - 1, BLOCK - 1, None, False),
    (BLOCK - 1, 2 * BLOCK - 1, None, True),
    (3 * BLOCK - 5, 3 * BLOCK, torch.tensor(TAIL), False),
    (37, 3 * BLOCK - 3, torch.tensor(TAIL[::-1]), True),
    (2 * BLOCK - 1, 2 * BLOCK - 1, torch.tensor(TAIL), True),
]


def _tail_case(q_len, kv_len, kv_lens, windowed, seed):
    g = torch.Generator().manual_seed(seed)
    b, h, d = 2, 2, 16
    nq, nk = -(-q_len // BLOCK), -(-kv_len // BLOCK)
    bitmap = torch.rand(1, 1, nq, nk, generator=g) < 0.5
    bitmap[..., 0] = True   # every query keeps a key (kv_lens >= block - 1 > 0)
    bitmap[..., -1] = True  # and the tail block is listed, so its missing keys matter
    predicate = partial = None
    if windowed:
        # text token first, then a 2 x 3 x 4 video: the window reaches into both tails
        predicate = WindowPredicate.inward(2, 3, 4, 0, 1, video_start=1)
        partial = torch.rand(1, 1, nq, nk, generator=g) < 0.7
        partial[..., 0] = False  # column 0 stays full: no query loses every key
    p = BlockPattern.from_block_mask(bitmap, q_len=q_len, kv_len=kv_len, block_q=BLOCK, block_kv=BLOCK,
                                     partial=partial, predicate=predicate, kv_lens=kv_lens)
    mask = _token_mask(bitmap, None if partial is None else partial & bitmap, predicate, q_len, kv_len, kv_lens, b)
    assert torch.equal(p.to_dense(batch=b), mask)
    assert mask.any(-1).all()
    q = torch.randn(b, h, q_len, d, generator=g)
    k, v = (torch.randn(b, h, kv_len, d, generator=g) for _ in range(2))
    return q, k, v, p, mask


def _truth(q, k, v, mask):
    """fp64 dense SDPA with the boolean mask, and the log-sum-exp of the masked scores."""
    q, k, v = (t.double() for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    scores = (q @ k.mT) * q.shape[-1] ** -0.5
    return out, scores.masked_fill(~mask, float("-inf")).logsumexp(-1)


def _call(backend, q, k, v, p):
    if backend == "torch-python":  # the torch backend where the CPU extension cannot be built
        with python_loop():
            return sparse_attention(q, k, v, p, backend="torch", return_lse=True)
    # return_lse: FlexAttention runs eagerly on CPU (no compile in the test)
    return sparse_attention(q, k, v, p, backend=backend, return_lse=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", range(len(TAIL_CASES)),
                         ids=[f"q{c[0]}-kv{c[1]}" + ("-lens" if c[2] is not None else "") + ("-win" if c[3] else "")
                              for c in TAIL_CASES])
def test_ragged_tail_forward_matches_dense_mask(backend, case):
    q, k, v, p, mask = _tail_case(*TAIL_CASES[case], seed=case)
    truth, truth_lse = _truth(q, k, v, mask)
    with torch.no_grad():
        out, lse = _call(backend, q, k, v, p)
    assert out.shape == q.shape
    assert (out.double() - truth).abs().max().item() <= 2e-5
    assert (lse.double() - truth_lse).abs().max().item() <= 2e-5


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b not in ("flex", "torch-python")])
@pytest.mark.parametrize("case", [2, 4, 5])
def test_ragged_tail_gradients_match_dense_mask(backend, case):
    q, k, v, p, mask = _tail_case(*TAIL_CASES[case], seed=case)
    go = torch.randn(q.shape, generator=torch.Generator().manual_seed(99))
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    truth = torch.autograd.grad((F.scaled_dot_product_attention(*leaves, attn_mask=mask) * go).sum(), leaves)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = sparse_attention(*leaves, p, backend=backend)
    grads = torch.autograd.grad((out * go).sum(), leaves)
    for name, got, want in zip("qkv", grads, truth):
        assert (got.double() - want).abs().max().item() <= 5e-5, f"d{name}"
