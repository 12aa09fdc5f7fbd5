"""``vidattn mask window``: FreeSwim's inward window for a video size: densities, build times, the block mask drawn."""
from __future__ import annotations

import argparse
from typing import Any

MODELS = ("wan", "ltx")


def register(methods: Any) -> None:
    p = methods.add_parser(
        "window", help="FreeSwim's inward sliding-window mask",
        description="FreeSwim's inward sliding window (the base grid's size, shifted inward at the borders) for a "
                    "video of FRAMES x HEIGHT x WIDTH pixels, converted to the model's latent grid. Prints the token "
                    "density (fraction of video keys per video query) and the block density (fraction of token "
                    "pairs inside listed blocks: what the kernels compute) in raster order and, with --tiles, in "
                    "spatial-tile order; draws the block mask (white full, grey partial, black skipped).")
    p.add_argument("--frames", type=int, required=True, help="video frames, as for generation (e.g. 81)")
    p.add_argument("--height", type=int, required=True, help="target height in pixels (e.g. 1088)")
    p.add_argument("--width", type=int, required=True, help="target width in pixels (e.g. 1920)")
    p.add_argument("--base-height", type=int, required=True, help="base (training) height in pixels (e.g. 480)")
    p.add_argument("--base-width", type=int, required=True, help="base (training) width in pixels (e.g. 832)")
    p.add_argument("--model", choices=MODELS, default="wan",
                   help="latent geometry: wan (4x time, 16 px cells) or ltx (8x time, 32 px cells); default wan")
    p.add_argument("--tiles", default=None, metavar="RxC",
                   help="also build in spatial-tile order with tiles of R x C latent cells (e.g. 8x16)")
    p.add_argument("--temporal", type=int, default=None,
                   help="temporal half-window in latent frames (default: every frame, as upstream)")
    p.add_argument("--inward", action=argparse.BooleanOptionalAction, default=True,
                   help="shift the window inward at the borders (default) or truncate it (ablation)")
    p.add_argument("--block-size", type=int, default=128, help="block size in tokens (default 128)")
    p.add_argument("--png", default=None,
                   help="write the block mask picture here (tiled order with --tiles, else raster; a .png name, "
                        "never replacing a file without --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --png file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """A :class:`~vidattn.validation.UsageError` raised here is printed as one line by ``vidattn.cli.main``."""
    from .. import validation as v
    from .mask import check_picture

    layout, knobs, tiles = _checked(args)
    target = check_picture(args.png, args.overwrite)
    try:
        raster = _build(layout, "raster", args.block_size, knobs)
        tiled = _build(layout, f"tiles{tiles[0]}x{tiles[1]}", args.block_size, knobs) if tiles else None
    except ValueError as err:
        if target is not None:
            target.discard()
        raise v.knob_error(err) from None
    _print_geometry(args, layout, knobs)
    nb = raster[0].num_q_blocks
    for name, (pattern, seconds) in [("raster", raster)] + ([(f"tiles {tiles[0]}x{tiles[1]}", tiled)] if tiled
                                                               else []):
        part = 0 if pattern.partial is None else int(pattern.partial.sum())
        print(f"{name:<16} block density {pattern.density():.4f}; {pattern.indices.shape[-1]} of {nb} x {nb} "
              f"blocks listed ({part} partial); built in {seconds:.3f} s")
    if target is not None:
        _picture(args, target, layout, knobs, tiles, (tiled or raster)[0])
    return 0


def _checked(args: argparse.Namespace) -> tuple[Any, dict, Any]:
    """The latent layout, the window knobs and the tiles of the command line (UsageError naming the option)."""
    from .. import validation as v
    from ..patterns.radial import MODEL_GEOMETRY, GeometryError
    from ..token_order import parse_tiles
    from .mask import geometry_error

    geometry = MODEL_GEOMETRY[args.model]
    try:
        layout = geometry.layout(args.frames, args.height, args.width, text_len=0)
    except GeometryError as err:
        raise geometry_error(err, args.model) from None
    cell = geometry.spatial * geometry.patch_s
    for name, value in (("--base-height", args.base_height), ("--base-width", args.base_width)):
        if value < cell or value % cell:
            raise v.UsageError(name, f"must be a positive multiple of {cell} pixels, got {value} ({args.model})")
    tiles = None
    if args.tiles is not None:
        tiles = parse_tiles(f"tiles{args.tiles}") if args.tiles.isascii() else None
        if tiles is None:
            raise v.UsageError("--tiles", f"expected ROWSxCOLS of positive integers such as 8x16, got {args.tiles!r}")
    if args.temporal is not None and args.temporal < 0:
        raise v.UsageError("--temporal", f"must be >= 0 latent frames, got {args.temporal}")
    if args.block_size < 1:
        raise v.UsageError("--block-size", f"must be a positive integer, got {args.block_size}")
    knobs = dict(base_rows=args.base_height // cell, base_cols=args.base_width // cell, inward=args.inward,
                 temporal=args.temporal)
    return layout, knobs, tiles


def _build(layout: Any, order: str, block_size: int, knobs: dict) -> tuple[Any, float]:
    """The window pattern in ``order`` and its build time in seconds."""
    import time
    from dataclasses import replace

    from ..patterns.window import window_pattern

    began = time.perf_counter()
    pattern = window_pattern(replace(layout, order=order), block_size=block_size, **knobs)
    return pattern, time.perf_counter() - began


def _print_geometry(args: argparse.Namespace, layout: Any, knobs: dict) -> None:
    """The model, latent grid, window sizes and token density lines."""
    from ..patterns.window import window_bounds, window_token_density

    f, h, w = layout.frames, layout.height, layout.width
    base_rows, base_cols = knobs["base_rows"], knobs["base_cols"]
    lens = []
    for n, half in ((h, base_rows // 2), (w, base_cols // 2)) + (((f, args.temporal),) if args.temporal is not None
                                                                 else ()):
        lo, hi = window_bounds(n, half, args.inward)
        lens.append(int((hi - lo + 1).max()))
    frames_seen = f"{lens[2]} of {f} frames" if args.temporal is not None else f"all {f} frames"
    print(f"model            {args.model}: {args.frames} frames x {args.height} x {args.width} px "
          f"(base {args.base_height} x {args.base_width} px)")
    print(f"latent grid      {f} frames x {h} x {w} = {layout.tokens_per_frame} tokens/frame, "
          f"{layout.video_tokens} tokens")
    print(f"window           {lens[0]} x {lens[1]} cells over {frames_seen} (half sizes {base_rows // 2}, "
          f"{base_cols // 2}{'' if args.temporal is None else f', {args.temporal} frames'}; "
          f"{'inward' if args.inward else 'truncated'})")
    print(f"token density    {window_token_density(layout, **knobs):.4f} (fraction of video keys per video query)")


def _picture(args: argparse.Namespace, target: Any, layout: Any, knobs: dict, tiles: Any, pattern: Any) -> None:
    """Draw the pattern shown (tiled order when given) to the checked ``--png`` target."""
    from dataclasses import replace

    from ..pictures import format_knobs, pattern_figure
    from .mask import save_picture

    order = f"tiles {tiles[0]}x{tiles[1]}" if tiles else "raster"
    title = (f"FreeSwim window, {args.model} {args.frames} frames x {args.height} x {args.width} px ({order} "
             f"order): block density {pattern.density():.4f}\n{format_knobs(dict(knobs, block_size=args.block_size))}")
    ordered = replace(layout, order=f"tiles{tiles[0]}x{tiles[1]}") if tiles else layout
    ph, pw = save_picture(target, pattern_figure(ordered, pattern, title), args.overwrite)
    print(f"picture          {args.png} ({pw} x {ph} px; white full, grey partial, black skipped)")
