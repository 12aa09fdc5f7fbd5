"""``vidattn generate`` over many prompts: the batch mode's checks, the run (``vidattn.pipelines.batch``) and the
end summary. Every check runs on every process before any process writes an item."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from vidattn.pipelines.batch import BatchJob
    from vidattn.pipelines.distributed import ProcessInfo

__all__ = ["is_batch", "run_batch"]

_ROW_FIELD = {"--frames": "num_frames", "--height": "height", "--width": "width"}


def is_batch(args: argparse.Namespace) -> bool:
    """A batch: a prompt file, several prompts, several videos per prompt, a comparison or a resumed run."""
    return bool(args.prompts is not None or (args.prompt and len(args.prompt) > 1)
                or args.num_videos_per_prompt != 1 or args.compare or args.resume)


def _check_combination(args: argparse.Namespace) -> str:
    """Options that exclude each other in a batch; returns the output folder's name."""
    from vidattn.validation import UsageError

    if args.prompts is not None and args.prompt:
        raise UsageError("--prompt", "give the prompts with --prompt or with --prompts FILE, not both")
    if args.resume and args.overwrite:
        raise UsageError("--resume", "keeps finished items and --overwrite renders them again; pass one of them")
    if args.compare and args.method == "dense":
        raise UsageError("--compare", "--method dense is the reference itself; choose a sparse --method")
    out = args.out if args.out is not None else f"outputs/{args.method}-batch"
    if Path(str(out)).suffix.lower() == ".mp4":
        raise UsageError("--out", f"a batch writes a folder (one mp4 and sidecar per item), got {out}; give a folder "
                                  "name")
    return out


def _invalid_items(items: list, checked: dict) -> dict:
    """Items whose row sets a frame count or size the model cannot take: index -> why (they fail; the rest run)."""
    from vidattn import validation as v

    settings, spec, bad = checked["settings"], checked["spec"], {}
    for item in items:
        row = item.row
        if row.num_frames is None and row.height is None and row.width is None:
            continue
        try:
            v.check_geometry(row.num_frames or settings["frames"], row.height or settings["height"],
                             row.width or settings["width"], checked["factors"],
                             model=f"{spec.name} ({spec.class_name})")
        except v.UsageError as err:
            bad[item.index] = f"{item.where}, field {_ROW_FIELD.get(err.option, err.option)!r}: {err.message}"
    return bad


def _lora_digest(lora: Optional[str]) -> Optional[str]:
    """:func:`vidattn.pipelines.batch.weights_digest` of ``--lora`` (None without one)."""
    from vidattn.pipelines.batch import weights_digest
    from vidattn.validation import UsageError, shown

    if lora is None:
        return None
    try:
        return weights_digest(lora)
    except OSError as err:
        raise UsageError("--lora", f"cannot read {shown(lora)} ({err.strerror or err})") from None


def _identity(args: argparse.Namespace, checked: dict) -> dict:
    """The run's settings that define every item's video (JSON-normalised, as the sidecar stores them): besides
    the options, what changes the pixels behind them (the model's resolved source and revision, the LoRA
    adapter's content, the device type)."""
    import torch

    from .generate import lora_scale

    spec = checked["spec"]
    identity = {"model": args.model, "model_source": spec.source, "model_revision": spec.revision,
                "method": args.method, "preset": args.preset,
                "knobs": checked["processor"].knobs(), "freeswim": checked["freeswim"],
                "steps": checked["settings"]["steps"], "guidance": checked["settings"]["guidance"],
                "dtype": checked["dtype"], "device_type": torch.device(checked["device"]).type, "fps": args.fps,
                "vae_tiling": bool(args.vae_tiling),
                "lora": str(Path(args.lora).expanduser().resolve()) if args.lora else None,
                "lora_sha256": _lora_digest(args.lora), "lora_scale": lora_scale(args) if args.lora else None}
    return json.loads(json.dumps(identity, default=str))


