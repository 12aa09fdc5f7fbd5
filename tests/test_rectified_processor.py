"""RectifiedProcessor end to end: tiny transformers of every family, batch 2 with per-sample text, dense modes."""
from __future__ import annotations

import pytest
import torch
from helpers import max_diff, run_applied, run_model

import vidattn
from vidattn import DenseProcessor, RectifiedProcessor
from vidattn.methods import make_processor
from vidattn.patterns.rectified import rectified_attention
from vidattn.pipelines.tiny import tiny_transformer, tiny_transformer_inputs
from vidattn.token_order import sequence_permutation

FAMILIES = ["wan", "hunyuan", "cogvideox", "ltx", "mochi"]


@pytest.mark.parametrize("family", FAMILIES)
def test_rectified_runs_sparse_on_every_family_batch_2(family):
    model = tiny_transformer(family)
    inputs = tiny_transformer_inputs(family, batch=2)
    dense, _ = run_applied(model, inputs, DenseProcessor())
    out, inst = run_applied(model, inputs, RectifiedProcessor(block_size=16, drop_rate=0.5))
    summary = inst.stats.summary()
    assert summary["sparse_calls"] > 0 and summary["dense_calls"] == 0
    assert 0 < summary["sparse_density"] < 1
    assert torch.isfinite(out).all()
    # sparse but rectified: close to dense on a tiny model, and not identical
    assert 0 < max_diff(out, dense) < 0.5 * dense.abs().max().item()


@pytest.mark.parametrize("family", ["wan", "ltx"])
def test_drop_rate_zero_with_full_selection_equals_dense(family):
    """Video-only models: drop_rate 0 selects every block, so R = 1, O_nc = 0 and the processor must reproduce dense
    attention. (Joint models differ: the text column competes in the top-k, as upstream, so one video block per
    row may be left to rectification even at drop 0.)"""
    model = tiny_transformer(family)
    inputs = tiny_transformer_inputs(family, batch=2)
    dense, _ = run_applied(model, inputs, DenseProcessor())
    out, inst = run_applied(model, inputs, RectifiedProcessor(block_size=16, drop_rate=0.0))
    assert inst.stats.summary()["sparse_density"] > 0.95  # blocks of padded text only are not listed
    assert max_diff(out, dense) < 2e-5


def _capture_attention_inputs(model, inputs, proc):
    """q, k, v, layout of the first sparse call, and the processor's output for it."""
    seen = {}
    original = type(proc)._attend_planned

    def spy(self, q, k, v, layout, dense_fn=None):
        out = original(self, q, k, v, layout, dense_fn)
        seen.setdefault("call", (q, k, v, layout, out[0]))
        return out

    type(proc)._attend_planned = spy
    try:
        run_applied(model, inputs, proc)
    finally:
        type(proc)._attend_planned = original
    return seen["call"]


@pytest.mark.parametrize("family", ["wan", "hunyuan", "cogvideox"])
def test_processor_call_equals_rectified_attention_on_curve_ordered_tokens(family):
    """One layer's output equals the pure function on the same q, k, v put in curve order with text last."""
    model = tiny_transformer(family)
    inputs = tiny_transformer_inputs(family, batch=2)
    proc = RectifiedProcessor(block_size=16, drop_rate=0.6)
    q, k, v, layout, out = _capture_attention_inputs(model, inputs, proc)
    assert layout.order == "gilbert"  # the split-point hooks put the forward in curve order
    n_video = layout.video_tokens
    perm = torch.arange(layout.seq_len)
    if layout.text is not None and layout.text.position == "first":
        perm = torch.cat([torch.arange(layout.text_tokens, layout.seq_len), torch.arange(layout.text_tokens)])
    text_valid = None if layout.text is None or layout.text.valid is None else torch.tensor(layout.text.valid)
    qb, kb, vb = (t.index_select(1, perm).transpose(1, 2) for t in (q, k, v))
    ref = rectified_attention(qb, kb, vb, grid=(layout.frames, layout.height, layout.width), drop_rate=0.6,
                              block_size=16, first_frame="corner" if family == "wan" else "off",
                              text_valid=text_valid, backend="torch")
    ref = ref.transpose(1, 2)
    got = out.index_select(1, perm)
    assert got.shape[1] >= n_video
    assert max_diff(got, ref) < 1e-5


def test_hooks_and_per_layer_permutation_agree():
    """Without split-point hooks the processor permutes q/k/v itself: same plan, same output."""
    model = tiny_transformer("wan")
    inputs = tiny_transformer_inputs("wan", batch=2)
    hooked, _ = run_applied(model, inputs, RectifiedProcessor(block_size=16))
    inst = vidattn.apply(model, RectifiedProcessor(block_size=16))
    inst.parts[0].order_hooks.remove(model)
    from vidattn.api import StepHook

    next(h for h in model._forward_pre_hooks.values() if isinstance(h, StepHook)).order = "raster"
    try:
        fallback = run_model(model, inputs)
    finally:
        vidattn.remove(model)
    assert max_diff(fallback, hooked) < 1e-5


