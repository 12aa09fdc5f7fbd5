"""Training clips: discovery (a folder with same-name ``.txt`` captions, or a CSV / JSONL manifest), decoding
(imageio-ffmpeg), temporal sampling, resize and centre crop."""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

__all__ = ["Clip", "ClipError", "Discovery", "discover", "load_clip", "needed_frames", "resize_center_crop"]

VIDEO_SUFFIXES = (".mp4", ".mov", ".webm", ".mkv", ".avi", ".gif", ".m4v")
MANIFEST_SUFFIXES = (".csv", ".jsonl")


class ClipError(ValueError):
    """A clip that cannot be used (unreadable, too short); the reason is the message."""


@dataclass(frozen=True)
class Clip:
    path: Path
    caption: str


@dataclass
class Discovery:
    """The usable-looking clips and the entries skipped as ``(path, reason)``."""

    clips: list[Clip] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)


def discover(data: Path) -> Discovery:
    """The clips of ``data``: a folder (each video with a non-empty same-name ``.txt``) or a manifest file
    (``.csv`` with a header, or ``.jsonl``; fields ``path`` and ``caption``, paths relative to the manifest).
    Raises ValueError for a manifest without those fields or that cannot be parsed."""
    if data.is_dir():
        return _from_folder(data)
    rows = _manifest_rows(data)
    found = Discovery()
    for n, row in enumerate(rows, 1):
        path, caption = row.get("path"), row.get("caption")
        if not isinstance(path, str) or not path.strip():
            found.skipped.append((f"{data.name}:{n}", "no 'path'"))
        elif caption is not None and not isinstance(caption, str):
            found.skipped.append((path, f"caption must be text, got {type(caption).__name__} {caption!r:.40}"))
        elif not caption or not caption.strip():
            found.skipped.append((path, "no caption" if caption is None else "empty caption"))
        else:
            video = (data.parent / path).resolve()
            if video.is_file():
                found.clips.append(Clip(video, caption.strip()))
            else:
                found.skipped.append((path, "file not found"))
    return found


def _from_folder(folder: Path) -> Discovery:
    found = Discovery()
    for video in sorted(p for p in folder.iterdir() if p.suffix.lower() in VIDEO_SUFFIXES and p.is_file()):
        text = video.with_suffix(".txt")
        caption = text.read_text(encoding="utf-8", errors="replace").strip() if text.is_file() else ""
        if caption:
            found.clips.append(Clip(video.resolve(), caption))
        else:
            found.skipped.append((video.name, "no caption (.txt)" if not text.is_file() else "empty caption"))
    return found


def _manifest_rows(path: Path) -> list[dict]:
    suffix = path.suffix.lower()
    if suffix not in MANIFEST_SUFFIXES:
        raise ValueError(f"{path} is neither a folder nor a {' / '.join(MANIFEST_SUFFIXES)} manifest")
    text = path.read_text(encoding="utf-8")
    if suffix == ".csv":
        reader = csv.DictReader(text.splitlines())
        if not reader.fieldnames or not {"path", "caption"} <= set(reader.fieldnames):
            raise ValueError(f"{path} needs a header with 'path' and 'caption', got {reader.fieldnames}")
        return list(reader)
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise ValueError(f"{path} line {n} is not JSON") from None
            rows.append(row if isinstance(row, dict) else {})
    return rows


def needed_frames(frames: int, stride: int) -> int:
    """Source frames a clip needs for ``frames`` samples every ``stride`` frames."""
    return (frames - 1) * stride + 1


def load_clip(clip: Clip, frames: int, height: int, width: int, stride: int = 1) -> torch.Tensor:
    """The first ``frames`` frames (every ``stride``-th) of ``clip``, resized to cover ``height x width`` and
    centre-cropped: float ``(3, frames, height, width)`` in [-1, 1]. ClipError when unreadable or too short."""
    from vidattn.pipelines.video_io import read_video

    try:
        video = read_video(clip.path)
    except Exception as err:  # noqa: BLE001 - any decoder failure makes the clip unusable
        raise ClipError(f"unreadable ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})")
    need = needed_frames(frames, stride)
    if video.shape[0] < need:
        raise ClipError(f"too short: {video.shape[0]} frames, needs {need}")
    picked = torch.from_numpy(video[:need:stride].copy()).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return resize_center_crop(picked, height, width).permute(1, 0, 2, 3).contiguous()


def resize_center_crop(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``(F, C, h, w)`` scaled (bilinear, antialiased) so that it covers ``height x width``, then centre-cropped."""
    h, w = frames.shape[-2:]
    scale = max(height / h, width / w)
    size = (max(height, round(h * scale)), max(width, round(w * scale)))
    if size != (h, w):
        frames = torch.nn.functional.interpolate(frames, size=size, mode="bilinear", align_corners=False,
                                                 antialias=True)
    top, left = (size[0] - height) // 2, (size[1] - width) // 2
    return frames[..., top:top + height, left:left + width].clamp(-1.0, 1.0)


def probe(clip: Clip, frames: int, stride: int) -> Optional[str]:
    """Why ``clip`` cannot give ``frames`` frames (None: it can), from the frame count alone."""
    import imageio_ffmpeg

    try:
        count, _ = imageio_ffmpeg.count_frames_and_secs(str(clip.path))
    except Exception as err:  # noqa: BLE001
        return f"unreadable ({type(err).__name__})"
    need = needed_frames(frames, stride)
    return None if count >= need else f"too short: {count} frames, needs {need}"
