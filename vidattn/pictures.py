"""Pictures people can read: block masks with frame axes, density per frame distance and per layer, video
differences. Used by ``vidattn mask --png`` and the demo.

The numbers (:func:`token_frames`, :func:`distance_density`, :func:`pool_blocks`) are pure numpy; the drawings
return matplotlib ``Figure`` objects (imported inside the functions: ``import vidattn`` never loads matplotlib) and
:func:`render` turns one into an RGB ``uint8`` array for a PNG or a web page.

A mask picture shows one group's ``(nq, nk)`` block values (1 computed, 0.5 computed with a token predicate, 0
skipped): query and key axes in frames with thin frame-boundary lines where every frame is a contiguous run of
tokens (raster and spatial-tile orders; a Gilbert-curve order is labelled in blocks), text rows and columns in blue,
the title carrying the density and the knobs, and beside it the computed fraction of video token pairs per frame
distance. Masks larger than ``max_cells`` blocks are averaged over square groups of blocks, so a kept block never
disappears (its group is at least ``1 / factor**2`` bright) and the picture keeps one size.
"""
from __future__ import annotations

import textwrap
from typing import Any, Mapping, Optional, Sequence

import numpy as np

__all__ = ["distance_density", "difference_figure", "format_knobs", "frame_starts", "layer_density_figure",
           "mask_figure", "pattern_figure", "pattern_values", "pool_blocks", "pool_factor", "render",
           "selection_figure", "token_frames"]

TEXT = -1  # frame label of a text token
TEXT_ON = np.array([0.35, 0.62, 1.0])  # colour of a computed text block
TEXT_OFF = np.array([0.05, 0.10, 0.32])  # colour of a skipped text block
FRAME_LINE = "#e8743b"
MAX_CELLS = 256  # largest side of the drawn mask, in cells
MAX_TICKS = 12
TITLE_WIDTH = 120  # characters per title line
LEGEND = "white computed, grey partial (token predicate), black skipped, blue text"


def token_frames(layout: Any) -> np.ndarray:
    """int64 ``(seq_len,)``: the latent frame of each token of ``layout``'s sequence in its token order; text
    tokens are ``-1``."""
    from .token_order import order_permutation

    raster = np.arange(layout.video_tokens) // layout.tokens_per_frame
    found = order_permutation(layout.order, layout.frames, layout.height, layout.width)
    video = raster if found is None else raster[found[0].numpy()]
    text = np.full(layout.text_tokens, TEXT, dtype=np.int64)
    parts = (text, video) if layout.video_start else (video, text)
    return np.concatenate(parts).astype(np.int64)


