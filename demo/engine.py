"""The demo's work, without any user interface: check a request (no loading), keep one pipeline per model, generate
a video with a method and report what the page shows (times, density, pictures)."""
from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

import vidattn
from vidattn import validation as v
from vidattn.methods import METHODS, make_processor
from vidattn.pipelines.generate import GenerationRequest
from vidattn.processors import SparseAttentionProcessor

from .recording import LayerRecorder

__all__ = ["DemoError", "Outcome", "Pipelines", "Request", "check_request", "generate", "user_message"]

# Form labels of the options validation names, so messages read as the page's fields.
LABELS = {"--model": "Model", "--frames": "Frames", "--height": "Height", "--width": "Width", "--steps": "Steps",
          "--guidance": "Guidance", "--seed": "Seed", "--preset": "Preset", "--method": "Method"}
Progress = Callable[[int, int, str], None]


class DemoError(Exception):
    """A problem the page shows as one line (bad input, missing model, out of memory, unsupported method)."""


def user_message(err: BaseException) -> str:
    """One line for the page: a UsageError names the form field; out of memory says what to reduce."""
    if isinstance(err, v.UsageError):
        label = LABELS.get(err.option or "", (err.option or "").lstrip("-").replace("-", " "))
        return f"{label}: {err.message}" if label else err.message
    if isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower():
        return "Out of memory: try fewer frames, a smaller size or a sparser method"
    return " ".join(str(err).split()) or type(err).__name__


@dataclass
class Request(GenerationRequest):
    """One generation as the form gives it: the video settings of ``vidattn generate`` (``None``: the model's
    default), the method, its preset and knobs, and the layer and head whose mask to draw."""

    method: str = "dense"
    preset: Optional[str] = None
    knobs: dict = field(default_factory=dict)
    layer: int = 0
    head: int = 0


@dataclass
class Checked:
    """A request that passed every check, with what the run needs."""

    request: Request
    spec: Any
    settings: dict
    processor: SparseAttentionProcessor
    pipeline_cls: Any = None
    freeswim: Optional[dict] = None


@dataclass
class Outcome:
    """A finished generation: the video file and frames, times, attention statistics and pictures."""

    video: Path
    frames: np.ndarray
    seconds: float
    attention_seconds: Optional[float]
    summary: dict
    layer_densities: list
    mask: Optional[np.ndarray]
    mask_note: str
    settings: dict


def _freeswim(request: Request, spec: Any) -> tuple[Any, dict, dict]:
    """FreeSwim's pipeline class, call options and base-grid knobs for the model (DemoError when unsupported)."""
    from vidattn.pipelines.generate import freeswim_pipeline_class

    try:
        cls, cell, base = freeswim_pipeline_class(request.model, spec.class_name)
    except ValueError as err:
        raise DemoError(f"Method freeswim does not support this model: {str(err).removeprefix('--model ')}") from None
    rows = request.knobs.get("base_rows") or base[0] // cell
    cols = request.knobs.get("base_cols") or base[1] // cell
    return cls, {"base_height": rows * cell, "base_width": cols * cell}, {"base_rows": rows, "base_cols": cols}


def check_request(request: Request) -> Checked:
    """Every check before loading anything; DemoError with a one-line message on a bad request."""
    try:
        v.check_choice("--method", request.method, METHODS)
        v.check_preset(request.method, request.preset)
        v.check_seed("--seed", request.seed)
        spec = v.check_model(request.model)
        given = dict(frames=request.frames, height=request.height, width=request.width, steps=request.steps,
                     guidance=request.guidance)
        settings = v.resolve_settings(spec, given)
        v.check_number("--steps", settings["steps"], minimum=1, integer=True)
        v.check_number("--guidance", settings["guidance"], minimum=0)
        v.check_geometry(settings["frames"], settings["height"], settings["width"], spec.factors,
                         model=f"{spec.name} ({spec.class_name})")
    except v.UsageError as err:
        raise DemoError(user_message(err)) from None
    if request.method not in ("dense", "freeswim") and spec.family is None:
        raise DemoError(f"Method {request.method} does not support {spec.class_name} ({spec.name}): vidattn knows "
                        "Wan, HunyuanVideo, CogVideoX, LTX-Video and Mochi")
    cls, call, knobs = None, None, dict(request.knobs)
    if request.method == "freeswim":
        cls, call, base = _freeswim(request, spec)
        knobs.update(base)
    try:
        processor = make_processor(request.method, request.preset, **knobs)
    except (ValueError, TypeError) as err:
        raise DemoError(f"Knobs: {user_message(err)}") from None
    return Checked(request, spec, settings, processor, cls, call)


