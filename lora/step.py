"""One training step (micro-steps, then the optimizer step), shared by the trainer and ``vidattn bench train``."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch

from .objective import draw_seed, flow_matching_loss, sample_draws

__all__ = ["Objective", "training_step", "make_optimizer", "make_lr_schedule"]


@dataclass(frozen=True)
class Objective:
    """How the loss draws its timesteps (see :mod:`vidattn.lora.objective`)."""

    scheme: str
    shift: float
    num_train_timesteps: int
    logit_mean: float = 0.0
    logit_std: float = 1.0
    seed: int = 0


def _micro(accelerator: Any, model: Any, context: Any, batch: dict, slots: Sequence[int], objective: Objective,
           step: int, micro: int, scale: float, sync: bool) -> torch.Tensor:
    device = accelerator.device
    latents, text = batch["latents"].to(device), batch["text"].to(device)
    seeds = [draw_seed(objective.seed, step, micro, s) for s in slots]
    sigmas, noise = sample_draws(tuple(latents.shape[1:]), seeds, objective.scheme, objective.shift,
                                 objective.logit_mean, objective.logit_std)
    no_sync = contextlib.nullcontext() if sync else accelerator.no_sync(model)
    passing = context.passing(training=True) if context is not None else contextlib.nullcontext()
    with no_sync, passing:
        loss = flow_matching_loss(model, latents, text, sigmas.to(device), noise.to(device),
                                  objective.num_train_timesteps)
        accelerator.backward(loss * scale)
    return loss.detach()


def training_step(accelerator: Any, model: Any, context: Any, params: list, optimizer: Any, scheduler: Any,
                  batches: Callable[[int], tuple[dict, Sequence[int]]], accumulation: int, objective: Objective,
                  step: int, max_grad_norm: float) -> tuple[torch.Tensor, Optional[float]]:
    """Optimizer step ``step`` (0-based) over ``accumulation`` micro-batches (``batches(micro)`` gives a batch and
    its positions in the global batch; gradients are synchronised on the last one). Returns this process's mean
    loss and the gradient norm before clipping (None without clipping)."""
    losses = []
    for micro in range(accumulation):
        batch, slots = batches(micro)
        losses.append(_micro(accelerator, model, context, batch, slots, objective, step, micro, 1.0 / accumulation,
                             sync=micro == accumulation - 1))
    norm = None
    if max_grad_norm > 0:
        norm = float(accelerator.clip_grad_norm_(params, max_grad_norm))
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return torch.stack(losses).mean(), norm


def make_optimizer(params: list, lr: float, betas: tuple[float, float], weight_decay: float,
                   eps: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, eps=eps)


def make_lr_schedule(optimizer: torch.optim.Optimizer, name: str, warmup: int, total: int) -> Any:
    """diffusers' schedules: linear warm-up from 0 over ``warmup`` steps, then constant, linear or cosine decay."""
    from diffusers.optimization import get_scheduler

    return get_scheduler("constant_with_warmup" if name == "constant" else name, optimizer,
                         num_warmup_steps=warmup, num_training_steps=total)
