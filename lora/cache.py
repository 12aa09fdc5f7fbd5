"""The latent cache: each clip's VAE latents and caption embedding, computed once into safetensors shards plus an
``index.json`` that records the settings that produced them. A cache whose settings (model, size, frames, stride,
text length, the clips' files and captions) differ from the run's is rebuilt; the index is written last, so a
cache interrupted while building is never taken as complete.

Latents are the VAE posterior's mode, normalised with the VAE's ``latents_mean`` / ``latents_std`` (Wan's
convention); caption embeddings are stored without their trailing zero rows (Wan zero-pads after the valid tokens)
and padded back to ``max_sequence_length`` when loaded.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from .data import Clip, ClipError, load_clip

__all__ = ["CacheSettings", "LatentCache", "build_cache", "cache_settings", "valid_cache", "foreign_files"]

INDEX = "index.json"
SHARD_SIZE = 16
VERSION = 1


@dataclass(frozen=True)
class CacheSettings:
    """What the cached tensors depend on (compared as a whole with the index's)."""

    model: dict
    frames: int
    height: int
    width: int
    frame_stride: int
    max_sequence_length: int
    clips: tuple

    def as_dict(self) -> dict:
        return {"version": VERSION, "model": self.model, "frames": self.frames, "height": self.height,
                "width": self.width, "frame_stride": self.frame_stride,
                "max_sequence_length": self.max_sequence_length, "clips": [list(c) for c in self.clips]}


def _fingerprint(clip: Clip) -> tuple:
    stat = clip.path.stat()
    return (str(clip.path), stat.st_size, stat.st_mtime_ns, hashlib.sha1(clip.caption.encode()).hexdigest()[:16])


def cache_settings(model: dict, clips: Sequence[Clip], frames: int, height: int, width: int, frame_stride: int,
                   max_sequence_length: int) -> CacheSettings:
    return CacheSettings(model=model, frames=frames, height=height, width=width, frame_stride=frame_stride,
                         max_sequence_length=max_sequence_length, clips=tuple(_fingerprint(c) for c in clips))


def _read_index(folder: Path) -> Optional[dict]:
    try:
        return json.loads((folder / INDEX).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def valid_cache(folder: Path, settings: CacheSettings) -> bool:
    """``folder`` holds a complete cache built with exactly ``settings``."""
    index = _read_index(folder)
    return index is not None and index.get("settings") == json.loads(json.dumps(settings.as_dict()))


def _owned(name: str) -> bool:
    """A file name a cache build writes (the index and its shards)."""
    return name == INDEX or (name.startswith("shard-") and name.endswith(".safetensors"))


def foreign_files(folder: Path) -> list[str]:
    """Why rebuilding ``folder`` is not safe: the names of what is in it besides a cache's files, when it has no
    vidattn index (a folder with only shards is an interrupted build). Empty: missing, empty, a vidattn cache, or
    only cache files; a build then touches nothing else."""
    if not folder.is_dir():
        return [folder.name] if folder.exists() else []
    index = _read_index(folder)
    if isinstance(index, dict) and isinstance(index.get("settings"), dict) and "version" in index["settings"]:
        return []
    return sorted(p.name for p in folder.iterdir() if not (_owned(p.name) and p.is_file()) or p.name == INDEX)


def _clear(folder: Path) -> None:
    """Remove the index (first: a half-cleared cache is never taken as complete), then the shards; nothing else."""
    foreign = foreign_files(folder)
    if foreign:  # checked before the run (checks.py); kept here so no caller can delete what is not the cache's
        raise ValueError(f"{folder} is not a vidattn cache (it holds {', '.join(foreign[:3])}); not clearing it")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / INDEX).unlink(missing_ok=True)
    for shard in folder.glob("shard-*.safetensors"):
        if shard.is_file():
            shard.unlink()


def _trim(text: torch.Tensor) -> torch.Tensor:
    """``(L, D)`` without its trailing all-zero rows (at least one row kept)."""
    nonzero = text.abs().sum(-1).nonzero()
    return text[: max(1, int(nonzero[-1]) + 1 if len(nonzero) else 1)]


@torch.no_grad()
def encode_clip(pipe: Any, video: torch.Tensor, caption: str, max_sequence_length: int,
                device: torch.device) -> dict[str, torch.Tensor]:
    """Normalised latents ``(C, f, h, w)`` and the trimmed caption embedding ``(l, D)`` of one clip."""
    vae = pipe.vae
    posterior = vae.encode(video[None].to(device, vae.dtype)).latent_dist
    latents = posterior.mode().float()
    mean = torch.tensor(vae.config.latents_mean, device=device).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std, device=device).view(1, -1, 1, 1, 1)
    latents = (latents - mean) / std
    embeds, _ = pipe.encode_prompt(prompt=caption, do_classifier_free_guidance=False, num_videos_per_prompt=1,
                                   max_sequence_length=max_sequence_length, device=device)
    return {"latents": latents[0].cpu().contiguous(), "text": _trim(embeds[0].float()).cpu().contiguous()}


