"""``vidattn generate``: one video with a chosen attention method, written as mp4 + JSON sidecar."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate one video with sparse attention",
                       description="Generate a video with a diffusers pipeline and a vidattn attention method. "
                                   "Writes an mp4 and a JSON sidecar (settings, versions, timings, attention stats).")
    p.add_argument("--prompt", default="a red fox running through fresh snow, cinematic", help="text prompt")
    p.add_argument("--negative-prompt", default="", help="negative prompt (used when guidance > 1)")
    p.add_argument("--method", default="dense",
                   help="attention method: dense, full, radial, rectified, freeswim (default: dense; freeswim "
                        "generates at --base-height x --base-width and refines at --height x --width)")
    p.add_argument("--preset", default=None, help="method preset, e.g. wan-1x for radial or hunyuan for rectified "
                                                  "(knobs below override it)")
    p.add_argument("--dense-steps", type=int, default=None, help="first N denoising steps dense")
    p.add_argument("--dense-layers", type=int, default=None, help="first N transformer blocks dense")
    p.add_argument("--dense-last-steps", type=int, default=None, help="last N denoising steps dense")
    p.add_argument("--decay", type=float, default=None, help="radial: band decay factor (> 0)")
    p.add_argument("--drop-rate", type=float, default=None,
                   help="rectified: share of key blocks dropped by the top-k floor, in [0, 1) (default 0.75)")
    p.add_argument("--top-p", type=float, default=None,
                   help="rectified: pooled attention mass kept by the top-p rule, in (0, 1] (default 0.3)")
    p.add_argument("--first-frame", default=None, choices=("corner", "frame0", "off"),
                   help="rectified: first-frame rule (default: corner on Wan, off elsewhere)")
    p.add_argument("--no-gapr", dest="gapr", action="store_const", const=False, default=None,
                   help="rectified: compensate every non-critical block (ablation of GAPR)")
    p.add_argument("--base-height", type=int, default=None,
                   help="freeswim: base (training) height in pixels (default: Wan 480, LTX-Video 512, tiny 64)")
    p.add_argument("--base-width", type=int, default=None,
                   help="freeswim: base (training) width in pixels (default: Wan 832, LTX-Video 704, tiny 64)")
    p.add_argument("--mode", default=None, choices=("cache", "nocache"),
                   help="freeswim: cross-attention override refreshed every --cache-steps (cache, default) or every "
                        "step (nocache)")
    p.add_argument("--cache-steps", type=int, default=None, help="freeswim: refresh period in steps (default 2)")
    p.add_argument("--strength", type=float, default=None,
                   help="freeswim: share of the refinement schedule run, in (0, 1] (default 0.7)")
    p.add_argument("--tiles", default=None, help="freeswim: spatial-tile token order RxC, e.g. 8x16")
    p.add_argument("--block-size", type=int, default=None, help="sparse block size in tokens")
    p.add_argument("--backend", default=None, help="sparse kernel backend: auto, torch, flex, triton, reference")
    p.add_argument("--model", default="tiny",
                   help="'tiny' (built-in toy model, offline), 'tiny-bench' (long sequences), a hub id such as "
                        "Wan-AI/Wan2.1-T2V-1.3B-Diffusers, or a local diffusers folder")
    p.add_argument("--frames", type=int, default=None, help="number of video frames (4k+1 for Wan)")
    p.add_argument("--height", type=int, default=None, help="height in pixels (multiple of 16 for Wan)")
    p.add_argument("--width", type=int, default=None, help="width in pixels (multiple of 16 for Wan)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--fps", type=int, default=16, help="frames per second of the mp4")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default=None, choices=("float32", "float16", "bfloat16"),
                   help="model dtype (default: bfloat16 on cuda, float32 on cpu)")
    p.add_argument("--out", default=None, help="output mp4 path (default: outputs/<method>_seed<seed>.mp4)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.set_defaults(func=run)


def _fail(message: str) -> int:
    print(f"vidattn generate: error: {message}", file=sys.stderr)
    return 2


def _default_out(method: str, seed: int) -> Path:
    base = Path("outputs") / f"{method}_seed{seed}.mp4"
    n = 1
    path = base
    while path.exists() or path.with_suffix(".json").exists():
        path = base.with_name(f"{base.stem}_{n}.mp4")
        n += 1
    return path


def _freeswim_options(args: argparse.Namespace) -> tuple[dict, dict]:
    """FreeSwimPipeline's call options and the processor's knobs from the command line (ValueError naming the
    option on bad values)."""
    from vidattn.pipelines.generate import freeswim_pipeline_class

    _, cell, (default_h, default_w) = freeswim_pipeline_class(args.model)
    base_h = args.base_height or default_h
    base_w = args.base_width or default_w
    for name, value in (("--base-height", base_h), ("--base-width", base_w)):
        if value < cell or value % cell:
            raise ValueError(f"{name} must be a positive multiple of {cell}, got {value}")
    if args.cache_steps is not None and args.cache_steps < 1:
        raise ValueError(f"--cache-steps must be >= 1, got {args.cache_steps}")
    if args.strength is not None and not 0 < args.strength <= 1:
        raise ValueError(f"--strength must lie in (0, 1], got {args.strength}")
    tiles = None
    if args.tiles is not None:
        parts = args.tiles.lower().split("x")
        if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise ValueError(f"--tiles must be RxC with positive integers (e.g. 8x16), got {args.tiles!r}")
        tiles = (int(parts[0]), int(parts[1]))
    call = {"base_height": base_h, "base_width": base_w, "mode": args.mode or "cache",
            "cache_steps": args.cache_steps or 2, "strength": 0.7 if args.strength is None else args.strength}
    knobs = {"base_rows": base_h // cell, "base_cols": base_w // cell, "tiles": tiles}
    if args.preset is None:
        knobs["scale_ratio"] = 2.0
    return call, knobs


def run(args: argparse.Namespace) -> int:
    from vidattn.methods import METHODS, make_processor

    freeswim_args = ("base_height", "base_width", "mode", "cache_steps", "strength", "tiles")
    if args.method != "freeswim":
        for name in freeswim_args:
            if getattr(args, name) is not None:
                return _fail(f"--{name.replace('_', '-')} applies to --method freeswim only")
    try:
        freeswim, freeswim_knobs = _freeswim_options(args) if args.method == "freeswim" else (None, {})
        processor = make_processor(args.method, args.preset, **freeswim_knobs, dense_steps=args.dense_steps,
                                   dense_layers=args.dense_layers, dense_last_steps=args.dense_last_steps,
                                   decay=args.decay, block_size=args.block_size, backend=args.backend,
                                   drop_rate=args.drop_rate, top_p=args.top_p, first_frame=args.first_frame,
                                   gapr=args.gapr)
    except (ValueError, TypeError) as err:
        return _fail(f"--method {args.method}: {err}" if args.method not in METHODS else str(err))
    for name in ("steps", "fps"):
        value = getattr(args, name)
        if value is not None and value < 1:
            return _fail(f"--{name} must be >= 1, got {value}")
    out = Path(args.out) if args.out else _default_out(args.method, args.seed)
    if out.suffix != ".mp4":
        return _fail(f"--out must end in .mp4, got {out}")
    if not args.overwrite and (out.exists() or out.with_suffix(".json").exists()):
        return _fail(f"--out {out} (or its .json sidecar) exists; pass --overwrite to replace it")
    from vidattn.pipelines.generate import TINY_MODELS, GenerationRequest, generate_video

    request = GenerationRequest(prompt=args.prompt, negative_prompt=args.negative_prompt, model=args.model,
                                frames=args.frames, height=args.height, width=args.width, steps=args.steps,
                                guidance=args.guidance, seed=args.seed, fps=args.fps, device=args.device,
                                dtype=args.dtype)
    published = METHODS[args.method].presets.get(args.preset, {}).get("generation", {}) if args.preset else {}
    if published and args.model not in TINY_MODELS:
        # Real models default to the settings the preset was published with; explicit options win.
        for field_name, key in (("frames", "num_frames"), ("height", "height"), ("width", "width"),
                                ("steps", "num_inference_steps"), ("guidance", "guidance_scale")):
            if getattr(request, field_name) is None and key in published:
                setattr(request, field_name, published[key])
    try:
        result = generate_video(request, processor, out, overwrite=args.overwrite,
                                method={"method": args.method, "preset": args.preset}, freeswim=freeswim)
    except ValueError as err:
        return _fail(str(err))
    stats = result["attention"]
    density = stats.get("computed_fraction")
    print(f"video     {result['video']}")
    print(f"sidecar   {result['sidecar']}")
    print(f"size      {result['settings']['frames']} frames x {result['settings']['height']}x"
          f"{result['settings']['width']}, {result['settings']['steps']} steps")
    print(f"time      {result['timings']['generate_s']:.2f} s generate, {result['timings']['attention_s']:.2f} s "
          "in attention (CPU)")
    print(f"attention {args.method}: {stats['sparse_calls']} sparse / {stats['dense_calls']} dense calls, "
          f"density {'n/a' if density is None else f'{density:.3f}'} of dense computed")
    return 0
