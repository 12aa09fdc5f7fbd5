"""FreeSwim: processors (window / full branches, cross-attention roles), pass context, the high-resolution pipeline."""
from __future__ import annotations

import math

import pytest
import torch
from helpers import max_diff, run_model

import vidattn
from vidattn import DenseProcessor
from vidattn.context import PassContext
from vidattn.pipelines.tiny import tiny_transformer, tiny_transformer_inputs
from vidattn.processors.freeswim import FreeSwimCrossProcessor, FreeSwimProcessor, freeswim_scale


def test_scale_matches_spec():
    assert freeswim_scale(128, 1560, 2.0) == pytest.approx(0.0925, abs=5e-5)
    assert freeswim_scale(128, 1560, 2.0) / 128 ** -0.5 == pytest.approx(1.046, abs=1e-3)
    assert FreeSwimProcessor(30, 52).scale(128) is None
    assert FreeSwimProcessor(30, 52, scale_ratio=2.0).scale(128) == pytest.approx(
        math.sqrt(math.log(2 * 1560) / math.log(1560) / 128))


def test_pass_context_validates_and_restores():
    ctx = vidattn.StepContext()
    with pytest.raises(ValueError, match="branch"):
        PassContext(branch="left")
    with pytest.raises(ValueError, match="cross"):
        PassContext(cross="steal")
    with pytest.raises(RuntimeError):
        with ctx.passing(branch="full", cross="record"):
            assert ctx.current.branch == "full"
            raise RuntimeError
    assert ctx.current == PassContext()


def _run_pass(model, inputs, ctx, **fields):
    with ctx.passing(**fields):
        return run_model(model, inputs)


def test_apply_installs_cross_processors_and_remove_restores():
    model = tiny_transformer("wan")
    before = {name: type(p) for name, p in model.attn_processors.items()}
    inst = vidattn.apply(model, FreeSwimProcessor(2, 3))
    crosses = [b.attn2.processor for b in model.blocks]
    assert all(isinstance(p, FreeSwimCrossProcessor) for p in crosses)
    assert [p.layer_index for p in crosses] == list(range(len(model.blocks)))
    assert all(p.state is inst.processor.state for p in crosses)
    vidattn.remove(model)
    assert {name: type(p) for name, p in model.attn_processors.items()} == before


@pytest.mark.parametrize("family", ["wan", "ltx"])
def test_full_branch_is_stock_attention_with_the_scale(family):
    model = tiny_transformer(family)
    inputs = tiny_transformer_inputs(family, batch=2)
    inst = vidattn.apply(model, DenseProcessor())
    dense = run_model(model, inputs)
    vidattn.remove(model)
    inst = vidattn.apply(model, FreeSwimProcessor(2, 2))
    full = _run_pass(model, inputs, inst.context, branch="full")
    scaled_inst = vidattn.apply(model, FreeSwimProcessor(2, 2, scale_ratio=2.0))
    scaled = _run_pass(model, inputs, scaled_inst.context, branch="full")
    vidattn.remove(model)
    assert torch.equal(full, dense)  # same dispatcher call: bit-exact
    assert max_diff(scaled, dense) > 1e-4  # the scale reaches the dispatcher


@pytest.mark.parametrize("family", ["wan", "ltx"])
def test_window_covering_the_grid_equals_full_attention(family):
    model = tiny_transformer(family)
    inputs = tiny_transformer_inputs(family, batch=2)
    inst = vidattn.apply(model, FreeSwimProcessor(64, 64, scale_ratio=2.0, block_size=16))
    full = _run_pass(model, inputs, inst.context, branch="full")
    window = _run_pass(model, inputs, inst.context, branch="window")
    vidattn.remove(model)
    assert max_diff(window, full) < 1e-5


def test_small_window_differs_and_is_sparse():
    model = tiny_transformer("wan")
    inputs = tiny_transformer_inputs("wan", batch=1)
    inst = vidattn.apply(model, FreeSwimProcessor(2, 2, block_size=16))
    full = _run_pass(model, inputs, inst.context, branch="full")
    window = _run_pass(model, inputs, inst.context, branch="window")
    vidattn.remove(model)
    assert max_diff(window, full) > 1e-4
    assert inst.stats.summary()["sparse_density"] < 1


