"""Tiny, offline, seed-deterministic video diffusion pipelines and transformers for tests and CPU benchmarks.

Everything is built from configs with random weights; no file or Hub access. Each builder runs under a forked
torch RNG seeded with ``seed``, so the same seed gives bitwise-identical weights and the global RNG is untouched.
"""
from __future__ import annotations

from typing import Any

import torch
from diffusers import (
    AutoencoderKLHunyuanVideo,
    AutoencoderKLLTXVideo,
    AutoencoderKLWan,
    CogVideoXTransformer3DModel,
    FlowMatchEulerDiscreteScheduler,
    HunyuanVideoPipeline,
    HunyuanVideoTransformer3DModel,
    LTXPipeline,
    LTXVideoTransformer3DModel,
    MochiTransformer3DModel,
    WanPipeline,
    WanTransformer3DModel,
)
from diffusers.models.embeddings import get_3d_rotary_pos_embed
from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    LlamaConfig,
    LlamaModel,
    PreTrainedTokenizerFast,
    T5Config,
    T5EncoderModel,
    UMT5Config,
    UMT5EncoderModel,
)

from vidattn.modeling import cast_like_pretrained, seeded

__all__ = [
    "FAMILIES",
    "TINY_HUNYUAN_SETTINGS",
    "TINY_LTX_SETTINGS",
    "TINY_PRESETS",
    "TINY_WAN22_SETTINGS",
    "tiny_hunyuan_pipeline",
    "tiny_ltx_pipeline",
    "tiny_tokenizer",
    "tiny_transformer",
    "tiny_transformer_inputs",
    "tiny_wan22_pipeline",
    "tiny_wan_pipeline",
]


FAMILIES: tuple[str, ...] = ("wan", "hunyuan", "cogvideox", "ltx", "mochi")

# Default ``__call__`` kwargs per Wan preset: ``pipe(prompt, **TINY_PRESETS["toy"])``.
TINY_PRESETS: dict[str, dict[str, Any]] = {
    # 5 latent frames x 4 x 4 = 80 video tokens.
    "toy": {"height": 64, "width": 64, "num_frames": 17, "num_inference_steps": 2, "guidance_scale": 5.0},
    # 13 latent frames x 30 x 52 = 1560 tokens per latent frame, 20280 video tokens.
    "bench": {"height": 480, "width": 832, "num_frames": 49, "num_inference_steps": 2, "guidance_scale": 5.0},
}
TINY_WAN22_SETTINGS: dict[str, Any] = {
    "height": 64, "width": 64, "num_frames": 17, "num_inference_steps": 2, "guidance_scale": 4.0,
    "guidance_scale_2": 3.0,
}
TINY_HUNYUAN_SETTINGS: dict[str, Any] = {
    "height": 64, "width": 64, "num_frames": 17, "num_inference_steps": 2, "guidance_scale": 6.0,
}

_WAN_TRANSFORMERS: dict[str, dict[str, Any]] = {
    "toy": {"num_attention_heads": 2, "attention_head_dim": 16, "ffn_dim": 64, "num_layers": 2},
    "bench": {"num_attention_heads": 2, "attention_head_dim": 64, "ffn_dim": 256, "num_layers": 2},
}
_WAN_TEXT_DIM = 32
_WAN_BOUNDARY_RATIO = 0.875
_COGVIDEOX_SAMPLE = (12, 16)  # latent (height, width) the tiny CogVideoX is "trained" at; sets its RoPE crop

_SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>", "<s>")
_WORDS = tuple((
    "a an the of and in on at with to from by is are it its this that over under into through near "
    "cat dog bird fish horse cow car boat plane train tree flower grass river ocean lake mountain city street "
    "forest field beach sky sun moon cloud rain snow fire water wind road house bridge garden "
    "red green blue yellow white black gray orange purple golden bright dark small big tall tiny huge "
    "fast slow walks runs flies swims jumps dances sits stands rolls falls moves turns waves shines "
    "video scene shot camera view light night day morning evening sunset sunrise "
    "beautiful realistic cinematic high low quality detailed blurry worst static still overall style "
    ", . ! ?"
).split())


