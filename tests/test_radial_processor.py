"""RadialProcessor on tiny models: sparse output equals the reference with the same pattern, warm-up policy,
presets, end-to-end generation."""
import pytest
import torch

import vidattn
from vidattn import RadialProcessor, TokenLayout, radial_pattern
from vidattn.methods import METHODS, make_processor
from vidattn.pipelines.tiny import TINY_PRESETS, tiny_transformer, tiny_transformer_inputs, tiny_wan_pipeline

from helpers import generate_patched, run_applied

SMALL = dict(block_size=16, decimation_threshold=16)


@pytest.mark.parametrize("batch", [1, 2])
def test_wan_radial_equals_reference_with_same_pattern(batch):
    model = tiny_transformer("wan")
    inputs = tiny_transformer_inputs("wan", batch=batch, frames=9)
    sparse, inst = run_applied(model, inputs, RadialProcessor(decay=0.5, backend="torch", **SMALL))
    ref, _ = run_applied(model, inputs, RadialProcessor(decay=0.5, backend="reference", **SMALL))
    with torch.no_grad():
        dense = model(**inputs)[0]
    assert (sparse - ref).abs().max().item() <= 1e-5
    assert (sparse - dense).abs().max().item() > 1e-4
    grid = (9, 6, 8)
    expect = radial_pattern(TokenLayout(*grid), decay=0.5, sink_frames=1, **SMALL).density()
    assert 0 < expect < 1
    assert inst.stats.summary()["sparse_density"] == pytest.approx(expect)
    assert inst.context.grid == grid


