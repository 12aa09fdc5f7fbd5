"""Dense and a sparse method side by side from the same seed: speedup, PSNR/SSIM, a difference heat-map."""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import numpy as np

from vidattn.video_metrics import psnr, ssim

from .engine import Checked, Outcome, Pipelines, Progress, check_request, generate

__all__ = ["Comparison", "compare"]


@dataclass
class Comparison:
    """Both runs, the speedup ``dense / method`` in wall time, PSNR/SSIM between the videos and the heat-map of
    the ``frame``-th frame's absolute difference."""

    dense: Outcome
    method: Outcome
    speedup: float
    psnr: float
    ssim: float
    frame: int
    difference: np.ndarray


def compare(checked: Checked, pipelines: Pipelines, out_dir: Path, progress: Optional[Progress] = None
            ) -> Comparison:
    """Generate with dense attention, then with ``checked``'s method, both from its seed and settings."""
    from vidattn.pictures import difference_figure, render

    request = checked.request
    # on FreeSwim's own pipeline (one model loaded, not two): its direct baseline, dense at the target size
    dense_checked = replace(check_request(replace(request, method="dense", preset=None, knobs={})),
                            pipeline_cls=checked.pipeline_cls)
    dense = generate(dense_checked, pipelines, out_dir, progress, label="dense")
    method = generate(checked, pipelines, out_dir, progress, label=request.method)
    frame = len(dense.frames) // 2
    title = f"|dense - {request.method}|, frame {frame} of {len(dense.frames)}"
    picture = render(difference_figure(dense.frames[frame], method.frames[frame], title))
    return Comparison(dense=dense, method=method, speedup=dense.seconds / max(method.seconds, 1e-9),
                      psnr=psnr(dense.frames, method.frames), ssim=ssim(dense.frames, method.frames), frame=frame,
                      difference=picture)
