"""Building models from config: a seeded build that leaves the global RNG alone, and the dtype cast that
``from_pretrained(torch_dtype=...)`` applies. Shared by the tiny pipelines (``vidattn.pipelines.tiny``) and the
benchmarks' random models."""
from __future__ import annotations

from typing import Callable, TypeVar

import torch

__all__ = ["cast_like_pretrained", "seeded"]

T = TypeVar("T")
M = TypeVar("M", bound=torch.nn.Module)


def seeded(seed: int, build: Callable[[], T]) -> T:
    """Run ``build`` under a forked CPU RNG seeded with ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def cast_like_pretrained(model: M, dtype: torch.dtype) -> M:
    """Cast floating parameters/buffers to ``dtype``, keeping the model's ``_keep_in_fp32_modules`` in float32.

    Mirrors what ``from_pretrained(torch_dtype=...)`` does, without ``ModelMixin.to``'s warning.
    """
    if dtype == torch.float32:
        return model
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or ())
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if tensor.is_floating_point():
                tensor.data = tensor.data.to(torch.float32 if keep & set(name.split(".")) else dtype)
    return model
