"""The flow-matching objective as Wan's scheduler defines it, and the seeded per-sample draws.

Timesteps: ``u`` ~ uniform(0, 1) (``uniform``) or ``sigmoid(N(logit_mean, logit_std))`` (``logit_normal``,
diffusers' ``compute_density_for_timestep_sampling``), shifted like the scheduler's sigmas,
``sigma = shift * u / (1 + (shift - 1) * u)``, and ``t = sigma * num_train_timesteps``. The model sees
``x_t = (1 - sigma) * x_0 + sigma * noise`` and is trained to predict the velocity ``noise - x_0`` (mean squared
error in float32).

Every draw of sample ``j`` of the global batch at optimizer step ``s``, micro-step ``m`` comes from its own
generator seeded with ``(seed, s, m, j)``, so a resumed run and a run split over more processes draw exactly the
same noise and timesteps.
"""
from __future__ import annotations

import hashlib
from typing import Any, Optional

import torch

__all__ = ["flow_settings", "sample_draws", "flow_matching_loss", "draw_seed"]


def flow_settings(scheduler: Any, shift: Optional[float] = None) -> tuple[float, int]:
    """``(shift, num_train_timesteps)`` of a flow-matching scheduler; ValueError for one that is not."""
    config = scheduler.config
    name = type(scheduler).__name__
    flow = "FlowMatch" in name or config.get("use_flow_sigmas") or config.get("prediction_type") == "flow_prediction"
    if not flow:
        raise ValueError(f"{name} is not a flow-matching scheduler; train-lora trains flow-matching models (Wan)")
    if shift is None:
        shift = config.get("shift") if "FlowMatch" in name else config.get("flow_shift")
    return float(shift or 1.0), int(config.get("num_train_timesteps") or 1000)


def draw_seed(seed: int, step: int, micro: int, sample: int) -> int:
    """A 63-bit seed for one sample's draws (stable across Python runs and processes)."""
    digest = hashlib.sha256(f"{seed}:{step}:{micro}:{sample}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def sample_draws(shape: tuple[int, ...], seeds: list[int], scheme: str, shift: float, logit_mean: float = 0.0,
                 logit_std: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sigmas (B,), noise (B, *shape))`` on the CPU, one seeded generator per sample."""
    from diffusers.training_utils import compute_density_for_timestep_sampling

    sigmas, noises = [], []
    for seed in seeds:
        gen = torch.Generator().manual_seed(seed)
        u = compute_density_for_timestep_sampling(scheme if scheme == "logit_normal" else "none", 1,
                                                  logit_mean=logit_mean, logit_std=logit_std, generator=gen)
        sigmas.append(shift * u / (1 + (shift - 1) * u))
        noises.append(torch.randn(shape, generator=gen))
    return torch.cat(sigmas).float(), torch.stack(noises)


def flow_matching_loss(model: Any, latents: torch.Tensor, text: torch.Tensor, sigmas: torch.Tensor,
                       noise: torch.Tensor, num_train_timesteps: int) -> torch.Tensor:
    """Mean squared error between the model's velocity prediction and ``noise - latents`` (float32 scalar)."""
    s = sigmas.view(-1, *([1] * (latents.dim() - 1))).to(latents)
    noisy = (1 - s) * latents + s * noise
    dtype = next(p for p in model.parameters()).dtype
    pred = model(hidden_states=noisy.to(dtype), timestep=(sigmas * num_train_timesteps).to(latents.device),
                 encoder_hidden_states=text.to(dtype), return_dict=False)[0]
    return torch.nn.functional.mse_loss(pred.float(), (noise - latents).float())
