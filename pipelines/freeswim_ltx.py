"""FreeSwimLTXPipeline: training-free high-resolution LTX-Video (spec ``freeswim.md`` §2.4-§2.6 and §4 "LTX-Video").

The coarse-to-fine flow and the pass table of :mod:`vidattn.pipelines.freeswim` (Wan), on LTX-Video:

1. base generation at the training size (the stock LTX loop, whatever processor is installed; default 512x704);
2. the decoded frames upsampled to the target size in pixel space (:meth:`FreeSwimPipeline.upsample`);
3. VAE encode (posterior mode), ``_normalize_latents``, packed to ``(B, S, C)`` tokens, noised at the first kept
   timestep of a refinement schedule (``strength`` of ``num_inference_steps`` run). The schedule is LTX's own at
   the target size (``sigmas = linspace(1, 1/n, n)`` and the resolution-dependent ``mu`` for the target token
   count) unless ``refine_flow_shift`` fixes the shift (``use_dynamic_shifting=False``, ``shift=...``);
4. refinement at the target size with :class:`~vidattn.processors.freeswim.FreeSwimProcessor` on
   ``transformer_blocks.N.attn1`` and the cross-attention roles on ``transformer_blocks.N.attn2``; cond and uncond
   are separate transformer calls (the stock pipeline batches them):

   | mode | cond, refresh step | cond, other steps | uncond |
   |---|---|---|---|
   | ``nocache`` | full (record) -> window (replay) | (every step refreshes) | full (record) -> window (replay) |
   | ``cache`` | full (record) -> window (replay) | window (replay the last cond record) | window (own) |

   Refresh steps are ``i % cache_steps == 0``, counted from the first kept step;
5. decoded as the stock pipeline does (unpack, ``_denormalize_latents``, timestep-conditioned VAE decode with
   ``decode_timestep`` / ``decode_noise_scale`` when the VAE config has ``timestep_conditioning``).

The window's base grid is ``(base_height // 32, base_width // 32)`` latent tokens (VAE 32x, patch 1); 512x704 ->
16x22, window 17x23. Sizes must be multiples of 32 and ``num_frames`` of the form 8k+1.
"""
from __future__ import annotations

from typing import Any, Optional, Union

import numpy as np
import torch
from diffusers.pipelines.ltx.pipeline_ltx import calculate_shift
from diffusers.pipelines.ltx.pipeline_output import LTXPipelineOutput
from diffusers.utils.torch_utils import randn_tensor

import vidattn
from vidattn.processors.freeswim import FreeSwimProcessor

from .dropin import LTXPipeline
from .freeswim import FreeSwimRefineMixin

__all__ = ["FreeSwimLTXPipeline"]