def test_padded_text_does_not_change_video_rows():
    model = tiny_transformer("hunyuan")
    inputs = tiny_transformer_inputs("hunyuan", batch=2)
    out, _ = run_applied(model, inputs, RectifiedProcessor(block_size=16))
    mask = inputs["encoder_attention_mask"].bool()
    noisy = dict(inputs)
    noisy["encoder_hidden_states"] = torch.where(mask[..., None], inputs["encoder_hidden_states"],
                                                 torch.randn_like(inputs["encoder_hidden_states"]) * 10)
    out2, _ = run_applied(model, noisy, RectifiedProcessor(block_size=16))
    assert max_diff(out, out2) < 1e-5


def test_dense_steps_and_layers_run_stock():
    model = tiny_transformer("wan")
    inputs = tiny_transformer_inputs("wan")
    _, inst = run_applied(model, inputs, RectifiedProcessor(block_size=16, dense_layers=1))
    summary = inst.stats.summary()
    assert summary["dense_reasons"] == {"dense layer": 1} and summary["sparse_calls"] == 1


def test_presets_and_validation():
    proc = make_processor("rectified", preset="hunyuan-fast")
    assert proc.drop_rate == 0.9 and proc.first_frame == "off"
    assert make_processor("rectified", preset="wan-t2v", drop_rate=0.8).drop_rate == 0.8
    for kwargs, name in [({"drop_rate": 1.0}, "drop_rate"), ({"top_p": 0}, "top_p"), ({"block_size": 0}, "block_size"),
                         ({"first_frame": "x"}, "first_frame"), ({"gapr": 1}, "gapr"),
                         ({"token_order": "tiles"}, "token_order")]:
        with pytest.raises(ValueError, match=name):
            RectifiedProcessor(**kwargs)


def test_raster_ablation_runs_without_hooks():
    model = tiny_transformer("wan")
    inputs = tiny_transformer_inputs("wan", batch=2)
    inst = vidattn.apply(model, RectifiedProcessor(block_size=16, token_order="raster"))
    assert inst.parts[0].order_hooks is None
    out = run_model(model, inputs)
    vidattn.remove(model)
    assert torch.isfinite(out).all()
    assert sequence_permutation(inst.context.layout, "raster") is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_per_head_pattern_with_epilogue_matches_torch(dtype):
    """The kernel path: per-(batch, head) critical CSR + fused epilogue (interpreter on CPU) equals the torch backend."""
    pytest.importorskip("triton")
    from vidattn.kernels import available_backends

    if "triton" not in available_backends("cpu"):
        pytest.skip("triton interpreter not active")
    torch.manual_seed(1)
    grid = (2, 4, 6)  # 48 video tokens: blocks of 16, text after
    q, k, v = (torch.randn(2, 2, 48 + 10, 16, dtype=dtype) for _ in range(3))
    text_valid = torch.tensor([10, 3])
    kwargs = dict(grid=grid, block_size=16, drop_rate=0.6, text_valid=text_valid, neighbours=False)
    ref = rectified_attention(q, k, v, backend="torch", **kwargs)
    out = rectified_attention(q, k, v, backend="triton", **kwargs)
    assert max_diff(out.float(), ref.float()) < (1e-5 if dtype == torch.float32 else 2e-3)


@pytest.mark.parametrize("family", ["wan", "hunyuan"])
def test_tiny_pipelines_batch_2_with_different_prompts(family):
    from vidattn.pipelines.tiny import TINY_PRESETS, tiny_hunyuan_pipeline, tiny_wan_pipeline

    pipe = tiny_wan_pipeline("toy") if family == "wan" else tiny_hunyuan_pipeline()
    settings = dict(TINY_PRESETS["toy"], num_frames=9) if family == "wan" else dict(
        num_frames=9, height=64, width=64, num_inference_steps=2)
    prompts = ["a fox", "a red fox running through deep fresh snow at dawn, cinematic"]
    inst = vidattn.apply(pipe, RectifiedProcessor(block_size=16))
    try:
        frames = pipe(prompts, output_type="np", generator=torch.Generator().manual_seed(0), **settings).frames
    finally:
        vidattn.remove(pipe)
    assert len(frames) == 2 and all(torch.isfinite(torch.as_tensor(f)).all() for f in frames)
    summary = inst.stats.summary()
    assert summary["sparse_calls"] > 0
    if family == "hunyuan":  # per-sample text lengths reached the layout
        assert inst.context.layout.text.valid is not None and len(set(inst.context.layout.text.valid)) == 2