def _frame_counts(frames: np.ndarray, block: int, num_frames: int) -> np.ndarray:
    """float64 ``(blocks, num_frames)``: how many tokens of each frame every block of ``block`` tokens holds."""
    blocks = -(-len(frames) // block)
    counts = np.zeros((blocks, num_frames))
    video = frames >= 0
    np.add.at(counts, (np.arange(len(frames))[video] // block, frames[video]), 1.0)
    return counts


def distance_density(kept: np.ndarray, q_frames: np.ndarray, k_frames: np.ndarray, block: int) -> np.ndarray:
    """float64 ``(F,)``: share of the video token pairs at each frame distance ``|t_q - t_k|`` that fall in kept
    blocks of the ``(nq, nk)`` boolean ``kept`` (blocks of ``block`` tokens; ``q_frames``/``k_frames`` from
    :func:`token_frames`, text ``-1`` ignored). Entry ``d`` is NaN when no pair is ``d`` frames apart."""
    num_frames = int(max(q_frames.max(initial=-1), k_frames.max(initial=-1))) + 1
    cq = _frame_counts(q_frames, block, num_frames)
    ck = _frame_counts(k_frames, block, num_frames)
    pairs = cq.T @ np.asarray(kept, dtype=np.float64) @ ck  # (F, F) kept token pairs per frame pair
    total = np.outer(cq.sum(0), ck.sum(0))
    dist = np.abs(np.arange(num_frames)[:, None] - np.arange(num_frames)[None, :])
    kept_d = np.bincount(dist.ravel(), weights=pairs.ravel(), minlength=num_frames)
    total_d = np.bincount(dist.ravel(), weights=total.ravel(), minlength=num_frames)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total_d > 0, kept_d / np.where(total_d > 0, total_d, 1), np.nan)


def pool_factor(shape: Sequence[int], max_cells: int = MAX_CELLS) -> int:
    """The smallest block-group side that fits a ``shape`` mask in ``max_cells`` cells per side."""
    return max(1, -(-max(shape) // max(1, int(max_cells))))


def pool_blocks(values: np.ndarray, factor: int) -> np.ndarray:
    """``values`` ``(nq, nk)`` averaged over ``factor x factor`` groups of blocks. Ragged edge groups average what
    they hold, so a non-zero block always leaves a non-zero cell and no side shrinks below one cell."""
    values = np.asarray(values, dtype=np.float64)
    if factor == 1:
        return values
    rows, cols = (-(-n // factor) for n in values.shape)
    padded = np.zeros((rows * factor, cols * factor))
    weight = np.zeros_like(padded)
    padded[:values.shape[0], :values.shape[1]] = values
    weight[:values.shape[0], :values.shape[1]] = 1.0
    sums = padded.reshape(rows, factor, cols, factor).sum((1, 3))
    return sums / weight.reshape(rows, factor, cols, factor).sum((1, 3))


def frame_starts(frames: np.ndarray) -> Optional[np.ndarray]:
    """Token index where each video frame starts when every frame is one contiguous, increasing run (raster and
    tile orders), else ``None`` (Gilbert order)."""
    video = np.flatnonzero(frames >= 0)
    if video.size == 0:
        return None
    labels = frames[video]
    change = np.flatnonzero(np.diff(labels)) + 1
    runs = labels[np.concatenate(([0], change))]
    contiguous = np.array_equal(runs, np.arange(len(runs))) and np.all(np.diff(video) == 1)
    return video[np.concatenate(([0], change))] if contiguous else None


def pattern_values(pattern: Any, group: tuple[int, int] = (0, 0)) -> np.ndarray:
    """float ``(nq, nk)`` of a ``BlockPattern`` group: 1 computed, 0.5 partial (token predicate), 0 skipped."""
    return pattern.to_image(group).numpy().astype(np.float64) / 255.0


def format_knobs(knobs: Mapping[str, Any]) -> str:
    """``"decay 0.5, block_size 16"``: the knobs that are set (``None`` and ``method`` left out)."""
    return ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in knobs.items()
                     if v is not None and k != "method")


def _colours(values: np.ndarray, q_text: np.ndarray, k_text: np.ndarray) -> np.ndarray:
    """RGB ``(nq, nk, 3)``: grey levels for video blocks, blue shades for blocks in a text row or column."""
    grey = np.repeat(values[..., None], 3, axis=-1)
    text = (q_text[:, None] | k_text[None, :])[..., None]
    blue = values[..., None] * TEXT_ON + (1 - values[..., None]) * TEXT_OFF
    return np.where(text, blue, grey)


def _text_blocks(frames: np.ndarray, block: int, factor: int) -> np.ndarray:
    """bool per drawn cell: whether its blocks hold a text token."""
    blocks = -(-len(frames) // block)
    text = np.zeros(blocks)
    np.add.at(text, np.flatnonzero(frames < 0) // block, 1.0)
    return pool_blocks(text[:, None], factor)[:, 0] > 0


def _frame_axis(axis: Any, frames: np.ndarray, name: str, lines: Any) -> None:
    """Ticks at frame centres labelled by frame (thinned to ``MAX_TICKS``), a thin line at each frame boundary and
    a blue one where the text begins or ends."""
    starts = frame_starts(frames)
    if starts is None:
        axis.set_label_text(f"{name} tokens (curve order: frames interleaved)")
        return
    ends = np.append(starts[1:], np.flatnonzero(frames >= 0)[-1] + 1)
    step = max(1, -(-len(starts) // MAX_TICKS))
    axis.set_ticks((starts + ends)[::step] / 2, [str(i) for i in range(0, len(starts), step)])
    axis.set_label_text(f"{name} frame")
    for start in starts[1:]:
        lines(start, color=FRAME_LINE, linewidth=0.6, alpha=0.8)
    text = np.flatnonzero(frames < 0)
    if text.size:
        lines(text[0] if text[0] > 0 else text[-1] + 1, color=TEXT_ON, linewidth=0.9)


def mask_figure(values: np.ndarray, q_frames: np.ndarray, k_frames: np.ndarray, block: int, title: str, *,
                kept: Optional[np.ndarray] = None, legend: str = LEGEND, max_cells: int = MAX_CELLS) -> Any:
    """The mask picture (module docstring): ``values`` ``(nq, nk)`` block values for query tokens ``q_frames`` and
    key tokens ``k_frames`` in blocks of ``block`` tokens, and beside it the density per frame distance of the
    computed blocks ``kept`` (default ``values > 0``)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    values = np.asarray(values, dtype=np.float64)
    factor = pool_factor(values.shape, max_cells)
    pooled = pool_blocks(values, factor)
    q_text, k_text = _text_blocks(q_frames, block, factor), _text_blocks(k_frames, block, factor)
    fig = Figure(figsize=(10.5, 4.8), dpi=100, layout="constrained")
    grid = fig.add_gridspec(1, 2, width_ratios=(1.2, 1))
    ax = fig.add_subplot(grid[0])
    ax.imshow(_colours(pooled, q_text, k_text), interpolation="nearest", aspect="auto",
              extent=(0, values.shape[1] * block, values.shape[0] * block, 0))
    ax.set_xlim(0, len(k_frames))
    ax.set_ylim(len(q_frames), 0)
    _frame_axis(ax.xaxis, k_frames, "key", ax.axvline)
    _frame_axis(ax.yaxis, q_frames, "query", ax.axhline)
    pooled_note = f"; {factor}x{factor} blocks per cell" if factor > 1 else ""
    ax.set_title(f"{values.shape[0]} x {values.shape[1]} blocks of {block} tokens{pooled_note}\n{legend}", fontsize=8)
    curve = fig.add_subplot(grid[1])
    density = distance_density(values > 0 if kept is None else kept, q_frames, k_frames, block)
    curve.plot(np.arange(len(density)), density, marker="o", markersize=3, color="#3366cc")
    curve.set_xlabel("frame distance |t_q - t_k|")
    curve.set_ylabel("computed share of video token pairs")
    curve.set_ylim(0, 1.05)
    curve.xaxis.set_major_locator(MaxNLocator(integer=True))
    curve.grid(alpha=0.3)
    fig.suptitle("\n".join(textwrap.fill(line, TITLE_WIDTH) for line in title.splitlines()), fontsize=9)
    return fig


def pattern_figure(layout: Any, pattern: Any, title: str, group: tuple[int, int] = (0, 0)) -> Any:
    """:func:`mask_figure` of one group of a ``BlockPattern`` built on ``layout`` (its rows and columns are the
    layout's whole sequence in the layout's token order)."""
    frames = token_frames(layout)
    return mask_figure(pattern_values(pattern, group), frames, frames, pattern.block_q, title)


def selection_figure(layout: Any, stats: Any, head: int, block_size: int, title: str) -> Any:
    """:func:`mask_figure` of Rectified SpaAttn's selection for one head (sample 0): white critical, grey
    compensated through ``O_nc``, black rejected by GAPR. Rows are the video query blocks, columns the raw key
    blocks (video, then text), both in the layout's token order; the distance curve counts critical blocks."""
    crit = stats.critical[0, head].cpu().numpy()
    n = crit.shape[0]
    values = np.where(crit, 1.0, 0.5)
    if stats.gapr_ok is not None:
        rejected = ~stats.gapr_ok[0, head].cpu().numpy() & ~crit[:, :n]
        values[:, :n][rejected] = 0.0
    frames = token_frames(layout)
    video = frames[frames >= 0]
    keys = np.concatenate([video, np.full(layout.text_tokens, TEXT)])
    legend = "white critical, grey compensated (O_nc), black rejected by GAPR, blue text"
    return mask_figure(values, video, keys, block_size, title, kept=crit, legend=legend)


def layer_density_figure(densities: Sequence[Optional[float]], title: str = "attention density per layer") -> Any:
    """Bar plot of the computed fraction per transformer layer (``None``: the layer ran no attention call)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 2.8), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    heights = [np.nan if d is None else d for d in densities]
    ax.bar(np.arange(len(heights)), heights, color="#3366cc")
    ax.set_xlabel("layer")
    ax.set_ylabel("computed fraction")
    ax.set_ylim(0, 1.05)
    ax.set_xticks(np.arange(len(heights)))
    ax.set_title(title, fontsize=9)
    return fig


def difference_figure(a: np.ndarray, b: np.ndarray, title: str) -> Any:
    """Heat-map of ``|a - b|`` (two ``(H, W, 3)`` uint8 frames), averaged over the colour channels, with a colour
    bar in 8-bit levels."""
    from matplotlib.figure import Figure

    diff = np.abs(a.astype(np.float64) - b.astype(np.float64)).mean(-1)
    fig = Figure(figsize=(5.0, 4.0), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(diff, cmap="inferno", vmin=0, vmax=max(1.0, float(diff.max())))
    fig.colorbar(image, ax=ax, label="|difference| (0-255)")
    ax.set_axis_off()
    ax.set_title(title, fontsize=9)
    return fig


def render(fig: Any) -> np.ndarray:
    """RGB ``uint8 (H, W, 3)`` pixels of a matplotlib figure (Agg canvas; no pyplot, no global state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()
