"""Every check of a training run's settings, before any model is loaded: a bad value is a one-line
:class:`~vidattn.validation.UsageError` naming the option (exit code 2), nothing written."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from vidattn import validation as v

from .cache import CacheSettings, cache_settings, foreign_files, valid_cache
from .checkpoint import RESUME_KEYS, latest_checkpoint, read_state, resume_problem
from .config import TrainConfig, option_of
from .data import Clip, discover, probe

__all__ = ["Checked", "check_config", "OUTPUT_FILES"]

OUTPUT_FILES = ("log.jsonl", "loss.png", "pytorch_lora_weights.safetensors", "lora_config.json")


@dataclass
class Checked:
    """What a checked run needs."""

    cfg: TrainConfig  # with frames, height and width resolved
    spec: Any
    device: str
    dtype: str
    processor: Any
    clips: list[Clip]
    skipped: list = field(default_factory=list)
    settings: Optional[CacheSettings] = None
    cache_dir: Optional[Path] = None
    cache_valid: bool = False
    output_dir: Optional[Path] = None
    resume: Optional[Path] = None
    warnings: list = field(default_factory=list)


# (field, minimum, strictly above the minimum, integer)
_NUMBERS = (
    ("frame_stride", 1, False, True), ("max_sequence_length", 1, False, True), ("block_size", 1, False, True),
    ("dense_layers", 0, False, True), ("rank", 1, False, True), ("max_steps", 1, False, True),
    ("train_batch_size", 1, False, True), ("gradient_accumulation_steps", 1, False, True),
    ("lr_warmup_steps", 0, False, True), ("checkpointing_steps", 0, False, True),
    ("checkpoints_total_limit", 1, False, True), ("validation_steps", 0, False, True),
    ("validation_inference_steps", 1, False, True), ("frames", 1, False, True), ("height", 1, False, True),
    ("width", 1, False, True), ("decay", 0, True, False), ("lora_alpha", 0, True, False),
    ("learning_rate", 0, True, False), ("adam_weight_decay", 0, False, False), ("adam_epsilon", 0, True, False),
    ("max_grad_norm", 0, False, False), ("logit_std", 0, True, False), ("flow_shift", 0, True, False),
)


def _check_numbers(cfg: TrainConfig) -> None:
    for name, low, open_, integer in _NUMBERS:
        v.check_number(option_of(name), getattr(cfg, name), minimum=low, low_open=open_, integer=integer)
    v.check_number("--lora-dropout", cfg.lora_dropout, minimum=0, maximum=1, high_open=True)
    for name in ("adam_beta1", "adam_beta2"):
        v.check_number(option_of(name), getattr(cfg, name), minimum=0, maximum=1, high_open=True)
    v.check_number("--logit-mean", cfg.logit_mean)
    v.check_seed("--seed", cfg.seed)
    if not cfg.targets or any(not t.replace(".", "").replace("_", "").isalnum() for t in cfg.targets):
        raise v.UsageError("--lora-targets", f"must be a comma list of projection names such as "
                                             f"to_q,to_k,to_v,to_out.0, got {cfg.lora_targets!r}")


def _check_model(cfg: TrainConfig) -> tuple[Any, str, str, tuple[int, int, int]]:
    spec = v.check_model(cfg.model)
    index = spec.configs.get("model_index") or {}
    if spec.family != "wan" or (index.get("transformer_2") or [None])[0] is not None:
        raise v.UsageError("--model", f"{v.shown(cfg.model)} is a {spec.class_name}; train-lora trains Wan 2.1-style "
                                      "text-to-video pipelines (one transformer), e.g. Wan-AI/Wan2.1-T2V-1.3B-Diffusers")
    device = v.check_device(cfg.device)
    dtype = v.check_dtype(cfg.dtype, device)
    v.check_backend(cfg.backend, device)
    if cfg.mixed_precision == "fp16" and not device.startswith("cuda"):
        raise v.UsageError("--mixed-precision", f"fp16 needs a CUDA device (here: {device}); use bf16 or no")
    given = {"frames": cfg.frames, "height": cfg.height, "width": cfg.width, "steps": None, "guidance": None}
    settings = v.resolve_settings(spec, given)
    v.check_geometry(settings["frames"], settings["height"], settings["width"], spec.factors,
                     model=f"{spec.name} ({spec.class_name})")
    return spec, device, dtype, (settings["frames"], settings["height"], settings["width"])


def _check_output(cfg: TrainConfig) -> v.OutputTarget:
    """The output folder: not a file, no earlier run unless resumed or overwritten, writable (created; the
    target's ``discard`` removes what the check created)."""
    out = Path(cfg.output_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise v.UsageError("--output-dir", f"{v.shown(cfg.output_dir)} is a file, not a folder")
    checkpoint = latest_checkpoint(out)
    earlier = [name for name in OUTPUT_FILES if (out / name).exists()] + ([checkpoint.name] if checkpoint else [])
    if earlier and cfg.resume is None and not cfg.overwrite:
        raise v.UsageError("--output-dir", f"{v.shown(cfg.output_dir)} holds an earlier run ({', '.join(earlier)}); "
                                           "pass --resume latest to continue it or --overwrite to start over")
    return v.check_output_file(out / "log.jsonl", "--output-dir", suffix=".jsonl", overwrite=True)


def _check_resume(cfg: TrainConfig, out: Path) -> Optional[Path]:
    if cfg.resume is None:
        return None
    path = latest_checkpoint(out) if cfg.resume == "latest" else Path(cfg.resume).expanduser()
    if path is None:
        raise v.UsageError("--resume", f"latest: there is no checkpoint-N folder in {v.shown(cfg.output_dir)}")
    try:
        state = read_state(path)
    except ValueError as err:
        raise v.UsageError("--resume", str(err)) from None
    problem = resume_problem(state, path, int(os.environ.get("WORLD_SIZE", "1")))
    if problem:
        raise v.UsageError("--resume", problem)
    saved = state["settings"]
    for key in RESUME_KEYS:
        if key in saved and saved[key] != getattr(cfg, key) and not (key == "dtype" and saved[key] is None):
            raise v.UsageError(option_of(key), f"is {getattr(cfg, key)!r} but the checkpoint {v.shown(path)} was "
                                               f"trained with {saved[key]!r}; a resumed run keeps it")
    if state["step"] >= cfg.max_steps:
        raise v.UsageError("--max-steps", f"{cfg.max_steps} is not past the checkpoint's step {state['step']}; "
                                          "raise it to train on")
    return path


def _check_data(cfg: TrainConfig, frames: int) -> tuple[list[Clip], list]:
    data = Path(cfg.data).expanduser()
    if not data.exists():
        raise v.UsageError("--data", f"there is no folder or manifest {v.shown(cfg.data)}")
    try:
        found = discover(data)
    except (ValueError, OSError) as err:
        raise v.UsageError("--data", str(err)) from None
    if not found.clips:
        why = f" ({len(found.skipped)} skipped: {found.skipped[0][1]}, ...)" if found.skipped else ""
        raise v.UsageError("--data", f"no videos with captions in {v.shown(cfg.data)}{why}; expected videos with "
                                     "same-name .txt captions, or a .csv / .jsonl manifest with path and caption")
    return found.clips, [list(s) for s in found.skipped]


def _probe_clips(clips: list[Clip], cfg: TrainConfig, frames: int) -> tuple[list[Clip], list]:
    """The clips that can give ``frames`` frames, and the others with why (UsageError when none can)."""
    usable, skipped = [], []
    for clip in clips:
        reason = probe(clip, frames, cfg.frame_stride)
        if reason is None:
            usable.append(clip)
        else:
            skipped.append([str(clip.path), reason])
    if not usable:
        raise v.UsageError("--data", f"none of the {len(clips)} videos can give --frames {frames} (e.g. "
                                     f"{Path(skipped[0][0]).name}: {skipped[0][1]})")
    return usable, skipped


def _overlaps(a: Path, b: Path) -> bool:
    """``a`` is ``b``, lies inside it or contains it."""
    return a == b or a in b.parents or b in a.parents


def _check_cache_dir(cfg: TrainConfig, out: Path, clips: list[Clip]) -> Path:
    """The cache folder (default ``<output-dir>/cache``): not the data, a folder around or inside it, the output
    folder or one around it, nor among the run's own outputs; and no folder of other files (a rebuild clears it)."""
    cache = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else out / "cache"
    where, home = cache.resolve(), out.resolve()
    guarded = {Path(cfg.data).expanduser().resolve(): "--data"}
    guarded.update({c.path.parent.resolve(): "--data" for c in clips if c.path.parent.resolve() not in guarded})
    for path, option in [*guarded.items(), (home, "--output-dir")]:
        if _overlaps(where, path) and not (option == "--output-dir" and home in where.parents):
            raise v.UsageError("--cache-dir", f"{v.shown(str(cache))} is, contains or lies inside the {option} "
                                              f"folder {v.shown(str(path))}; the cache needs a folder of its own "
                                              "(default: <output-dir>/cache)")
    inner = where.relative_to(home).parts[0] if home in where.parents else ""
    if inner in OUTPUT_FILES + ("validation",) or inner.startswith("checkpoint-"):
        raise v.UsageError("--cache-dir", f"{v.shown(str(cache))} lies in the run's own {inner}; use another folder "
                                          "(default: <output-dir>/cache)")
    foreign = foreign_files(cache) if int(os.environ.get("RANK", "0")) == 0 else []  # others: rank 0 may be building
    if foreign:
        raise v.UsageError("--cache-dir", f"{v.shown(str(cache))} is not a vidattn cache (it holds "
                                          f"{', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}) and would "
                                          "be cleared to build one; pass a new or empty folder")
    return cache


def check_config(cfg: TrainConfig) -> Checked:
    """All checks, cheapest first; returns what the run needs (UsageError on the first bad value)."""
    from .adapter import training_processor

    _check_numbers(cfg)
    spec, device, dtype, (frames, height, width) = _check_model(cfg)
    cfg = dataclasses.replace(cfg, frames=frames, height=height, width=width, dtype=dtype)  # resolved, as saved
    try:
        processor = training_processor(cfg)
    except (ValueError, TypeError) as err:
        raise v.knob_error(err) from None
    warnings = v.dense_warnings(processor.knobs(), None, spec.num_layers, f" on {spec.name}")
    clips, skipped = _check_data(cfg, frames)
    out = Path(cfg.output_dir).expanduser()
    resume = _check_resume(cfg, out)
    cache_dir = _check_cache_dir(cfg, out, clips)
    settings = cache_settings(spec.describe(), clips, frames, height, width, cfg.frame_stride,
                              cfg.max_sequence_length)
    valid = valid_cache(cache_dir, settings)
    target = _check_output(cfg)
    if not valid and int(os.environ.get("RANK", "0")) == 0:
        try:
            clips, unusable = _probe_clips(clips, cfg, frames)
        except v.UsageError:
            target.discard()
            raise
        skipped += unusable
    return Checked(cfg=cfg, spec=spec, device=device, dtype=dtype, processor=processor, clips=clips, skipped=skipped,
                   settings=settings, cache_dir=cache_dir, cache_valid=valid, output_dir=out, resume=resume,
                   warnings=warnings)
