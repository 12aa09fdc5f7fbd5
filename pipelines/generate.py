"""Load a pipeline, install an attention processor, generate one video, write it with its metadata sidecar."""
from __future__ import annotations

import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import torch

import vidattn
from vidattn.processors import SparseAttentionProcessor

__all__ = ["GenerationRequest", "load_pipeline", "generate_video", "versions"]

TINY_MODELS = {"tiny": "toy", "tiny-bench": "bench"}
_CALL_SETTINGS = ("height", "width", "num_frames", "num_inference_steps", "guidance_scale")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class GenerationRequest:
    """What to generate; ``None`` fields take the model's defaults."""

    prompt: str
    negative_prompt: str = ""
    model: str = "tiny"
    frames: Optional[int] = None
    height: Optional[int] = None
    width: Optional[int] = None
    steps: Optional[int] = None
    guidance: Optional[float] = None
    seed: int = 0
    fps: int = 16
    device: Optional[str] = None
    dtype: Optional[str] = None


def versions() -> dict:
    import diffusers
    import transformers

    return {"vidattn": vidattn.__version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}


def load_pipeline(model: str, device: str, dtype: torch.dtype, pipeline_cls: Any = None):
    """The built-in tiny pipeline (offline) or ``from_pretrained`` for a hub id / local diffusers folder;
    ``pipeline_cls`` (e.g. ``FreeSwimPipeline``) loads that class instead of the checkpoint's own.

    Returns ``(pipe, defaults)`` with the model's default call settings.
    """
    if model in TINY_MODELS:
        from .tiny import TINY_PRESETS, tiny_wan_pipeline

        preset = TINY_MODELS[model]
        pipe = tiny_wan_pipeline(preset, seed=0, dtype=dtype if device != "cpu" else torch.float32,
                                 pipeline_cls=pipeline_cls)
        return pipe.to(device), dict(TINY_PRESETS[preset])
    if pipeline_cls is not None:
        pipe = pipeline_cls.from_pretrained(model, torch_dtype=dtype)
        return pipe.to(device), call_defaults(pipe)
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(model, torch_dtype=dtype)
    return pipe.to(device), call_defaults(pipe)


def freeswim_pipeline_class(model: str) -> tuple[Any, int, tuple[int, int]]:
    """``(pipeline class, pixels per latent token, default base size)`` of FreeSwim for ``model`` (the tiny model,
    or a Wan 2.1 / LTX-Video checkpoint by its ``model_index.json``); ValueError naming ``--model`` otherwise."""
    if model in TINY_MODELS:
        from .freeswim import FreeSwimPipeline

        return FreeSwimPipeline, 16, (64, 64)
    from diffusers import DiffusionPipeline

    try:
        name = DiffusionPipeline.load_config(model).get("_class_name", "")
    except Exception as err:  # offline hub id, missing folder, no model_index.json
        raise ValueError(f"--model {model}: cannot read its model_index.json ({type(err).__name__}); FreeSwim needs a "
                         "Wan 2.1 or LTX-Video diffusers checkpoint, or 'tiny'") from None
    if "LTX" in name:
        from .freeswim_ltx import FreeSwimLTXPipeline

        return FreeSwimLTXPipeline, 32, (512, 704)
    if name.startswith("Wan"):
        from .freeswim import FreeSwimPipeline

        return FreeSwimPipeline, 16, (480, 832)
    raise ValueError(f"--model {model} is a {name or 'unknown pipeline'}; --method freeswim runs Wan 2.1 and "
                     "LTX-Video checkpoints")


def call_defaults(pipe) -> dict:
    """The pipeline's own defaults for the generation settings, read from its ``__call__`` signature."""
    import inspect

    params = inspect.signature(type(pipe).__call__).parameters
    missing = [name for name in _CALL_SETTINGS if name not in params]
    if missing:
        raise ValueError(f"--model: {type(pipe).__name__} is not a text-to-video pipeline vidattn can drive "
                         f"(its __call__ lacks {missing})")
    return {name: params[name].default for name in _CALL_SETTINGS}


def check_geometry(frames: int, height: int, width: int, temporal: int, spatial: int) -> None:
    """Raise ValueError naming the option when the pipeline cannot take this video size."""
    if frames < 1 or (frames - 1) % temporal:
        raise ValueError(f"--frames must be {temporal}k+1 (e.g. {temporal * 4 + 1}), got {frames}")
    for name, value in (("--height", height), ("--width", width)):
        if value < spatial or value % spatial:
            raise ValueError(f"{name} must be a positive multiple of {spatial}, got {value}")


