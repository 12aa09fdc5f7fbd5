"""Tiny offline pipelines and transformers: determinism, shapes, Wan 2.2 switching, HunyuanVideo end to end."""
from __future__ import annotations

import diffusers
import numpy as np
import pytest
import torch

from vidattn.pipelines.tiny import (
    FAMILIES,
    TINY_HUNYUAN_SETTINGS,
    TINY_PRESETS,
    TINY_WAN22_SETTINGS,
    tiny_hunyuan_pipeline,
    tiny_tokenizer,
    tiny_transformer,
    tiny_transformer_inputs,
    tiny_wan22_pipeline,
    tiny_wan_pipeline,
)

PROMPT = "a red fox runs through the snow, cinematic"


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _generate(pipe, seed: int = 0, **overrides) -> np.ndarray:
    kwargs = {**TINY_PRESETS["toy"], **overrides}
    return pipe(PROMPT, generator=torch.Generator().manual_seed(seed), output_type="np", **kwargs).frames


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _spy_inputs(module: torch.nn.Module) -> list[dict]:
    calls: list[dict] = []
    module.register_forward_pre_hook(lambda m, args, kwargs: calls.append(kwargs), with_kwargs=True)
    return calls


@pytest.fixture(scope="module")
def toy_pipe():
    return _quiet(tiny_wan_pipeline("toy", seed=0))


def test_builders_leave_global_rng_alone():
    state = torch.random.get_rng_state()
    tiny_wan_pipeline("toy", seed=3)
    tiny_transformer("mochi", seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)


def test_wan_weights_deterministic_per_seed(toy_pipe):
    again, other = tiny_wan_pipeline("toy", seed=0), tiny_wan_pipeline("toy", seed=1)
    for name in ("transformer", "vae", "text_encoder"):
        assert _same_weights(getattr(toy_pipe, name), getattr(again, name)), name
        assert not _same_weights(getattr(toy_pipe, name), getattr(other, name)), name


def test_toy_generation_shape_tokens_and_determinism(toy_pipe):
    calls = _spy_inputs(toy_pipe.transformer)
    video = _generate(toy_pipe)
    preset = TINY_PRESETS["toy"]
    assert video.shape == (1, preset["num_frames"], preset["height"], preset["width"], 3)
    assert video.dtype == np.float32 and np.isfinite(video).all() and 0.0 <= video.min() <= video.max() <= 1.0
    assert len(calls) == 2 * preset["num_inference_steps"]  # CFG: cond + uncond per step
    latents = calls[0]["hidden_states"]
    assert latents.shape == (1, 16, 5, 8, 8)  # 5 latent frames x 4 x 4 tokens = 80
    assert calls[0]["encoder_hidden_states"].shape == (1, 512, 32)

    assert np.array_equal(video, _generate(_quiet(tiny_wan_pipeline("toy", seed=0))))
    assert not np.array_equal(video, _generate(_quiet(tiny_wan_pipeline("toy", seed=1))))
    assert not np.array_equal(video, _generate(toy_pipe, seed=1))


def test_default_pipeline_class_and_subclass():
    class Custom(diffusers.WanPipeline):
        pass

    assert isinstance(tiny_wan_pipeline(), diffusers.WanPipeline)
    assert type(tiny_wan_pipeline(pipeline_cls=Custom)) is Custom
    assert type(tiny_wan22_pipeline(pipeline_cls=Custom)) is Custom
    with pytest.raises(ValueError, match="preset"):
        tiny_wan_pipeline("huge")


def test_bench_preset_geometry():
    pipe = tiny_wan_pipeline("bench")
    cfg, settings = pipe.transformer.config, TINY_PRESETS["bench"]
    spatial = pipe.vae_scale_factor_spatial
    grid_h = settings["height"] // (spatial * cfg.patch_size[1])
    grid_w = settings["width"] // (spatial * cfg.patch_size[2])
    frames = (settings["num_frames"] - 1) // pipe.vae_scale_factor_temporal + 1
    assert grid_h * grid_w >= 1500 and frames >= 5
    assert cfg.rope_max_seq_len >= max(grid_h, grid_w, frames)
    assert (cfg.num_attention_heads, cfg.attention_head_dim) == (2, 64)