def build_cache(pipe: Any, clips: Sequence[Clip], settings: CacheSettings, folder: Path, device: torch.device,
                warn: Callable[[str], None] = print, skipped: Sequence = (), progress: bool = True) -> dict:
    """Encode every usable clip into ``folder`` (its earlier index and shards removed first, nothing else; a
    folder holding other files without a vidattn index is refused) and write the index; returns the index. Unusable
    clips are skipped with a warning and listed under ``skipped`` after the ``skipped`` given (``[path, why]``
    found earlier)."""
    from safetensors.torch import save_file
    from tqdm import tqdm

    _clear(folder)
    samples, skipped, pending = [], [list(s) for s in skipped], {}

    def flush() -> None:
        if pending:
            save_file(dict(pending), str(folder / samples[-1]["shard"]))  # the shard of the last samples
            pending.clear()

    for clip in tqdm(clips, desc="caching latents", unit="clip", disable=not progress):
        try:
            video = load_clip(clip, settings.frames, settings.height, settings.width, settings.frame_stride)
        except ClipError as err:
            skipped.append([str(clip.path), str(err)])
            warn(f"skipped {clip.path.name}: {err}")
            continue
        encoded = encode_clip(pipe, video, clip.caption, settings.max_sequence_length, device)
        n = len(samples)
        shard = f"shard-{n // SHARD_SIZE:05d}.safetensors"
        pending.update({f"{n}.latents": encoded["latents"], f"{n}.text": encoded["text"]})
        samples.append({"shard": shard, "key": str(n), "path": str(clip.path), "caption": clip.caption})
        if len(samples) % SHARD_SIZE == 0:
            flush()
    flush()
    index = {"settings": settings.as_dict(), "samples": samples, "skipped": skipped}
    (folder / INDEX).write_text(json.dumps(index, indent=1), encoding="utf-8")
    return index


class LatentCache:
    """Read access to a built cache: ``len(cache)``, ``cache.batch(indices)``."""

    def __init__(self, folder: Path) -> None:
        index = _read_index(folder)
        if index is None:
            raise FileNotFoundError(f"no cache index in {folder}")
        self.folder = folder
        self.samples: list[dict] = index["samples"]
        self.skipped: list = index["skipped"]
        self.max_sequence_length: int = index["settings"]["max_sequence_length"]

    def __len__(self) -> int:
        return len(self.samples)

    def _load(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        from safetensors import safe_open

        sample = self.samples[i]
        with safe_open(str(self.folder / sample["shard"]), framework="pt") as f:
            return f.get_tensor(f"{sample['key']}.latents"), f.get_tensor(f"{sample['key']}.text")

    def batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """``latents`` ``(B, C, f, h, w)`` and ``text`` ``(B, max_sequence_length, D)`` (zero-padded)."""
        latents, texts = zip(*(self._load(i) for i in indices))
        text = torch.zeros(len(texts), self.max_sequence_length, texts[0].shape[-1])
        for row, t in enumerate(texts):
            text[row, : t.shape[0]] = t[: self.max_sequence_length]
        return {"latents": torch.stack(latents), "text": text}
