"""FreeSwimPipeline: training-free high-resolution Wan 2.1 video (spec ``freeswim.md`` §2.4-§2.6).

1. base generation at the training size (the stock Wan loop, whatever processor is installed);
2. the decoded frames upsampled to the target size in pixel space (bilinear, ``align_corners=False``);
3. VAE encode (posterior mode), normalised, noised at the first kept timestep of a refinement schedule built with
   ``from_config(..., flow_shift=refine_flow_shift)`` (``strength`` of ``num_inference_steps`` run);
4. refinement at the target size with :class:`~vidattn.processors.freeswim.FreeSwimProcessor` installed: per step
   and CFG half, passes declared with ``StepContext.passing``:

   | mode | cond, refresh step | cond, other steps | uncond |
   |---|---|---|---|
   | ``nocache`` | full (record) → window (replay) | (every step refreshes) | full (record) → window (replay) |
   | ``cache`` | full (record) → window (replay) | window (replay the last cond record) | window (own) |

   Refresh steps are ``i % cache_steps == 0``, counted from the first kept step. The full branch runs only when
   it records; no batch row is ever duplicated.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Union

import torch
import torch.nn.functional as F
from diffusers.pipelines.wan.pipeline_output import WanPipelineOutput
from diffusers.utils.torch_utils import randn_tensor

import vidattn
from vidattn.processors.freeswim import FreeSwimProcessor

from .dropin import WanPipeline

__all__ = ["FREESWIM_MODES", "FreeSwimPipeline", "FreeSwimRefineMixin"]

FREESWIM_MODES = ("cache", "nocache")


def _check(name: str, ok: bool, accepted: str, value: Any) -> None:
    if not ok:
        raise ValueError(f"{name} must be {accepted}, got {value!r}")


class FreeSwimRefineMixin:
    """Model-independent FreeSwim pieces: input checks, the refinement scheduler and the per-step pass table.

    The host declares ``freeswim_cell`` (pixels per latent token) and ``freeswim_frame_step`` (``num_frames`` must
    be ``k * step + 1``) and gives :meth:`_refine_passes` a ``predict(half, latents, t)`` callable.
    """

    @staticmethod
    def upsample(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Bilinear pixel-space upsampling of ``(B, F, C, h, w)`` frames in [0, 1] (spec §2.6)."""
        b, f = frames.shape[:2]
        up = F.interpolate(frames.flatten(0, 1).float(), size=(height, width), mode="bilinear", align_corners=False)
        return up.clamp(0, 1).unflatten(0, (b, f))

    @property
    def freeswim_cell(self) -> int:
        raise NotImplementedError

    @property
    def freeswim_frame_step(self) -> int:
        raise NotImplementedError

    def check_freeswim_inputs(self, height: int, width: int, base_height: int, base_width: int, num_frames: int,
                              strength: float, mode: str, cache_steps: int, num_inference_steps: int,
                              base_steps: Optional[int] = None, refine_flow_shift: Optional[float] = None) -> None:
        cell, step = self.freeswim_cell, self.freeswim_frame_step
        for name, value in (("height", height), ("width", width), ("base_height", base_height),
                            ("base_width", base_width)):
            _check(name, isinstance(value, int) and not isinstance(value, bool) and value >= cell
                   and value % cell == 0, f"a positive multiple of {cell}", value)
        _check("num_frames", isinstance(num_frames, int) and num_frames >= 1 and (num_frames - 1) % step == 0,
               f"{step}k+1 (e.g. {4 * step + 1}, {8 * step + 1})", num_frames)
        _check("strength", isinstance(strength, (int, float)) and 0 < strength <= 1, "a number in (0, 1]", strength)
        _check("mode", mode in FREESWIM_MODES, f"one of {FREESWIM_MODES}", mode)
        _check("cache_steps", isinstance(cache_steps, int) and not isinstance(cache_steps, bool) and cache_steps >= 1,
               "an integer >= 1", cache_steps)
        _check("num_inference_steps", isinstance(num_inference_steps, int) and num_inference_steps >= 1,
               "an integer >= 1", num_inference_steps)
        _check("base_steps", base_steps is None or (isinstance(base_steps, int) and base_steps >= 1),
               "None or an integer >= 1", base_steps)
        _check("refine_flow_shift", refine_flow_shift is None
               or (isinstance(refine_flow_shift, (int, float)) and refine_flow_shift > 0),
               "None (the scheduler's own shift) or a number > 0", refine_flow_shift)
        if int(num_inference_steps * strength) < 1:
            raise ValueError(f"strength {strength} of {num_inference_steps} steps runs no refinement step")

    def _freeswim_processor(self, processor: Optional[FreeSwimProcessor], base_height: int, base_width: int,
                            tiles: Any, cache_device: Any, backend: str) -> FreeSwimProcessor:
        cell = self.freeswim_cell
        base_grid = (base_height // cell, base_width // cell)
        if processor is not None and not isinstance(processor, FreeSwimProcessor):
            raise TypeError(f"processor must be a FreeSwimProcessor, got {type(processor).__name__}")
        proc = processor or FreeSwimProcessor(*base_grid, scale_ratio=2.0, tiles=tiles, cache_device=cache_device,
                                              backend=backend)
        if (proc.base_rows, proc.base_cols) != base_grid:
            raise ValueError(f"processor's base grid {proc.base_rows}x{proc.base_cols} does not match base_height x "
                             f"base_width {base_height}x{base_width} (= {base_grid[0]}x{base_grid[1]} latent cells)")
        return proc

    def _refine_scheduler(self, flow_shift: Optional[float]) -> Any:
        """A fresh scheduler for the refinement (the stock one keeps its state); ``flow_shift`` fixes the shift."""
        config = self.scheduler.config
        if flow_shift is None:
            return type(self.scheduler).from_config(config)
        if "flow_shift" in config:
            return type(self.scheduler).from_config(config, flow_shift=flow_shift)
        return type(self.scheduler).from_config(config, shift=flow_shift, use_dynamic_shifting=False)

    def _refine_passes(self, ctx: Any, latents: torch.Tensor, timesteps: torch.Tensor, cfg: bool, guidance: float,
                       mode: str, cache_steps: int, predict: Callable[..., torch.Tensor]) -> torch.Tensor:
        """The refinement loop (module docstring's pass table); ``predict(half, latents, t)`` runs one transformer
        call for ``half`` = ``"cond"`` / ``"uncond"`` (inside the pass declared here) and returns the float32
        prediction."""
        state = {"latents": latents}

        def run(half: str, t: torch.Tensor, branch: str, cross: str, step: int) -> torch.Tensor:
            with ctx.passing(branch=branch, cross=cross, cfg=half, step=step):
                return predict(half, state["latents"], t)

        with self.progress_bar(total=len(timesteps)) as bar:
            for i, t in enumerate(timesteps):
                refresh = mode == "nocache" or i % cache_steps == 0
                if refresh:
                    run("cond", t, "full", "record", i)
                noise = run("cond", t, "window", "replay", i)
                if cfg:
                    if mode == "nocache":
                        run("uncond", t, "full", "record", i)
                        noise_u = run("uncond", t, "window", "replay", i)
                    else:
                        noise_u = run("uncond", t, "window", "own", i)
                    noise = noise_u + guidance * (noise - noise_u)
                state["latents"] = self.scheduler.step(noise, t, state["latents"], return_dict=False)[0]
                bar.update()
        return state["latents"]


def direct_call(pipe: Any) -> Any:
    """The call of ``pipe``'s stock pipeline (past the FreeSwim refinement): one generation straight at the requested
    size, the paper's *direct* high-resolution baseline; ``pipe`` itself when it is not a FreeSwim pipeline."""
    return super(FreeSwimRefineMixin, pipe).__call__ if isinstance(pipe, FreeSwimRefineMixin) else pipe


class FreeSwimPipeline(FreeSwimRefineMixin, WanPipeline):
    """Wan 2.1 T2V with FreeSwim's high-resolution refinement; loads with ``from_pretrained`` like ``WanPipeline``.

    ``pipe(prompt, height=1088, width=1920)`` returns frames at the target size (see the module docstring).
    """

    freeswim_cell = 16  # pixels per latent token (VAE 8x, patch 2x)
    freeswim_frame_step = 4

    def _check_wan21(self) -> None:
        """FreeSwim is defined for Wan 2.1 (one transformer, 16-px latent cells): refuse a Wan 2.2 checkpoint
        (two experts switched by timestep, or TI2V-5B's 32-px cells) instead of refining it wrongly."""
        if getattr(self, "transformer_2", None) is not None or self.config.get("boundary_ratio") is not None:
            raise ValueError("FreeSwimPipeline runs Wan 2.1 checkpoints; this one has two experts (Wan 2.2 A14B), "
                             "which FreeSwim does not define")
        cell = int(self.vae_scale_factor_spatial) * int(self.transformer.config.patch_size[-1])
        if cell != self.freeswim_cell:
            raise ValueError(f"FreeSwimPipeline runs Wan 2.1 checkpoints (16-px latent cells); this one has {cell}-px "
                             "cells (Wan 2.2 TI2V-5B?)")

    def _encode_video(self, frames: torch.Tensor) -> torch.Tensor:
        """``(B, F, C, H, W)`` frames in [0, 1] -> normalised latents (posterior mode)."""
        video = (frames * 2 - 1).permute(0, 2, 1, 3, 4).to(self.vae.dtype)
        latents = torch.cat([self.vae.encode(v[None]).latent_dist.mode() for v in video])
        mean = torch.tensor(self.vae.config.latents_mean).view(1, -1, 1, 1, 1).to(latents)
        std = torch.tensor(self.vae.config.latents_std).view(1, -1, 1, 1, 1).to(latents)
        return (latents - mean) / std

    def _decode(self, latents: torch.Tensor, output_type: str) -> Any:
        latents = latents.to(self.vae.dtype)
        mean = torch.tensor(self.vae.config.latents_mean).view(1, -1, 1, 1, 1).to(latents)
        std = torch.tensor(self.vae.config.latents_std).view(1, -1, 1, 1, 1).to(latents)
        video = self.vae.decode(latents * std + mean, return_dict=False)[0]
        return self.video_processor.postprocess_video(video, output_type=output_type)

    def _noised_start(self, latents: torch.Tensor, steps: int, strength: float,
                      generator: Any) -> tuple[torch.Tensor, torch.Tensor]:
        scheduler = self.scheduler
        scheduler.set_timesteps(steps, device=latents.device)
        start = steps - int(steps * strength)
        timesteps = scheduler.timesteps[start:]
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(start)
        noise = randn_tensor(latents.shape, generator=generator, device=latents.device, dtype=torch.float32)
        noise = noise.to(latents.dtype)
        first = timesteps[:1].repeat(latents.shape[0])
        if hasattr(scheduler, "scale_noise"):
            return scheduler.scale_noise(latents, first, noise), timesteps
        return scheduler.add_noise(latents, noise, first), timesteps

    @torch.no_grad()
    def __call__(self, prompt: Union[str, list[str]], negative_prompt: Optional[Union[str, list[str]]] = None, *,
                 height: int = 1088, width: int = 1920, num_frames: int = 81, base_height: int = 480,
                 base_width: int = 832, num_inference_steps: int = 50, base_steps: Optional[int] = None,
                 guidance_scale: float = 5.0, strength: float = 0.7, refine_flow_shift: float = 9.0,
                 mode: str = "cache", cache_steps: int = 2, cache_device: Optional[str] = None,
                 tiles: Optional[tuple[int, int]] = None, backend: str = "auto",
                 processor: Optional[FreeSwimProcessor] = None, generator: Any = None, output_type: str = "np",
                 return_dict: bool = True) -> Any:
        """Base generation, upsampling and FreeSwim refinement (module docstring). ``processor``: a configured
        :class:`FreeSwimProcessor` for the refinement (its base grid must be the base size's); by default one with
        FreeSwim's scale (ratio 2), ``tiles``, ``cache_device`` and ``backend``. Its statistics stay readable
        after the call (``processor.stats``)."""
        self.check_freeswim_inputs(height, width, base_height, base_width, num_frames, strength, mode, cache_steps,
                                   num_inference_steps, base_steps, refine_flow_shift)
        self._check_wan21()
        proc = self._freeswim_processor(processor, base_height, base_width, tiles, cache_device, backend)
        device = self._execution_device
        cfg = guidance_scale > 1.0
        cond, uncond = self.encode_prompt(prompt, negative_prompt, do_classifier_free_guidance=cfg, device=device)
        base = super().__call__(None, None, prompt_embeds=cond, negative_prompt_embeds=uncond,
                                height=base_height, width=base_width, num_frames=num_frames,
                                num_inference_steps=base_steps or num_inference_steps, guidance_scale=guidance_scale,
                                generator=generator, output_type="pt").frames
        latents = self._encode_video(self.upsample(base.to(device), height, width))
        dtype = self.transformer.dtype
        embeds = {"cond": cond.to(dtype), "uncond": None if uncond is None else uncond.to(dtype)}

        def predict(half: str, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return self.transformer(hidden_states=x.to(dtype), timestep=t.expand(x.shape[0]),
                                    encoder_hidden_states=embeds[half], return_dict=False)[0]

        stock_scheduler = self.scheduler
        self.scheduler = self._refine_scheduler(refine_flow_shift)
        inst = vidattn.apply(self, proc)
        try:
            latents, timesteps = self._noised_start(latents, num_inference_steps, strength, generator)
            latents = self._refine_passes(inst.context, latents, timesteps, cfg, guidance_scale, mode, cache_steps,
                                          predict)
        finally:
            vidattn.remove(self)
            self.scheduler = stock_scheduler
            proc.state.clear()  # the recorded cross-attention outputs (GBs at 1080p) are not needed any more
        video = self._decode(latents, output_type) if output_type != "latent" else latents
        self.maybe_free_model_hooks()
        return WanPipelineOutput(frames=video) if return_dict else (video,)
