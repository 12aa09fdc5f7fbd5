"""Input checks every command runs before any expensive work, and the one error type the CLI prints.

A user error is a :class:`UsageError` naming the option (``--out``, ``--device``, ...). The commands print it as one
line, ``vidattn <command>: error: argument <option>: <message>``, and exit with code 2 (argparse's own code for
bad arguments), before a model is loaded or a picture is computed. The checks are small and reusable:

* :func:`check_output_file` (and :func:`check_png`): the file can be written without replacing anything (unless
  ``--overwrite``): not a folder, no file in place of a parent folder, parents created and a temporary file probed;
  :func:`check_output_dir` the same for a batch's folder; :func:`check_lora` a LoRA adapter file or folder;
* :func:`check_device`, :func:`check_backend`, :func:`check_dtype`, :func:`check_offload`: the device exists in
  this torch build, the kernel backend runs on it (``vidattn.kernels.available_backends``), offload needs CUDA;
* :func:`check_model`: a built-in tiny model, a local diffusers folder or a hub id, read from its
  ``model_index.json`` and component configs without loading weights (:class:`ModelSpec`: pipeline class, call
  defaults, video geometry, layer count, revision);
* :func:`resolve_settings` / :func:`check_geometry`: frame count and size against the model's factors;
* :func:`knob_error`, :func:`check_method_options`, :func:`check_preset`: processor knob errors in option names;
* :func:`dense_warnings`: settings under which a preset computes every attention call dense.
"""
from __future__ import annotations

import difflib
import json
import math
import os
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

__all__ = [
    "EXIT_USAGE",
    "KNOB_OPTIONS",
    "ModelSpec",
    "OFFLOAD_MODES",
    "OutputTarget",
    "UsageError",
    "available_devices",
    "check_backend",
    "check_choice",
    "check_device",
    "check_dtype",
    "check_geometry",
    "check_lora",
    "check_method_options",
    "check_model",
    "check_number",
    "check_offload",
    "check_output_dir",
    "check_output_file",
    "check_png",
    "check_preset",
    "check_seed",
    "command_name",
    "dense_warnings",
    "knob_error",
    "report",
    "resolve_settings",
    "shown",
    "warn",
    "with_pipeline_class",
]

EXIT_USAGE = 2
TINY_MODELS = ("tiny", "tiny-bench")
CALL_SETTINGS = ("height", "width", "num_frames", "num_inference_steps", "guidance_scale")
SETTING_OPTIONS = {"num_frames": "--frames", "height": "--height", "width": "--width",
                   "num_inference_steps": "--steps", "guidance_scale": "--guidance"}

# Processor knobs -> the command-line option that sets them (for messages that name the option).
KNOB_OPTIONS: dict[str, str] = {
    "decay": "--decay", "block_size": "--block-size", "dense_steps": "--dense-steps",
    "dense_layers": "--dense-layers", "dense_last_steps": "--dense-last-steps", "backend": "--backend",
    "drop_rate": "--drop-rate", "top_p": "--top-p", "first_frame": "--first-frame", "gapr": "--no-gapr",
    "sink_frames": "--sink-frames", "d1_full": "--d1-full", "decimation_threshold": "--decimation-threshold",
    "base_rows": "--base-height", "base_cols": "--base-width", "tiles": "--tiles", "temporal": "--temporal",
    "inward": "--inward", "strength": "--strength", "cache_steps": "--cache-steps", "mode": "--mode",
    "text_len": "--text-len", "num_frames": "--frames", "height": "--height", "width": "--width",
    "base_height": "--base-height", "base_width": "--base-width", "num_inference_steps": "--steps",
}


# ---------------------------------------------------------------------------------------------------- the error
class UsageError(ValueError):
    """A bad command-line value: ``option`` (e.g. ``"--out"``, or None) and a one-line ``message``.

    ``str(err)`` is ``"argument --out: <message>"`` (argparse's wording); :func:`report` prints it as
    ``vidattn <command>: error: ...`` and returns :data:`EXIT_USAGE`. A ``ValueError``, so callers that catch
    ``ValueError`` keep working.
    """

    exit_code = EXIT_USAGE

    def __init__(self, option: Optional[str], message: str) -> None:
        self.option = option
        self.message = _one_line(message)
        super().__init__(str(self))

    def __str__(self) -> str:
        return f"argument {self.option}: {self.message}" if self.option else self.message