def test_record_then_replay_overrides_cross_attention():
    """Replay returns the recorded outputs: a window pass replaying the full pass's cross-attention gives the same
    output whatever text it is given (its own cross-attention query is never used)."""
    model = tiny_transformer("wan")
    inputs = tiny_transformer_inputs("wan", batch=2)
    other = dict(inputs, encoder_hidden_states=torch.randn_like(inputs["encoder_hidden_states"]))
    proc = FreeSwimProcessor(64, 64, block_size=16)
    inst = vidattn.apply(model, proc)
    ctx = inst.context
    recorded = _run_pass(model, inputs, ctx, branch="full", cross="record")
    assert proc.state.records == len(model.blocks) and set(proc.state.cache) == set(range(len(model.blocks)))
    replayed = _run_pass(model, other, ctx, branch="window", cross="replay")
    own_other = _run_pass(model, other, ctx, branch="window", cross="own")
    vidattn.remove(model)
    assert proc.state.replays == len(model.blocks)
    assert max_diff(replayed, recorded) < 1e-5  # window == full here, cross-attention from the recording
    assert max_diff(own_other, recorded) > 1e-3  # with its own text it differs


def test_replay_without_record_or_with_other_batch_is_an_error():
    model = tiny_transformer("wan")
    inst = vidattn.apply(model, FreeSwimProcessor(4, 4, block_size=16))
    with pytest.raises(RuntimeError, match="no recorded output"):
        _run_pass(model, tiny_transformer_inputs("wan"), inst.context, branch="window", cross="replay")
    _run_pass(model, tiny_transformer_inputs("wan", batch=2), inst.context, branch="full", cross="record")
    with pytest.raises(RuntimeError, match="needs batch 1"):
        _run_pass(model, tiny_transformer_inputs("wan"), inst.context, branch="window", cross="replay")
    vidattn.remove(model)


def test_cache_on_cpu_device():
    model = tiny_transformer("wan")
    proc = FreeSwimProcessor(4, 4, block_size=16, cache_device="cpu")
    inst = vidattn.apply(model, proc)
    _run_pass(model, tiny_transformer_inputs("wan"), inst.context, branch="full", cross="record")
    vidattn.remove(model)
    assert all(t.device.type == "cpu" for t in proc.state.cache.values())


def test_validation_names_the_knob():
    for kwargs, name in [(dict(base_rows=0, base_cols=4), "base_rows"), (dict(base_rows=4, base_cols=4.5), "base_cols"),
                         (dict(base_rows=4, base_cols=4, scale_ratio=1.0), "scale_ratio"),
                         (dict(base_rows=4, base_cols=4, temporal=-1), "temporal"),
                         (dict(base_rows=4, base_cols=4, tiles=(8,)), "tiles")]:
        with pytest.raises(ValueError, match=name):
            FreeSwimProcessor(**kwargs)


# ---------------------------------------------------------------------------------------------------- pipeline
@pytest.fixture(scope="module")
def freeswim_pipe():
    from vidattn.pipelines.freeswim import FreeSwimPipeline
    from vidattn.pipelines.tiny import tiny_wan_pipeline

    return tiny_wan_pipeline("toy", pipeline_cls=FreeSwimPipeline)


def _generate(pipe, **kwargs):
    call = dict(prompt="a fox", height=128, width=128, num_frames=9, base_height=64, base_width=64,
                num_inference_steps=4, strength=0.75, guidance_scale=1.0, output_type="pt",
                generator=torch.Generator().manual_seed(0))
    call.update(kwargs)
    return pipe(**call).frames


def test_pipeline_writes_target_size_and_restores_processors(freeswim_pipe):
    before = {name: type(p) for name, p in freeswim_pipe.transformer.attn_processors.items()}
    frames = _generate(freeswim_pipe, guidance_scale=3.0)
    assert frames.shape[1] == 9 and tuple(frames.shape[-2:]) == (128, 128)
    assert torch.isfinite(frames).all()
    assert {name: type(p) for name, p in freeswim_pipe.transformer.attn_processors.items()} == before
    assert vidattn.installed(freeswim_pipe) is None


