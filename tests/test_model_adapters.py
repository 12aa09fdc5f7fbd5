"""HunyuanVideo, CogVideoX, LTX-Video and Mochi adapters: exactness against the stock processors, install paths,
layer indices, step-context grid and RoPE read-back (tiny random transformers, batch 2, padded text)."""
from dataclasses import replace

import pytest
import torch
from diffusers import HunyuanVideoTransformer3DModel
from diffusers.models.attention_processor import AttnProcessor2_0
from diffusers.models.embeddings import get_3d_rotary_pos_embed
from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

import vidattn
from vidattn import DenseProcessor, FullProcessor, TextSegment, TokenLayout
from vidattn.models import adapter_for_transformer
from vidattn.models.rope import banded_rope_layout
from vidattn.models.ltx import ltx_rope_layout
from vidattn.models.mochi import mochi_rope_layout
from vidattn.pipelines.tiny import tiny_transformer, tiny_transformer_inputs

from helpers import PerturbedDense, RandomBlocks, max_diff, run_applied, run_model, run_with_shared_processor

pytestmark = pytest.mark.filterwarnings("ignore:In CPU autocast")  # diffusers' Mochi RoPE, on CPU

FAMILIES = ["hunyuan", "cogvideox", "ltx", "mochi"]
GRID = (5, 6, 8)  # the latent token grid of tiny_transformer_inputs' defaults, after patching
PER_SAMPLE = {"mochi"}  # the stock processor (and ours) attends once per sample


