"""Synthetic training clips: coloured shapes moving over a plain background, with captions that say which."""
from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["moving_shape_clip", "write_moving_shapes"]

_COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (40, 80, 220), "yellow": (230, 210, 40)}
_MOTIONS = ("moves", "runs", "falls", "rolls")


def moving_shape_clip(frames: int, height: int, width: int, colour: tuple[int, int, int], velocity: tuple[float, float],
                      square: bool = True) -> np.ndarray:
    """``(frames, height, width, 3)`` uint8: a square (or disc) of ``colour`` moving by ``velocity`` pixels per
    frame (wrapping around) on a grey background."""
    yy, xx = np.mgrid[0:height, 0:width]
    size = max(2, min(height, width) // 4)
    video = np.full((frames, height, width, 3), 128, dtype=np.uint8)
    for f in range(frames):
        cy = (height / 2 + velocity[0] * f) % height
        cx = (width / 2 + velocity[1] * f) % width
        if square:
            inside = (np.abs(yy - cy) <= size / 2) & (np.abs(xx - cx) <= size / 2)
        else:
            inside = (yy - cy) ** 2 + (xx - cx) ** 2 <= (size / 2) ** 2
        video[f][inside] = colour
    return video


def write_moving_shapes(folder: Path, count: int, frames: int, height: int, width: int, seed: int = 0) -> list[Path]:
    """``count`` clips ``clip_<i>.mp4`` with same-name ``.txt`` captions in ``folder``; returns the video paths."""
    from vidattn.pipelines.video_io import write_video

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        name = list(_COLOURS)[i % len(_COLOURS)]
        square = bool(i % 2)
        velocity = tuple(float(v) for v in rng.uniform(-3, 3, size=2))
        video = moving_shape_clip(frames, height, width, _COLOURS[name], velocity, square)
        path = write_video(video, folder / f"clip_{i}.mp4", fps=8, overwrite=True)
        motion = _MOTIONS[i % len(_MOTIONS)]
        path.with_suffix(".txt").write_text(f"a {name} {'car' if square else 'sun'} {motion} in the scene")
        paths.append(path)
    return paths
