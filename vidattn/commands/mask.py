"""``vidattn mask radial|rectified``: build a method's block mask for a video size, print its densities, draw it."""
from __future__ import annotations

import argparse
from typing import Any

MODELS = ("wan", "hunyuan", "cogvideox", "ltx", "mochi")
KNOBS = ("decay", "block_size", "sink_frames", "d1_full", "decimation_threshold")


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("mask", help="build a sparse-attention block mask, print its density, draw it",
                                   description="Build a sparse-attention block mask for a video size.")
    methods = parser.add_subparsers(dest="method", metavar="METHOD", required=True)
    radial = methods.add_parser(
        "radial", help="Radial Attention's static mask",
        description="Radial Attention's static block mask for a video of FRAMES x HEIGHT x WIDTH pixels, converted "
                    "to the model's latent token grid. Densities are fractions of token pairs computed.")
    radial.add_argument("--frames", type=int, required=True, help="video frames, as for generation (e.g. 81)")
    radial.add_argument("--height", type=int, required=True, help="video height in pixels (e.g. 480)")
    radial.add_argument("--width", type=int, required=True, help="video width in pixels (e.g. 832)")
    radial.add_argument("--model", choices=MODELS, required=True, help="model family (latent geometry, text, sink)")
    radial.add_argument("--decay", type=float, default=1.0, help="band scale for frame distances >= 2, > 0 "
                                                                 "(default 1.0)")
    radial.add_argument("--block-size", type=int, default=128, help="block size in tokens (default 128)")
    radial.add_argument("--sink-frames", type=int, default=None,
                        help="dense key frames (default: wan 1, hunyuan 0, others 1)")
    radial.add_argument("--d1-full", action=argparse.BooleanOptionalAction, default=True,
                        help="keep adjacent frames fully (default) or at half width (pre-Nov-2025 upstream)")
    radial.add_argument("--decimation-threshold", type=float, default=128,
                        help="un-decayed band width in tokens below which frame distances are decimated "
                             "(default 128)")
    radial.add_argument("--text-len", type=int, default=None,
                        help="text tokens in self-attention (joint models; default: hunyuan 256, cogvideox 226, "
                             "mochi 256)")
    radial.add_argument("--png", default=None, help="write the block mask picture here (white = computed; a .png "
                                                    "name, never replacing a file without --overwrite)")
    radial.add_argument("--overwrite", action="store_true", help="replace an existing --png file")
    radial.set_defaults(func=run)
    from . import mask_rectified, mask_window

    mask_rectified.register(methods)
    mask_window.register(methods)


def check_picture(png: Any, overwrite: bool) -> Any:
    """``check_png`` plus matplotlib, which draws the pictures (an optional dependency): a UsageError naming
    ``--png`` before any work when it is missing."""
    import importlib.util

    from .. import validation as v

    if png is not None and importlib.util.find_spec("matplotlib") is None:
        raise v.UsageError("--png", "drawing needs matplotlib; install it with pip install 'vidattn[demo]' or "
                                    "pip install matplotlib")
    return v.check_png(png, overwrite=overwrite)


def geometry_error(err: Any, model: str) -> Any:
    """A ``GeometryError`` as the UsageError of its option."""
    from ..validation import UsageError

    return UsageError(f"--{err.param.replace('_', '-')}", f"{err.reason} ({model})")


def save_picture(target: Any, figure: Any, overwrite: bool) -> tuple[int, int]:
    """Render the matplotlib ``figure`` (:mod:`vidattn.pictures`) and write it atomically to the checked ``--png``
    target; returns ``(height, width)`` in pixels. A file that appeared meanwhile is a UsageError, not a
    traceback."""
    from ..pictures import render
    from ..pipelines.video_io import write_png
    from ..validation import UsageError

    pixels = render(figure)
    try:
        write_png(pixels, target.path, overwrite=overwrite)
    except (FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError) as err:
        target.discard()
        raise UsageError("--png", f"{err}") from None
    return pixels.shape[:2]


def run(args: argparse.Namespace) -> int:
    """A :class:`~vidattn.validation.UsageError` raised here is printed as one line by ``vidattn.cli.main``."""
    import time

    from .. import validation as v
    from ..patterns.radial import MODEL_GEOMETRY, GeometryError, radial_pattern, radial_stats

    geometry = MODEL_GEOMETRY[args.model]
    try:
        layout = geometry.layout(args.frames, args.height, args.width, text_len=args.text_len)
    except GeometryError as err:
        raise geometry_error(err, args.model) from None
    v.check_number("--decay", args.decay, minimum=0, low_open=True)
    v.check_number("--block-size", args.block_size, minimum=1, integer=True)
    if args.sink_frames is not None and not 0 <= args.sink_frames <= layout.frames:
        raise v.UsageError("--sink-frames", f"must be in [0, {layout.frames}] (the latent frames of this video), "
                                            f"got {args.sink_frames}")
    v.check_number("--decimation-threshold", args.decimation_threshold, minimum=0)
    sink = geometry.sink_frames if args.sink_frames is None else args.sink_frames
    target = check_picture(args.png, args.overwrite)
    began = time.perf_counter()
    try:
        pattern = radial_pattern(layout, decay=args.decay, block_size=args.block_size, sink_frames=sink,
                                 d1_full=args.d1_full, decimation_threshold=args.decimation_threshold)
    except ValueError as err:
        if target is not None:
            target.discard()
        raise v.knob_error(err) from None
    elapsed = time.perf_counter() - began
    stats = radial_stats(layout, pattern)
    text = layout.text
    print(f"model            {args.model}: {args.frames} frames x {args.height} x {args.width} px")
    print(f"latent grid      {layout.frames} frames x {layout.height} x {layout.width} "
          f"= {layout.tokens_per_frame} tokens/frame")
    print(f"tokens           video {layout.video_tokens}, text {layout.text_tokens}"
          f"{f' ({text.position})' if text is not None else ''}, total {layout.seq_len}")
    print(f"knobs            decay {args.decay:g}, block {args.block_size}, sink frames {sink}, "
          f"d1_full {args.d1_full}, decimation threshold {args.decimation_threshold:g}")
    print(f"blocks           {stats.num_blocks} x {stats.num_blocks}, kept {stats.kept_blocks}")
    print(f"density          video-video {stats.video_density:.4f}, whole sequence {stats.total_density:.4f} "
          f"(fraction of token pairs computed)")
    print(f"keys per query   {stats.keys_per_query:.1f} (video keys per video query "
          f"{stats.video_keys_per_query:.1f})")
    print(f"build time       {elapsed:.3f} s")
    if target is not None:
        from ..pictures import format_knobs, pattern_figure

        knobs = dict(decay=args.decay, block_size=args.block_size, sink_frames=sink, d1_full=args.d1_full,
                     decimation_threshold=args.decimation_threshold)
        title = (f"Radial Attention, {args.model} {args.frames} frames x {args.height} x {args.width} px: density "
                 f"{stats.total_density:.4f} (video-video {stats.video_density:.4f})\n{format_knobs(knobs)}")
        h, w = save_picture(target, pattern_figure(layout, pattern, title), args.overwrite)
        print(f"picture          {args.png} ({w} x {h} px)")
    return 0
