"""``vidattn mask rectified``: the critical blocks Rectified SpaAttn selects in one call of a tiny model, drawn."""
from __future__ import annotations

import argparse
from typing import Any

MODELS = ("wan", "hunyuan", "cogvideox", "ltx", "mochi")


def register(methods: Any) -> None:
    p = methods.add_parser(
        "rectified", help="Rectified SpaAttn's per-head critical blocks in one tiny-model call",
        description="Run one forward of a tiny random transformer (offline) with RectifiedProcessor and report the "
                    "blocks selected for the first sparse layer: per-head density, rectification mass R, GAPR "
                    "rejections; draw one head's selection (white = critical, grey = compensated, black = "
                    "rejected by GAPR, so its mass goes into R).")
    p.add_argument("--model", choices=MODELS, default="wan", help="tiny model family (default wan)")
    p.add_argument("--latent-frames", type=int, default=5, help="latent frames before patching (default 5)")
    p.add_argument("--latent-height", type=int, default=None, help="latent height before patching")
    p.add_argument("--latent-width", type=int, default=None, help="latent width before patching")
    p.add_argument("--drop-rate", type=float, default=0.75, help="top-k floor drop rate, in [0, 1) (default 0.75)")
    p.add_argument("--top-p", type=float, default=0.3, help="top-p mass, in (0, 1] (default 0.3)")
    p.add_argument("--block-size", type=int, default=16, help="block size in tokens (default 16: tiny grids)")
    p.add_argument("--head", type=int, default=0, help="head to draw (default 0)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the tiny model and inputs")
    p.add_argument("--png", default=None, help="write the picture of the head's selection here (a .png name, never "
                                               "replacing a file without --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --png file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """A :class:`~vidattn.validation.UsageError` raised here is printed as one line by ``vidattn.cli.main``."""
    from .. import validation as v
    from ..processors.rectified import RectifiedProcessor
    from .mask import check_picture

    try:
        proc = RectifiedProcessor(drop_rate=args.drop_rate, top_p=args.top_p, block_size=args.block_size)
    except ValueError as err:
        raise v.knob_error(err) from None
    v.check_number("--latent-frames", args.latent_frames, minimum=1, integer=True)
    patch = 1 if args.model == "ltx" else 2  # the tiny transformers' spatial patch
    for option, value in (("--latent-height", args.latent_height), ("--latent-width", args.latent_width)):
        if value is not None and (value < patch or value % patch):
            raise v.UsageError(option, f"must be a positive multiple of the {args.model} patch size {patch} "
                                       f"(latent cells before patching), got {value}")
    v.check_seed("--seed", args.seed)
    import torch

    import vidattn
    from vidattn.pipelines.tiny import tiny_transformer, tiny_transformer_inputs

    model = tiny_transformer(args.model, seed=args.seed)  # milliseconds: random tiny weights, no download
    heads = model.config.num_attention_heads
    if not 0 <= args.head < heads:
        raise v.UsageError("--head", f"must lie in [0, {heads}) (the tiny {args.model} model's heads), got "
                                     f"{args.head}")
    target = check_picture(args.png, args.overwrite)
    try:
        inputs = tiny_transformer_inputs(args.model, frames=args.latent_frames, height=args.latent_height,
                                         width=args.latent_width, seed=args.seed)
    except (ValueError, RuntimeError) as err:
        if target is not None:
            target.discard()
        raise v.UsageError("--latent-frames/--latent-height/--latent-width", str(err)) from None
    vidattn.apply(model, proc)
    proc.record_selection(True)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        vidattn.remove(model)
    layout, stats = proc.recorded_selection
    _report(args, layout, stats)
    if target is not None:
        _picture(args, target, layout, stats)
    return 0


def _report(args: argparse.Namespace, layout: Any, stats: Any) -> None:
    """The grid and, per head, the critical share, the mean R and the GAPR-trusted share."""
    print(f"model       tiny {args.model}, latent grid {layout.frames} x {layout.height} x {layout.width} "
          f"({layout.order} order), text {layout.text_tokens}")
    print(f"blocks      {stats.critical.shape[-2]} video query blocks x {stats.critical.shape[-1]} key blocks "
          f"of {args.block_size}")
    for h in range(stats.critical.shape[1]):
        crit = stats.critical[0, h].float()
        line = f"head {h:<3}    critical {crit.mean():.3f}, R mean {stats.R[0, h].mean():.3f}"
        if stats.gapr_ok is not None:
            line += f", GAPR-trusted {stats.gapr_ok[0, h].float().mean():.3f}"
        print(line)


def _picture(args: argparse.Namespace, target: Any, layout: Any, stats: Any) -> None:
    """Draw the chosen head's selection to the checked ``--png`` target."""
    from ..pictures import format_knobs, selection_figure
    from .mask import save_picture

    knobs = format_knobs(dict(drop_rate=args.drop_rate, top_p=args.top_p, block_size=args.block_size))
    crit = stats.critical[0, args.head].float().mean()
    title = (f"Rectified SpaAttn, tiny {args.model}, first sparse layer, head {args.head}: critical blocks "
             f"{crit:.3f}\n{knobs}")
    h, w = save_picture(target, selection_figure(layout, stats, args.head, args.block_size, title), args.overwrite)
    print(f"picture     {args.png} ({w} x {h} px)")
