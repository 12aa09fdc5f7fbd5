"""Validation videos: the prompts rendered with the LoRA being trained, at the training length and size."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import torch

__all__ = ["render_validation"]


@torch.no_grad()
def render_validation(pipe: Any, prompts: Sequence[str], step: int, folder: Path, frames: int, height: int,
                      width: int, steps: Optional[int], seed: int) -> list[Path]:
    """``<folder>/step-<step>-<i>.mp4`` for each prompt (same seed each time, so videos compare across steps).
    The transformer is put in eval mode for the call and back in train mode after."""
    from vidattn.pipelines.video_io import write_video

    transformer = pipe.transformer
    transformer.eval()
    written = []
    try:
        for i, prompt in enumerate(prompts):
            call = dict(prompt=prompt, num_frames=frames, height=height, width=width, output_type="np",
                        generator=torch.Generator().manual_seed(seed))
            if steps is not None:
                call["num_inference_steps"] = steps
            video = pipe(**call).frames[0]
            written.append(write_video(video, folder / f"step-{step:06d}-{i}.mp4", overwrite=True))
    finally:
        transformer.train()
    return written
