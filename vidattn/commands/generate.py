"""``vidattn generate``: one video with a chosen attention method, written as mp4 + JSON sidecar."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate videos with sparse attention (one, or a batch from a prompt file)",
                       description="Generate videos with a diffusers pipeline and a vidattn attention method. One "
                                   "video: an mp4 and a JSON sidecar (settings, versions, timings, attention stats). "
                                   "A batch (--prompts FILE, several --prompt, --num-videos-per-prompt, --compare or "
                                   "--resume): a folder with one mp4 + sidecar per item, manifest.jsonl, report.md "
                                   "and contact_sheet.png; resumable, and sharded across processes when started by "
                                   "torchrun or accelerate launch.")
    _add_method_options(p)
    _add_freeswim_options(p)
    _add_model_options(p)
    _add_run_options(p)
    _add_batch_options(p)
    p.set_defaults(func=run)


def _add_method_options(p: argparse.ArgumentParser) -> None:
    """The prompt, the attention method, its preset and the knobs of the sparse methods."""
    p.add_argument("--prompt", action="append", default=None,
                   help=f"text prompt; repeat it for a batch (default: {DEFAULT_PROMPT!r})")
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


def _add_freeswim_options(p: argparse.ArgumentParser) -> None:
    """The options of ``--method freeswim`` (base size, cache mode, strength, tiles)."""
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


def _add_model_options(p: argparse.ArgumentParser) -> None:
    """The kernel backend, the model and the video's geometry, steps, guidance and seed."""
    p.add_argument("--block-size", type=int, default=None, help="sparse block size in tokens")
    p.add_argument("--backend", default=None,
                   help="sparse kernel backend: auto, torch, flex, triton, reference (refused up front when it "
                        "cannot run on --device)")
    p.add_argument("--model", default="tiny",
                   help="'tiny' (built-in toy model, offline), 'tiny-bench' (long sequences), a hub id such as "
                        "Wan-AI/Wan2.1-T2V-1.3B-Diffusers, or a local diffusers folder")
    p.add_argument("--frames", type=int, default=None, help="number of video frames (4k+1 for Wan)")
    p.add_argument("--height", type=int, default=None, help="height in pixels (multiple of 16 for Wan)")
    p.add_argument("--width", type=int, default=None, help="width in pixels (multiple of 16 for Wan)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale")
    p.add_argument("--seed", type=int, default=0,
                   help="random seed; in a batch the base seed: item i gets seed + i unless its row gives one")


def _add_run_options(p: argparse.ArgumentParser) -> None:
    """Frame rate, device, dtype, output, overwrite and context parallelism."""
    p.add_argument("--fps", type=int, default=16, help="frames per second of the mp4")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default=None, choices=("float32", "float16", "bfloat16"),
                   help="model dtype (default: bfloat16 on cuda, float32 on cpu; honoured on every device, the tiny "
                        "model included)")
    p.add_argument("--out", default=None,
                   help="one video: output mp4 path (default: outputs/<method>_seed<seed>.mp4); a batch: output "
                        "folder (default: outputs/<method>-batch)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing output file (and its sidecar); a batch: render every item again")
    p.add_argument("--cp", default=None, metavar="ulysses:N|ring:N",
                   help="diffusers' context parallelism over N processes of torchrun / accelerate launch (ulysses: "
                        "heads split, any method; ring: K/V shards rotate, radial and freeswim): one video on N "
                        "processes, rank 0 writes it; a batch on a multiple of N, items sharded across groups of N "
                        "consecutive ranks, each group's first rank writes its items")


