"""``vidattn generate --cp ulysses:N|ring:N``: one video with diffusers' context parallelism over the N processes of
a ``torchrun`` / ``accelerate launch`` run (gloo on CPU, NCCL on CUDA). Every process loads the pipeline and takes
part in every step (``vidattn.parallel.enable_context_parallel``); rank 0 writes the video and its sidecar. A batch
with ``--cp`` (``vidattn.pipelines.batch``) reuses the checks and the process group set up here."""
from __future__ import annotations

import argparse
import datetime
from typing import Any, Optional

__all__ = ["check_cp", "init_group", "main_cp", "run_cp"]

OPTION = "--cp"


def _transformer_class(spec: Any) -> Optional[type]:
    import diffusers

    name = (spec.configs.get("transformer") or {}).get("_class_name")
    if name is None and spec.kind == "tiny":
        name = "WanTransformer3DModel"
    return getattr(diffusers, name, None) if name else None


def check_cp(args: argparse.Namespace, checked: dict, batch: bool = False) -> tuple[str, int]:
    """``--cp``'s value, the launch and the model, before any model is loaded: UsageError naming ``--cp``. One
    video needs exactly N processes; a ``batch`` a multiple of N (consecutive ranks form CP groups)."""
    from vidattn.validation import UsageError

    try:
        return _check_cp(args, checked, batch)
    except UsageError:
        if "out" in checked:
            checked["out"].discard()  # the folders the output check created
        raise


def _check_launch(args: argparse.Namespace, batch: bool) -> tuple[str, int]:
    from vidattn.parallel import parse_cp
    from vidattn.pipelines.distributed import process_info
    from vidattn.validation import UsageError

    try:
        kind, n = parse_cp(args.cp)
        info = process_info()
    except ValueError as err:
        raise UsageError(OPTION, str(err)) from None
    if batch and info.world % n:
        raise UsageError(OPTION, f"{args.cp} splits the processes into groups of {n}; this run has {info.world}, "
                                 f"not a multiple of {n} (torchrun --nproc_per_node {n}, {2 * n}, ...)")
    if not batch and info.world != n:
        raise UsageError(OPTION, f"{args.cp} needs {n} processes (torchrun --nproc_per_node {n} -m vidattn generate "
                                 f"...); this run has {info.world}")
    return kind, n


def _check_cp(args: argparse.Namespace, checked: dict, batch: bool) -> tuple[str, int]:
    from vidattn.parallel import model_cp_plan
    from vidattn.validation import UsageError

    kind, n = _check_launch(args, batch)
    cls = _transformer_class(checked["spec"])
    if cls is not None and model_cp_plan(cls) is None:
        raise UsageError(OPTION, f"{cls.__name__} has no context-parallel plan in diffusers or vidattn; --cp runs on "
                                 "Wan and HunyuanVideo")
    heads = (checked["spec"].configs.get("transformer") or {}).get("num_attention_heads")
    if kind == "ulysses" and heads and heads % n:
        raise UsageError(OPTION, f"ulysses:{n} splits the {heads} attention heads of the model; choose N dividing "
                                 f"{heads}")
    processor = checked["processor"]
    if kind == "ring" and processor.uses_pattern and not processor.static_pattern:
        raise UsageError(OPTION, f"--method {args.method} selects its blocks from the whole sequence per call and "
                                 f"cannot run under ring attention; use ulysses:{n}")
    _check_tokens(checked, kind, n)
    return kind, n


def _check_tokens(checked: dict, kind: str, n: int) -> None:
    """The token count splits into ``n`` equal shards (of whole blocks for ring). Tokens per frame: the size over the
    pixel multiple (VAE factor x patch); FreeSwim's two sizes are checked when they run."""
    from vidattn.validation import UsageError

    settings, factors = checked["settings"], checked["factors"]
    if factors is None or checked["freeswim"] is not None:
        return
    frames = (settings["frames"] - 1) // factors[0] + 1
    tokens = frames * (settings["height"] // factors[1]) * (settings["width"] // factors[1])
    if tokens % n:
        raise UsageError(OPTION, f"{tokens} video tokens ({frames} latent frames) do not split into {n} equal "
                                 "shards; change --frames, --height or --width")
    block = getattr(checked["processor"], "block_size", None)
    if kind == "ring" and block and (tokens // n) % block:
        raise UsageError(OPTION, f"ring:{n} needs shards of whole blocks: {tokens // n} tokens per rank is not a "
                                 f"multiple of --block-size {block}")


def init_group(rank: int, world: int, device: str, timeout: Optional[datetime.timedelta] = None) -> None:
    """The process group context parallelism needs: gloo on CPU, ``cpu:gloo,cuda:nccl`` on CUDA (a batch's
    ``process_group`` then reuses it; ``timeout``: how long a collective may wait, torch's default if None)."""
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return
    if torch.device(device).type == "cuda":
        torch.cuda.set_device(torch.device(device))
        backend = "cpu:gloo,cuda:nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend, rank=rank, world_size=world, **({"timeout": timeout} if timeout else {}))


def run_cp(args: argparse.Namespace, checked: dict, prompt: str) -> Optional[dict]:
    """Render the video on every process; rank 0 writes it and returns the sidecar dict (None elsewhere)."""
    import torch.distributed as dist

    from vidattn.parallel import enable_context_parallel
    from vidattn.pipelines.distributed import process_info, rank_device
    from vidattn.pipelines.generate import describe_run, open_pipeline, render
    from vidattn.pipelines.video_io import write_sidecar, write_video

    from .generate import _request

    info = process_info()
    device = rank_device(checked["device"], info)
    init_group(info.rank, info.world, device)
    try:
        started = datetime.datetime.now(datetime.timezone.utc)
        request = _request(args, {**checked, "device": device}, checked["given"], prompt)
        loaded = open_pipeline(request, freeswim=checked["freeswim"] is not None, model_spec=checked["spec"])
        enable_context_parallel(loaded.pipe, args.cp)
        loaded.pipe.set_progress_bar_config(disable=info.rank != 0)  # one bar: every rank runs the same steps
        rendered = render(loaded, request, checked["processor"], checked["freeswim"])
        sidecar = None
        if info.rank == 0:
            out = checked["out"].path
            video = write_video(rendered.frames, out, fps=request.fps, overwrite=args.overwrite)
            sidecar = describe_run(loaded, request, checked["processor"], rendered, video=video,
                                   sidecar=out.with_suffix(".json"), started=started,
                                   method={"method": args.method, "preset": args.preset},
                                   command=getattr(args, "argv", None), model_spec=checked["spec"],
                                   warnings=checked["warnings"])
            sidecar["context_parallel"] = {"cp": args.cp, "processes": info.world}
            write_sidecar(out.with_suffix(".json"), sidecar, overwrite=args.overwrite)
        dist.barrier()
        return sidecar
    finally:
        dist.destroy_process_group()


def main_cp(args: argparse.Namespace, checked: dict, prompt: str) -> int:
    """The ``--cp`` run of ``vidattn generate``: exit code 0, 2 for an error of the request (one line on stderr)."""
    from vidattn.validation import report

    from .generate import COMMAND, _print_result

    ok = False
    try:
        result = run_cp(args, checked, prompt)
        ok = True
    except ValueError as err:  # a check the model or the parallel engine makes (token count, block alignment)
        return report(COMMAND, err)
    finally:
        if not ok:
            checked["out"].discard()
    if result is not None:
        _print_result(args, result)
    return 0