class FreeSwimLTXPipeline(FreeSwimRefineMixin, LTXPipeline):
    """LTX-Video T2V with FreeSwim's high-resolution refinement; loads with ``from_pretrained`` like
    ``LTXPipeline``. ``pipe(prompt, height=1024, width=1408)`` returns frames at the target size (module
    docstring)."""

    @property
    def freeswim_cell(self) -> int:
        return self.vae_spatial_compression_ratio * self.transformer_spatial_patch_size

    @property
    def freeswim_frame_step(self) -> int:
        return self.vae_temporal_compression_ratio * self.transformer_temporal_patch_size

    def _latent_grid(self, num_frames: int, height: int, width: int) -> tuple[int, int, int]:
        return ((num_frames - 1) // self.vae_temporal_compression_ratio + 1,
                height // self.vae_spatial_compression_ratio, width // self.vae_spatial_compression_ratio)

    def _encode_video(self, frames: torch.Tensor) -> torch.Tensor:
        """``(B, F, C, H, W)`` frames in [0, 1] -> normalised, packed latents ``(B, S, C)`` (posterior mode)."""
        video = (frames * 2 - 1).permute(0, 2, 1, 3, 4).to(self.vae.dtype)
        latents = torch.cat([self.vae.encode(v[None]).latent_dist.mode() for v in video]).float()
        latents = self._normalize_latents(latents, self.vae.latents_mean, self.vae.latents_std,
                                          self.vae.config.scaling_factor)
        return self._pack_latents(latents, self.transformer_spatial_patch_size, self.transformer_temporal_patch_size)

    def _noised_start(self, latents: torch.Tensor, steps: int, strength: float, seq_len: int,
                      generator: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Set LTX's schedule on ``self.scheduler`` (sigmas ``linspace(1, 1/n, n)``, ``mu`` for ``seq_len``), keep
        the last ``int(steps * strength)`` steps and noise ``latents`` at the first kept one."""
        scheduler = self.scheduler
        config = scheduler.config
        mu = calculate_shift(seq_len, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                             config.get("base_shift", 0.5), config.get("max_shift", 1.15))
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), device=latents.device, mu=mu)
        start = steps - int(steps * strength)
        timesteps = scheduler.timesteps[start:]
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(start)
        noise = randn_tensor(latents.shape, generator=generator, device=latents.device, dtype=torch.float32)
        first = timesteps[:1].repeat(latents.shape[0])
        if hasattr(scheduler, "scale_noise"):
            return scheduler.scale_noise(latents, first, noise), timesteps
        return scheduler.add_noise(latents, noise, first), timesteps

    def _decode(self, latents: torch.Tensor, grid: tuple[int, int, int], dtype: torch.dtype, generator: Any,
                decode_timestep: Union[float, list[float]], decode_noise_scale: Optional[Union[float, list[float]]],
                output_type: str) -> Any:
        """As the stock ``LTXPipeline.__call__`` decodes (timestep-conditioned VAE decode included)."""
        device = latents.device
        batch_size = latents.shape[0]
        latents = self._unpack_latents(latents, *grid, self.transformer_spatial_patch_size,
                                       self.transformer_temporal_patch_size)
        latents = self._denormalize_latents(latents, self.vae.latents_mean, self.vae.latents_std,
                                            self.vae.config.scaling_factor).to(dtype)
        timestep = None
        if self.vae.config.timestep_conditioning:
            noise = randn_tensor(latents.shape, generator=generator, device=device, dtype=latents.dtype)
            if not isinstance(decode_timestep, list):
                decode_timestep = [decode_timestep] * batch_size
            if decode_noise_scale is None:
                decode_noise_scale = decode_timestep
            elif not isinstance(decode_noise_scale, list):
                decode_noise_scale = [decode_noise_scale] * batch_size
            timestep = torch.tensor(decode_timestep, device=device, dtype=latents.dtype)
            scale = torch.tensor(decode_noise_scale, device=device, dtype=latents.dtype)[:, None, None, None, None]
            latents = (1 - scale) * latents + scale * noise
        video = self.vae.decode(latents.to(self.vae.dtype), timestep, return_dict=False)[0]
        return self.video_processor.postprocess_video(video, output_type=output_type)

    @torch.no_grad()
    def __call__(self, prompt: Union[str, list[str]], negative_prompt: Optional[Union[str, list[str]]] = None, *,
                 height: int = 1024, width: int = 1408, num_frames: int = 161, base_height: int = 512,
                 base_width: int = 704, num_inference_steps: int = 50, base_steps: Optional[int] = None,
                 guidance_scale: float = 3.0, strength: float = 0.7, refine_flow_shift: Optional[float] = None,
                 mode: str = "cache", cache_steps: int = 2, cache_device: Optional[str] = None,
                 tiles: Optional[tuple[int, int]] = None, backend: str = "auto",
                 processor: Optional[FreeSwimProcessor] = None, generator: Any = None, output_type: str = "np",
                 return_dict: bool = True, frame_rate: int = 25, decode_timestep: Union[float, list[float]] = 0.0,
                 decode_noise_scale: Optional[Union[float, list[float]]] = None,
                 max_sequence_length: int = 128) -> Any:
        """Base generation, upsampling and FreeSwim refinement (module docstring). ``processor``: a configured
        :class:`FreeSwimProcessor` for the refinement (its base grid must be the base size's); by default one with
        FreeSwim's scale (ratio 2), ``tiles``, ``cache_device`` and ``backend``. Its statistics stay readable after
        the call (``processor.stats``). ``frame_rate``, ``decode_timestep``, ``decode_noise_scale`` and
        ``max_sequence_length`` as in ``LTXPipeline`` (both stages)."""
        self.check_freeswim_inputs(height, width, base_height, base_width, num_frames, strength, mode, cache_steps,
                                   num_inference_steps, base_steps, refine_flow_shift)
        proc = self._freeswim_processor(processor, base_height, base_width, tiles, cache_device, backend)
        device = self._execution_device
        cfg = guidance_scale > 1.0
        cond, cond_mask, uncond, uncond_mask = self.encode_prompt(
            prompt, negative_prompt, do_classifier_free_guidance=cfg, max_sequence_length=max_sequence_length,
            device=device)
        base = super().__call__(
            prompt_embeds=cond, prompt_attention_mask=cond_mask, negative_prompt_embeds=uncond,
            negative_prompt_attention_mask=uncond_mask, height=base_height, width=base_width, num_frames=num_frames,
            frame_rate=frame_rate, num_inference_steps=base_steps or num_inference_steps,
            guidance_scale=guidance_scale, generator=generator, decode_timestep=decode_timestep,
            decode_noise_scale=decode_noise_scale, output_type="pt", max_sequence_length=max_sequence_length).frames
        latents = self._encode_video(self.upsample(base.to(device), height, width))

        dtype = self.transformer.dtype
        embeds = {"cond": (cond.to(dtype), cond_mask)}
        if cfg:
            embeds["uncond"] = (uncond.to(dtype), uncond_mask)
        grid = self._latent_grid(num_frames, height, width)
        tokens = grid[0] * grid[1] * grid[2]  # the stock pipeline's ``video_sequence_length`` (sets ``mu``)
        rope_scale = (self.vae_temporal_compression_ratio / frame_rate, self.vae_spatial_compression_ratio,
                      self.vae_spatial_compression_ratio)

        def predict(half: str, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            text, mask = embeds[half]
            return self.transformer(hidden_states=x.to(dtype), encoder_hidden_states=text,
                                    timestep=t.expand(x.shape[0]), encoder_attention_mask=mask, num_frames=grid[0],
                                    height=grid[1], width=grid[2], rope_interpolation_scale=rope_scale,
                                    return_dict=False)[0].float()

        stock_scheduler = self.scheduler
        self.scheduler = self._refine_scheduler(refine_flow_shift)
        inst = vidattn.apply(self, proc)
        try:
            latents, timesteps = self._noised_start(latents, num_inference_steps, strength, tokens, generator)
            self._num_timesteps = len(timesteps)
            latents = self._refine_passes(inst.context, latents, timesteps, cfg, guidance_scale, mode, cache_steps,
                                          predict)
        finally:
            vidattn.remove(self)
            self.scheduler = stock_scheduler
            proc.state.clear()  # the recorded cross-attention outputs are not needed any more
        if output_type == "latent":
            video = latents
        else:
            video = self._decode(latents, grid, dtype, generator, decode_timestep, decode_noise_scale, output_type)
        self.maybe_free_model_hooks()
        return LTXPipelineOutput(frames=video) if return_dict else (video,)