def tiny_tokenizer(model_max_length: int = 512) -> PreTrainedTokenizerFast:
    """Word-level fast tokenizer built in code: ``<pad>`` = 0, ``</s>`` = 1, ``<unk>`` = 2, ``<s>`` = 3, then words.

    Lower-cases, splits on whitespace and punctuation and appends ``</s>``; unknown words map to ``<unk>``.
    """
    vocab = {token: i for i, token in enumerate(_SPECIAL_TOKENS + _WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", vocab["</s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        bos_token="<s>",
        model_max_length=model_max_length,
        padding_side="right",
    )


def _vocab_size() -> int:
    return len(_SPECIAL_TOKENS) + len(_WORDS)


def _tiny_umt5(d_model: int) -> UMT5EncoderModel:
    config = UMT5Config(
        vocab_size=_vocab_size() + 8, d_model=d_model, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, dropout_rate=0.0, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )
    return UMT5EncoderModel(config).eval()


def _tiny_wan_vae() -> AutoencoderKLWan:
    return AutoencoderKLWan(
        base_dim=2, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=0, temperal_downsample=[False, True, True]
    ).eval()


def _tiny_wan_transformer(preset: str) -> WanTransformer3DModel:
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), in_channels=16, out_channels=16, text_dim=_WAN_TEXT_DIM, freq_dim=256,
        cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=1024, **_WAN_TRANSFORMERS[preset],
    ).eval()


def _default_wan_pipeline_cls() -> type[WanPipeline]:
    try:
        from vidattn.pipelines.dropin import WanPipeline as VidattnWanPipeline
    except ImportError:
        return WanPipeline
    return VidattnWanPipeline


def _build_wan(cls: type[WanPipeline], dtype: torch.dtype, presets: tuple[str, ...], **kwargs: Any) -> WanPipeline:
    """A Wan pipeline of ``cls``: text encoder, VAE, then one transformer per preset (``transformer``,
    ``transformer_2``), built in that order (the order fixes the seeded weights); ``kwargs`` go to ``cls``."""
    text_encoder = _tiny_umt5(_WAN_TEXT_DIM)
    vae = _tiny_wan_vae()
    transformers = [_tiny_wan_transformer(preset) for preset in presets]
    names = ("transformer", "transformer_2")[:len(transformers)]
    return cls(
        tokenizer=tiny_tokenizer(),
        text_encoder=cast_like_pretrained(text_encoder, dtype),
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        **{name: cast_like_pretrained(transformer, dtype) for name, transformer in zip(names, transformers)},
        **kwargs,
    )


def tiny_wan_pipeline(
    preset: str = "toy",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    pipeline_cls: type[WanPipeline] | None = None,
) -> WanPipeline:
    """Wan 2.1 T2V pipeline with random tiny weights (local tokenizer + UMT5, tiny VAE, tiny transformer).

    ``preset`` picks the transformer size ("toy": 2 heads x 16, "bench": 2 heads x 64); generation defaults are in
    ``TINY_PRESETS[preset]``. ``dtype`` applies to the transformer and text encoder; the VAE stays float32 (as Wan
    is usually run). ``pipeline_cls`` defaults to ``vidattn.pipelines.WanPipeline`` when importable.
    """
    if preset not in _WAN_TRANSFORMERS:
        raise ValueError(f"unknown preset {preset!r}; expected one of {sorted(_WAN_TRANSFORMERS)}")
    cls = pipeline_cls or _default_wan_pipeline_cls()
    return seeded(seed, lambda: _build_wan(cls, dtype, (preset,)))


def tiny_wan22_pipeline(
    seed: int = 0, dtype: torch.dtype = torch.float32, pipeline_cls: type[WanPipeline] | None = None
) -> WanPipeline:
    """Wan 2.2 A14B-style pipeline: high-noise ``transformer`` and low-noise ``transformer_2``, toy sizes.

    ``boundary_ratio`` = 0.875 (switch at t = 875). With ``TINY_WAN22_SETTINGS`` (2 steps, shift 3) the timesteps
    are 1000 (``transformer``) and ~8.9 (``transformer_2``), so each transformer runs one step (cond + uncond).
    """
    cls = pipeline_cls or _default_wan_pipeline_cls()
    return seeded(seed, lambda: _build_wan(cls, dtype, ("toy", "toy"), boundary_ratio=_WAN_BOUNDARY_RATIO))


