"""How close two videos are: PSNR and SSIM over uint8 ``(F, H, W, 3)`` frames (the demo's dense-vs-sparse compare).

* PSNR = ``10 log10(255² / MSE)`` over every pixel and channel of all frames (``inf`` for identical videos).
* SSIM (Wang et al. 2004) on the luma ``Y = 0.299 R + 0.587 G + 0.114 B`` of each frame: local means, variances and
  covariance under an ``11 x 11`` Gaussian window (σ 1.5, normalised), ``C1 = (0.01 L)²``, ``C2 = (0.03 L)²``,
  ``L = 255``, averaged over the window positions that fit inside the frame ("valid"), then over frames. Frames
  smaller than the window use a window of the frame's smaller side.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["gaussian_window", "psnr", "ssim"]

PEAK = 255.0
LUMA = (0.299, 0.587, 0.114)


def _shapes(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.ndim != 4 or a.shape[-1] != 3:
        raise ValueError(f"expected two videos shaped (F, H, W, 3) alike, got {a.shape} and {b.shape}")
    return a, b


def _check(a: np.ndarray, b: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = _shapes(a, b)
    return torch.from_numpy(a.astype(np.float64)), torch.from_numpy(b.astype(np.float64))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of two uint8 videos (``inf`` when identical). The squared error is summed a
    frame at a time, so a long high-resolution video needs no float64 copy of itself."""
    a, b = _shapes(a, b)
    total = sum(float(((f.astype(np.float64) - g) ** 2).sum()) for f, g in zip(a, b))
    mse = total / a.size
    return math.inf if mse == 0 else 10.0 * math.log10(PEAK ** 2 / mse)


def gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """float64 ``(size, size)`` Gaussian weights summing to 1."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(a: np.ndarray, b: np.ndarray, size: int = 11, sigma: float = 1.5) -> float:
    """Mean structural similarity of two uint8 videos on luma (module docstring); 1 when identical."""
    x, y = _check(a, b)
    weights = torch.tensor(LUMA, dtype=torch.float64)
    x, y = (x @ weights)[:, None], (y @ weights)[:, None]  # (F, 1, H, W)
    size = min(size, x.shape[-2], x.shape[-1])
    window = gaussian_window(size, sigma)[None, None]

    def local(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, window)

    mx, my = local(x), local(y)
    vx, vy, cxy = local(x * x) - mx ** 2, local(y * y) - my ** 2, local(x * y) - mx * my
    c1, c2 = (0.01 * PEAK) ** 2, (0.03 * PEAK) ** 2
    index = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return float(index.mean())