def _add_batch_options(p: argparse.ArgumentParser) -> None:
    """The options of batches (prompt files, comparison, resume) and of large models (offload, tiling, LoRA)."""
    from vidattn.validation import LORA_SCALE_DEFAULT, OFFLOAD_MODES

    batch = p.add_argument_group("batch (--out is then a folder)")
    batch.add_argument("--prompts", default=None, metavar="FILE",
                       help="prompt file: .txt (one prompt a line; '#' comments and blank lines skipped), .jsonl or "
                            ".csv (rows with 'prompt' and optional negative_prompt, seed, num_frames, height, width, "
                            "id)")
    batch.add_argument("--num-videos-per-prompt", type=int, default=1,
                       help="videos per prompt, seeds counted on per video (a batch when > 1)")
    batch.add_argument("--compare", default=None, choices=("dense",),
                       help="also render each item with dense attention from the same seed; report speedup, PSNR "
                            "and SSIM")
    batch.add_argument("--resume", action="store_true",
                       help="keep items whose video and sidecar are complete, render the rest")
    large = p.add_argument_group("large models")
    large.add_argument("--offload", default=None, choices=OFFLOAD_MODES,
                       help="CUDA only: keep weights on the CPU, moving whole components (model) or submodules "
                            "(sequential, leanest) to the GPU as needed")
    large.add_argument("--vae-tiling", action="store_true", help="decode the video in tiles (less memory)")
    large.add_argument("--lora", default=None, metavar="PATH",
                       help="LoRA adapter saved with the pipeline's save_lora_weights (a folder or its .safetensors "
                            "file), loaded with load_lora_weights")
    large.add_argument("--lora-scale", type=float, default=None,
                       help=f"strength of the --lora adapter (default {LORA_SCALE_DEFAULT})")


COMMAND = "generate"
DEFAULT_PROMPT = "a red fox running through fresh snow, cinematic"
# generate's options for processor knobs (the freeswim ones are checked by _freeswim_options)
KNOB_OPTIONS = {"dense_steps": "--dense-steps", "dense_layers": "--dense-layers",
                "dense_last_steps": "--dense-last-steps", "decay": "--decay", "drop_rate": "--drop-rate",
                "top_p": "--top-p", "first_frame": "--first-frame", "gapr": "--no-gapr", "block_size": "--block-size",
                "backend": "--backend"}
FREESWIM_OPTIONS = ("base_height", "base_width", "mode", "cache_steps", "strength", "tiles")


def _default_out(method: str, seed: int) -> Path:
    base = Path("outputs") / f"{method}_seed{seed}.mp4"
    n = 1
    path = base
    while path.exists() or path.with_suffix(".json").exists():
        path = base.with_name(f"{base.stem}_{n}.mp4")
        n += 1
    return path