def _tiny_hunyuan_transformer() -> HunyuanVideoTransformer3DModel:
    return HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=2, patch_size_t=1, guidance_embeds=True,
        text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(4, 6, 6),
    ).eval()


def tiny_hunyuan_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32) -> HunyuanVideoPipeline:
    """HunyuanVideo pipeline built fully offline, including both text encoders.

    Text: ``LlamaModel`` (hidden 16, 2 layers; the pipeline reads ``hidden_states[-3]``) and ``CLIPTextModel``
    (hidden 8, its ``pooler_output`` is the pooled projection), both with the local word-level tokenizer, so
    ``prompt=`` works. ``DEFAULT_PROMPT_TEMPLATE`` (``crop_start=95``) runs mechanically; pass
    ``prompt_template={"template": "{}", "crop_start": 0}`` to keep every prompt token. Transformer: 2 heads x 16,
    patch (1, 2, 2), 1 dual + 1 single + 1 refiner block, 4 latent channels. Defaults: ``TINY_HUNYUAN_SETTINGS``.
    """

    def build() -> HunyuanVideoPipeline:
        vocab_size = _vocab_size() + 8
        llama = LlamaModel(
            LlamaConfig(
                vocab_size=vocab_size, hidden_size=16, intermediate_size=37, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0,
                bos_token_id=3, eos_token_id=1,
            )
        ).eval()
        clip = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=vocab_size, hidden_size=8, intermediate_size=37, projection_dim=8, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=77, pad_token_id=0, bos_token_id=3, eos_token_id=1,
            )
        ).eval()
        vae = AutoencoderKLHunyuanVideo(
            latent_channels=4, block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4,
            spatial_compression_ratio=8, temporal_compression_ratio=4,
        ).eval()
        transformer = _tiny_hunyuan_transformer()
        return HunyuanVideoPipeline(
            text_encoder=cast_like_pretrained(llama, dtype),
            tokenizer=tiny_tokenizer(model_max_length=512),
            transformer=cast_like_pretrained(transformer, dtype),
            vae=vae,
            scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
            text_encoder_2=cast_like_pretrained(clip, dtype),
            tokenizer_2=tiny_tokenizer(model_max_length=77),
        )

    return seeded(seed, build)


def _build_transformer(family: str) -> torch.nn.Module:
    if family == "wan":
        return _tiny_wan_transformer("toy")
    if family == "hunyuan":
        return _tiny_hunyuan_transformer()
    if family == "cogvideox":
        return CogVideoXTransformer3DModel(
            num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=8,
            text_embed_dim=16, num_layers=2, sample_height=_COGVIDEOX_SAMPLE[0], sample_width=_COGVIDEOX_SAMPLE[1],
            patch_size=2, use_rotary_positional_embeddings=True,
        )
    if family == "ltx":
        return LTXVideoTransformer3DModel(
            in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=2,
            attention_head_dim=16, cross_attention_dim=32, num_layers=2, caption_channels=16,
        )
    if family == "mochi":
        model = MochiTransformer3DModel(
            patch_size=2, num_attention_heads=2, attention_head_dim=16, num_layers=2, pooled_projection_dim=16,
            in_channels=4, text_embed_dim=16, time_embed_dim=4,
        )
        with torch.no_grad():
            model.pos_frequencies.normal_(0.0, 0.1)
        return model
    raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")


def tiny_transformer(family: str, seed: int = 0) -> torch.nn.Module:
    """Tiny random video transformer of ``family`` (one of ``FAMILIES``), float32, eval mode.

    Every family uses 2 heads x 16 head dim and the real model's patching. Mochi's ``pos_frequencies`` (zeros at
    init, learned in the real model) are drawn from N(0, 0.1^2) so its RoPE is not the identity.
    """
    return seeded(seed, lambda: _build_transformer(family).eval())


