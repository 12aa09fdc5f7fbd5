"""Batch generation: many prompts into one folder, one pipeline per process, resumable, optionally compared
against dense attention, sharded across the processes of a ``torchrun`` / ``accelerate launch`` run.

Per item the folder holds ``<name>.mp4`` and ``<name>.json`` (the sidecar, written last: settings, seed, versions,
timings, attention statistics, the video's SHA-256), with ``--compare dense`` also ``dense/<name>.mp4``. An item is
complete when its sidecar reads back, was made with the same settings and its videos match their recorded hashes;
``--resume`` skips complete items and renders the rest again. Files are written under temporary names and renamed,
so a killed run never leaves a truncated video that looks finished. Rank 0 writes ``manifest.jsonl`` (one line per
item, then a summary line), ``report.md`` and ``contact_sheet.png`` once every process is done.

With context parallelism (``job.cp``, ``"ulysses:N"`` / ``"ring:N"``) consecutive ranks form groups of N
(``distributed.item_share``), the items are sharded across the groups, and every rank of a group renders each of the
group's items in lockstep (diffusers' collectives pair them up); only the group's first rank writes videos, sidecars
and its rank file. Every rank reads the folder (``--resume``) before any rank writes, so a group decides alike.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import math
import re
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from vidattn.validation import UsageError, shown

from .distributed import ItemShare, ProcessInfo, item_share, process_group, shard_items
from .prompts import BatchItem

__all__ = ["BatchJob", "ItemPaths", "MANIFEST", "check_previous", "item_identity", "item_paths", "item_request",
           "item_state", "run_batch", "temp_files", "weights_digest"]

MANIFEST = "manifest.jsonl"
DENSE_DIR = "dense"
_RANK_FILE = ".vidattn-rank-{rank}-of-{world}.json"


@dataclass
class BatchJob:
    """Everything a batch run needs besides the pipeline.

    ``template``: the request every item starts from (resolved frames, size, steps and guidance; the item sets
    prompt, seed and its row's values); ``identity``: the run's settings that define its videos (model, method and
    knobs, LoRA, dtype, ...), recorded in each sidecar and compared on ``--resume``; ``invalid``: items that cannot
    render (item index -> reason, found before the run); ``make_processor``: a fresh processor for ``"method"`` or
    ``"dense"``; ``cp``: ``"ulysses:N"`` / ``"ring:N"`` to render each item with context parallelism over groups of
    N processes; ``created``: the folders this run created for ``out_dir`` (deepest first), removed again when the
    run stops before writing anything (a LoRA file the pipeline refuses).
    """

    items: list[BatchItem]
    out_dir: Path
    template: Any
    make_processor: Callable[[str], Any]
    identity: dict
    method: dict
    freeswim: Optional[dict] = None
    compare: Optional[str] = None
    invalid: dict = field(default_factory=dict)
    command: Optional[Sequence[str]] = None
    model_spec: Any = None
    warnings: Sequence[str] = ()
    cp: Optional[str] = None
    created: list = field(default_factory=list)


@dataclass(frozen=True)
class ItemPaths:
    video: Path
    sidecar: Path
    dense: Path


def item_paths(out_dir: Path, name: str) -> ItemPaths:
    return ItemPaths(out_dir / f"{name}.mp4", out_dir / f"{name}.json", out_dir / DENSE_DIR / f"{name}.mp4")


def item_request(template: Any, item: BatchItem) -> Any:
    """The item's ``GenerationRequest``: the template with the item's prompt and seed and its row's overrides."""
    row = item.row
    return replace(template, prompt=row.prompt, seed=item.seed,
                   negative_prompt=template.negative_prompt if row.negative_prompt is None else row.negative_prompt,
                   frames=row.num_frames or template.frames, height=row.height or template.height,
                   width=row.width or template.width)


def item_identity(job: BatchJob, item: BatchItem) -> dict:
    """The settings that define the item's videos (what ``--resume`` compares)."""
    req = item_request(job.template, item)
    return {**job.identity, "prompt": req.prompt, "negative_prompt": req.negative_prompt, "seed": req.seed,
            "frames": req.frames, "height": req.height, "width": req.width, "compare": job.compare}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def weights_digest(path: str | Path) -> str:
    """The SHA-256 of a weights file, or for a folder of the names and SHA-256s of the weights files in it (what
    ``--resume`` compares for ``--lora``: the adapter's content, not its name)."""
    from vidattn.validation import LORA_SUFFIXES

    path = Path(path).expanduser()
    if path.is_file():
        return _sha256(path)
    digest = hashlib.sha256()
    for weights in sorted(p for p in path.iterdir() if p.suffix in LORA_SUFFIXES and p.is_file()):
        digest.update(f"{weights.name}\0{_sha256(weights)}\n".encode())
    return digest.hexdigest()


def _read_json(path: Path) -> Optional[dict]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def item_state(out_dir: Path, name: str, identity: dict) -> tuple[str, list[str]]:
    """``("complete", [])``, ``("absent", [])``, ``("partial", [])`` (files missing, truncated or unreadable) or
    ``("other", fields)``: complete, but made with other settings (the differing fields)."""
    paths = item_paths(out_dir, name)
    if not any(p.exists() for p in (paths.video, paths.sidecar, paths.dense)):
        return "absent", []
    meta = _read_json(paths.sidecar)
    batch = (meta or {}).get("batch")
    if not isinstance(batch, dict) or not paths.video.is_file():
        return "partial", []
    videos = [(paths.video, batch.get("video_sha256"))]
    if identity.get("compare"):
        videos.append((paths.dense, (meta.get("compare") or {}).get("dense_sha256")))
    for path, digest in videos:
        if not path.is_file() or _sha256(path) != digest:
            return "partial", []
    recorded = batch.get("identity") or {}
    differ = sorted(k for k in set(recorded) | set(identity) if recorded.get(k) != identity.get(k))
    return ("other", differ) if differ else ("complete", [])


def check_previous(job: BatchJob, resume: bool, overwrite: bool) -> int:
    """Before any work: refuse a folder holding an earlier run unless ``resume`` or ``overwrite``, and (resume) a
    complete item made with other settings. Returns how many items are complete already."""
    out = job.out_dir
    if not out.is_dir():
        return 0
    complete = 0
    earlier = (out / MANIFEST).exists()
    for item in job.items:
        state, differ = item_state(out, item.name, item_identity(job, item))
        earlier = earlier or state != "absent"
        if state == "other" and not overwrite:
            raise UsageError("--resume" if resume else "--out",
                             f"{shown(out / item.name)}.mp4 was rendered with other settings ({', '.join(differ)}); "
                             "give another --out, or --overwrite to render every item again")
        complete += state == "complete"
    if earlier and not (resume or overwrite):
        raise UsageError("--out", f"{shown(out)} holds an earlier run ({complete} of {len(job.items)} items "
                                  "complete); pass --resume to finish it or --overwrite to render every item again")
    return complete if resume else 0


def temp_files(folder: Path, name: str) -> list[Path]:
    """The temporary files ``video_io.atomic_write`` leaves for ``<name>.mp4`` / ``<name>.json`` in ``folder``
    when killed: exactly ``.<name>.<mkstemp's random part>.tmp.<mp4|json>`` (the random part has no dot, so item
    ``a`` never claims item ``a.b``'s files)."""
    pattern = re.compile(rf"\.{re.escape(name)}\.[A-Za-z0-9_]+\.tmp\.(?:mp4|json)")
    if not folder.is_dir():
        return []
    return [p for p in folder.iterdir() if pattern.fullmatch(p.name)]


def _clear(out_dir: Path, name: str) -> None:
    """Remove an item's files (sidecar first) and temporary files a killed run left."""
    paths = item_paths(out_dir, name)
    for path in (paths.sidecar, paths.video, paths.dense):
        path.unlink(missing_ok=True)
    for folder in (out_dir, out_dir / DENSE_DIR):
        for stale in temp_files(folder, name):
            stale.unlink(missing_ok=True)


def _discard_created(job: BatchJob) -> None:
    """Remove the folders this run created for ``job.out_dir`` where nothing was written into them."""
    for folder in job.created:
        try:
            folder.rmdir()
        except OSError:
            pass


@dataclass
class _Rendered:
    """One item rendered (and its dense reference with ``--compare``), not yet written."""

    request: Any
    processor: Any
    video: Any
    dense: Any
    started: datetime.datetime


def _warm_up(job: BatchJob, loaded: Any, item: BatchItem) -> None:
    """One untimed single-step render per attention kind before the first timed item, so that one-time costs (the
    CPU extension's load, Triton's compilation and autotuning) do not bias the first item's speedup; a failure is
    left for the item itself to report."""
    import dataclasses

    from . import generate as gen

    request = dataclasses.replace(item_request(job.template, item), steps=1)
    try:
        gen.render(loaded, request, job.make_processor("method"), job.freeswim)
        gen.render(loaded, request, job.make_processor("dense"), None)
    except Exception:  # noqa: BLE001 - the timed render reports it
        _free_memory(loaded.device)


def _render_item(job: BatchJob, loaded: Any, item: BatchItem) -> _Rendered:
    """Render one item with the method (and dense with ``--compare``); every rank of a CP group runs this."""
    from . import generate as gen

    request = item_request(job.template, item)
    started = datetime.datetime.now(datetime.timezone.utc)
    processor = job.make_processor("method")
    rendered = gen.render(loaded, request, processor, job.freeswim)
    dense = gen.render(loaded, request, job.make_processor("dense"), None) if job.compare else None
    return _Rendered(request, processor, rendered, dense, started)


def _write_item(job: BatchJob, loaded: Any, item: BatchItem, info: ProcessInfo, done: _Rendered) -> dict:
    """Write the item's videos, then its sidecar (last); returns the sidecar."""
    from . import generate as gen
    from .video_io import write_sidecar, write_video

    paths, request = item_paths(job.out_dir, item.name), done.request
    t0 = time.perf_counter()
    write_video(done.video.frames, paths.video, fps=request.fps, overwrite=True)
    sidecar = gen.describe_run(loaded, request, done.processor, done.video, video=paths.video, sidecar=paths.sidecar,
                               started=done.started, method=job.method, command=job.command,
                               model_spec=job.model_spec, warnings=job.warnings)
    sidecar["timings"]["write_s"] = round(time.perf_counter() - t0, 3)
    sidecar["batch"] = {"index": item.index, "name": item.name, "line": item.row.line, "copy": item.copy,
                        "rank": info.rank, "world": info.world, "identity": item_identity(job, item),
                        "video_sha256": _sha256(paths.video)}
    if job.cp:
        sidecar["context_parallel"] = {"cp": job.cp, "processes": _cp_degree(job)}
    if done.dense is not None:
        write_video(done.dense.frames, paths.dense, fps=request.fps, overwrite=True)
        _add_comparison(job, sidecar, paths, done.dense)
    write_sidecar(paths.sidecar, sidecar, overwrite=True)
    return sidecar


def _add_comparison(job: BatchJob, sidecar: dict, paths: ItemPaths, dense: Any) -> None:
    """The ``--compare`` fields of the sidecar: the dense video's hash and timing, PSNR, SSIM."""
    from vidattn.video_metrics import psnr

    from .video_io import read_video

    t1 = time.perf_counter()
    ours, ref = read_video(paths.video), read_video(paths.dense)
    sparse_s, dense_s = sidecar["timings"]["generate_s"], round(dense.generate_s, 3)
    sidecar["compare"] = {
        "against": job.compare, "dense_video": str(paths.dense), "dense_sha256": _sha256(paths.dense),
        "dense_generate_s": dense_s, "speedup": round(dense_s / sparse_s, 4) if sparse_s > 0 else None,
        "psnr_db": _finite(psnr(ours, ref)), "ssim": _video_ssim(ours, ref),
        "identical": bool((ours == ref).all()),
        "dense_attention": dense.stats,
        # FreeSwim's reference is the paper's direct baseline: one dense generation straight at the target size
        "reference": "direct dense generation at the target size" if job.freeswim is not None
        else "the same pipeline with dense attention"}
    sidecar["timings"]["compare_s"] = round(dense.generate_s, 3)
    sidecar["timings"]["metrics_s"] = round(time.perf_counter() - t1, 3)


def _cp_degree(job: BatchJob) -> int:
    """The context-parallel degree N of ``job.cp`` (1 without context parallelism)."""
    from vidattn.parallel import parse_cp

    return parse_cp(job.cp)[1] if job.cp else 1


def _video_ssim(a: Any, b: Any, chunk: int = 8) -> float:
    """``vidattn.video_metrics.ssim`` of two videos, computed ``chunk`` frames at a time (the mean over frames is
    the same; the float64 intermediates of a long high-resolution video would not fit in memory at once)."""
    from vidattn.video_metrics import ssim

    return sum(ssim(a[s:s + chunk], b[s:s + chunk]) * len(a[s:s + chunk]) for s in range(0, len(a), chunk)) / len(a)


def _finite(value: float) -> Optional[float]:
    """JSON has no infinity: identical videos (PSNR inf) are recorded as None next to ``identical: true``."""
    return value if math.isfinite(value) else None


def _plan_shard(job: BatchJob, shard: list[BatchItem], resume: bool) -> tuple[dict, list[BatchItem]]:
    """Read-only: the outcome so far (``{"rendered": [], "skipped": [...], "failed": {index: why}}``) and the items
    left to render. Every rank of a CP group reads the same files, so they decide alike."""
    done: dict = {"rendered": [], "skipped": [], "failed": {}}
    todo = []
    for item in shard:
        if item.index in job.invalid:
            done["failed"][item.index] = job.invalid[item.index]
        elif resume and item_state(job.out_dir, item.name, item_identity(job, item))[0] == "complete":
            done["skipped"].append(item.index)
        else:
            todo.append(item)
    return done, todo


def _open(job: BatchJob, info: ProcessInfo) -> Any:
    """The pipeline of this process, with context parallelism over its group when ``job.cp``."""
    from . import generate as gen

    loaded = gen.open_pipeline(job.template, freeswim=job.freeswim is not None, model_spec=job.model_spec)
    if job.cp:
        from vidattn.parallel import enable_context_parallel

        enable_context_parallel(loaded.pipe, job.cp)
    loaded.pipe.set_progress_bar_config(leave=False, desc="steps", disable=info.rank != 0)
    return loaded


def _run_shard(job: BatchJob, done: dict, todo: list[BatchItem], info: ProcessInfo, share: ItemShare) -> dict:
    """Render ``todo`` (every rank of a CP group, in lockstep) and, on the group's writer, write each item; adds the
    outcome to ``done``. With ``job.cp`` every rank opens the pipeline, even with nothing to render: enabling
    context parallelism builds the CP groups' meshes, a collective over all processes."""
    from tqdm.auto import tqdm

    if not todo and not job.cp:
        return done
    loaded = _open(job, info)
    if job.compare and todo:
        _warm_up(job, loaded, todo[0])
    bar = tqdm(todo, desc=f"rank {info.rank}" if info.distributed else "videos", unit="video",
               position=share.group if info.distributed else None, disable=not share.writer)
    for item in bar:
        bar.set_postfix_str(item.name, refresh=False)
        if share.writer:
            _clear(job.out_dir, item.name)
        try:
            rendered = _render_item(job, loaded, item)
            if share.writer:
                _write_item(job, loaded, item, info, rendered)
        except Exception as err:  # noqa: BLE001 - one item failing (out of memory, a bad row) ends only that item
            why = f"{type(err).__name__}: {' '.join(str(err).split())}"
            done["failed"][item.index] = why
            if share.writer:
                bar.write(f"vidattn generate: item {item.name} ({item.where}) failed: {why}", file=sys.stderr)
                _clear(job.out_dir, item.name)
            _free_memory(loaded.device)
        else:
            done["rendered"].append(item.index)
    bar.close()
    return done


def _free_memory(device: str) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def _manifest_rows(job: BatchJob, outcomes: Sequence[dict]) -> list[dict]:
    """One row per item, from its sidecar (complete) or the processes' failure records."""
    failed, rendered = {}, set()
    for outcome in outcomes:
        failed.update({int(k): v for k, v in outcome["failed"].items()})
        rendered.update(outcome["rendered"])
    rows = []
    for item in job.items:
        paths = item_paths(job.out_dir, item.name)
        row = {"kind": "item", "index": item.index, "name": item.name, "prompt": item.row.prompt, "seed": item.seed,
               "line": item.row.line}
        meta = _read_json(paths.sidecar) if item.index not in failed else None
        if item.index in failed:
            row.update(status="failed", error=failed[item.index])
        elif meta is None or "batch" not in meta:
            row.update(status="missing", error="not rendered (a process stopped before it)")
        else:
            attention, compare = meta["attention"], meta.get("compare") or {}
            row.update(status="ok", rendered="this run" if item.index in rendered else "earlier run",
                       video=paths.video.name, sidecar=paths.sidecar.name, rank=meta["batch"]["rank"],
                       generate_s=meta["timings"]["generate_s"], attention_s=meta["timings"]["attention_s"],
                       density=attention.get("computed_fraction"))
            if compare:
                row.update(dense_video=f"{DENSE_DIR}/{paths.dense.name}", dense_generate_s=compare["dense_generate_s"],
                           speedup=compare["speedup"], psnr_db=compare["psnr_db"], ssim=compare["ssim"],
                           identical=compare["identical"])
        rows.append(row)
    return rows


def _finish(job: BatchJob, outcomes: Sequence[dict]) -> list[dict]:
    """Rank 0, after every process: the manifest, the report and the contact sheet."""
    from .report import summary, write_report
    from .video_io import atomic_write

    rows = _manifest_rows(job, outcomes)
    lines = [*rows, {"kind": "summary", **summary(rows)}]
    text = "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines)
    atomic_write(job.out_dir / MANIFEST, True, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    write_report(job.out_dir, rows, job.compare, command=job.command, method=job.method)
    return rows


def run_batch(job: BatchJob, info: ProcessInfo, *, resume: bool = False) -> Optional[list[dict]]:
    """Render this process's share of ``job.items`` (its CP group's with ``job.cp``); rank 0 then waits for the
    others and writes the manifest and report. Returns the manifest rows on rank 0, None elsewhere."""
    from .video_io import atomic_write

    degree = _cp_degree(job)
    share = item_share(info, degree)
    job.out_dir.mkdir(parents=True, exist_ok=True)
    with process_group(info) as dist:
        if dist is not None:  # every process has checked the folder before any writes into it
            dist.barrier()
        done, todo = _plan_shard(job, shard_items(job.items, share.group, share.groups), resume)
        if dist is not None and job.cp:  # every rank of a group has read the item states before its writer writes
            dist.barrier()
        try:
            outcome = _run_shard(job, done, todo, info, share)
        except BaseException:  # opening the pipeline failed (a LoRA it refuses: UsageError): leave no empty folder
            _discard_created(job)
            raise
        if share.writer:
            text = json.dumps(outcome)
            rank_file = job.out_dir / _RANK_FILE.format(rank=info.rank, world=info.world)
            atomic_write(rank_file, True, lambda tmp: tmp.write_text(text, encoding="utf-8"))
        if dist is not None:
            dist.barrier()
        if info.rank != 0:
            return None
        files = [job.out_dir / _RANK_FILE.format(rank=r, world=info.world) for r in range(0, info.world, degree)]
        outcomes = [_read_json(f) or {"rendered": [], "skipped": [], "failed": {}} for f in files]
        rows = _finish(job, outcomes)
        for f in job.out_dir.glob(_RANK_FILE.format(rank="*", world="*")):  # also those of killed runs
            f.unlink(missing_ok=True)
        return rows