class RecordingFull(FullProcessor):
    """FullProcessor that records the token layout of every call (the list is shared by the per-layer copies)."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.layouts = []

    def attend(self, q, k, v, layout, dense_fn):
        self.layouts.append(layout)
        return super().attend(q, k, v, layout, dense_fn)


def _self_attention(model):
    return [m for _, m in adapter_for_transformer(model).self_attention_modules(model)]


def _processors(model):
    """Every attention processor of the model by module name (Mochi's included: it has no attn_processors)."""
    return {name: m.processor for name, m in model.named_modules() if hasattr(m, "processor")}


def _attention_calls(family, model):
    return len(_self_attention(model)) * (2 if family in PER_SAMPLE else 1)


@pytest.fixture(scope="module", params=FAMILIES)
def case(request):
    family = request.param
    model = tiny_transformer(family)
    inputs = tiny_transformer_inputs(family, batch=2)
    return family, model, inputs, run_model(model, inputs)


def test_dense_mode_equals_stock_and_detects_perturbation(case):
    family, model, inputs, ref = case
    out, inst = run_applied(model, inputs, DenseProcessor())
    assert max_diff(out, ref) <= 1e-6
    assert inst.stats.dense_calls == _attention_calls(family, model)
    assert max_diff(run_applied(model, inputs, PerturbedDense())[0], ref) > 1e-6


def _expected_layouts(family, inputs):
    mask = inputs.get("encoder_attention_mask")
    valid = None if mask is None else tuple(int(n) for n in mask.sum(1).tolist())
    text_len = inputs["encoder_hidden_states"].shape[1]
    if family == "hunyuan":
        return {TokenLayout(*GRID, text=TextSegment(text_len, "last", valid))}
    if family == "cogvideox":
        return {TokenLayout(*GRID, text=TextSegment(text_len, "first"))}
    if family == "ltx":
        return {TokenLayout(*GRID)}
    return {TokenLayout(*GRID, text=TextSegment(n, "last")) for n in valid}


def test_all_ones_pattern_matches_stock_with_padded_text(case):
    family, model, inputs, ref = case
    proc = RecordingFull(block_size=32, backend="torch")
    out, inst = run_applied(model, inputs, proc)
    assert inst.stats.sparse_calls == _attention_calls(family, model) and inst.stats.dense_calls == 0
    assert set(proc.layouts) == _expected_layouts(family, inputs)
    if family in ("hunyuan", "mochi"):
        assert len(set(inputs["encoder_attention_mask"].sum(1).tolist())) == 2  # really different valid lengths
    assert max_diff(out, ref) <= 1e-5


def test_sparse_mode_equals_reference_with_same_pattern(case):
    family, model, inputs, ref = case
    outs = {}
    for backend in ("reference", "torch"):
        outs[backend], inst = run_applied(model, inputs, RandomBlocks(backend=backend))
        assert inst.stats.sparse_calls == _attention_calls(family, model)
        assert 0 < inst.stats.summary()["sparse_density"] < 1
    assert max_diff(outs["torch"], outs["reference"]) <= 1e-5
    assert max_diff(outs["torch"], ref) > 1e-4


def test_apply_remove_restores_exactly(case):
    family, model, _, _ = case
    before = _processors(model)
    hooks = len(model._forward_pre_hooks)
    selfattn = {id(m) for m in _self_attention(model)}
    vidattn.apply(model, FullProcessor())
    try:
        assert len(model._forward_pre_hooks) == hooks + 1
        during = _processors(model)
        for name, module in model.named_modules():
            if name not in before:
                continue
            if id(module) in selfattn:
                assert isinstance(during[name], FullProcessor)
            else:
                assert during[name] is before[name]  # cross-attention / refiner untouched
        assert [m.processor.layer_index for m in _self_attention(model)] == list(range(len(selfattn)))
        vidattn.apply(model, DenseProcessor())  # re-apply replaces
        assert len(model._forward_pre_hooks) == hooks + 1
    finally:
        vidattn.remove(model)
    after = _processors(model)
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
    assert len(model._forward_pre_hooks) == hooks
    vidattn.remove(model)  # no-op


def test_hunyuan_layer_order_dual_then_single_and_refiner_untouched():
    model = HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
        num_single_layers=3, num_refiner_layers=2, patch_size=2, patch_size_t=1, text_embed_dim=16,
        pooled_projection_dim=8, rope_axes_dim=(2, 2, 4),
    )
    refiners = [b.attn for b in model.context_embedder.token_refiner.refiner_blocks]
    originals = [a.processor for a in refiners]
    names = [n for n, _ in adapter_for_transformer(model).self_attention_modules(model)]
    assert names == [f"transformer_blocks.{i}.attn" for i in range(2)] + \
        [f"single_transformer_blocks.{i}.attn" for i in range(3)]
    vidattn.apply(model, FullProcessor())
    try:
        assert [b.attn.processor.layer_index for b in model.transformer_blocks] == [0, 1]
        assert [b.attn.processor.layer_index for b in model.single_transformer_blocks] == [2, 3, 4]
        assert all(a.processor is p and isinstance(p, AttnProcessor2_0) for a, p in zip(refiners, originals))
    finally:
        vidattn.remove(model)


@pytest.mark.parametrize("size", ["default", "other"])
def test_step_context_grid_is_the_latent_grid(case, size):
    family, model, inputs, _ = case
    if size == "other":  # latent 3 x 8 x 12: patch 2 gives 3 x 4 x 6, LTX (patch 1) 3 x 8 x 12
        inputs = tiny_transformer_inputs(family, batch=1, frames=3, height=8, width=12)
        grid = (3, 8, 12) if family == "ltx" else (3, 4, 6)
    else:
        grid = GRID
    _, inst = run_applied(model, inputs, FullProcessor(block_size=32))
    assert inst.context.grid == grid
    assert inst.stats.sparse_calls > 0 and inst.stats.dense_calls == 0  # the grid matched the sequence


def test_shared_instance_reads_layout_from_rope(case):
    family, model, inputs, ref = case
    proc = RecordingFull(block_size=32)
    # Mochi has no set_attn_processor: one instance goes to every attn1 by hand
    out = run_with_shared_processor(model, inputs, proc, _self_attention(model) if family == "mochi" else None)
    # cross-attention (LTX attn2) and the Hunyuan token refiner took the stock path; every layout came from RoPE
    assert proc.stats.sparse_calls == _attention_calls(family, model) and proc.stats.dense_calls == 0
    assert max_diff(out, ref) <= 1e-5
    assert {replace(layout, text=None) for layout in proc.layouts} == {TokenLayout(*GRID)}
    assert set(proc.layouts) == _expected_layouts(family, inputs)