def _pipeline_factors(pipe) -> tuple[int, int]:
    """(frames step, pixel multiple) from the pipeline's VAE factors (names differ by family) and patch size."""
    temporal = int(getattr(pipe, "vae_scale_factor_temporal", getattr(pipe, "vae_temporal_scale_factor", 4)))
    spatial = int(getattr(pipe, "vae_scale_factor_spatial", getattr(pipe, "vae_spatial_scale_factor", 8)))
    patch = getattr(getattr(pipe, "transformer", None), "config", None)
    p = getattr(patch, "patch_size", (1, 2, 2)) if patch is not None else (1, 2, 2)
    p_s = p[-1] if isinstance(p, (tuple, list)) else int(p)
    return temporal, spatial * p_s


def generate_video(request: GenerationRequest, processor: SparseAttentionProcessor, out: Path, *,
                   overwrite: bool = False, method: Optional[dict] = None, freeswim: Optional[dict] = None) -> dict:
    """Generate one video and write ``out`` (mp4) and ``out.with_suffix('.json')``; returns the sidecar dict.

    ``freeswim``: FreeSwimPipeline's own options (base size, mode, cache_steps, strength); the video is generated
    at the base size, upsampled and refined with ``processor`` (a ``FreeSwimProcessor``) at the requested size.
    """
    from .video_io import write_sidecar, write_video

    out = Path(out)
    device = request.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = _DTYPES[request.dtype] if request.dtype else (torch.bfloat16 if device == "cuda" else torch.float32)
    t0 = time.perf_counter()
    pipeline_cls = None
    if freeswim is not None:
        pipeline_cls = freeswim_pipeline_class(request.model)[0]
    pipe, defaults = load_pipeline(request.model, device, dtype, pipeline_cls)
    load_s = time.perf_counter() - t0
    def pick(value, key):
        if value is None and defaults.get(key) is None:
            raise ValueError(f"--model {request.model} has no default for {key}; pass it explicitly")
        return defaults[key] if value is None else value

    settings = {
        "frames": pick(request.frames, "num_frames"),
        "height": pick(request.height, "height"),
        "width": pick(request.width, "width"),
        "steps": pick(request.steps, "num_inference_steps"),
        "guidance": pick(request.guidance, "guidance_scale"),
    }
    check_geometry(settings["frames"], settings["height"], settings["width"], *_pipeline_factors(pipe))
    generator = torch.Generator(device="cpu").manual_seed(request.seed)
    call = dict(prompt=request.prompt, negative_prompt=request.negative_prompt or None,
                num_frames=settings["frames"], height=settings["height"], width=settings["width"],
                num_inference_steps=settings["steps"], guidance_scale=settings["guidance"], generator=generator,
                output_type="np")
    t1 = time.perf_counter()
    if freeswim is not None:  # the pipeline installs the processor for its refinement stage itself
        result = pipe(**call, processor=processor, **freeswim)
        settings["freeswim"] = dict(freeswim)
    else:
        vidattn.apply(pipe, processor)
        try:
            result = pipe(**call)
        finally:
            vidattn.remove(pipe)
    generate_s = time.perf_counter() - t1
    frames = result.frames[0]
    t2 = time.perf_counter()
    video = write_video(frames, out, fps=request.fps, overwrite=overwrite)
    stats = processor.stats.summary()
    sidecar: dict[str, Any] = {
        "video": str(video),
        "sidecar": str(out.with_suffix(".json")),
        "request": asdict(request),
        "settings": {**settings, "device": device,
                     "dtype": str(pipe.transformer.dtype).replace("torch.", "")},
        "method": {**(method or {}), **processor.knobs()},
        "attention": stats,
        "timings": {"load_s": round(load_s, 3), "generate_s": round(generate_s, 3),
                    "attention_s": round(stats["sparse_seconds"] + stats["dense_seconds"], 3),
                    "write_s": round(time.perf_counter() - t2, 3)},
        "versions": versions(),
    }
    write_sidecar(out.with_suffix(".json"), sidecar, overwrite=overwrite)
    return sidecar
