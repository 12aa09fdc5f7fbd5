"""``vidattn presets [METHOD]``: the methods' presets, their knobs and the generation settings they were published
with (``vidattn.methods.METHODS``)."""
from __future__ import annotations

import argparse
import json
import sys

# Generation settings as ``vidattn generate`` options (the keys are the diffusers call's).
GENERATE_OPTIONS = (("height", "--height"), ("width", "--width"), ("num_frames", "--frames"),
                    ("num_inference_steps", "--steps"), ("guidance_scale", "--guidance"))


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "presets", help="list the methods' presets: knobs and published generation settings",
        description="List the presets of every attention method, or of METHOD: each preset's processor knobs and "
                    "the generation settings it was published with, written as `vidattn generate` options. "
                    "`vidattn generate --method METHOD --preset PRESET` uses the knobs, and on real models the "
                    "generation settings for the options not given.")
    p.add_argument("method", nargs="?", default=None, metavar="METHOD",
                   help="one method (radial, rectified, freeswim, ...); default: all")
    p.add_argument("--json", action="store_true",
                   help='print JSON instead: {method: {"help", "knobs": [accepted knobs], "presets": {preset: '
                        '{"knobs": {...}, "generation": {...}}}}}')
    p.set_defaults(func=run)


def _fail(message: str) -> int:
    print(f"vidattn presets: error: {message}", file=sys.stderr)
    return 2


def _value(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def format_knobs(knobs: dict) -> str:
    return " ".join(f"{k}={_value(v)}" for k, v in knobs.items()) or "-"


def format_generation(generation: dict) -> str:
    """``--height 768 --width 1280 --frames 69 --steps 50 --guidance 5.0``; other keys as ``key=value``."""
    flags = dict(GENERATE_OPTIONS)
    parts = [f"{flags[k]} {_value(generation[k])}" for k, _ in GENERATE_OPTIONS if k in generation]
    parts += [f"{k}={_value(v)}" for k, v in generation.items() if k not in flags]
    return " ".join(parts) or "-"


def describe(spec) -> dict:
    """One method as plain data: help, accepted knobs, presets (knobs and generation settings apart)."""
    presets = {}
    for name, preset in spec.presets.items():
        presets[name] = {"knobs": {k: v for k, v in preset.items() if k != "generation"},
                         "generation": dict(preset.get("generation") or {})}
    return {"help": spec.help, "knobs": list(spec.knobs), "presets": presets}


def _table(rows: list[tuple[str, str, str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(2)]
    return [f"  {a:<{widths[0]}}  {b:<{widths[1]}}  {c}".rstrip() for a, b, c in rows]


def run(args: argparse.Namespace) -> int:
    from vidattn.methods import METHODS

    if args.method is not None and args.method not in METHODS:
        return _fail(f"argument METHOD: unknown method {args.method!r}; accepted: {', '.join(sorted(METHODS))}")
    names = [args.method] if args.method is not None else list(METHODS)
    data = {name: describe(METHODS[name]) for name in names}
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    blocks = []
    for name, info in data.items():
        lines = [f"{name}: {info['help']}" if info["help"] else name]
        if info["presets"]:
            rows = [("preset", "knobs", "generation settings (vidattn generate options)")]
            rows += [(preset, format_knobs(p["knobs"]), format_generation(p["generation"]))
                     for preset, p in info["presets"].items()]
            lines += _table(rows)
        else:
            lines.append("  no presets")
        lines.append(f"  knobs: {', '.join(info['knobs']) or 'none'}")
        blocks.append("\n".join(lines))
    print("\n\n".join(blocks))
    return 0
