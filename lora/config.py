"""The training settings, declared once: :class:`TrainConfig` fields carry their command-line option and help, and
:func:`add_arguments` builds the same options for ``vidattn train-lora`` and ``python -m vidattn.lora.train``.

Standard library only, so ``vidattn --help`` stays fast.
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

__all__ = ["TrainConfig", "add_arguments", "config_from_args", "DEFAULT_TARGETS", "TIMESTEP_SCHEMES",
           "LR_SCHEDULES", "TRAIN_METHODS", "MIXED_PRECISION"]

DEFAULT_TARGETS = "to_q,to_k,to_v,to_out.0"  # spec radial.md §5: q, k, v, out of self-attention
TIMESTEP_SCHEMES = ("uniform", "logit_normal")
LR_SCHEDULES = ("constant", "linear", "cosine")
TRAIN_METHODS = ("radial", "dense")
MIXED_PRECISION = ("no", "bf16", "fp16")


def _opt(default: Any, help: str, **argparse_kwargs: Any) -> Any:
    """A field with its argparse settings (``metadata``); lists get a fresh default per instance."""
    meta = {"help": help, "argparse": argparse_kwargs}
    if isinstance(default, list):
        return field(default_factory=list, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    """Everything a LoRA training run is defined by (``None``: the model's or the scheduler's default)."""

    model: str = _opt("tiny", "'tiny' (built-in toy Wan, offline), 'tiny-bench', a hub id such as "
                              "Wan-AI/Wan2.1-T2V-1.3B-Diffusers, or a local diffusers folder")
    data: Optional[str] = _opt(None, "a folder of videos with same-name .txt captions, or a .csv / .jsonl manifest "
                                     "with 'path' and 'caption' (paths relative to the manifest)", required=True)
    output_dir: Optional[str] = _opt(None, "where the adapter, lora_config.json, log.jsonl, loss.png and "
                                           "checkpoint-N folders go", required=True)
    cache_dir: Optional[str] = _opt(None, "latent + text-embedding cache (default: <output-dir>/cache); reused "
                                          "while its settings match, rebuilt when one changes")
    frames: Optional[int] = _opt(None, "frames per training clip (4k+1 for Wan; the point is a count longer than "
                                       "the model's default)", type=int)
    height: Optional[int] = _opt(None, "clip height in pixels (multiple of 16 for Wan)", type=int)
    width: Optional[int] = _opt(None, "clip width in pixels (multiple of 16 for Wan)", type=int)
    frame_stride: int = _opt(1, "take every N-th source frame", type=int)
    max_sequence_length: int = _opt(512, "text tokens per caption (Wan: 512)", type=int)
    method: str = _opt("radial", "attention while training: radial (sparse, the spec's dense first blocks) or "
                                 "dense (the baseline)", choices=TRAIN_METHODS)
    decay: float = _opt(1.0, "radial: band decay factor (> 0; the extended-length presets use 1.0)", type=float)
    block_size: int = _opt(128, "radial: block size in tokens", type=int)
    dense_layers: int = _opt(2, "radial: first N transformer blocks dense while training (spec: 2)", type=int)
    backend: str = _opt("auto", "sparse kernel backend: auto (torch on CPU, triton on CUDA), torch, triton, "
                                "reference")
    rank: int = _opt(128, "LoRA rank (spec: 128)", type=int)
    lora_alpha: Optional[float] = _opt(None, "LoRA alpha (default: the rank, i.e. scale 1)", type=float)
    lora_targets: str = _opt(DEFAULT_TARGETS, "comma list of projections inside each self-attention module",)
    lora_dropout: float = _opt(0.0, "LoRA dropout", type=float)
    max_steps: int = _opt(1000, "optimizer steps to train", type=int)
    train_batch_size: int = _opt(1, "clips per process per micro-step", type=int)
    gradient_accumulation_steps: int = _opt(1, "micro-steps per optimizer step", type=int)
    learning_rate: float = _opt(1e-4, "AdamW learning rate after warm-up", type=float)
    lr_scheduler: str = _opt("constant", "learning-rate schedule after warm-up", choices=LR_SCHEDULES)
    lr_warmup_steps: int = _opt(0, "linear warm-up steps from 0", type=int)
    adam_beta1: float = _opt(0.9, "AdamW beta1", type=float)
    adam_beta2: float = _opt(0.999, "AdamW beta2", type=float)
    adam_weight_decay: float = _opt(1e-4, "AdamW weight decay", type=float)
    adam_epsilon: float = _opt(1e-8, "AdamW epsilon", type=float)
    max_grad_norm: float = _opt(1.0, "gradient clipping norm (0: no clipping)", type=float)
    weighting_scheme: str = _opt("logit_normal", "timestep sampling: u ~ uniform(0, 1) or sigmoid(N(mean, std)); "
                                                 "then sigma = shift*u / (1 + (shift-1)*u), t = 1000*sigma",
                                 choices=TIMESTEP_SCHEMES)
    logit_mean: float = _opt(0.0, "logit_normal: mean", type=float)
    logit_std: float = _opt(1.0, "logit_normal: standard deviation", type=float)
    flow_shift: Optional[float] = _opt(None, "timestep shift (default: the scheduler's shift / flow_shift)",
                                       type=float)
    gradient_checkpointing: bool = _opt(False, "recompute each block in the backward pass (less memory)",
                                        action="store_true")
    mixed_precision: str = _opt("no", "autocast precision (fp16 needs CUDA)", choices=MIXED_PRECISION)
    dtype: Optional[str] = _opt(None, "frozen base weights' dtype (default: bfloat16 on cuda, float32 on cpu); "
                                      "the LoRA weights stay float32", choices=("float32", "float16", "bfloat16"))
    device: Optional[str] = _opt(None, "cpu or cuda (default: cuda if available; accelerate picks the GPU per "
                                       "process)")
    seed: int = _opt(0, "seed of the LoRA init, the data order and every noise / timestep draw", type=int)
    checkpointing_steps: int = _opt(500, "save a resumable checkpoint-N every N steps and at the last "
                                             "step (0: never)", type=int)
    checkpoints_total_limit: Optional[int] = _opt(None, "keep only the newest N checkpoints", type=int)
    resume: Optional[str] = _opt(None, "'latest' (newest checkpoint-N in --output-dir) or a checkpoint folder")
    validation_prompt: list = _opt([], "prompt rendered into a video every --validation-steps (repeatable)",
                                   action="append")
    validation_steps: int = _opt(0, "render the validation prompts every N steps and at the end (0: never)",
                                 type=int)
    validation_inference_steps: Optional[int] = _opt(None, "denoising steps of validation videos (default: the "
                                                           "model's)", type=int)
    overwrite: bool = _opt(False, "replace the outputs of an earlier run in --output-dir", action="store_true")

    @property
    def alpha(self) -> float:
        return float(self.rank if self.lora_alpha is None else self.lora_alpha)

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(t.strip() for t in self.lora_targets.split(",") if t.strip())

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """One option per :class:`TrainConfig` field (``--output-dir`` for ``output_dir``)."""
    for f in dataclasses.fields(TrainConfig):
        kwargs = dict(f.metadata["argparse"])
        default = [] if f.default is dataclasses.MISSING else f.default
        if kwargs.get("action") != "append":
            kwargs["default"] = default
        parser.add_argument(_option(f.name), dest=f.name, help=f.metadata["help"], **kwargs)
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The :class:`TrainConfig` of parsed arguments (other attributes of ``args`` are ignored)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
    values["validation_prompt"] = list(values["validation_prompt"] or [])
    return TrainConfig(**values)


def option_of(name: str) -> str:
    """The command-line option of a field (for messages)."""
    return _option(name)