def _prepare(args: argparse.Namespace):
    """Every check of a batch command line; returns ``(job, process info, items complete already)``."""
    from vidattn import validation as v
    from vidattn.pipelines.batch import BatchJob, check_previous
    from vidattn.pipelines.distributed import process_info, rank_device
    from vidattn.pipelines.prompts import expand_items, read_prompt_file, rows_from_prompts

    from .generate import DEFAULT_PROMPT, _check, _request

    out_name = _check_combination(args)
    rows = (read_prompt_file(args.prompts) if args.prompts is not None
            else rows_from_prompts(args.prompt or [DEFAULT_PROMPT], args.negative_prompt))
    checked = _check(args, batch=True)
    if args.cp is not None:
        from .generate_cp import check_cp

        check_cp(args, checked, batch=True)
    items = expand_items(rows, args.seed, args.num_videos_per_prompt, source=args.prompts)
    try:
        info = process_info()
    except ValueError as err:
        raise v.UsageError(None, str(err)) from None
    device = rank_device(checked["device"], info)
    if device != checked["device"]:
        v.check_device(device)
    identity = _identity(args, checked)
    target = v.check_output_dir(out_name)
    template = _request(args, {**checked, "device": device}, checked["settings"], prompt="")
    job = BatchJob(items=items, out_dir=target.path, template=template, make_processor=checked["make"],
                   identity=identity, method={"method": args.method, "preset": args.preset},
                   freeswim=checked["freeswim"], compare=args.compare, invalid=_invalid_items(items, checked),
                   command=getattr(args, "argv", None), model_spec=checked["spec"], warnings=checked["warnings"],
                   cp=args.cp, created=list(target.created))
    try:
        done = check_previous(job, args.resume, args.overwrite)
    except v.UsageError:
        target.discard()
        raise
    return job, info, done


def _print_summary(job, rows: list) -> None:
    from vidattn.pipelines.batch import MANIFEST
    from vidattn.pipelines.report import REPORT, summary, summary_table

    print(summary_table(rows, job.compare))
    s = summary(rows)
    print(f"manifest  {job.out_dir / MANIFEST}")
    print(f"report    {job.out_dir / REPORT}")
    if s.get("speedup") is not None:
        print(f"speedup   {s['speedup']:.2f}x over {job.compare}, total time ratio ({s['dense_generate_s']:.1f} s -> "
              f"{s['generate_s']:.1f} s); mean of items {s['mean_speedup']:.2f}x")
    print(f"done      {s['ok']} of {s['items']} items")


def _run(job: BatchJob, info: ProcessInfo, resume: bool) -> Optional[list[dict]]:
    """``vidattn.pipelines.batch.run_batch``; with ``--cp`` inside the process group context parallelism needs
    (set up here, torn down after)."""
    from vidattn.pipelines import batch

    if job.cp is None:  # (--cp checked that the world is a multiple of N >= 2: several processes)
        return batch.run_batch(job, info, resume=resume)
    import torch.distributed as dist

    from vidattn.pipelines.distributed import BARRIER_TIMEOUT

    from .generate_cp import init_group

    init_group(info.rank, info.world, job.template.device, timeout=BARRIER_TIMEOUT)
    try:
        return batch.run_batch(job, info, resume=resume)
    finally:
        dist.destroy_process_group()


def run_batch(args: argparse.Namespace) -> int:
    """The batch mode of ``vidattn generate``: 0 when every item rendered, 1 when some failed (listed last)."""
    import sys

    from vidattn.validation import warn

    from .generate import COMMAND

    job, info, done = _prepare(args)
    if info.rank == 0:
        for message in job.warnings:
            warn(COMMAND, message)
        for index, why in sorted(job.invalid.items()):
            warn(COMMAND, f"item {job.items[index].name} will not render: {why}")
        cp = f" in context-parallel groups of {args.cp.split(':')[1]} ({args.cp})" if args.cp else ""
        print(f"batch     {len(job.items)} items ({done} complete already), {info.world} process"
              f"{'es' if info.world > 1 else ''}{cp}, into {job.out_dir}")
    rows = _run(job, info, args.resume)
    if rows is None:  # not rank 0: rank 0 reports for all
        return 0
    _print_summary(job, rows)
    failed = [r for r in rows if r["status"] != "ok"]
    if failed:
        print(f"vidattn {COMMAND}: {len(failed)} of {len(rows)} items failed:", file=sys.stderr)
        for r in failed:
            print(f"  {r['name']} ({r['status']}): {r.get('error', '')}", file=sys.stderr)
        return 1
    return 0