def _freeswim_options(args: argparse.Namespace, cell: int, default_base: tuple[int, int]) -> tuple[dict, dict]:
    """FreeSwimPipeline's call options and the processor's knobs from the command line (UsageError naming the
    option on bad values)."""
    from vidattn.validation import UsageError

    base_h = args.base_height or default_base[0]
    base_w = args.base_width or default_base[1]
    for name, value in (("--base-height", base_h), ("--base-width", base_w)):
        if value < cell or value % cell:
            raise UsageError(name, f"must be a positive multiple of {cell}, got {value}")
    if args.cache_steps is not None and args.cache_steps < 1:
        raise UsageError("--cache-steps", f"must be >= 1, got {args.cache_steps}")
    if args.strength is not None and not 0 < args.strength <= 1:
        raise UsageError("--strength", f"must lie in (0, 1], got {args.strength}")
    tiles = None
    if args.tiles is not None:
        parts = args.tiles.lower().split("x")
        if len(parts) != 2 or not all(p.isascii() and p.isdigit() and int(p) > 0 for p in parts):
            raise UsageError("--tiles", f"must be RxC with positive integers (e.g. 8x16), got {args.tiles!r}")
        tiles = (int(parts[0]), int(parts[1]))
    call = {"base_height": base_h, "base_width": base_w, "mode": args.mode or "cache",
            "cache_steps": args.cache_steps or 2, "strength": 0.7 if args.strength is None else args.strength}
    knobs = {"base_rows": base_h // cell, "base_cols": base_w // cell, "tiles": tiles}
    if args.preset is None:
        knobs["scale_ratio"] = 2.0
    return call, knobs


def _processor_factory(args: argparse.Namespace, freeswim_knobs: dict):
    """``make(method)``: a fresh processor of ``--method`` with its knobs (``make("dense")``: the dense one)."""
    from vidattn.methods import make_processor

    def make(which: str = "method"):
        if which == "dense":
            return make_processor("dense")
        return make_processor(args.method, args.preset, **freeswim_knobs, dense_steps=args.dense_steps,
                              dense_layers=args.dense_layers, dense_last_steps=args.dense_last_steps,
                              decay=args.decay, block_size=args.block_size, backend=args.backend,
                              drop_rate=args.drop_rate, top_p=args.top_p, first_frame=args.first_frame,
                              gapr=args.gapr)
    return make


def _check_options(args: argparse.Namespace) -> None:
    """The checks of single values: method, knobs, preset, numbers, seed, offload, LoRA."""
    from vidattn import validation as v
    from vidattn.methods import METHODS

    v.check_choice("--method", args.method, METHODS)
    if args.method != "freeswim":
        for name in FREESWIM_OPTIONS:
            if getattr(args, name) is not None:
                raise v.UsageError(f"--{name.replace('_', '-')}", "applies to --method freeswim only")
    knobs = {k: getattr(args, k) for k in KNOB_OPTIONS}
    v.check_method_options(args.method, knobs, KNOB_OPTIONS)
    v.check_preset(args.method, args.preset)
    for option, value, low in (("--dense-steps", args.dense_steps, 0), ("--dense-layers", args.dense_layers, 0),
                               ("--dense-last-steps", args.dense_last_steps, 0), ("--steps", args.steps, 1),
                               ("--fps", args.fps, 1), ("--block-size", args.block_size, 1),
                               ("--frames", args.frames, 1), ("--height", args.height, 1),
                               ("--width", args.width, 1), ("--base-height", args.base_height, 1),
                               ("--base-width", args.base_width, 1), ("--cache-steps", args.cache_steps, 1),
                               ("--num-videos-per-prompt", args.num_videos_per_prompt, 1)):
        v.check_number(option, value, minimum=low, integer=True)
    v.check_seed("--seed", args.seed)
    v.check_number("--guidance", args.guidance, minimum=0)
    v.check_number("--lora-scale", args.lora_scale)
    if args.lora_scale is not None and args.lora is None:
        raise v.UsageError("--lora-scale", "needs --lora PATH")
    if args.lora is not None:
        v.check_lora(args.lora)


def _check(args: argparse.Namespace, batch: bool = False) -> dict:
    """Every check of the command line, before any model is loaded; returns what the run needs (``out``: the
    checked mp4 of one video; a batch checks its folder itself)."""
    from vidattn import validation as v
    from vidattn.methods import METHODS

    _check_options(args)
    device = v.check_device(args.device)
    dtype = v.check_dtype(args.dtype, device)
    v.check_backend(args.backend, device)
    v.check_offload(args.offload, device)

    freeswim, freeswim_knobs, cell = None, {}, None
    spec = v.check_model(args.model)
    if args.method == "freeswim":
        from vidattn.pipelines.generate import freeswim_pipeline_class

        try:
            pipeline_cls, cell, default_base = freeswim_pipeline_class(args.model, spec.class_name)
        except ValueError as err:
            raise v.UsageError("--model", str(err).removeprefix("--model ")) from None
        spec = v.with_pipeline_class(spec, pipeline_cls)
        freeswim, freeswim_knobs = _freeswim_options(args, cell, default_base)

    given = {"frames": args.frames, "height": args.height, "width": args.width, "steps": args.steps,
             "guidance": args.guidance}
    published = METHODS[args.method].presets.get(args.preset, {}).get("generation", {}) if args.preset else {}
    if published and spec.kind != "tiny":
        # Real models default to the settings the preset was published with; explicit options win.
        for name, key in (("frames", "num_frames"), ("height", "height"), ("width", "width"),
                          ("steps", "num_inference_steps"), ("guidance", "guidance_scale")):
            if given[name] is None and key in published:
                given[name] = published[key]
    settings = v.resolve_settings(spec, given)
    factors = spec.factors
    if cell is not None:  # FreeSwim's own rule: sizes in whole latent cells
        factors = (factors or (4, cell))[0], cell
    v.check_geometry(settings["frames"], settings["height"], settings["width"], factors,
                     model=f"{spec.name} ({spec.class_name})")
    refine_steps = None
    if freeswim is not None:
        refine_steps = int(settings["steps"] * freeswim["strength"])
        if refine_steps < 1:
            raise v.UsageError("--strength", f"{freeswim['strength']} of {settings['steps']} steps runs no refinement "
                                             "step; raise --strength or --steps")
    make = _processor_factory(args, freeswim_knobs)
    try:
        processor = make("method")
    except (ValueError, TypeError) as err:
        raise v.knob_error(err) from None
    warnings = []
    if args.method != "dense":
        where = f" on {spec.name}"
        if args.preset:
            where += f" (--preset {args.preset})"
        steps = refine_steps if refine_steps is not None else settings["steps"]
        warnings = v.dense_warnings(processor.knobs(), steps, spec.num_layers, where)
    checked = dict(spec=spec, device=device, dtype=dtype, processor=processor, make=make, freeswim=freeswim,
                   given=given, settings=settings, factors=factors, warnings=warnings)
    if not batch:
        out_name = args.out if args.out is not None else _default_out(args.method, args.seed)
        checked["out"] = v.check_output_file(out_name, "--out", suffix=".mp4", overwrite=args.overwrite,
                                             companions=(".json",))
    return checked


def lora_scale(args: argparse.Namespace) -> float:
    """``--lora-scale``, or :data:`vidattn.validation.LORA_SCALE_DEFAULT` when not given."""
    from vidattn.validation import LORA_SCALE_DEFAULT

    return LORA_SCALE_DEFAULT if args.lora_scale is None else args.lora_scale


def _request(args: argparse.Namespace, checked: dict, given: dict, prompt: str):
    from vidattn.pipelines.generate import GenerationRequest

    return GenerationRequest(prompt=prompt, negative_prompt=args.negative_prompt, model=args.model,
                             frames=given["frames"], height=given["height"], width=given["width"],
                             steps=given["steps"], guidance=given["guidance"], seed=args.seed, fps=args.fps,
                             device=checked["device"], dtype=checked["dtype"], lora=args.lora,
                             lora_scale=lora_scale(args), offload=args.offload,
                             vae_tiling=args.vae_tiling)


def run(args: argparse.Namespace) -> int:
    from vidattn.validation import UsageError, report, warn

    from .generate_batch import is_batch, run_batch

    try:
        if is_batch(args):
            return run_batch(args)
        checked = _check(args)
        if args.cp is not None:
            from .generate_cp import check_cp

            check_cp(args, checked)
    except UsageError as err:
        return report(COMMAND, err)
    if args.cp is not None:
        from .generate_cp import main_cp

        return main_cp(args, checked, args.prompt[0] if args.prompt else DEFAULT_PROMPT)
    from vidattn.pipelines.generate import OutputWriteError, generate_video

    out = checked["out"]
    for message in checked["warnings"]:
        warn(COMMAND, message)
    request = _request(args, checked, checked["given"], args.prompt[0] if args.prompt else DEFAULT_PROMPT)
    ok = False
    try:
        result = generate_video(request, checked["processor"], out.path, overwrite=args.overwrite,
                                method={"method": args.method, "preset": args.preset}, freeswim=checked["freeswim"],
                                command=getattr(args, "argv", None), model_spec=checked["spec"],
                                warnings=checked["warnings"])
        ok = True
    except OutputWriteError as err:  # the output location changed during the run; the video was kept elsewhere
        print(f"vidattn {COMMAND}: error: {err}", file=sys.stderr)
        return 1
    except ValueError as err:  # a check the pipeline itself makes
        return report(COMMAND, err)
    finally:
        if not ok:
            out.discard()
    _print_result(args, result)
    return 0


def _print_result(args: argparse.Namespace, result: dict) -> None:
    stats = result["attention"]
    density = stats.get("computed_fraction")
    timings = result["timings"]
    attention = (f"{timings['attention_s']:.2f} s in attention (CPU)" if timings["attention_s"] is not None
                 else f"attention not timed on {result['settings']['device']}")
    print(f"video     {result['video']}")
    print(f"sidecar   {result['sidecar']}")
    print(f"size      {result['settings']['frames']} frames x {result['settings']['height']}x"
          f"{result['settings']['width']}, {result['settings']['steps']} steps, {result['settings']['dtype']} on "
          f"{result['settings']['device']}")
    print(f"time      {timings['generate_s']:.2f} s generate, {attention}")
    print(f"attention {args.method}: {stats['sparse_calls']} sparse / {stats['dense_calls']} dense calls, "
          f"density {'n/a' if density is None else f'{density:.3f}'} of dense computed")