def test_cache_steps_1_equals_nocache_for_the_cond_prediction(freeswim_pipe):
    """Without guidance only the cond half runs: refreshing every step is exactly nocache."""
    cache1 = _generate(freeswim_pipe, mode="cache", cache_steps=1)
    nocache = _generate(freeswim_pipe, mode="nocache")
    assert torch.equal(cache1, nocache)
    cache2 = _generate(freeswim_pipe, mode="cache", cache_steps=2)
    assert max_diff(cache2, nocache) > 0


def test_full_branch_runs_only_when_refreshing(freeswim_pipe):
    proc = FreeSwimProcessor(4, 4, scale_ratio=2.0)
    _generate(freeswim_pipe, mode="cache", cache_steps=2, guidance_scale=3.0, processor=proc)
    layers = len(freeswim_pipe.transformer.blocks)
    kept = 3  # int(4 * 0.75) refinement steps
    refreshes = len(range(0, kept, 2))
    assert proc.state.records == refreshes * layers  # cond full pass on refresh steps only
    assert proc.state.replays == kept * layers  # every cond window pass; uncond runs its own
    summary = proc.stats.summary()
    # self-attention calls: full (refresh) + window (cond, every step) + window (uncond, every step)
    assert summary["calls"] == (refreshes + 2 * kept) * layers
    assert summary["dense_reasons"] == {"method's full attention": refreshes * layers}


@pytest.mark.parametrize("kwargs, name", [(dict(height=120), "height"), (dict(base_width=70), "base_width"),
                                          (dict(num_frames=10), "num_frames"), (dict(strength=0), "strength"),
                                          (dict(mode="fast"), "mode"), (dict(cache_steps=0), "cache_steps")])
def test_pipeline_checks_inputs_before_work(freeswim_pipe, kwargs, name):
    with pytest.raises(ValueError, match=name):
        _generate(freeswim_pipe, **kwargs)


def test_tiled_token_order_gives_the_same_video(freeswim_pipe):
    """Spatial tiles only reorder tokens (split-point hooks, window predicate on coordinates): same result."""
    raster = _generate(freeswim_pipe, guidance_scale=3.0)
    tiled = _generate(freeswim_pipe, guidance_scale=3.0,
                      processor=FreeSwimProcessor(4, 4, scale_ratio=2.0, tiles=(2, 4), block_size=16))
    plain = _generate(freeswim_pipe, guidance_scale=3.0, processor=FreeSwimProcessor(4, 4, scale_ratio=2.0,
                                                                                      block_size=16))
    assert max_diff(tiled, plain) < 1e-4
    assert max_diff(plain, raster) < 1e-4  # block size does not change an exact window


def test_two_experts_never_share_a_cross_attention_slot():
    from vidattn.pipelines.tiny import tiny_wan22_pipeline

    pipe = tiny_wan22_pipeline()
    vidattn.apply(pipe, FreeSwimProcessor(4, 4))
    first = [b.attn2.processor.layer_index for b in pipe.transformer.blocks]
    second = [b.attn2.processor.layer_index for b in pipe.transformer_2.blocks]
    vidattn.remove(pipe)
    assert len(set(first + second)) == len(first) + len(second)


def test_freeswim_pipeline_refuses_wan22():
    from vidattn.pipelines.freeswim import FreeSwimPipeline
    from vidattn.pipelines.tiny import tiny_wan22_pipeline

    pipe = tiny_wan22_pipeline(pipeline_cls=FreeSwimPipeline)
    with pytest.raises(ValueError, match="Wan 2.1"):
        _generate(pipe)


@pytest.mark.parametrize("policy", [dict(dense_layers=2), dict(dense_steps=5)])
def test_freeswim_scale_kept_where_a_policy_keeps_calls_dense(policy):
    """Both branches use FreeSwim's scale in every layer and step (spec §2.3), also in layers/steps kept dense."""
    model = tiny_transformer("wan")
    inputs = tiny_transformer_inputs("wan", batch=2)
    outs = []
    for knobs in ({}, policy):
        inst = vidattn.apply(model, FreeSwimProcessor(2, 2, scale_ratio=2.0, **knobs))
        outs.append(_run_pass(model, inputs, inst.context, branch="full"))
        vidattn.remove(model)
    assert max_diff(outs[0], outs[1]) < 1e-6