def test_radial_batched_equals_per_sample():
    """Batch > 1 (batched CFG): each sample's output equals running it alone."""
    model = tiny_transformer("wan")
    inputs = tiny_transformer_inputs("wan", batch=2, frames=9)
    both, _ = run_applied(model, inputs, RadialProcessor(backend="torch", **SMALL))
    for i in range(2):
        one = {k: (v[i:i + 1] if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
        alone, _ = run_applied(model, one, RadialProcessor(backend="torch", **SMALL))
        assert (alone[0] - both[i]).abs().max().item() <= 1e-5


def test_ragged_sequence_keeps_every_query():
    """Any resolution: a sequence that is not a multiple of the block size still attends every query."""
    model = tiny_transformer("wan")
    inputs = tiny_transformer_inputs("wan", batch=1, frames=7, height=10, width=14)  # 7 x 5 x 7 = 245 tokens
    sparse, inst = run_applied(model, inputs, RadialProcessor(backend="torch", **SMALL))
    ref, _ = run_applied(model, inputs, RadialProcessor(backend="reference", **SMALL))
    assert torch.isfinite(sparse).all()
    assert (sparse - ref).abs().max().item() <= 1e-5
    pattern = radial_pattern(TokenLayout(7, 5, 7), sink_frames=1, **SMALL)
    assert pattern.to_dense().any(-1).all()


def test_dense_steps_and_layers_really_dense():
    pipe = tiny_wan_pipeline("toy", seed=0)
    settings = dict(TINY_PRESETS["toy"], num_inference_steps=4)
    proc = RadialProcessor(dense_steps=2, dense_layers=1, dense_last_steps=1, **SMALL)
    calls = {"sdpa": 0}
    import diffusers.models.attention_dispatch as dispatch

    def make_counting(original):
        def counting(*args, **kwargs):
            calls["sdpa"] += 1
            return original(*args, **kwargs)
        return counting

    inst = generate_patched(pipe, proc, dispatch, "dispatch_attention_fn", make_counting, **settings)
    layers = len(pipe.transformer.blocks)
    cfg_calls = 4 * 2  # steps x (cond, uncond)
    stats = inst.stats.summary()
    # sparse only at step 2 (steps 0, 1 warm-up; step 3 last) on layers >= 1
    assert stats["sparse_calls"] == 1 * 2 * (layers - 1)
    assert stats["dense_calls"] == cfg_calls * layers - stats["sparse_calls"]
    # every dense self-attention call went through diffusers' dispatcher, no sparse call did
    assert calls["sdpa"] == stats["dense_calls"]


def test_presets_and_overrides():
    spec = METHODS["radial"]
    for name in ("wan-1x", "wan-2x", "wan22-1x", "hunyuan-1x", "hunyuan-4x", "mochi-2x"):
        assert name in spec.presets
    p = make_processor("radial", "wan-1x")
    assert (p.decay, p.dense_steps, p.dense_layers) == (0.2, 12, 1)
    p = make_processor("radial", "wan22-1x", decay=0.5, dense_steps=3)
    assert (p.decay, p.dense_steps, p.block_size) == (0.5, 3, 64)
    with pytest.raises(ValueError, match="preset"):
        make_processor("radial", "wan-9x")
    with pytest.raises(ValueError, match="decay"):
        make_processor("dense", decay=0.5)


@pytest.mark.parametrize("kwargs, name", [
    (dict(decay=0.0), "decay"), (dict(decay=-1.0), "decay"), (dict(block_size=0), "block_size"),
    (dict(sink_frames=-1), "sink_frames"), (dict(decimation_threshold=0), "decimation_threshold"),
    (dict(dense_steps=-2), "dense_steps"),
])
def test_bad_knobs_are_named(kwargs, name):
    with pytest.raises(ValueError, match=name):
        RadialProcessor(**kwargs)


def test_radial_pipeline_end_to_end():
    pipe = tiny_wan_pipeline("toy", seed=0)
    settings = dict(TINY_PRESETS["toy"], num_frames=33)  # 9 latent frames x 4 x 4
    pipe.set_attn_processor(RadialProcessor(**SMALL))
    try:
        frames = pipe("a fox", output_type="np", generator=torch.Generator().manual_seed(0), **settings).frames
        stats = pipe.attention_stats
    finally:
        pipe.reset_attn_processor()
    assert frames.shape == (1, 33, 64, 64, 3) and bool(torch.isfinite(torch.as_tensor(frames)).all())
    assert stats["sparse_calls"] == 2 * 2 * len(pipe.transformer.blocks)
    assert 0 < stats["sparse_density"] < 1


FAMILIES = ("wan", "hunyuan", "cogvideox", "ltx", "mochi")


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_radial_equals_reference_and_is_sparse(family):
    """Sparse radial output equals the reference backend with the same pattern; batch 2 with padded text."""
    model = tiny_transformer(family)
    inputs = tiny_transformer_inputs(family, batch=2, frames=9 if family != "ltx" else 9)
    sparse, inst = run_applied(model, inputs, RadialProcessor(decay=0.5, backend="torch", **SMALL))
    ref, _ = run_applied(model, inputs, RadialProcessor(decay=0.5, backend="reference", **SMALL))
    with torch.no_grad():
        dense = model(**inputs)[0]
    assert torch.isfinite(sparse).all()
    assert (sparse - ref).abs().max().item() <= 1e-5
    assert (sparse - dense).abs().max().item() > 1e-5
    stats = inst.stats.summary()
    assert stats["dense_calls"] == 0 and 0 < stats["sparse_density"] < 1
    assert inst.context.step == 0 and inst.context.timestep == 500.0


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_positional_timestep_is_tracked(family):
    model = tiny_transformer(family)
    inputs = tiny_transformer_inputs(family, batch=1, timestep=700.0)
    inst = vidattn.apply(model, RadialProcessor(**SMALL))
    try:
        hs = inputs.pop("hidden_states")
        order = {"wan": ("timestep", "encoder_hidden_states"), "hunyuan": ("timestep", "encoder_hidden_states"),
                 "cogvideox": ("encoder_hidden_states", "timestep"), "ltx": ("encoder_hidden_states", "timestep"),
                 "mochi": ("encoder_hidden_states", "timestep")}[family]
        positional = [inputs.pop(name) for name in order]
        with torch.no_grad():
            model(hs, *positional, **inputs)
    finally:
        vidattn.remove(model)
    assert inst.context.timestep == 700.0


def test_hunyuan_pipeline_end_to_end_with_radial():
    from vidattn.pipelines.tiny import TINY_HUNYUAN_SETTINGS, tiny_hunyuan_pipeline

    pipe = tiny_hunyuan_pipeline(seed=0)
    settings = dict(TINY_HUNYUAN_SETTINGS, num_frames=33)
    inst = vidattn.apply(pipe, RadialProcessor(dense_steps=1, **SMALL))
    try:
        out = pipe("a fox", output_type="np", generator=torch.Generator().manual_seed(0),
                   prompt_template={"template": "{}", "crop_start": 0}, **settings).frames
    finally:
        vidattn.remove(pipe)
    stats = inst.stats.summary()
    assert out.shape[1] == 33 and bool(torch.isfinite(torch.as_tensor(out)).all())
    assert stats["sparse_calls"] > 0 and stats["dense_reasons"].get("dense step", 0) > 0