def test_shared_instance_without_rope_runs_dense_and_says_why():
    # CogVideoX-2b has no rotary embedding: no layout can be read back, so every call runs dense
    model = tiny_transformer("cogvideox")
    inputs = dict(tiny_transformer_inputs("cogvideox", batch=2), image_rotary_emb=None)
    ref = run_model(model, inputs)
    proc = FullProcessor(block_size=32)
    out = run_with_shared_processor(model, inputs, proc)
    assert proc.stats.summary()["dense_reasons"] == {"no token layout": len(_self_attention(model))}
    assert max_diff(out, ref) <= 1e-6


ODD_GRIDS = [(1, 1, 1), (1, 3, 5), (4, 1, 7), (3, 6, 1), (2, 4, 4), (1, 1, 6), (5, 1, 1), (1, 4, 1), (3, 5, 7)]


@pytest.fixture(scope="module")
def ropes():
    return {f: tiny_transformer(f) for f in ("hunyuan", "ltx", "mochi")}


@pytest.mark.parametrize("grid", ODD_GRIDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_rope_read_back_on_odd_grids(ropes, family, grid):
    t, h, w = grid
    s = t * h * w
    if family == "hunyuan":
        got = banded_rope_layout(ropes["hunyuan"].rope(torch.zeros(1, 4, t, h * 2, w * 2)), s)
    elif family == "cogvideox":
        crops = get_resize_crop_region_for_grid((h, w), 8, 6)
        got = banded_rope_layout(get_3d_rotary_pos_embed(16, crops, (h, w), t), s)
    elif family == "ltx":
        got = ltx_rope_layout(ropes["ltx"].rope(torch.zeros(1, s, 8), t, h, w, (8 / 25, 32, 32)), s)
    else:
        model = ropes["mochi"]
        got = mochi_rope_layout(model.rope(model.pos_frequencies, t, h, w, dtype=torch.float32), s)
        if (h, w) != (1, 1) and min(h, w) == 1:  # one row or one column: the mixed axes cannot tell H from W
            assert got is None
            return
    assert got == TokenLayout(*grid)


def test_rope_read_back_refuses_unreadable_tables():
    # CogVideoX's linspace crop puts both rows of a 2 x 8 grid at the same height: refuse rather than guess
    crops = get_resize_crop_region_for_grid((2, 8), 8, 6)
    assert banded_rope_layout(get_3d_rotary_pos_embed(16, crops, (2, 8), 3), 48) is None
    # an untrained Mochi (pos_frequencies all zero) has the identity rotary table
    model = tiny_transformer("mochi")
    zeros = torch.zeros_like(model.pos_frequencies)
    assert mochi_rope_layout(model.rope(zeros, 5, 6, 8, dtype=torch.float32), 240) is None
    # wrong length
    assert banded_rope_layout(model.rope(model.pos_frequencies, 5, 6, 8, dtype=torch.float32), 240) is None


def test_hunyuan_call_without_text_takes_the_stock_processor():
    """A dual-stream attention called without text (not how the model calls it) runs the stock computation."""
    from diffusers.models.transformers.transformer_hunyuan_video import HunyuanVideoAttnProcessor2_0

    attn = tiny_transformer("hunyuan").transformer_blocks[0].attn
    x = torch.randn(2, 12, attn.inner_dim if hasattr(attn, "inner_dim") else attn.to_q.in_features)
    with torch.no_grad():
        ref = HunyuanVideoAttnProcessor2_0()(attn, x)
        out = FullProcessor(block_size=32)(attn, x)
    ref = ref[0] if isinstance(ref, tuple) else ref
    out = out[0] if isinstance(out, tuple) else out
    assert torch.equal(out, ref)
