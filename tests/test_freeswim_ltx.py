"""FreeSwim on LTX-Video: the coarse-to-fine pipeline on the tiny offline LTX pipeline."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import max_diff

import vidattn
from vidattn.pipelines.freeswim_ltx import FreeSwimLTXPipeline
from vidattn.pipelines.tiny import TINY_LTX_SETTINGS, tiny_ltx_pipeline
from vidattn.processors.freeswim import FreeSwimProcessor


@pytest.fixture(scope="module")
def pipe():
    p = tiny_ltx_pipeline(pipeline_cls=FreeSwimLTXPipeline)
    p.set_progress_bar_config(disable=True)
    return p


def _generate(pipe, **kwargs):
    call = dict(prompt="a red fox runs", height=128, width=128, num_frames=9, base_height=64, base_width=64,
                num_inference_steps=4, strength=0.75, guidance_scale=1.0, output_type="pt",
                generator=torch.Generator().manual_seed(0))
    call.update(kwargs)
    return pipe(**call).frames


def _processor_types(pipe):
    return {name: type(p) for name, p in pipe.transformer.attn_processors.items()}


def test_tiny_ltx_pipeline_is_a_working_stock_pipeline():
    pipe = tiny_ltx_pipeline()
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe, vidattn.pipelines.LTXPipeline)
    assert (pipe.vae_spatial_compression_ratio, pipe.vae_temporal_compression_ratio) == (32, 8)
    assert pipe.vae.config.timestep_conditioning
    out = pipe("a red fox runs", height=64, width=64, num_frames=9, num_inference_steps=2)
    frames = out.frames[0]
    assert len(frames) == 9 and frames[0].size == (64, 64)
    gen = dict(TINY_LTX_SETTINGS, output_type="pt", decode_timestep=0.05, decode_noise_scale=0.025)
    a = pipe("a red fox runs", generator=torch.Generator().manual_seed(1), **gen).frames
    b = tiny_ltx_pipeline(seed=0)("a red fox runs", generator=torch.Generator().manual_seed(1), **gen).frames
    assert torch.equal(a, b)  # the seed fixes the weights


def test_runs_at_twice_the_base_size_and_restores_processors(pipe):
    before = _processor_types(pipe)
    stock_scheduler = pipe.scheduler
    frames = _generate(pipe, guidance_scale=3.0, negative_prompt="blurry", output_type="np",
                       decode_timestep=0.05, decode_noise_scale=0.025)
    assert isinstance(frames, np.ndarray) and frames.shape == (1, 9, 128, 128, 3)
    assert np.isfinite(frames).all()
    assert vidattn.installed(pipe) is None
    assert _processor_types(pipe) == before
    assert pipe.scheduler is stock_scheduler


def test_batch_of_prompts_with_guidance(pipe):
    frames = _generate(pipe, prompt=["a red fox runs", "a small boat on the lake"],
                       negative_prompt=["blurry", "worst quality"], guidance_scale=3.0, mode="nocache")
    assert frames.shape == (2, 9, 3, 128, 128) and torch.isfinite(frames).all()


def test_cache_steps_1_equals_nocache_without_guidance(pipe):
    cache1 = _generate(pipe, mode="cache", cache_steps=1, output_type="latent")
    nocache = _generate(pipe, mode="nocache", output_type="latent")
    assert cache1.shape == (1, 2 * 4 * 4, 8)  # packed (B, T*h*w, C) at the target size
    assert torch.equal(cache1, nocache)
    cache2 = _generate(pipe, mode="cache", cache_steps=2, output_type="latent")
    assert max_diff(cache2, nocache) > 0  # step 1 replays step 0's recording


def test_pass_table_counts(pipe):
    """Cache mode, CFG: cond full pass on refresh steps only, every cond window pass replays, uncond runs its own."""
    proc = FreeSwimProcessor(2, 2, scale_ratio=2.0)
    _generate(pipe, mode="cache", cache_steps=2, guidance_scale=3.0, processor=proc, output_type="latent")
    layers = len(pipe.transformer.transformer_blocks)
    kept = 3  # int(4 * 0.75)
    refreshes = len(range(0, kept, 2))
    assert proc.state.records == refreshes * layers
    assert proc.state.replays == kept * layers
    summary = proc.stats.summary()
    assert summary["calls"] == (refreshes + 2 * kept) * layers
    assert summary["dense_reasons"] == {"method's full attention": refreshes * layers}


def test_window_is_local_at_the_target_size(pipe):
    """Base 64x64 = 2x2 latent cells -> window 3x3 on the 4x4 target grid: with 4-token blocks (one latent row)
    every query row keeps 3 of the 4 rows of each frame."""
    proc = FreeSwimProcessor(2, 2, scale_ratio=2.0, block_size=4)
    _generate(pipe, output_type="latent", processor=proc)
    summary = proc.stats.summary()
    layers = len(pipe.transformer.transformer_blocks)
    assert summary["sparse_calls"] == 3 * layers  # the cond window pass of each of the 3 kept steps
    assert summary["sparse_density"] == pytest.approx(0.75)


def test_refine_schedule_is_ltx_schedule_at_the_target_size(pipe):
    """``refine_flow_shift=None``: LTX's own dynamic-shift schedule for the target token count; a fixed shift
    replaces it and changes the result."""
    from diffusers.pipelines.ltx.pipeline_ltx import calculate_shift

    stock = pipe.scheduler
    refine = pipe._refine_scheduler(None)
    assert refine is not stock and dict(refine.config) == dict(stock.config)
    tokens = 2 * 16
    cfg = stock.config
    mu = calculate_shift(tokens, cfg.base_image_seq_len, cfg.max_image_seq_len, cfg.base_shift, cfg.max_shift)
    expected = type(stock).from_config(cfg)
    expected.set_timesteps(sigmas=np.linspace(1.0, 1 / 10, 10), mu=mu)
    pipe.scheduler = refine
    try:
        latents, timesteps = pipe._noised_start(torch.zeros(1, tokens, 8), 10, 0.7, tokens, None)
    finally:
        pipe.scheduler = stock
    assert torch.equal(timesteps, expected.timesteps[3:])
    fixed = pipe._refine_scheduler(9.0)
    assert fixed.config.shift == 9.0 and not fixed.config.use_dynamic_shifting
    assert stock.config.use_dynamic_shifting and stock.config.shift == 1.0  # stock untouched
    a = _generate(pipe, output_type="latent")
    b = _generate(pipe, output_type="latent", refine_flow_shift=9.0)
    assert max_diff(a, b) > 1e-4


@pytest.mark.parametrize("kwargs, name", [
    (dict(height=120), "height"), (dict(width=100), "width"), (dict(base_height=48), "base_height"),
    (dict(base_width=70), "base_width"), (dict(num_frames=10), "num_frames"), (dict(num_frames=13), "num_frames"),
    (dict(strength=0), "strength"), (dict(strength=1.5), "strength"), (dict(mode="fast"), "mode"),
    (dict(cache_steps=0), "cache_steps"), (dict(num_inference_steps=0), "num_inference_steps"),
    (dict(base_steps=0), "base_steps"), (dict(refine_flow_shift=-1.0), "refine_flow_shift"),
    (dict(num_inference_steps=2, strength=0.4), "strength"),
    (dict(processor=FreeSwimProcessor(4, 4)), "base grid"),
])
def test_checks_inputs_before_work(pipe, kwargs, name):
    calls = []
    handle = pipe.transformer.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(ValueError, match=name):
            _generate(pipe, **kwargs)
    finally:
        handle.remove()
    assert not calls


def test_tiled_token_order_gives_the_same_video(pipe):
    """Spatial tiles only reorder tokens (LTX split points, window predicate on coordinates): same result."""
    plain = _generate(pipe, guidance_scale=3.0, output_type="latent",
                      processor=FreeSwimProcessor(2, 2, scale_ratio=2.0, block_size=16))
    tiled = _generate(pipe, guidance_scale=3.0, output_type="latent",
                      processor=FreeSwimProcessor(2, 2, scale_ratio=2.0, block_size=16, tiles=(2, 2)))
    assert max_diff(tiled, plain) < 1e-4
