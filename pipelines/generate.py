"""Load a pipeline, install an attention processor, generate one video, write it with its metadata sidecar."""
from __future__ import annotations

import contextlib
import datetime
import os
import platform
import shlex
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

import vidattn
from vidattn.processors import SparseAttentionProcessor
from vidattn.validation import LORA_SCALE_DEFAULT, OFFLOAD_MODES, UsageError, shown

__all__ = ["GenerationRequest", "LoadedPipeline", "OutputWriteError", "RenderedVideo", "describe_run", "device_name",
           "generate_video", "load_lora", "load_pipeline", "open_pipeline", "peak_memory", "render", "versions"]

TINY_MODELS = {"tiny": "toy", "tiny-bench": "bench"}
_CALL_SETTINGS = ("height", "width", "num_frames", "num_inference_steps", "guidance_scale")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class GenerationRequest:
    """What to generate; ``None`` fields take the model's defaults. ``lora`` / ``lora_scale``: an adapter loaded with
    ``load_lora_weights``; ``offload``: ``model`` or ``sequential`` CPU offload; ``vae_tiling``: tiled decoding."""

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
    lora: Optional[str] = None
    lora_scale: float = LORA_SCALE_DEFAULT
    offload: Optional[str] = None
    vae_tiling: bool = False


def versions() -> dict:
    import diffusers
    import transformers

    return {"vidattn": vidattn.__version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}


LORA_ADAPTER = "vidattn_lora"


def _place(pipe, device: str, offload: Optional[str]):
    """``pipe`` on ``device``, or with diffusers' CPU offload (``model``: whole components moved to the GPU in
    turn; ``sequential``: submodule by submodule, slowest and leanest)."""
    if offload is None:
        return pipe.to(device)
    if offload not in OFFLOAD_MODES:
        raise ValueError(f"--offload must be one of {', '.join(OFFLOAD_MODES)}, got {offload!r}")
    if offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.enable_sequential_cpu_offload(device=device)
    return pipe


def load_pipeline(model: str, device: str, dtype: torch.dtype, pipeline_cls: Any = None,
                  offload: Optional[str] = None):
    """The built-in tiny pipeline (offline) or ``from_pretrained`` for a hub id / local diffusers folder;
    ``pipeline_cls`` (e.g. ``FreeSwimPipeline``) loads that class instead of the checkpoint's own. ``dtype`` is
    honoured on every device (the tiny model's VAE stays float32, as Wan is usually run); ``offload`` (``model``
    or ``sequential``) keeps the weights on the CPU and moves them to ``device`` as they are needed.

    Returns ``(pipe, defaults)`` with the model's default call settings.
    """
    if model in TINY_MODELS:
        from .tiny import TINY_PRESETS, tiny_wan_pipeline

        preset = TINY_MODELS[model]
        pipe = tiny_wan_pipeline(preset, seed=0, dtype=dtype, pipeline_cls=pipeline_cls)
        return _place(pipe, device, offload), dict(TINY_PRESETS[preset])
    if pipeline_cls is not None:
        pipe = pipeline_cls.from_pretrained(model, torch_dtype=dtype)
        return _place(pipe, device, offload), call_defaults(pipe)
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(model, torch_dtype=dtype)
    return _place(pipe, device, offload), call_defaults(pipe)


def load_lora(pipe, path: str | os.PathLike, scale: float = LORA_SCALE_DEFAULT) -> None:
    """Load a LoRA adapter saved with the pipeline's ``save_lora_weights`` (a folder holding one weights file, or
    the ``.safetensors`` / ``.bin`` file itself) through ``pipe.load_lora_weights``, active at ``scale``.
    :class:`~vidattn.validation.UsageError` naming ``--lora`` when the file is not a weights file or holds no LoRA
    weights this pipeline takes."""
    path = Path(path)
    try:
        if path.is_file():
            pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=LORA_ADAPTER)
        else:
            pipe.load_lora_weights(str(path), adapter_name=LORA_ADAPTER)
    except UsageError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError) as err:  # junk bytes, another model's keys or shapes
        if isinstance(err, RuntimeError) and "Error(s) in loading state_dict" not in str(err):
            raise  # out of memory and the like are no user error
        why = " ".join(str(err).split())
        raise UsageError("--lora", f"cannot load {shown(path)} as a LoRA adapter of {type(pipe).__name__} "
                                   f"({type(err).__name__}: {why[:300]})") from None
    pipe.set_adapters([LORA_ADAPTER], adapter_weights=[scale])