class Pipelines:
    """The loaded pipeline of the last (model, pipeline class), reused across requests (loading another drops it);
    ``lock(key)`` serialises the generations that use one pipeline (the Gradio queue also runs one at a time per
    device)."""

    def __init__(self, device: str, dtype: torch.dtype) -> None:
        self.device, self.dtype = device, dtype
        self._pipes: dict = {}
        self._locks: dict = {}
        self._guard = threading.Lock()
        self.loads = 0

    def lock(self, key: tuple) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(key, threading.Lock())

    def get(self, model: str, pipeline_cls: Any = None) -> tuple[Any, dict]:
        """``(pipe, defaults)``, loaded on first use (``load_pipeline``); a missing model is a DemoError."""
        from vidattn.pipelines.generate import load_pipeline

        key = (model, getattr(pipeline_cls, "__name__", None))
        with self.lock(("load",) + key):
            if key not in self._pipes:
                self._evict_others(key)
                try:
                    self._pipes[key] = load_pipeline(model, self.device, self.dtype, pipeline_cls)
                except (OSError, ValueError) as err:
                    raise DemoError(f"Model: cannot load {model!r} ({user_message(err)})") from None
                self.loads += 1
            return self._pipes[key]


    def _evict_others(self, key: tuple) -> None:
        """One model in memory per device: the others are dropped (after any generation using them) before a new
        one loads, so that trying several models in the form does not pile up copies on the GPU."""
        for other in [k for k in self._pipes if k != key]:
            with self.lock(other):
                del self._pipes[other]
        if torch.device(self.device).type == "cuda":
            torch.cuda.empty_cache()


def _call(pipe: Any, checked: Checked, progress: Progress, label: str) -> np.ndarray:
    """Run the pipeline once; progress per denoising step (FreeSwim: per stage)."""
    r, s = checked.request, checked.settings
    call = dict(prompt=r.prompt, negative_prompt=r.negative_prompt or None, num_frames=s["frames"],
                height=s["height"], width=s["width"], num_inference_steps=s["steps"], guidance_scale=s["guidance"],
                generator=torch.Generator(device="cpu").manual_seed(r.seed), output_type="np")
    if checked.freeswim is not None:
        progress(0, s["steps"], f"{label}: base generation and refinement")
        return pipe(**call, processor=checked.processor, **checked.freeswim).frames[0]

    def step_end(_pipe: Any, step: int, _timestep: Any, kwargs: dict) -> dict:
        progress(step + 1, s["steps"], f"{label}: denoising step {step + 1}/{s['steps']}")
        return kwargs

    from vidattn.pipelines.freeswim import direct_call

    progress(0, s["steps"], f"{label}: denoising step 0/{s['steps']}")
    return direct_call(pipe)(**call, callback_on_step_end=step_end).frames[0]


def _mask_picture(recorder: LayerRecorder, checked: Checked) -> tuple[Optional[np.ndarray], str]:
    """The chosen layer's mask picture and a note (why there is none)."""
    from vidattn.pictures import format_knobs, pattern_figure, render, selection_figure

    r = checked.request
    if recorder.captured is None:
        return None, f"Layer {r.layer} ran no sparse attention call (dense method, dense layer or dense steps)."
    kind, layout, found = recorder.captured
    knobs = format_knobs(checked.processor.knobs())
    if kind == "selection":
        head = min(r.head, found.critical.shape[1] - 1)
        density = float(found.critical[0, head].float().mean())
        title = f"{r.method}, layer {r.layer}, head {head}: critical blocks {density:.3f}\n{knobs}"
        figure = selection_figure(layout, found, head, checked.processor.block_size, title)
    else:
        head = min(r.head, found.groups[1] - 1)
        heads = f"head {head}" if found.groups[1] > 1 else "all heads"
        title = f"{r.method}, layer {r.layer}, {heads}: density {found.density():.3f}\n{knobs}"
        figure = pattern_figure(layout, found, title, group=(0, head))
        return render(figure), f"Block mask of layer {r.layer}, {heads} (last sparse call)."
    return render(figure), f"Block mask of layer {r.layer}, head {head} (last sparse call)."


def generate(checked: Checked, pipelines: Pipelines, out_dir: Path, progress: Optional[Progress] = None,
             label: str = "") -> Outcome:
    """Generate one video with ``checked``'s method on its (cached) pipeline; writes ``out_dir/<method>-<id>.mp4``."""
    from vidattn.pipelines.video_io import to_uint8_frames, write_video

    progress = progress or (lambda done, total, desc: None)
    r = checked.request
    pipe, _ = pipelines.get(r.model, checked.pipeline_cls)
    recorder = LayerRecorder(layer=r.layer)
    with pipelines.lock((r.model, getattr(checked.pipeline_cls, "__name__", None))):
        start = time.perf_counter()
        try:
            if checked.freeswim is not None:  # the pipeline installs the processor for its refinement itself
                with recorder.attached(pipe, checked.processor):
                    frames = _call(pipe, checked, progress, label or r.method)
            else:
                vidattn.apply(pipe, checked.processor)
                try:
                    with recorder.attached(pipe, checked.processor):
                        frames = _call(pipe, checked, progress, label or r.method)
                finally:
                    vidattn.remove(pipe)
        except (ValueError, NotImplementedError, RuntimeError) as err:
            raise DemoError(f"Generation failed: {user_message(err)}") from None
        seconds = time.perf_counter() - start
    summary = checked.processor.stats.summary()
    on_cpu = torch.device(pipelines.device).type == "cpu"
    video = write_video(frames, Path(out_dir) / f"{r.method}-{uuid.uuid4().hex[:8]}.mp4")
    mask, note = _mask_picture(recorder, checked)
    return Outcome(video=video, frames=to_uint8_frames(frames), seconds=seconds,
                   attention_seconds=summary["sparse_seconds"] + summary["dense_seconds"] if on_cpu else None,
                   summary=summary, layer_densities=recorder.densities(), mask=mask, mask_note=note,
                   settings=dict(checked.settings))
