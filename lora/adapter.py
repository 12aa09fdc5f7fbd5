"""The LoRA itself: peft adapters on the self-attention projections, the attention processor trained under, and
the files written at the end (diffusers' ``save_lora_weights`` + ``lora_config.json``)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import nn

from vidattn.methods import make_processor
from vidattn.models import adapter_for_transformer
from vidattn.processors import SparseAttentionProcessor

from .config import TrainConfig

__all__ = ["lora_targets", "add_lora", "training_processor", "lora_parameters", "save_adapter", "ADAPTER_JSON"]

ADAPTER_JSON = "lora_config.json"
WEIGHTS_NAME = "pytorch_lora_weights.safetensors"  # diffusers' default name, what load_lora_weights looks for


def lora_targets(transformer: nn.Module, suffixes: Sequence[str]) -> list[str]:
    """Full module names ``<self-attention module>.<suffix>``; ValueError (naming ``--lora-targets``) for a
    suffix that is not a linear layer of every self-attention module."""
    modules = adapter_for_transformer(transformer).self_attention_modules(transformer)
    targets = []
    for name, _ in modules:
        for suffix in suffixes:
            try:
                layer = transformer.get_submodule(f"{name}.{suffix}")
            except AttributeError:
                layer = None
            if not isinstance(layer, nn.Linear):
                raise ValueError(f"--lora-targets: {name}.{suffix} is not a linear layer of the self-attention "
                                 f"(e.g. to_q, to_k, to_v, to_out.0)")
            targets.append(f"{name}.{suffix}")
    return targets


def add_lora(transformer: nn.Module, cfg: TrainConfig) -> list[str]:
    """Freeze ``transformer`` and add a peft LoRA (rank, alpha, dropout of ``cfg``) on the self-attention
    projections, initialised under ``cfg.seed``; the LoRA weights are float32. Returns the target names."""
    from peft import LoraConfig

    targets = lora_targets(transformer, cfg.targets)
    transformer.requires_grad_(False)
    config = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.lora_dropout, init_lora_weights=True,
                        target_modules=targets)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        transformer.add_adapter(config)
    for param in lora_parameters(transformer):
        param.data = param.data.float()
    return targets


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for n, p in model.named_parameters() if "lora_" in n and p.requires_grad]


def training_processor(cfg: TrainConfig) -> SparseAttentionProcessor:
    """The processor trained under: Radial with ``cfg``'s knobs (step knobs stay 0: a training call has no
    denoising step), or the dense baseline."""
    if cfg.method == "dense":
        return make_processor("dense")
    return make_processor("radial", decay=cfg.decay, block_size=cfg.block_size, dense_layers=cfg.dense_layers,
                          backend=cfg.backend)


def adapter_metadata(cfg: TrainConfig, targets: list[str], processor: SparseAttentionProcessor, extra: dict,
                     flow_shift: Optional[float] = None) -> dict:
    """What ``lora_config.json`` records next to the weights (``flow_shift``: the shift trained with, default
    ``cfg.flow_shift``)."""
    return {"format": "diffusers (save_lora_weights)", "weights": WEIGHTS_NAME, "rank": cfg.rank,
            "alpha": cfg.alpha, "dropout": cfg.lora_dropout, "targets": list(cfg.targets), "target_modules": targets,
            "method": cfg.method, "knobs": processor.knobs(), "frames": cfg.frames, "height": cfg.height,
            "width": cfg.width, "frame_stride": cfg.frame_stride, "model": cfg.model,
            "optimizer": {"name": "AdamW", "learning_rate": cfg.learning_rate, "betas": [cfg.adam_beta1,
                          cfg.adam_beta2], "weight_decay": cfg.adam_weight_decay, "eps": cfg.adam_epsilon},
            "schedule": {"name": cfg.lr_scheduler, "warmup_steps": cfg.lr_warmup_steps},
            "timesteps": {"weighting_scheme": cfg.weighting_scheme, "logit_mean": cfg.logit_mean,
                          "logit_std": cfg.logit_std,
                          "flow_shift": cfg.flow_shift if flow_shift is None else flow_shift},
            **extra}


def save_adapter(pipeline_cls: Any, transformer: nn.Module, folder: Path, metadata: dict) -> Path:
    """Write the LoRA with ``pipeline_cls.save_lora_weights`` (loadable by the stock pipeline's
    ``load_lora_weights``) and ``lora_config.json``; returns the weights file."""
    from peft.utils import get_peft_model_state_dict

    folder.mkdir(parents=True, exist_ok=True)
    state = get_peft_model_state_dict(transformer)
    config = transformer.peft_config["default"].to_dict()
    config = {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}
    pipeline_cls.save_lora_weights(str(folder), transformer_lora_layers=state, weight_name=WEIGHTS_NAME,
                                   transformer_lora_adapter_metadata=config)
    (folder / ADAPTER_JSON).write_text(json.dumps(metadata, indent=2, default=str) + "\n", encoding="utf-8")
    return folder / WEIGHTS_NAME