def test_bf16_keeps_fp32_modules():
    pipe = tiny_wan_pipeline("toy", dtype=torch.bfloat16)
    blocks = pipe.transformer.blocks[0]
    assert blocks.attn1.to_q.weight.dtype == torch.bfloat16
    assert pipe.transformer.scale_shift_table.dtype == torch.float32
    assert pipe.vae.dtype == torch.float32
    inputs = tiny_transformer_inputs("wan")
    inputs = {k: v.to(torch.bfloat16) if torch.is_tensor(v) else v for k, v in inputs.items()}
    with torch.no_grad():
        out = pipe.transformer(**inputs)[0]
    assert out.shape == inputs["hidden_states"].shape and torch.isfinite(out.float()).all()


def test_tokenizer_pads_and_appends_eos():
    tok = tiny_tokenizer()
    enc = tok(["A cat, zebra"], padding="max_length", max_length=8, truncation=True, return_tensors="pt")
    ids, mask = enc.input_ids[0].tolist(), enc.attention_mask[0].tolist()
    assert mask == [1, 1, 1, 1, 1, 0, 0, 0]
    assert ids[3] == tok.unk_token_id and ids[4] == tok.eos_token_id and ids[5:] == [tok.pad_token_id] * 3


def test_wan22_calls_both_transformers():
    pipe = _quiet(tiny_wan22_pipeline(seed=0))
    assert pipe.config.boundary_ratio == pytest.approx(0.875)
    high, low = _spy_inputs(pipe.transformer), _spy_inputs(pipe.transformer_2)
    video = pipe(PROMPT, generator=torch.Generator().manual_seed(0), output_type="np", **TINY_WAN22_SETTINGS).frames
    assert video.shape == (1, 17, 64, 64, 3)
    assert len(high) == 2 and len(low) == 2
    assert float(high[0]["timestep"][0]) >= 875 > float(low[0]["timestep"][0])
    assert not _same_weights(pipe.transformer, pipe.transformer_2)


def test_hunyuan_pipeline_runs_from_prompt():
    pipe = _quiet(tiny_hunyuan_pipeline(seed=0))
    calls = _spy_inputs(pipe.transformer)
    video = pipe(
        PROMPT, negative_prompt="blurry", true_cfg_scale=2.0, generator=torch.Generator().manual_seed(0),
        output_type="np", **TINY_HUNYUAN_SETTINGS,
    ).frames
    assert video.shape == (1, 17, 64, 64, 3) and np.isfinite(video).all()
    assert len(calls) == 4  # 2 steps x (cond + true-CFG uncond)
    kwargs = calls[0]
    assert kwargs["hidden_states"].shape == (1, 4, 5, 8, 8)
    mask = kwargs["encoder_attention_mask"]
    assert mask.shape == (1, 256) and 0 < mask.sum() < 256
    assert kwargs["pooled_projections"].shape == (1, 8) and kwargs["guidance"] is not None

    again = _quiet(tiny_hunyuan_pipeline(seed=0))
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        assert _same_weights(getattr(pipe, name), getattr(again, name)), name


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_transformer_forward(family):
    model = tiny_transformer(family, seed=0)
    assert not model.training
    inputs = tiny_transformer_inputs(family, batch=2)
    latents = inputs["hidden_states"]
    with torch.no_grad():
        out = model(**inputs)[0]
        again = model(**tiny_transformer_inputs(family, batch=2))[0]
    assert out.shape == latents.shape and torch.isfinite(out).all()
    assert torch.equal(out, again)
    assert _same_weights(model, tiny_transformer(family, seed=0))
    assert not _same_weights(model, tiny_transformer(family, seed=1))

    if family == "ltx":
        tokens, per_frame, frames = latents.shape[1], inputs["height"] * inputs["width"], inputs["num_frames"]
    else:
        shape = latents.shape[2:] if family != "cogvideox" else (latents.shape[1], *latents.shape[3:])
        frames, per_frame = shape[0], (shape[1] // 2) * (shape[2] // 2)
        tokens = frames * per_frame
    assert frames >= 5 and per_frame >= 16 and 100 <= tokens <= 1000

    mask = inputs.get("encoder_attention_mask")
    if mask is not None:
        valid = mask.sum(dim=1)
        assert valid[0] < mask.shape[1] and valid[1] < valid[0]
    if family == "wan":
        assert (inputs["encoder_hidden_states"][:, -1] == 0).all()


def test_tiny_transformer_inputs_sizes_and_errors():
    inputs = tiny_transformer_inputs("wan", frames=7, height=4, width=6, text_len=9)
    assert inputs["hidden_states"].shape == (1, 16, 7, 4, 6)
    assert inputs["encoder_hidden_states"].shape == (1, 9, 32)
    with pytest.raises(ValueError, match="family"):
        tiny_transformer_inputs("sora")
    with pytest.raises(ValueError, match="family"):
        tiny_transformer("sora")