def freeswim_pipeline_class(model: str, class_name: Optional[str] = None) -> tuple[Any, int, tuple[int, int]]:
    """``(pipeline class, pixels per latent token, default base size)`` of FreeSwim for ``model`` (the tiny model,
    or a Wan 2.1 / LTX-Video checkpoint by its ``model_index.json``, or by ``class_name`` when the caller read it
    already); ValueError naming ``--model`` otherwise."""
    if model in TINY_MODELS:
        from .freeswim import FreeSwimPipeline

        return FreeSwimPipeline, 16, (64, 64)
    name = class_name
    if name is None:
        from diffusers import DiffusionPipeline

        try:
            name = DiffusionPipeline.load_config(model).get("_class_name", "")
        except Exception as err:  # offline hub id, missing folder, no model_index.json
            raise ValueError(f"--model {model}: cannot read its model_index.json ({type(err).__name__}); FreeSwim "
                             "needs a Wan 2.1 or LTX-Video diffusers checkpoint, or 'tiny'") from None
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
    """(frames step, pixel multiple) from the pipeline's VAE factors (names differ by family: Wan/Hunyuan/CogVideoX
    ``vae_scale_factor_*``, Mochi ``vae_*_scale_factor``, LTX-Video ``vae_*_compression_ratio``) and patch size."""
    def first(names: tuple, default: int) -> int:
        return int(next((getattr(pipe, n) for n in names if getattr(pipe, n, None) is not None), default))

    temporal = first(("vae_scale_factor_temporal", "vae_temporal_scale_factor", "vae_temporal_compression_ratio"), 4)
    spatial = first(("vae_scale_factor_spatial", "vae_spatial_scale_factor", "vae_spatial_compression_ratio"), 8)
    patch = getattr(getattr(pipe, "transformer", None), "config", None)
    p = getattr(patch, "patch_size", (1, 2, 2)) if patch is not None else (1, 2, 2)
    p_s = p[-1] if isinstance(p, (tuple, list)) else int(p)
    return temporal, spatial * p_s


class OutputWriteError(OSError):
    """The video was computed but could not be written where asked; ``rescued`` is where it was saved instead."""

    def __init__(self, message: str, rescued: Path) -> None:
        super().__init__(message)
        self.rescued = rescued


def device_name(device: str) -> str:
    """A readable name of ``device``: the GPU's name, or the CPU model (``/proc/cpuinfo``, else ``platform``)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    if dev.type == "cpu":
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.lower().startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} CPUs, {torch.get_num_threads()} " \
                           "torch threads)"
        except OSError:
            pass
        return f"{platform.processor() or platform.machine()} ({os.cpu_count()} CPUs)"
    return dev.type


def peak_memory(device: str) -> dict:
    """Peak memory of the run: CUDA's ``max_memory_allocated`` on a GPU, the process's peak resident set on CPU."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return {"bytes": int(torch.cuda.max_memory_allocated(dev)), "measure": "torch.cuda.max_memory_allocated"}
    try:
        import resource
        import sys

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return {"bytes": int(rss if sys.platform == "darwin" else rss * 1024), "measure": "process peak RSS"}
    except (ImportError, OSError):
        return {"bytes": None, "measure": "unavailable"}


@contextlib.contextmanager
def _recording_backends():
    """Counts the kernel backends ``sparse_attention`` runs (by wrapping the dispatcher's loader while the video
    is generated). Yields a Counter, or None when the dispatcher has no loader to wrap."""
    from vidattn.kernels import dispatch

    original = getattr(dispatch, "_load", None)
    if original is None:
        yield None
        return
    seen: Counter = Counter()

    def load(name: str):
        seen[name] += 1
        return original(name)

    dispatch._load = load
    try:
        yield seen
    finally:
        if dispatch._load is load:
            dispatch._load = original


def _cpu_extension_state(ran: Optional[Counter], device: str) -> dict:
    try:
        from vidattn.kernels import cpu_ext
    except ImportError:  # pragma: no cover
        return {"used": False, "error": "vidattn.kernels.cpu_ext missing"}
    state = getattr(cpu_ext, "_STATE", {})
    loaded = bool(state.get("ok"))
    torch_ran = bool(ran and ran.get("torch"))
    info = {"used": loaded and torch_ran and torch.device(device).type == "cpu", "loaded": loaded,
            "error": cpu_ext.extension_error()}
    if "ok" not in state:
        info["note"] = "not tried: no sparse call ran through the torch backend on CPU"
    return info


