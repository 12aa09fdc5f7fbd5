"""The token-order mechanism: split-point hooks put a forward in another token order once, and back, exactly."""
from __future__ import annotations

import copy
import pickle

import pytest
import torch
from helpers import max_diff, run_applied, run_model

import vidattn
from vidattn import FullProcessor, TokenLayout
from vidattn.pipelines.tiny import tiny_transformer, tiny_transformer_inputs
from vidattn.token_order import OrderHooks, order_permutation, sequence_permutation

ORDERED = ["wan", "hunyuan", "cogvideox", "ltx"]  # families with split points


def _hook_count(model):
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def test_sequence_permutation_moves_only_video_tokens():
    layout = TokenLayout(2, 3, 4, text=vidattn.TextSegment(5, "first"))
    perm, inverse = sequence_permutation(layout, "gilbert")
    video, _ = order_permutation("gilbert", 2, 3, 4)
    assert torch.equal(perm[:5], torch.arange(5))
    assert torch.equal(perm[5:] - 5, video)
    assert torch.equal(perm[inverse], torch.arange(layout.seq_len))
    assert sequence_permutation(TokenLayout(2, 3, 4), "raster") is None


@pytest.mark.parametrize("family", ORDERED)
def test_hooks_match_raster_order_and_the_per_layer_fallback(family):
    """All-ones pattern: the hook-ordered forward equals raster order to rounding, and equals bit for bit the same
    order applied per layer (processor-side permutation, the fallback for models without split points)."""
    model = tiny_transformer(family)
    inputs = tiny_transformer_inputs(family, batch=2)
    raster, _ = run_applied(model, inputs, FullProcessor(block_size=32))
    inst = vidattn.apply(model, FullProcessor(block_size=32, token_order="gilbert"))
    assert inst.parts[0].order_hooks is not None
    hooked = run_model(model, inputs)
    assert inst.context.layout.order == "gilbert"
    vidattn.remove(model)
    assert max_diff(hooked, raster) < 1e-5
    # The fallback: the same processor installed on each module by hand (no step context, no hooks).
    proc = FullProcessor(block_size=32, token_order="gilbert")
    inst = vidattn.apply(model, proc)
    inst.parts[0].order_hooks.remove(model)  # as if the model had no split points
    try:
        from vidattn.api import StepHook

        hook = next(h for h in model._forward_pre_hooks.values() if isinstance(h, StepHook))
        hook.order = "raster"
        fallback = run_model(model, inputs)
    finally:
        vidattn.remove(model)
    assert torch.equal(fallback, hooked)


def test_perturbed_order_hook_is_detected():
    """Dropping the inverse at the output split point must change the result (the test above can fail)."""
    model = tiny_transformer("wan")
    inputs = tiny_transformer_inputs("wan")
    raster, _ = run_applied(model, inputs, FullProcessor(block_size=32))
    original = OrderHooks.on_output
    OrderHooks.on_output = lambda self, module, args, output: output
    try:
        broken, _ = run_applied(model, inputs, FullProcessor(block_size=32, token_order="gilbert"))
    finally:
        OrderHooks.on_output = original
    assert max_diff(broken, raster) > 1e-3


@pytest.mark.parametrize("family", ["wan", "hunyuan"])
def test_remove_restores_hooks_exactly(family):
    model = tiny_transformer(family)
    before = _hook_count(model)
    vidattn.apply(model, FullProcessor(block_size=32, token_order="gilbert"))
    assert _hook_count(model) == before + 1 + 4  # step hook + forward, rope, first block, output
    vidattn.remove(model)
    assert _hook_count(model) == before


def test_layout_records_the_order_and_permutation_is_once_per_forward():
    model = tiny_transformer("wan")
    inputs = tiny_transformer_inputs("wan")
    proc = FullProcessor(block_size=32, token_order="gilbert")
    inst = vidattn.apply(model, proc)
    calls = []
    original = torch.Tensor.index_select

    def counting(self, dim, index):
        calls.append(self.shape)
        return original(self, dim, index)

    torch.Tensor.index_select = counting
    try:
        run_model(model, inputs)
    finally:
        torch.Tensor.index_select = original
        layout = inst.context.layout
        vidattn.remove(model)
    assert layout.order == "gilbert"
    # cos and sin tables, the hidden states, the output: four moves per forward whatever the number of layers.
    assert len(calls) == 4


def test_pickled_and_copied_models_keep_and_remove_their_order_hooks():
    model = tiny_transformer("wan")
    inputs = tiny_transformer_inputs("wan")
    before = _hook_count(model)
    vidattn.apply(model, FullProcessor(block_size=32, token_order="gilbert"))
    expected = run_model(model, inputs)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert torch.equal(run_model(clone, inputs), expected)
        vidattn.remove(clone)
        assert _hook_count(clone) == before
    assert _hook_count(model) == before + 5
    vidattn.remove(model)