def _one_line(text: Any) -> str:
    """Collapse whitespace (newlines included) and make the text printable on any stream."""
    text = re.sub(r"\s+", " ", str(text)).strip()
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def shown(value: Any) -> str:
    """A path or value as it can be shown in a one-line message (``repr`` when it has odd characters)."""
    text = str(value)
    return text if text.isprintable() and text.strip() == text and text else repr(text)


def report(command: str, err: BaseException, stream: Any = None) -> int:
    """Print ``vidattn <command>: error: <one line>`` to stderr; returns :data:`EXIT_USAGE`."""
    print(f"vidattn {command}: error: {_one_line(err)}", file=stream or sys.stderr)
    return EXIT_USAGE


def warn(command: str, message: str, stream: Any = None) -> None:
    print(f"vidattn {command}: warning: {_one_line(message)}", file=stream or sys.stderr)


def command_name(args: Any) -> str:
    """``"generate"``, ``"mask radial"``, ``"bench attention"``: the words of the command ``args`` ran."""
    command = getattr(args, "command", None) or "vidattn"
    sub = getattr(args, {"mask": "method", "bench": "what"}.get(command, ""), None)
    return f"{command} {sub}" if isinstance(sub, str) else command


# ---------------------------------------------------------------------------------------------------- values
def check_choice(option: str, value: Any, choices: Iterable[str], what: str = "") -> str:
    """``value`` in ``choices``, else a UsageError listing them (and the closest match)."""
    choices = list(choices)
    if value in choices:
        return value
    if not choices:
        raise UsageError(option, f"takes no value here{f' ({what})' if what else ''}, got {value!r}")
    close = difflib.get_close_matches(str(value), choices, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise UsageError(option, f"must be one of {', '.join(choices)}{f' ({what})' if what else ''}, got {value!r}{hint}")


def check_number(option: str, value: Any, *, minimum: Optional[float] = None, maximum: Optional[float] = None,
                 low_open: bool = False, high_open: bool = False, integer: bool = False) -> Any:
    """``value`` (None passes) is finite and within the bounds, else a UsageError naming ``option``."""
    if value is None:
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise UsageError(option, f"must be {'an integer' if integer else 'a number'}, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise UsageError(option, f"must be a finite number, got {value!r}")
    bad_low = minimum is not None and (value <= minimum if low_open else value < minimum)
    bad_high = maximum is not None and (value >= maximum if high_open else value > maximum)
    if bad_low or bad_high:
        if minimum is not None and maximum is not None:
            accepted = f"in {'(' if low_open else '['}{minimum:g}, {maximum:g}{')' if high_open else ']'}"
        elif minimum is not None:
            accepted = f"{'>' if low_open else '>='} {minimum:g}"
        else:
            accepted = f"{'<' if high_open else '<='} {maximum:g}"
        raise UsageError(option, f"must be {accepted}, got {value!r}")
    return value


def check_seed(option: str, value: Any) -> int:
    """A seed ``torch.Generator.manual_seed`` takes: an integer in [-2**63, 2**64 - 1]."""
    if isinstance(value, bool) or not isinstance(value, int) or not -2 ** 63 <= value <= 2 ** 64 - 1:
        raise UsageError(option, f"must be an integer in [-2**63, 2**64 - 1], got {value!r}")
    return value


# ---------------------------------------------------------------------------------------------------- outputs
@dataclass
class OutputTarget:
    """A checked output file: ``path`` and the folders the check created (``discard`` removes them when empty)."""

    path: Path
    created: list = field(default_factory=list)

    def discard(self) -> None:
        """Remove the folders the check created, deepest first, where nothing was written into them."""
        for folder in self.created:
            try:
                folder.rmdir()
            except OSError:
                pass
        self.created = []


def _existing_ancestor(path: Path) -> Path:
    for parent in path.parents:
        if os.path.lexists(parent):
            return parent
    return Path(".")


def check_output_file(value: Any, option: str = "--out", *, suffix: str = ".mp4", overwrite: bool = False,
                      companions: Sequence[str] = (), create: bool = True) -> OutputTarget:
    """Check that ``value`` names a file the command can write, before any work.

    Refused with a :class:`UsageError` naming ``option``: an empty name or one with a NUL byte, a name not ending in
    ``suffix``, a folder, an existing file (or companion such as the ``.json`` sidecar) without ``overwrite``, a
    parent path that is a file, a folder that cannot be created or written (a temporary file is created and
    removed in it). Missing parent folders are created (``create``); :meth:`OutputTarget.discard` removes them when
    the run fails.
    """
    text = "" if value is None else str(value)
    if not text.strip():
        raise UsageError(option, f"needs a file name ending in {suffix}, got {text!r}")
    if "\x00" in text:
        raise UsageError(option, f"contains a NUL character: {text!r}")
    path = Path(text).expanduser()
    try:
        if path.suffix.lower() != suffix or path.stem in ("", "."):
            raise UsageError(option, f"must be a file name ending in {suffix}, got {shown(text)}")
        if path.is_dir():
            raise UsageError(option, f"{shown(text)} is a folder; give a file name such as "
                                     f"{shown(path / ('out' + suffix))}")
        targets = [path, *(path.with_suffix(s) for s in companions)]
        for target in targets:
            if target.is_dir():
                raise UsageError(option, f"{shown(target)} is a folder, so the run could not write it")
            if os.path.lexists(target) and not overwrite:
                what = "exists" if target == path else f"exists (the {target.suffix} written next to {path.name})"
                raise UsageError(option, f"{shown(target)} {what}; pass --overwrite to replace it")
        ancestor = _existing_ancestor(path)
        if not ancestor.is_dir():
            raise UsageError(option, f"{shown(ancestor)} is a file, not a folder, so {shown(text)} cannot be "
                                     "created")
        parent = path.parent
        if not create:
            if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
                raise UsageError(option, f"cannot write in {shown(parent)}")
            return OutputTarget(path)
        missing = [p for p in reversed(path.parents) if not os.path.lexists(p)]
        target = OutputTarget(path)
        for folder in missing:
            try:
                folder.mkdir()
            except FileExistsError:
                continue
            except OSError as err:
                target.discard()
                raise UsageError(option, f"cannot create the folder {shown(folder)} ({err.strerror or err})") from None
            target.created.insert(0, folder)
        try:
            fd, probe = tempfile.mkstemp(dir=parent, prefix=".vidattn-probe-", suffix=suffix)
            os.close(fd)
            os.unlink(probe)
        except OSError as err:
            target.discard()
            raise UsageError(option, f"cannot write in {shown(parent)} ({err.strerror or err})") from None
        for existing in targets:  # with --overwrite: the old file must be replaceable
            if overwrite and existing.exists() and not os.access(existing, os.W_OK):
                raise UsageError(option, f"{shown(existing)} exists and is read-only")
        return target
    except OSError as err:  # a name too long, a loop of links, ...
        raise UsageError(option, f"cannot use {shown(text)} ({err.strerror or err})") from None


def check_png(value: Any, option: str = "--png", *, overwrite: bool = False) -> Optional[OutputTarget]:
    """:func:`check_output_file` for a PNG picture (None passes)."""
    if value is None:
        return None
    return check_output_file(value, option, suffix=".png", overwrite=overwrite)


def check_output_dir(value: Any, option: str = "--out") -> OutputTarget:
    """A folder the command can write in: not a file, no file in place of a parent, writable (a temporary file is
    created and removed). Missing folders are created; :meth:`OutputTarget.discard` removes them again."""
    text = "" if value is None else str(value)
    if not text.strip() or "\x00" in text:
        raise UsageError(option, f"needs a folder name, got {text!r}")
    path = Path(text).expanduser()
    try:
        if os.path.lexists(path) and not path.is_dir():
            raise UsageError(option, f"{shown(text)} is a file, not a folder")
        ancestor = _existing_ancestor(path / "x")
        if not ancestor.is_dir():
            raise UsageError(option, f"{shown(ancestor)} is a file, not a folder, so {shown(text)} cannot be created")
        target = OutputTarget(path)
        for folder in [p for p in (*reversed(path.parents), path) if not os.path.lexists(p)]:
            try:
                folder.mkdir()
            except OSError as err:
                target.discard()
                raise UsageError(option, f"cannot create the folder {shown(folder)} ({err.strerror or err})") from None
            target.created.insert(0, folder)
        try:
            fd, probe = tempfile.mkstemp(dir=path, prefix=".vidattn-probe-")
            os.close(fd)
            os.unlink(probe)
        except OSError as err:
            target.discard()
            raise UsageError(option, f"cannot write in {shown(text)} ({err.strerror or err})") from None
        return target
    except OSError as err:
        raise UsageError(option, f"cannot use {shown(text)} ({err.strerror or err})") from None


LORA_SUFFIXES = (".safetensors", ".bin")
LORA_SCALE_DEFAULT = 1.0  # --lora-scale when not given (GenerationRequest.lora_scale, the help text, the sidecar)


def check_lora(value: Any, option: str = "--lora") -> Path:
    """A LoRA adapter as ``save_lora_weights`` writes it: a ``.safetensors`` / ``.bin`` file, or a folder holding
    one; and peft installed (``load_lora_weights`` needs it)."""
    import importlib.util

    path = Path(str(value)).expanduser()
    try:
        if not path.exists():
            raise UsageError(option, f"there is no file or folder {shown(value)}")
        if path.is_dir() and not any(p.suffix in LORA_SUFFIXES for p in path.iterdir()):
            raise UsageError(option, f"the folder {shown(value)} holds no .safetensors or .bin weights")
    except UsageError:
        raise
    except (OSError, ValueError) as err:  # unreadable folder, NUL in the name, ...
        raise UsageError(option, f"cannot use {shown(value)} ({getattr(err, 'strerror', None) or err})") from None
    if path.is_file() and path.suffix not in LORA_SUFFIXES:
        raise UsageError(option, f"{shown(value)} must be a .safetensors or .bin file, or a folder holding one")
    if importlib.util.find_spec("peft") is None:
        raise UsageError(option, "loading a LoRA adapter needs peft (pip install peft)")
    return path


# ---------------------------------------------------------------------------------------------------- device
def available_devices() -> list[str]:
    """Devices this torch build can run on here: ``cpu``, ``cuda`` / ``cuda:N``, ``mps``, ``xpu``."""
    import torch

    names = ["cpu"]
    if torch.cuda.is_available():
        names.append("cuda")
        names += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        names.append("mps")
    xpu = getattr(torch, "xpu", None)
    if xpu is not None and xpu.is_available():
        names.append("xpu")
    return names


def check_device(value: Optional[str], option: str = "--device") -> str:
    """The device to run on (default: ``cuda`` when available, else ``cpu``); a UsageError for an unknown device
    string or one this machine / torch build does not have."""
    import torch

    if value is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    here = ", ".join(available_devices())
    try:
        device = torch.device(value)
    except (RuntimeError, ValueError, TypeError):
        raise UsageError(option, f"{value!r} is not a torch device; this machine has {here}") from None
    if device.type == "cpu":
        return "cpu"
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = (f"this torch ({torch.__version__}) is built without CUDA" if torch.version.cuda is None
                   else "no CUDA device is visible")
            raise UsageError(option, f"{value}: {why}; this machine has {here}")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(option, f"{value}: there are {torch.cuda.device_count()} CUDA devices; this machine "
                                     f"has {here}")
        return str(device)
    if device.type in ("mps", "xpu") and device.type in available_devices():
        return str(device)
    raise UsageError(option, f"{value}: vidattn runs on cpu, cuda or mps; this machine has {here}")


def check_dtype(value: Optional[str], device: str, option: str = "--dtype") -> str:
    """The model dtype name (default: bfloat16 on cuda, float32 elsewhere)."""
    if value is None:
        return "bfloat16" if device.startswith("cuda") else "float32"
    return check_choice(option, value, ("float32", "float16", "bfloat16"))


OFFLOAD_MODES = ("model", "sequential")


def check_offload(value: Optional[str], device: str, option: str = "--offload") -> Optional[str]:
    """CPU offload (``model`` / ``sequential``, None passes) moves weights to a CUDA device as they are needed."""
    if value is None:
        return None
    check_choice(option, value, OFFLOAD_MODES)
    if not device.startswith("cuda"):
        raise UsageError(option, f"{value} offload moves weights to a CUDA device; --device is {device}")
    return value


def check_backend(value: Optional[str], device: str, option: str = "--backend") -> Optional[str]:
    """A sparse kernel backend that runs on ``device`` here (None and ``auto`` pass)."""
    if value is None or value == "auto":
        return value
    from .kernels import BACKENDS, available_backends

    check_choice(option, value, BACKENDS)
    usable = available_backends(device)
    if value not in usable:
        why = " (it needs a CUDA device)" if value == "triton" else ""
        raise UsageError(option, f"{value} cannot run on {device} here{why}; backends for {device}: "
                                 f"{', '.join(['auto', *usable])}")
    return value


# ---------------------------------------------------------------------------------------------------- methods
def _options(knobs: Iterable[str], offered: Mapping[str, str]) -> str:
    names = [offered[k] for k in knobs if k in offered]
    return ", ".join(dict.fromkeys(names)) or "none"


def check_method_options(method: str, given: Mapping[str, Any], offered: Mapping[str, str]) -> None:
    """Each knob in ``given`` (not None) is one ``method`` takes; ``offered``: knob -> option of this command."""
    from .methods import METHODS

    spec = METHODS[method]
    for knob, value in given.items():
        if value is None or knob in spec.knobs:
            continue
        option = offered.get(knob, KNOB_OPTIONS.get(knob, f"--{knob.replace('_', '-')}"))
        takes = _options(spec.knobs, offered)
        if takes == "none":
            raise UsageError(option, f"--method {method} has no {knob} knob: it takes none of the attention options")
        raise UsageError(option, f"--method {method} has no {knob} knob; its options are {takes}")


def check_preset(method: str, preset: Optional[str], option: str = "--preset") -> Optional[str]:
    from .methods import METHODS

    if preset is None:
        return None
    presets = sorted(METHODS[method].presets)
    if not presets:
        with_presets = sorted(name for name, spec in METHODS.items() if spec.presets)
        raise UsageError(option, f"--method {method} has no presets (methods with presets: "
                                 f"{', '.join(with_presets)}), got {preset!r}")
    return check_choice(option, preset, presets, what=f"presets of --method {method}")


def knob_error(err: BaseException, options: Mapping[str, str] = KNOB_OPTIONS) -> UsageError:
    """A processor's ``ValueError("block_size must be ...")`` as ``UsageError("--block-size", "must be ...")``.

    The knob's Python name stays in the message (``(knob block_size)``) for users of the Python API."""
    if isinstance(err, UsageError):
        return err
    text = _one_line(err)
    text = re.sub(r"^vidattn:\s*", "", text)
    match = re.match(r"^(\w+)(?: for method '?\w+'?)?\s+(.*)$", text)
    if match and match.group(1) in options:
        knob, rest = match.group(1), match.group(2)
        rest = re.sub(r"\[\]", "none", rest)
        return UsageError(options[knob], f"{rest} (knob {knob})")
    return UsageError(None, text.replace("[]", "none"))


# ---------------------------------------------------------------------------------------------------- models
# family -> (frames step, pixel multiple) when the configs do not say (spec of each diffusers pipeline's __init__)
_FAMILY_FACTORS = {"wan": (4, 16), "hunyuan": (4, 16), "cogvideox": (4, 16), "ltx": (8, 32), "mochi": (6, 16)}


@dataclass(frozen=True)
class ModelSpec:
    """What ``--model`` names, read without loading weights.

    ``kind``: ``"tiny"``, ``"local"`` or ``"hub"``; ``source``: the resolved folder, hub id or built-in preset;
    ``revision``: the hub snapshot's commit (None elsewhere); ``class_name``: the pipeline class in
    ``model_index.json``; ``defaults``: its ``__call__`` defaults of the generation settings; ``factors``:
    ``(frames step, pixel multiple)`` (None when unknown); ``num_layers``: self-attention layers per transformer
    (None when unknown); ``family``: wan, hunyuan, cogvideox, ltx, mochi or None.
    """

    name: str
    kind: str
    source: str
    revision: Optional[str]
    class_name: str
    defaults: dict
    factors: Optional[tuple]
    num_layers: Optional[int]
    family: Optional[str]
    configs: dict = field(default_factory=dict, repr=False, compare=False)

    def describe(self) -> dict:
        return {"name": self.name, "kind": self.kind, "source": self.source, "revision": self.revision,
                "pipeline": self.class_name}


def family_of(class_name: str) -> Optional[str]:
    for prefix, family in (("Wan", "wan"), ("HunyuanVideo", "hunyuan"), ("CogVideoX", "cogvideox"),
                           ("LTX", "ltx"), ("Mochi", "mochi"), ("FreeSwimLTX", "ltx"), ("FreeSwim", "wan")):
        if class_name.startswith(prefix):
            return family
    return None


def pipeline_factors(class_name: str, vae: Optional[dict], transformer: Optional[dict]) -> Optional[tuple]:
    """``(frames step, pixel multiple)`` of a pipeline from its VAE and transformer configs, as the pipeline's
    ``__init__`` derives them (None for families vidattn does not know)."""
    family = family_of(class_name)
    if family is None:
        return None
    vae, transformer = vae or {}, transformer or {}
    temporal, multiple = _FAMILY_FACTORS[family]
    patch = transformer.get("patch_size")
    patch_s = (patch[-1] if isinstance(patch, (list, tuple)) else patch) if patch is not None else None
    if family == "wan":
        temporal = vae.get("scale_factor_temporal", 4)
        spatial = vae.get("scale_factor_spatial", 8)
    elif family == "hunyuan":
        temporal = vae.get("temporal_compression_ratio", 4)
        spatial = vae.get("spatial_compression_ratio", 8)
    elif family == "cogvideox":
        temporal = vae.get("temporal_compression_ratio", 4)
        blocks = vae.get("block_out_channels")
        spatial = 2 ** (len(blocks) - 1) if blocks else 8
    elif family == "ltx":
        temporal = vae.get("temporal_compression_ratio") or 8
        spatial = vae.get("spatial_compression_ratio") or 32
        patch_s = patch_s or 1
    else:  # mochi: fixed in MochiPipeline.__init__
        temporal, spatial = 6, 8
    try:
        return int(temporal), int(spatial) * int(patch_s or 2)
    except (TypeError, ValueError):
        return _FAMILY_FACTORS[family]


def _layers(transformer: Optional[dict]) -> Optional[int]:
    if not transformer:
        return None
    total = sum(int(transformer.get(k) or 0) for k in ("num_layers", "num_single_layers"))
    return total or None


def call_defaults_of(cls: Any) -> Optional[dict]:
    """A pipeline class's ``__call__`` defaults of the generation settings (None unless it is text-to-video)."""
    import inspect

    params = inspect.signature(cls.__call__).parameters
    if any(name not in params for name in CALL_SETTINGS):
        return None
    defaults = {name: params[name].default for name in CALL_SETTINGS}
    return {k: (None if v is inspect.Parameter.empty else v) for k, v in defaults.items()}


def _accepted() -> str:
    return (f"accepted: {', '.join(TINY_MODELS)} (built in), a local diffusers folder with model_index.json, or a "
            "hub id such as Wan-AI/Wan2.1-T2V-1.3B-Diffusers")


def _tiny_spec(name: str) -> ModelSpec:
    from vidattn.pipelines.tiny import _WAN_TRANSFORMERS, TINY_PRESETS

    preset = {"tiny": "toy", "tiny-bench": "bench"}[name]
    return ModelSpec(name=name, kind="tiny", source=f"built-in tiny Wan model, preset {preset!r}", revision=None,
                     class_name="WanPipeline", defaults=dict(TINY_PRESETS[preset]), factors=(4, 16),
                     num_layers=_WAN_TRANSFORMERS[preset]["num_layers"], family="wan")


def _hub_file(repo: str, filename: str) -> str:
    from huggingface_hub import hf_hub_download

    return hf_hub_download(repo, filename)


def _read_json(path: Path, option: str, what: str) -> dict:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UsageError(option, f"cannot read {what} {shown(path)} ({type(err).__name__})") from None
    if not isinstance(data, dict):
        raise UsageError(option, f"{what} {shown(path)} is not a JSON object")
    return data


def _hub_reason(err: BaseException, value: str) -> str:
    from huggingface_hub import errors

    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    if isinstance(err, errors.HFValidationError):
        return "it is not a valid hub id (owner/name) either"
    if isinstance(err, errors.LocalEntryNotFoundError) or offline:
        return (f"as a hub id it is not in the local hub cache and the hub is "
                f"{'offline (HF_HUB_OFFLINE=1)' if offline else 'unreachable'}")
    if isinstance(err, errors.GatedRepoError):
        return "its hub repository is gated: accept its terms and log in (hf auth login)"
    if isinstance(err, errors.RepositoryNotFoundError):
        return "there is no hub repository of that name (or it is private: log in with hf auth login)"
    if isinstance(err, (errors.EntryNotFoundError, errors.RemoteEntryNotFoundError)):
        return "its hub repository has no model_index.json (not a diffusers pipeline)"
    return f"as a hub id it could not be read ({type(err).__name__})"


def check_model(value: Any, option: str = "--model") -> ModelSpec:
    """Resolve ``--model`` without loading weights: the tiny models, a local diffusers folder or a hub id (its
    ``model_index.json`` and ``vae`` / ``transformer`` configs; hub files go through the hub cache and respect
    ``HF_HUB_OFFLINE``).

    One-line UsageError saying what was tried and what is accepted: a misspelt built-in name (with a suggestion),
    a missing folder, a folder without ``model_index.json``, a hub id that is offline / missing / gated, a pipeline
    class this diffusers does not have or that is not text-to-video.
    """
    text = "" if value is None else str(value)
    if text in TINY_MODELS:
        return _tiny_spec(text)
    if not text.strip() or "\x00" in text:
        raise UsageError(option, f"got {text!r} ({_accepted()})")
    path = Path(text).expanduser()
    close = difflib.get_close_matches(text, TINY_MODELS, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    tail = f"{hint} ({_accepted()})"
    revision = None
    try:
        is_dir, exists = path.is_dir(), os.path.lexists(path)
    except OSError as err:
        raise UsageError(option, f"cannot use {shown(text)} ({err.strerror or err}){tail}") from None
    if is_dir:
        index_path = path / "model_index.json"
        if not index_path.is_file():
            raise UsageError(option, f"the folder {shown(text)} has no model_index.json, so it is not a diffusers "
                                     f"pipeline folder ({_accepted()})")
        index = _read_json(index_path, option, "model_index.json")
        kind, source = "local", str(path.resolve())

        def component(sub: str) -> Optional[dict]:
            file = path / sub / "config.json"
            return _read_json(file, option, f"{sub}/config.json") if file.is_file() else None
    elif exists:
        raise UsageError(option, f"{shown(text)} is a file, not a diffusers folder ({_accepted()})")
    else:
        if not re.fullmatch(r"[A-Za-z0-9_][\w.-]*(/[\w.-]+)?", text):  # not owner/name: a path
            raise UsageError(option, f"there is no folder {shown(text)}{tail}")
        try:
            index_file = _hub_file(text, "model_index.json")
        except Exception as err:  # noqa: BLE001 - every hub failure becomes one line
            raise UsageError(option, f"{shown(text)} is not a built-in model nor a folder, and "
                                     f"{_hub_reason(err, text)}{tail}") from None
        index = _read_json(Path(index_file), option, "model_index.json")
        kind, source = "hub", text
        parts = Path(index_file).parts
        revision = parts[-2] if len(parts) >= 2 and re.fullmatch(r"[0-9a-f]{40}", parts[-2]) else None

        def component(sub: str) -> Optional[dict]:
            try:
                return _read_json(Path(_hub_file(text, f"{sub}/config.json")), option, f"{sub}/config.json")
            except UsageError:
                raise
            except Exception:  # noqa: BLE001 - geometry then falls back to the family's defaults
                return None

    class_name = index.get("_class_name")
    if isinstance(class_name, list):  # [module, class] of a custom pipeline
        class_name = class_name[-1]
    if not isinstance(class_name, str) or not class_name:
        raise UsageError(option, f"{shown(text)}: model_index.json names no pipeline class (_class_name)")
    import diffusers

    cls = _pipeline_class(class_name)
    if cls is None:
        raise UsageError(option, f"{shown(text)} is a {class_name}, which diffusers {diffusers.__version__} does "
                                 "not provide")
    defaults = call_defaults_of(cls)
    if defaults is None:
        raise UsageError(option, f"{shown(text)} is a {class_name}, not a text-to-video pipeline vidattn can drive "
                                 "(its __call__ lacks num_frames, height, width, ...)")
    vae = component("vae") if "vae" in index else None
    transformer = component("transformer") if "transformer" in index else None
    return ModelSpec(name=text, kind=kind, source=source, revision=revision, class_name=class_name,
                     defaults=defaults, factors=pipeline_factors(class_name, vae, transformer),
                     num_layers=_layers(transformer), family=family_of(class_name),
                     configs={"model_index": index, "vae": vae, "transformer": transformer})


def _pipeline_class(name: str) -> Any:
    """``diffusers.<name>`` (None when missing), imported with transformers' import-time warnings silenced."""
    import diffusers

    try:
        from transformers.utils import logging as transformers_logging
    except ImportError:  # pragma: no cover
        transformers_logging = None
    level = transformers_logging.get_verbosity() if transformers_logging else None
    if transformers_logging:
        transformers_logging.set_verbosity_error()
    try:
        return getattr(diffusers, name, None)
    except Exception:  # noqa: BLE001 - a pipeline whose optional dependency is missing
        return None
    finally:
        if transformers_logging:
            transformers_logging.set_verbosity(level)


def with_pipeline_class(spec: ModelSpec, cls: Any) -> ModelSpec:
    """``spec`` run through ``cls`` instead of its own class (e.g. ``FreeSwimPipeline``): that class's call
    defaults (the tiny models keep their presets' settings, as ``load_pipeline`` does)."""
    from dataclasses import replace

    if spec.kind == "tiny":
        return spec
    return replace(spec, defaults=call_defaults_of(cls) or spec.defaults)


# ---------------------------------------------------------------------------------------------------- geometry
def resolve_settings(spec: ModelSpec, given: Mapping[str, Any]) -> dict:
    """``frames, height, width, steps, guidance`` from ``given`` (None: the model's default); a UsageError naming
    the option when the model has no default for one."""
    keys = {"frames": "num_frames", "height": "height", "width": "width", "steps": "num_inference_steps",
            "guidance": "guidance_scale"}
    settings = {}
    for name, key in keys.items():
        value = given.get(name)
        if value is None:
            value = spec.defaults.get(key)
            if value is None:
                raise UsageError(SETTING_OPTIONS[key], f"{spec.class_name} ({shown(spec.name)}) has no default "
                                                       f"{key}; pass {SETTING_OPTIONS[key]}")
        settings[name] = value
    return settings


def check_geometry(frames: Any, height: Any, width: Any, factors: Optional[tuple], model: str = "") -> None:
    """Frames ``k * step + 1`` and sizes positive multiples of the pixel multiple (``factors``), naming the
    option; only positivity when the factors are unknown."""
    step, multiple = factors if factors else (1, 1)
    where = f" for {model}" if model else ""
    if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1 or (frames - 1) % step:
        raise UsageError("--frames", f"must be {step}k+1 (e.g. {step * 4 + 1}){where}, got {frames!r}"
                         if step > 1 else f"must be >= 1, got {frames!r}")
    for option, value in (("--height", height), ("--width", width)):
        if isinstance(value, bool) or not isinstance(value, int) or value < multiple or value % multiple:
            raise UsageError(option, f"must be a positive multiple of {multiple}{where}, got {value!r}")


# ---------------------------------------------------------------------------------------------------- warnings
def dense_warnings(knobs: Mapping[str, Any], steps: Optional[int], num_layers: Optional[int],
                   where: str = "") -> list[str]:
    """Why every attention call would run dense under these knobs (warm-up steps covering all steps, dense
    layers covering all layers); empty when some calls run sparse."""
    found = []
    ds, dl, dls = (int(knobs.get(k) or 0) for k in ("dense_steps", "dense_layers", "dense_last_steps"))
    if steps is not None and ds + dls >= steps > 0:
        parts = [f"--dense-steps {ds}"] + ([f"--dense-last-steps {dls}"] if dls else [])
        found.append(f"{' + '.join(parts)} cover all {steps} denoising steps{where}: every attention call runs "
                     "dense (lower them or raise --steps)")
    if num_layers is not None and dl >= num_layers > 0:
        found.append(f"--dense-layers {dl} covers all {num_layers} transformer layers{where}: every attention call "
                     "runs dense (lower --dense-layers)")
    return found