def _resolved_knobs(processor: SparseAttentionProcessor, family: Optional[str], frames: int,
                    temporal: int) -> dict:
    """The knobs whose value is ``None`` ("the model's default"), resolved for this model family."""
    import copy

    probe = copy.copy(processor)
    probe._family = family
    resolved: dict = {}
    try:
        if hasattr(probe, "_sink") and getattr(processor, "sink_frames", 0) is None:
            from vidattn.layout import TokenLayout

            resolved["sink_frames"] = int(probe._sink(TokenLayout((frames - 1) // temporal + 1, 1, 1)))
        if hasattr(probe, "_first_frame") and getattr(processor, "first_frame", "") is None:
            resolved["first_frame"] = probe._first_frame()
    except Exception:  # noqa: BLE001 - metadata only, never fail a finished run for it
        pass
    return resolved


@dataclass
class LoadedPipeline:
    """A pipeline ready to render: ``pipe``, its call ``defaults``, ``factors`` (frames step, pixel multiple), the
    ``device`` it runs on and the seconds loading took."""

    pipe: Any
    defaults: dict
    factors: tuple[int, int]
    device: str
    load_s: float


@dataclass
class RenderedVideo:
    """One generated video: its frames (``(F, H, W, 3)`` floats in [0, 1]), the resolved settings, the attention
    statistics, the kernel backends that ran and the seconds the pipeline call took."""

    frames: Any
    settings: dict
    stats: dict
    ran: Optional[Counter]
    generate_s: float


def _device_dtype(request: GenerationRequest) -> tuple[str, torch.dtype]:
    device = request.device or ("cuda" if torch.cuda.is_available() else "cpu")
    on_cuda = torch.device(device).type == "cuda"
    return device, _DTYPES[request.dtype] if request.dtype else (torch.bfloat16 if on_cuda else torch.float32)


def open_pipeline(request: GenerationRequest, *, freeswim: bool = False, model_spec: Any = None) -> LoadedPipeline:
    """Load ``request.model`` on its device and dtype (``FreeSwimPipeline`` / ``FreeSwimLTXPipeline`` when
    ``freeswim``), with the request's offload, VAE tiling and LoRA adapter."""
    device, dtype = _device_dtype(request)
    t0 = time.perf_counter()
    pipeline_cls = None
    if freeswim:
        pipeline_cls = freeswim_pipeline_class(request.model, getattr(model_spec, "class_name", None))[0]
    pipe, defaults = load_pipeline(request.model, device, dtype, pipeline_cls, offload=request.offload)
    if request.vae_tiling:
        pipe.vae.enable_tiling()
    if request.lora is not None:
        load_lora(pipe, request.lora, request.lora_scale)
    return LoadedPipeline(pipe, defaults, _pipeline_factors(pipe), device, time.perf_counter() - t0)


def _settings(request: GenerationRequest, defaults: dict) -> dict:
    def pick(value, key):
        if value is None and defaults.get(key) is None:
            raise ValueError(f"--model {request.model} has no default for {key}; pass it explicitly")
        return defaults[key] if value is None else value

    return {"frames": pick(request.frames, "num_frames"), "height": pick(request.height, "height"),
            "width": pick(request.width, "width"), "steps": pick(request.steps, "num_inference_steps"),
            "guidance": pick(request.guidance, "guidance_scale")}


def render(loaded: LoadedPipeline, request: GenerationRequest, processor: SparseAttentionProcessor,
           freeswim: Optional[dict] = None) -> RenderedVideo:
    """Generate one video with ``processor`` installed for the call (and removed afterwards); ValueError naming
    the option when the pipeline cannot take the request's size."""
    pipe = loaded.pipe
    settings = _settings(request, loaded.defaults)
    check_geometry(settings["frames"], settings["height"], settings["width"], *loaded.factors)
    if torch.device(loaded.device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(torch.device(loaded.device))
    generator = torch.Generator(device="cpu").manual_seed(request.seed)
    call = dict(prompt=request.prompt, negative_prompt=request.negative_prompt or None,
                num_frames=settings["frames"], height=settings["height"], width=settings["width"],
                num_inference_steps=settings["steps"], guidance_scale=settings["guidance"], generator=generator,
                output_type="np")
    t1 = time.perf_counter()
    with _recording_backends() as ran:
        if freeswim is not None:  # the pipeline installs the processor for its refinement stage itself
            result = pipe(**call, processor=processor, **freeswim)
            settings["freeswim"] = dict(freeswim)
        else:  # on a FreeSwim pipeline: direct generation at the requested size (the dense reference)
            from .freeswim import direct_call

            vidattn.apply(pipe, processor)
            try:
                result = direct_call(pipe)(**call)
            finally:
                vidattn.remove(pipe)
    generate_s = time.perf_counter() - t1
    return RenderedVideo(result.frames[0], settings, processor.stats.summary(), ran, generate_s)


def describe_run(loaded: LoadedPipeline, request: GenerationRequest, processor: SparseAttentionProcessor,
                 rendered: RenderedVideo, *, video: Path, sidecar: Path, started: datetime.datetime,
                 method: Optional[dict] = None, command: Optional[Sequence[str]] = None, model_spec: Any = None,
                 warnings: Sequence[str] = ()) -> dict:
    """The JSON sidecar of one rendered video: command line, time, request, settings, model, method and resolved
    knobs, backends, CPU extension, attention statistics, timings, peak memory, warnings and versions."""
    device, stats, settings = loaded.device, rendered.stats, rendered.settings
    on_cpu = torch.device(device).type == "cpu"
    family = getattr(model_spec, "family", None) or ("wan" if request.model in TINY_MODELS else None)
    timings: dict[str, Any] = {
        "load_s": round(loaded.load_s, 3), "generate_s": round(rendered.generate_s, 3),
        "attention_s": round(stats["sparse_seconds"] + stats["dense_seconds"], 3) if on_cpu else None,
    }
    if not on_cpu:
        timings["attention_note"] = (f"attention time is measured on CPU only; on {torch.device(device).type} the "
                                     "kernels run asynchronously and are not timed")
    model_info = model_spec.describe() if model_spec is not None and hasattr(model_spec, "describe") else {
        "name": request.model, "kind": "tiny" if request.model in TINY_MODELS else "path or hub id",
        "source": request.model, "revision": None}
    ran = rendered.ran
    return {
        "video": str(video),
        "sidecar": str(sidecar),
        "command": shlex.join(["vidattn", *command]) if command is not None else None,
        "timestamp": started.isoformat(timespec="seconds"),
        "request": asdict(request),
        "settings": {**settings, "device": device, "device_name": device_name(device),
                     "dtype": str(loaded.pipe.transformer.dtype).replace("torch.", "")},
        "model": {**model_info, "loaded_class": type(loaded.pipe).__name__},
        "method": {**(method or {}), **processor.knobs(),
                   "resolved": _resolved_knobs(processor, family, settings["frames"], loaded.factors[0])},
        "backend": {"requested": getattr(processor, "backend", None),
                    "ran": dict(ran) if ran is not None else None,
                    "note": None if ran else ("no sparse kernel ran (every attention call was dense)" if ran is not None
                                              else "not recorded")},
        "cpu_extension": _cpu_extension_state(ran, device),
        "attention": stats,
        "timings": timings,
        "memory": {"peak": peak_memory(device)},
        "warnings": list(warnings),
        "versions": versions(),
    }


def generate_video(request: GenerationRequest, processor: SparseAttentionProcessor, out: Path, *,
                   overwrite: bool = False, method: Optional[dict] = None, freeswim: Optional[dict] = None,
                   command: Optional[Sequence[str]] = None, model_spec: Any = None,
                   warnings: Sequence[str] = ()) -> dict:
    """Generate one video and write ``out`` (mp4) and ``out.with_suffix('.json')``; returns the sidecar dict.

    ``freeswim``: FreeSwimPipeline's own options (base size, mode, cache_steps, strength); the video is generated
    at the base size, upsampled and refined with ``processor`` (a ``FreeSwimProcessor``) at the requested size.
    ``command`` (the argument vector), ``model_spec`` (``vidattn.validation.ModelSpec``) and ``warnings`` go into
    the sidecar (see :func:`describe_run`). Attention time is measured on CPU only (``timings.attention_s`` is
    null elsewhere, with a note).
    """
    from .video_io import write_sidecar, write_video

    out = Path(out)
    started = datetime.datetime.now(datetime.timezone.utc)
    loaded = open_pipeline(request, freeswim=freeswim is not None, model_spec=model_spec)
    rendered = render(loaded, request, processor, freeswim)
    t2 = time.perf_counter()
    rescue: Optional[Path] = None
    try:
        video = write_video(rendered.frames, out, fps=request.fps, overwrite=overwrite)
    except OSError as err:  # the location changed during the run: keep the computed video anyway
        rescue = Path(tempfile.mkdtemp(prefix="vidattn-rescue-")) / out.name
        video = write_video(rendered.frames, rescue, fps=request.fps)
        write_error = err
    sidecar = describe_run(loaded, request, processor, rendered, video=video, sidecar=out.with_suffix(".json"),
                           started=started, method=method, command=command, model_spec=model_spec,
                           warnings=warnings)
    sidecar["timings"]["write_s"] = round(time.perf_counter() - t2, 3)
    if rescue is not None:
        sidecar["sidecar"] = str(rescue.with_suffix(".json"))
        write_sidecar(rescue.with_suffix(".json"), sidecar)
        raise OutputWriteError(f"could not write {out} ({write_error}); the video and its sidecar were saved to "
                               f"{rescue} instead", rescue) from write_error
    write_sidecar(out.with_suffix(".json"), sidecar, overwrite=overwrite)
    return sidecar