def test_mochi_has_no_split_points_and_permutes_per_layer(caplog):
    model = tiny_transformer("mochi")
    inputs = tiny_transformer_inputs("mochi", batch=2)
    raster, _ = run_applied(model, inputs, FullProcessor(block_size=32))
    inst = vidattn.apply(model, FullProcessor(block_size=32, token_order="gilbert"))
    assert inst.parts[0].order_hooks is None
    with caplog.at_level("INFO", logger="vidattn"):
        ordered = run_model(model, inputs)
    vidattn.remove(model)
    assert max_diff(ordered, raster) < 1e-5
    assert any("permuting q, k, v" in r.message for r in caplog.records)


def test_plan_parts_must_tile_the_rows():
    from vidattn import AttentionPlan, BlockPattern, PlanPart

    a = BlockPattern.full(8, 16, block_q=4)
    b = BlockPattern.full(8, 16, block_q=4)
    with pytest.raises(ValueError, match="contiguously"):
        AttentionPlan((PlanPart(0, 8, a), PlanPart(9, 17, b)))
    with pytest.raises(ValueError, match="q_len"):
        PlanPart(0, 7, a)
    with pytest.raises(ValueError, match="at least one part"):
        AttentionPlan(())
    with pytest.raises(ValueError, match="perm and inverse"):
        AttentionPlan((PlanPart(0, 8, a),), perm=torch.arange(8))


def test_execute_plan_equals_reference_with_perm_and_scale():
    from vidattn import AttentionPlan, BlockPattern, PlanPart
    from vidattn.kernels.reference import reference_attention
    from vidattn.plan import execute_plan

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 20, 8) for _ in range(3))
    perm = torch.randperm(20)
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(20)
    top = BlockPattern.from_block_mask(torch.tensor([[1, 0, 1, 1, 0], [0, 1, 1, 0, 1], [1, 1, 1, 1, 1]]).bool(),
                                       q_len=12, kv_len=20, block_q=4)
    bottom = BlockPattern.full(8, 20, block_q=4)
    plan = AttentionPlan((PlanPart(0, 12, top), PlanPart(12, 20, bottom)), scale=0.5, perm=perm, inverse=inverse)
    out = execute_plan(plan, q, k, v, backend="torch", layout="bhsd")
    qp, kp, vp = (t[:, :, perm] for t in (q, k, v))
    ref = torch.cat([reference_attention(qp[:, :, :12], kp, vp, top, scale=0.5)[0],
                     reference_attention(qp[:, :, 12:], kp, vp, bottom, scale=0.5)[0]], 2)[:, :, inverse]
    assert torch.allclose(out, ref, atol=1e-6)


def test_per_token_timestep_passed_by_position_is_reordered_too():
    """Wan 2.2 TI2V passes a per-token timestep; given by position it must follow the tokens like by keyword."""
    model = tiny_transformer("wan")
    inputs = tiny_transformer_inputs("wan", batch=2)
    t, h, w = 5, 6, 8  # the tiny Wan grid after patching
    per_token = torch.linspace(100, 900, t * h * w).expand(2, -1).contiguous()
    keyword = dict(inputs, timestep=per_token)
    raster, _ = run_applied(model, keyword, FullProcessor(block_size=32))
    positional = dict(keyword)
    args = (positional.pop("hidden_states"), positional.pop("timestep"))
    vidattn.apply(model, FullProcessor(block_size=32, token_order="gilbert"))
    try:
        with torch.no_grad():
            by_position = model(*args, **positional)[0]
            by_keyword = model(**keyword)[0]
    finally:
        vidattn.remove(model)
    assert max_diff(by_keyword, raster) < 1e-5
    assert max_diff(by_position, raster) < 1e-5


def test_tile_order_puts_whole_tiles_first_in_each_frame():
    from vidattn.token_order import tile_order

    frames, rows, cols, tr, tc = 2, 10, 13, 4, 4  # edge tiles on both axes
    perm = tile_order(frames, rows, cols, tr, tc)
    assert torch.equal(perm.sort().values, torch.arange(frames * rows * cols))
    whole = (rows // tr) * (cols // tc) * tr * tc
    for f in range(frames):
        frame = perm[f * rows * cols:(f + 1) * rows * cols] - f * rows * cols
        assert ((frame // cols) // tr * tr + tr <= rows).logical_and((frame % cols) // tc * tc + tc <= cols)[:whole].all()
        first_tile = frame[:tr * tc]
        assert set(first_tile.tolist()) == {y * cols + x for y in range(tr) for x in range(tc)}
