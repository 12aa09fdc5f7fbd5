"""mp4 and JSON sidecar I/O: round trips, input formats, atomic no-clobber writes."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vidattn.pipelines.video_io import read_sidecar, read_video, to_uint8_frames, write_sidecar, write_video


def _gradient_video(frames: int = 9, height: int = 64, width: int = 64) -> np.ndarray:
    """Smooth float video in [0, 1], (F, H, W, 3): compresses well, so decoded pixels stay close."""
    t = np.linspace(0.1, 0.9, frames)[:, None, None]
    y = np.linspace(0.0, 1.0, height)[None, :, None]
    x = np.linspace(0.0, 1.0, width)[None, None, :]
    shape = (frames, height, width)
    return np.stack([np.broadcast_to(t, shape), np.broadcast_to(y, shape), np.broadcast_to(0.25 + 0.5 * x, shape)],
                    axis=-1).astype(np.float32)


def _assert_close(decoded: np.ndarray, expected: np.ndarray) -> None:
    assert decoded.shape == expected.shape and decoded.dtype == np.uint8
    diff = np.abs(decoded.astype(np.int16) - expected.astype(np.int16))
    assert diff.mean() < 3.0 and diff.max() < 24


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp" in p.name)


def test_mp4_round_trip_float(tmp_path):
    video = _gradient_video()
    path = write_video(video, tmp_path / "out.mp4", fps=8)
    assert path == tmp_path / "out.mp4" and path.stat().st_size > 0
    _assert_close(read_video(path), to_uint8_frames(video))
    assert _leftovers(tmp_path) == []


def test_mp4_round_trip_uint8_pipeline_batch_and_torch(tmp_path):
    expected = to_uint8_frames(_gradient_video(5, 32, 48))
    _assert_close(read_video(write_video(expected[None], tmp_path / "batch.mp4")), expected)  # (1, F, H, W, 3)
    tensor = torch.from_numpy(_gradient_video(5, 32, 48)).permute(0, 3, 1, 2)  # (F, C, H, W) float
    _assert_close(read_video(write_video(tensor, tmp_path / "torch.mp4")), expected)


def test_pil_list_and_grey(tmp_path):
    expected = to_uint8_frames(_gradient_video(4, 32, 32))
    images = [Image.fromarray(frame) for frame in expected]
    _assert_close(read_video(write_video(images, tmp_path / "pil.mp4")), expected)
    grey = to_uint8_frames(np.full((3, 16, 16), 0.5, dtype=np.float32))
    assert grey.shape == (3, 16, 16, 3) and (grey == 128).all()


def test_odd_sizes_are_padded_not_resized(tmp_path):
    video = to_uint8_frames(_gradient_video(3, 33, 47))
    decoded = read_video(write_video(video, tmp_path / "odd.mp4"))
    assert decoded.shape == (3, 34, 48, 3)
    _assert_close(decoded[:, :33, :47], video)


def test_existing_video_is_not_clobbered(tmp_path):
    path = tmp_path / "keep.mp4"
    path.write_bytes(b"original")
    with pytest.raises(FileExistsError, match="keep.mp4"):
        write_video(_gradient_video(2, 16, 16), path)
    assert path.read_bytes() == b"original"
    write_video(_gradient_video(2, 16, 16), path, overwrite=True)
    assert read_video(path).shape == (2, 16, 16, 3)
    assert _leftovers(tmp_path) == []


def test_bad_input_leaves_nothing(tmp_path):
    with pytest.raises(ValueError):
        write_video(np.zeros((2, 8, 8, 5), dtype=np.uint8), tmp_path / "bad.mp4")
    with pytest.raises(ValueError):
        write_video(np.zeros((2, 2, 8, 8, 3), dtype=np.uint8), tmp_path / "bad.mp4")
    with pytest.raises(ValueError):
        write_video([], tmp_path / "bad.mp4")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(FileNotFoundError):
        read_video(tmp_path / "missing.mp4")


def test_sidecar_round_trip_and_no_clobber(tmp_path):
    data = {
        "prompt": "a fox — in snow",
        "steps": np.int64(2),
        "density": np.float32(0.25),
        "grid": np.array([5, 4, 4]),
        "dtype": torch.bfloat16,
        "video": tmp_path / "v.mp4",
        "nested": {"timings": [0.5, 1.25], "ok": True, "none": None},
    }
    path = write_sidecar(tmp_path / "v.json", data)
    loaded = read_sidecar(path)
    assert loaded["prompt"] == "a fox — in snow" and loaded["steps"] == 2 and loaded["density"] == 0.25
    assert loaded["grid"] == [5, 4, 4] and loaded["dtype"] == "torch.bfloat16"
    assert loaded["video"] == str(tmp_path / "v.mp4") and loaded["nested"] == data["nested"]

    with pytest.raises(FileExistsError, match="v.json"):
        write_sidecar(path, {"other": 1})
    assert read_sidecar(path) == loaded
    write_sidecar(path, {"other": 1}, overwrite=True)
    assert read_sidecar(path) == {"other": 1}
    with pytest.raises(TypeError):
        write_sidecar(tmp_path / "bad.json", {"x": object()})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.json"]


def test_written_files_get_normal_permissions(tmp_path):
    import os

    from vidattn.pipelines.video_io import write_sidecar

    umask = os.umask(0o022)
    try:
        path = write_sidecar(tmp_path / "meta.json", {"a": 1})
    finally:
        os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o644