# Latent (frames, height, width) per family giving 5 x 6 x 8 = 240 video tokens.
_DEFAULT_LATENT_GRID: dict[str, tuple[int, int, int]] = {
    "wan": (5, 12, 16), "hunyuan": (5, 12, 16), "cogvideox": (5, 12, 16), "ltx": (5, 6, 8), "mochi": (5, 12, 16),
}
_LATENT_CHANNELS = {"wan": 16, "hunyuan": 4, "cogvideox": 4, "ltx": 8, "mochi": 4}
_TEXT_DIM = {"wan": _WAN_TEXT_DIM, "hunyuan": 16, "cogvideox": 16, "ltx": 16, "mochi": 16}


def _valid_text_lengths(batch: int, text_len: int) -> list[int]:
    """Valid prefix length per sample: 3/4 of ``text_len`` for sample 0, fewer for each further sample."""
    first = max(1, (3 * text_len) // 4)
    return [max(1, first - i * max(1, text_len // 4)) for i in range(batch)]


def tiny_transformer_inputs(
    family: str,
    batch: int = 1,
    frames: int | None = None,
    height: int | None = None,
    width: int | None = None,
    text_len: int = 16,
    seed: int = 0,
    timestep: float = 500.0,
) -> dict[str, Any]:
    """Forward kwargs for ``tiny_transformer(family)``, built the way the family's pipeline builds them.

    ``frames``/``height``/``width`` are latent sizes (before patching); the defaults give 5 latent frames with a
    6 x 8 token grid (240 video tokens). Text is a valid prefix followed by padding: 3/4 of ``text_len`` valid for
    sample 0, fewer for each later sample. Wan has no text mask, so its padded rows are zero (as in WanPipeline);
    CogVideoX has no mask either. Layouts: Wan/Hunyuan/Mochi ``(B, C, F, H, W)``, CogVideoX ``(B, F, C, H, W)`` plus
    its ``image_rotary_emb``, LTX packed ``(B, F*H*W, C)`` plus ``num_frames/height/width/rope_interpolation_scale``.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    default = _DEFAULT_LATENT_GRID[family]
    frames = default[0] if frames is None else frames
    height = default[1] if height is None else height
    width = default[2] if width is None else width
    channels = _LATENT_CHANNELS[family]
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, channels, frames, height, width, generator=generator)
    text = torch.randn(batch, text_len, _TEXT_DIM[family], generator=generator)
    valid = _valid_text_lengths(batch, text_len)
    mask = torch.arange(text_len).unsqueeze(0) < torch.tensor(valid).unsqueeze(1)
    t = torch.full((batch,), float(timestep))

    if family == "wan":
        return {
            "hidden_states": latents,
            "timestep": t,
            "encoder_hidden_states": text * mask.unsqueeze(-1),
            "return_dict": False,
        }
    if family == "hunyuan":
        return {
            "hidden_states": latents,
            "timestep": t,
            "encoder_hidden_states": text,
            "encoder_attention_mask": mask.float(),
            "pooled_projections": torch.randn(batch, 8, generator=generator),
            "guidance": torch.full((batch,), 6000.0),
            "return_dict": False,
        }
    if family == "cogvideox":
        patch = 2
        grid_h, grid_w = height // patch, width // patch
        crops = get_resize_crop_region_for_grid(
            (grid_h, grid_w), _COGVIDEOX_SAMPLE[1] // patch, _COGVIDEOX_SAMPLE[0] // patch
        )
        rotary = get_3d_rotary_pos_embed(
            embed_dim=16, crops_coords=crops, grid_size=(grid_h, grid_w), temporal_size=frames, device="cpu"
        )
        return {
            "hidden_states": latents.transpose(1, 2).contiguous(),
            "encoder_hidden_states": text,
            "timestep": t.long(),
            "image_rotary_emb": rotary,
            "return_dict": False,
        }
    if family == "ltx":
        packed = latents.permute(0, 2, 3, 4, 1).reshape(batch, frames * height * width, channels)
        return {
            "hidden_states": packed,
            "encoder_hidden_states": text,
            "timestep": t,
            "encoder_attention_mask": mask,
            "num_frames": frames,
            "height": height,
            "width": width,
            "rope_interpolation_scale": (8 / 25, 32, 32),
            "return_dict": False,
        }
    return {
        "hidden_states": latents,
        "encoder_hidden_states": text,
        "timestep": t,
        "encoder_attention_mask": mask,
        "return_dict": False,
    }


# ------------------------------------------------------------------------------------------------------ LTX-Video
TINY_LTX_SETTINGS: dict[str, Any] = {
    "height": 64, "width": 64, "num_frames": 9, "num_inference_steps": 2, "guidance_scale": 3.0,
}
# LTX-Video's scheduler config (resolution-dependent shift from the token count, terminal sigma 0.1).
_LTX_SCHEDULER: dict[str, Any] = {
    "use_dynamic_shifting": True, "base_shift": 0.95, "max_shift": 2.05, "base_image_seq_len": 1024,
    "max_image_seq_len": 4096, "shift_terminal": 0.1,
}


def _tiny_t5(d_model: int) -> T5EncoderModel:
    config = T5Config(
        vocab_size=_vocab_size() + 8, d_model=d_model, d_kv=8, d_ff=37, num_layers=2, num_heads=2,
        relative_attention_num_buckets=8, dropout_rate=0.0, feed_forward_proj="gated-gelu", pad_token_id=0,
        eos_token_id=1, decoder_start_token_id=0,
    )
    return T5EncoderModel(config).eval()


def _tiny_ltx_vae() -> AutoencoderKLLTXVideo:
    """LTX-Video's VAE layout (patch 4, three spatio-temporal downsamplings: 32x space, 8x time, timestep-conditioned
    decoder as in LTX-Video 0.9.1+) with 8 channels everywhere and 8 latent channels."""
    return AutoencoderKLLTXVideo(
        latent_channels=_LATENT_CHANNELS["ltx"], block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8), layers_per_block=(1, 1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1, 1), spatio_temporal_scaling=(True, True, True, False),
        decoder_spatio_temporal_scaling=(True, True, True, False), decoder_inject_noise=(False,) * 5,
        upsample_residual=(False,) * 4, upsample_factor=(1,) * 4, timestep_conditioning=True, patch_size=4,
        patch_size_t=1,
    ).eval()


def _default_ltx_pipeline_cls() -> type[LTXPipeline]:
    try:
        from vidattn.pipelines.dropin import LTXPipeline as VidattnLTXPipeline
    except ImportError:
        return LTXPipeline
    return VidattnLTXPipeline


def tiny_ltx_pipeline(
    seed: int = 0, dtype: torch.dtype = torch.float32, pipeline_cls: type[LTXPipeline] | None = None
) -> LTXPipeline:
    """LTX-Video pipeline built fully offline: local word-level tokenizer (128 tokens) + tiny T5 encoder (d_model 16),
    tiny ``AutoencoderKLLTXVideo`` (32x space / 8x time like the real one, 8 latent channels, timestep-conditioned
    decoder), the tiny LTX transformer of ``tiny_transformer("ltx")`` (2 heads x 16, patch 1) and LTX-Video's
    dynamic-shift ``FlowMatchEulerDiscreteScheduler``. 64x64x9 px is a 2 x 2 x 2 latent grid. Defaults:
    ``TINY_LTX_SETTINGS``. ``dtype`` applies to the transformer and text encoder; the VAE stays float32.
    ``pipeline_cls`` defaults to ``vidattn.pipelines.LTXPipeline`` when importable (e.g. ``FreeSwimLTXPipeline``).
    """
    cls = pipeline_cls or _default_ltx_pipeline_cls()

    def build() -> LTXPipeline:
        text_encoder = _tiny_t5(_TEXT_DIM["ltx"])
        vae = _tiny_ltx_vae()
        transformer = _build_transformer("ltx").eval()
        return cls(
            scheduler=FlowMatchEulerDiscreteScheduler(**_LTX_SCHEDULER),
            vae=vae,
            text_encoder=cast_like_pretrained(text_encoder, dtype),
            tokenizer=tiny_tokenizer(model_max_length=128),
            transformer=cast_like_pretrained(transformer, dtype),
        )

    return seeded(seed, build)
