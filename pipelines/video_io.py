"""Atomic mp4 and JSON sidecar writing, and mp4 reading (H.264 / yuv420p through imageio-ffmpeg).

Writers never leave a partial file at the target path: they write a temporary file in the same folder and move it
into place. Without ``overwrite=True`` an existing target raises ``FileExistsError``, checked before encoding and
again, race-free, when the file is moved into place.
"""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import imageio_ffmpeg
import numpy as np
import torch

__all__ = ["atomic_write", "read_sidecar", "read_video", "to_uint8_frames", "write_png", "write_sidecar", "write_video"]


def to_uint8_frames(frames: Any) -> np.ndarray:
    """Normalize video frames to a C-contiguous uint8 ``(F, H, W, 3)`` array.

    Accepts numpy arrays or torch tensors shaped ``(F, H, W, C)``, ``(F, C, H, W)`` (C in 1, 3, 4), ``(F, H, W)``
    or with a leading batch dimension of 1 (as ``pipe(...).frames`` is), lists of such frames or of PIL images.
    Floating-point values are taken as [0, 1] (clipped); alpha is dropped; grey is repeated to RGB.
    """
    if isinstance(frames, torch.Tensor):
        frames = frames.detach().to("cpu", torch.float32 if frames.is_floating_point() else frames.dtype).numpy()
    elif isinstance(frames, (list, tuple)):
        if not frames:
            raise ValueError("no frames to write")
        frames = np.stack([np.asarray(f.convert("RGB")) if _is_pil(f) else _as_array(f) for f in frames])
    array = np.asarray(frames)
    if array.ndim == 5:
        if array.shape[0] != 1:
            raise ValueError(f"expected one video, got a batch of {array.shape[0]}; pass frames[i]")
        array = array[0]
    if array.ndim == 3:
        array = array[..., None]
    if array.ndim != 4:
        raise ValueError(f"expected frames shaped (F, H, W, C), got shape {array.shape}")
    if array.shape[-1] not in (1, 3, 4) and array.shape[1] in (1, 3, 4):
        array = array.transpose(0, 2, 3, 1)
    channels = array.shape[-1]
    if channels not in (1, 3, 4):
        raise ValueError(f"expected 1, 3 or 4 channels, got shape {array.shape}")
    if channels == 1:
        array = np.repeat(array, 3, axis=-1)
    elif channels == 4:
        array = array[..., :3]
    if array.shape[0] == 0:
        raise ValueError("no frames to write")
    if np.issubdtype(array.dtype, np.floating):
        array = np.round(np.clip(np.nan_to_num(array), 0.0, 1.0) * 255.0).astype(np.uint8)
    elif array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    elif array.dtype != np.uint8:
        array = np.clip(array, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(array)


def _is_pil(obj: Any) -> bool:
    return hasattr(obj, "convert") and hasattr(obj, "size") and hasattr(obj, "mode")


def _as_array(frame: Any) -> np.ndarray:
    if isinstance(frame, torch.Tensor):
        frame = frame.detach().cpu().numpy()
    return np.asarray(frame)


def _pad_even(frames: np.ndarray) -> np.ndarray:
    """yuv420p needs even sizes: replicate the last row/column when height/width is odd."""
    pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
    if not (pad_h or pad_w):
        return frames
    return np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")


def _check_target(path: Path, overwrite: bool) -> None:
    if not overwrite and (path.exists() or path.is_symlink()):
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")


def atomic_write(path: str | os.PathLike, overwrite: bool, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file next to ``path``, then move it to ``path`` (no partial file is ever
    left at ``path``; without ``overwrite`` an existing ``path`` raises ``FileExistsError``, checked again
    race-free at the move). Missing parent folders are created; a parent that is a file raises
    ``NotADirectoryError`` and an existing folder at ``path`` ``IsADirectoryError``."""
    path = Path(path)
    _check_target(path, overwrite)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise NotADirectoryError(f"{parent} is a file, not a folder, so {path} cannot be created")
            break
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o666 & ~umask)  # mkstemp creates 0600; give the file the permissions a plain open() would
        if overwrite:
            os.replace(tmp, path)
        else:
            _link_no_clobber(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


_atomic_write = atomic_write  # the former private name


def _link_no_clobber(tmp: Path, path: Path) -> None:
    """Move ``tmp`` to ``path`` unless ``path`` exists (hard link is atomic and fails on an existing target)."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it") from None
    except OSError:
        _check_target(path, overwrite=False)
        os.replace(tmp, path)


def write_video(
    frames: Any,
    path: str | os.PathLike,
    fps: float = 16,
    overwrite: bool = False,
    quality: float = 8.0,
) -> Path:
    """Write frames (see ``to_uint8_frames``) to an H.264 / yuv420p mp4 atomically; returns the path.

    Odd heights/widths are padded by one replicated row/column (yuv420p needs even sizes); frames are not resized.
    ``quality`` is imageio-ffmpeg's 1-10 scale (8 = CRF 10). Raises ``FileExistsError`` if ``path`` exists and
    ``overwrite`` is False.
    """
    if fps <= 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    video = _pad_even(to_uint8_frames(frames))
    _, height, width, _ = video.shape

    def encode(tmp: Path) -> None:
        writer = imageio_ffmpeg.write_frames(
            str(tmp), (width, height), fps=fps, codec="libx264", pix_fmt_out="yuv420p", quality=quality,
            macro_block_size=1, ffmpeg_log_level="error", output_params=["-movflags", "+faststart", "-f", "mp4"],
        )
        writer.send(None)
        try:
            for frame in video:
                writer.send(frame)
        finally:
            writer.close()

    return _atomic_write(path, overwrite, encode)


def write_png(image: Any, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write a ``(H, W)`` or ``(H, W, 3)`` uint8 array (or tensor) as a PNG atomically; returns the path. Raises
    ``FileExistsError`` if ``path`` exists and ``overwrite`` is False."""
    from PIL import Image

    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    picture = Image.fromarray(np.ascontiguousarray(image))
    return atomic_write(path, overwrite, lambda tmp: picture.save(tmp, format="PNG"))


def read_video(path: str | os.PathLike) -> np.ndarray:
    """Decode a video file to a uint8 ``(F, H, W, 3)`` RGB array."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no video at {path}")
    reader = imageio_ffmpeg.read_frames(str(path), pix_fmt="rgb24")
    meta = next(reader)
    width, height = meta["size"]
    frames = [np.frombuffer(buf, dtype=np.uint8).reshape(height, width, 3) for buf in reader]
    if not frames:
        return np.zeros((0, height, width, 3), dtype=np.uint8)
    return np.stack(frames)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, (np.ndarray, torch.Tensor)):
        return obj.tolist()
    if isinstance(obj, (os.PathLike, torch.dtype, torch.device)):
        return str(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj, key=str)
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


def write_sidecar(path: str | os.PathLike, data: dict[str, Any], overwrite: bool = False) -> Path:
    """Write ``data`` as indented UTF-8 JSON atomically; returns the path.

    numpy scalars/arrays, tensors, paths, torch dtypes/devices and sets are converted. Raises ``FileExistsError``
    if ``path`` exists and ``overwrite`` is False, and ``TypeError`` (before touching the disk) for other objects.
    """
    text = json.dumps(data, indent=2, default=_json_default, ensure_ascii=False) + "\n"
    return _atomic_write(path, overwrite, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def read_sidecar(path: str | os.PathLike) -> dict[str, Any]:
    """Read a JSON sidecar written by ``write_sidecar``."""
    return json.loads(Path(path).read_text(encoding="utf-8"))
