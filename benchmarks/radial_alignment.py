"""Radial mask at the families' published sizes: upstream's rule (``literal=True``) against vidattn's (spec §2.2a).

For each geometry and block size prints one markdown row: the worst own-frame and own+adjacent-frame coverage (the
smallest fraction of a frame's keys that a query block holding tokens of that frame or its neighbour attends; the
design attends them whole, 1.000) and the video-video / whole-sequence densities before -> after.

    python benchmarks/radial_alignment.py
"""
from __future__ import annotations

import argparse

import torch

from vidattn.layout import TokenLayout
from vidattn.patterns.radial import MODEL_GEOMETRY, _tokens_per_block, radial_pattern, radial_stats

GEOMETRIES = [("wan", 81, 480, 832), ("wan", 69, 768, 1280), ("hunyuan", 117, 768, 1280),
              ("hunyuan", 129, 720, 1280), ("cogvideox", 49, 480, 720), ("cogvideox", 81, 768, 1360),
              ("ltx", 161, 480, 704), ("ltx", 121, 512, 704), ("mochi", 163, 480, 848)]


def worst_coverage(layout: TokenLayout, kept: torch.Tensor, block: int, reach: int) -> float:
    """Smallest fraction of frame j's keys in the kept blocks of a query block holding frame i, |i - j| <= reach."""
    kept, s, worst = kept.to(torch.float64), layout.tokens_per_frame, 1.0
    for i in range(layout.frames):
        a = layout.video_start + i * s
        rows = kept[a // block:(a + s - 1) // block + 1]
        for j in range(max(0, i - reach), min(layout.frames, i + reach + 1)):
            b = layout.video_start + j * s
            keys = _tokens_per_block(kept.shape[0], block, b, b + s).to(torch.float64)
            worst = min(worst, float((rows @ keys).min()) / s)
    return worst


def main() -> None:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()
    print("| model | frames x H x W | latent grid + text | block | upstream: own / +-1 frame covered | vidattn | "
          "video density (upstream -> vidattn) | whole-sequence density |")
    print("|---|---|---|---|---|---|---|---|")
    for model, frames, height, width in GEOMETRIES:
        geometry = MODEL_GEOMETRY[model]
        layout = geometry.layout(frames, height, width)
        for block in (64, 128):
            row = []
            for literal in (True, False):
                pattern = radial_pattern(layout, block_size=block, sink_frames=geometry.sink_frames, literal=literal)
                kept = pattern.block_bitmap()[0, 0]
                stats = radial_stats(layout, pattern)
                row.append((worst_coverage(layout, kept, block, 0), worst_coverage(layout, kept, block, 1),
                            stats.video_density, stats.total_density))
            (o0, a0, v0, t0), (o1, a1, v1, t1) = row
            print(f"| {model} | {frames}x{height}x{width} | {layout.frames}x{layout.height}x{layout.width}"
                  f"+{layout.text_tokens} | {block} | {o0:.3f} / {a0:.3f} | {o1:.3f} / {a1:.3f} | "
                  f"{v0:.4f} -> {v1:.4f} | {t0:.4f} -> {t1:.4f} |")


if __name__ == "__main__":
    main()
