"""Pure-torch block-sparse attention (the CPU path, and the autograd path wherever Triton is unavailable).

Inference (no grad) computes dense rectangles of the pattern (query rows x a contiguous key run, views of q, k, v,
no copy) with the fused CPU flash kernel (``torch._scaled_dot_product_flash_attention_for_cpu``; plain math
elsewhere), which also returns the log-sum-exp, so a query row's partial results merge exactly:

    lse = log sum_r exp(lse_r),    out = sum_r exp(lse_r - lse) * out_r

On CPU with the C++ extension (``cpu_ext``) the rectangles come from ``cpu_plan`` (tall ones where the pattern
allows: the kernel runs them faster) and the call-and-merge loop runs in C++ on all intra-op threads. Without it,
the same loop runs in Python over one call per query block and key run, on worker threads (the kernel releases the
GIL). Partial blocks of a window predicate (``predicates.window_tables``) are masked inside the extension and run on
its workers with the full rectangles; other partial blocks (token predicate) and per-sample key lengths become an
additive ``-inf`` mask built in Python on the calls that need one.

Training (grad enabled): on CPU in fp32/fp16/bf16 ``cpu_autograd`` runs the same calls forward and their fused flash
backward per call (exact, five matmuls per rectangle). Elsewhere (other devices, fp64, or a differentiable
log-sum-exp asked for) each query block gathers its keys (``index_select``) and calls SDPA with a boolean mask once;
autograd flows through SDPA.
"""
from __future__ import annotations

import threading
from typing import Any, Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F

from .cpu_ext import cpu_extension
from .cpu_plan import plan_rects, rect_cost
from .pattern import BlockPattern
from .predicates import window_tables

__all__ = ["torch_sparse_attention", "plan_runs"]

Run = tuple[int, int, bool]  # (first key token, end key token, needs the predicate)

# The CPU flash kernel with its log-sum-exp. The ``torch.`` binding releases the GIL during the call (the
# ``torch.ops.aten`` route does not fully), which the worker threads below depend on.
_CPU_FLASH = getattr(torch, "_scaled_dot_product_flash_attention_for_cpu",
                     torch.ops.aten._scaled_dot_product_flash_attention_for_cpu)


def plan_runs(pattern: BlockPattern) -> list[list[tuple[int, int, tuple[Run, ...]]]]:
    """Per group: a list of ``(q_start, q_end, runs)`` where consecutive query blocks with equal runs are merged.

    Runs are maximal sequences of consecutive listed key blocks with the same partial flag, in key tokens (the
    last one clipped to ``kv_len``). Memoised on the pattern.
    """
    return pattern.memo(("runs",), lambda: _build_runs(pattern))


def _build_runs(pattern: BlockPattern) -> list[list[tuple[int, int, tuple[Run, ...]]]]:
    bp, hp = pattern.groups
    indptr = pattern.indptr.reshape(bp * hp, -1).tolist()
    indices = pattern.indices.reshape(bp * hp, -1).tolist()
    partial = None if pattern.partial is None else pattern.partial.reshape(bp * hp, -1).tolist()
    bq, bk = pattern.block_q, pattern.block_kv
    plans = []
    for g in range(bp * hp):
        rows: list[tuple[int, int, tuple[Run, ...]]] = []
        ptr, idx = indptr[g], indices[g]
        for r in range(pattern.num_q_blocks):
            runs: list[list] = []
            for e in range(ptr[r], ptr[r + 1]):
                blk = idx[e]
                part = bool(partial[g][e]) if partial is not None else False
                if runs and runs[-1][1] == blk * bk and runs[-1][2] == part:
                    runs[-1][1] = min((blk + 1) * bk, pattern.kv_len)
                else:
                    runs.append([blk * bk, min((blk + 1) * bk, pattern.kv_len), part])
            run_t = tuple((a, b, p) for a, b, p in runs)
            q0, q1 = r * bq, min((r + 1) * bq, pattern.q_len)
            if rows and rows[-1][2] == run_t and rows[-1][1] == q0:
                rows[-1] = (rows[-1][0], q1, run_t)
            else:
                rows.append((q0, q1, run_t))
        plans.append(rows)
    return plans


def _run_mask(pattern: BlockPattern, q0: int, q1: int, k0: int, k1: int, part: bool,
              sample: slice) -> Optional[torch.Tensor]:
    """Boolean keep-mask ``(b|1, 1, q, k)`` for one run, or None when every pair of the run is kept."""
    mask = None
    dev = pattern.device
    if part:
        qi = torch.arange(q0, q1, device=dev)[:, None]
        ki = torch.arange(k0, k1, device=dev)[None, :]
        mask = pattern.predicate(qi, ki)[None, None]
    if pattern.kv_lens is not None:
        lens = pattern.kv_lens[sample]
        if int(lens.min()) < k1:
            ki = torch.arange(k0, k1, device=dev)
            kv_ok = (ki[None, :] < lens[:, None])[:, None, None, :]
            mask = kv_ok if mask is None else mask & kv_ok
    return mask


def _group_slices(pattern: BlockPattern, b: int, h: int):
    bp, hp = pattern.groups
    for gb in range(bp):
        bs = slice(None) if bp == 1 else slice(gb, gb + 1)
        for gh in range(hp):
            hs = slice(None) if hp == 1 else slice(gh, gh + 1)
            yield gb * hp + gh, bs, hs


def _flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor], scale: float):
    """Attention of one query chunk on one key run: ``(out, lse)``, lse in fp32 (fp64 for fp64 inputs)."""
    has_key = None if mask is None else mask.any(-1)
    add = _additive_mask(mask, q, k)
    if q.device.type == "cpu":
        out, lse = _CPU_FLASH(q, k, v, attn_mask=add, scale=scale)
    else:
        scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
        if add is not None:
            scores = scores + add.float()
        lse = scores.logsumexp(-1)
        out = torch.matmul(torch.softmax(scores, -1).nan_to_num(0.0).to(v.dtype), v)
    if has_key is not None:
        lse = lse.masked_fill(~has_key.expand_as(lse), float("-inf"))
        out = out.masked_fill(~has_key.expand_as(lse)[..., None], 0.0)
    return out, lse.to(_merge_dtype(q.dtype))


def _additive_mask(mask: Optional[torch.Tensor], q: torch.Tensor, k: torch.Tensor) -> Optional[torch.Tensor]:
    """A boolean keep-mask ``(b|1, 1, q, k)`` as the flash kernels' additive mask (0 / -inf in q's dtype), expanded
    to q's batch."""
    if mask is None:
        return None
    add = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, float("-inf"))
    return add.expand(q.shape[0], 1, q.shape[2], k.shape[2]) if add.shape[0] == 1 and q.shape[0] > 1 else add


def _merge_dtype(dtype: torch.dtype) -> torch.dtype:
    """Precision of the log-sum-exp merge: fp32, or the input's if wider."""
    return torch.promote_types(dtype, torch.float32)


def _query_chunk(q, k, v, out, lse_all, pattern: BlockPattern, scale: float, item) -> None:
    """Attention of one query chunk over its key runs, merged by log-sum-exp, written into ``out``/``lse_all``."""
    bs, hs, q0, q1, runs = item
    qc = q[bs, hs, q0:q1]
    parts = [_flash(qc, k[bs, hs, k0:k1], v[bs, hs, k0:k1], _run_mask(pattern, q0, q1, k0, k1, part, bs), scale)
             for k0, k1, part in runs]
    if len(parts) == 1:
        o, lse = parts[0]
    else:
        lses = torch.stack([p[1] for p in parts])
        lse = torch.logsumexp(lses, 0)
        w = torch.exp(lses - lse).nan_to_num_(0.0)
        o = parts[0][0].to(lse.dtype) * w[0][..., None]
        for i in range(1, len(parts)):
            o.add_(parts[i][0] * w[i][..., None])
    out[bs, hs, q0:q1] = o.to(out.dtype)
    if lse_all is not None:
        lse_all[bs, hs, q0:q1] = lse.float()


def _chunk_work(item: tuple) -> int:
    """Token pairs of a query chunk ``(batch, heads, q0, q1, runs)``."""
    _, _, q0, q1, runs = item
    return (q1 - q0) * sum(k1 - k0 for k0, k1, _ in runs)


def _balanced_bins(items: list, workers: int, measure: Callable[[Any], int] = _chunk_work) -> list[list]:
    """Greedy longest-first assignment of items to workers by their work (``measure``: query chunks by default)."""
    work = [measure(item) for item in items]
    bins: list[list] = [[] for _ in range(workers)]
    load = [0] * workers
    for i in sorted(range(len(items)), key=work.__getitem__, reverse=True):
        j = load.index(min(load))
        bins[j].append(items[i])
        load[j] += work[i]
    return bins


def _query_chunks(pattern: BlockPattern, b: int, h: int) -> list[tuple]:
    """The Python path's work: ``(batch, heads, q0, q1, runs)`` per group and query chunk with keys."""
    plans = plan_runs(pattern)
    return [(bs, hs, q0, q1, runs) for g, bs, hs in _group_slices(pattern, b, h) for q0, q1, runs in plans[g]
            if runs]


_POOL: dict = {}


def _runs_forward(q, k, v, pattern: BlockPattern, scale: float, return_lse: bool):
    """Inference path. Many small kernel calls: with T intra-op threads, T Python threads each run single-threaded
    calls on a balanced share of the query chunks (the ops release the GIL), which avoids a fork-join per call;
    measured 10-25 % faster than threading inside each call on 2 cores."""
    b, h, sq, d = q.shape
    out = torch.zeros(b, sq, h, v.shape[-1], dtype=q.dtype, device=q.device).transpose(1, 2)
    lse_all = torch.full((b, h, sq), float("-inf"), dtype=torch.float32, device=q.device) if return_lse else None
    items = _query_chunks(pattern, b, h)
    threads = torch.get_num_threads()
    if q.device.type != "cpu" or threads < 2 or len(items) < 4 * threads:
        for item in items:
            _query_chunk(q, k, v, out, lse_all, pattern, scale, item)
        return out, lse_all
    from concurrent.futures import ThreadPoolExecutor

    pool = _POOL.get(threads)
    if pool is None:
        pool = _POOL[threads] = ThreadPoolExecutor(threads, thread_name_prefix="vidattn")

    inference = torch.is_inference_mode_enabled()  # thread-local: carried into the workers

    def work(chunk: list) -> None:
        with torch.inference_mode(inference), torch.no_grad():
            for item in chunk:
                _query_chunk(q, k, v, out, lse_all, pattern, scale, item)

    with _one_thread_per_call():
        for future in [pool.submit(work, chunk) for chunk in _balanced_bins(items, threads)]:
            future.result()
    return out, lse_all


class _OneThread:
    """Intra-op threads set to 1 while our own workers split the calls (``with _one_thread_per_call():``).
    Re-entrant and safe across Python threads: only the outermost entry saves and restores the count."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._depth = 0
        self._saved = 1

    def __enter__(self) -> None:
        with self._lock:
            if self._depth == 0:
                self._saved = torch.get_num_threads()
                torch.set_num_threads(1)
            self._depth += 1

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self._depth -= 1
            if self._depth == 0:
                torch.set_num_threads(self._saved)


_ONE_THREAD = _OneThread()


def _one_thread_per_call() -> _OneThread:
    return _ONE_THREAD


Call = tuple[slice, slice, int, int, int, int, bool]  # (batch, heads, q0, q1, k0, k1, partial)
# The extension merges in fp32: float64 inputs keep their precision on the Python path.
_EXT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class ExtProgram(NamedTuple):
    """The extension's input for one pattern and input shape: ``tasks (T, 2)`` ranges of ``calls (C, 9)`` rows
    (batch, heads, queries, keys, windowed flag), the window tables the windowed calls read (None when no call is
    windowed) and the calls left to Python (they need a mask the extension cannot build)."""

    tasks: torch.Tensor
    calls: torch.Tensor
    tables: Optional[tuple[torch.Tensor, torch.Tensor]]
    masked: list[Call]


def _ext_program(pattern: BlockPattern, b: int, h: int, per_head: bool = False) -> ExtProgram:
    """The extension's program for inputs of batch ``b`` and ``h`` heads. One task per strip of one group
    (``per_head``: of one sample and head, for more tasks than strips), longest first; a strip's task holds its
    full rectangles and, for a window predicate, its partial runs (windowed calls). Memoised on the pattern."""
    return pattern.memo(("ext", b, h, per_head), lambda: _build_ext_program(pattern, b, h, per_head),
                        structural=False)


def _strip_rows(pattern: BlockPattern) -> int:
    """Query tokens per strip, as :func:`plan_rects` cuts them."""
    return max(1, 1024 // pattern.block_q) * pattern.block_q


def _partial_calls(pattern: BlockPattern, g: int, strip_q: int) -> dict[int, list[tuple[int, int, int, int]]]:
    """Group ``g``'s partial runs ``(q0, q1, k0, k1)`` by strip index, cut at strip boundaries."""
    out: dict[int, list[tuple[int, int, int, int]]] = {}
    for q0, q1, row in plan_runs(pattern)[g]:
        a = q0
        while a < q1:
            i = a // strip_q
            end = min(q1, (i + 1) * strip_q)
            out.setdefault(i, []).extend((a, end, k0, k1) for k0, k1, part in row if part)
            a = end
    return out


def _build_ext_program(pattern: BlockPattern, b: int, h: int, per_head: bool) -> ExtProgram:
    bp, hp = pattern.groups
    lens = None if pattern.kv_lens is None else pattern.kv_lens.tolist()
    tables = None if pattern.partial is None else window_tables(pattern.predicate, pattern.q_len, pattern.kv_len)
    tasks: list[tuple[float, list[list[int]]]] = []
    masked: list[Call] = []
    strip_q = _strip_rows(pattern)
    for (g, bs, hs), strips in zip(_group_slices(pattern, b, h), plan_rects(pattern)):
        b0, b1 = (0, b) if bp == 1 else (bs.start, bs.stop)
        h0, h1 = (0, h) if hp == 1 else (hs.start, hs.stop)
        clean_end = pattern.kv_len if lens is None else min(lens[b0:b1])
        longest = pattern.kv_len if lens is None else max(lens[b0:b1])
        pairs = ([(i, i + 1, j, j + 1) for i in range(b0, b1) for j in range(h0, h1)] if per_head
                 else [(b0, b1, h0, h1)])
        by_strip: dict[int, list[tuple[int, int, int, int, bool]]] = {}
        for strip in strips:
            by_strip.setdefault(strip[0][0] // strip_q, []).extend((*r, False) for r in strip)
        if pattern.partial is not None:
            for i, runs in _partial_calls(pattern, g, strip_q).items():
                if tables is None:
                    masked += [(bs, hs, q0, q1, k0, k1, True) for q0, q1, k0, k1 in runs]
                else:
                    by_strip.setdefault(i, []).extend((*r, True) for r in runs)
        for _, rects in sorted(by_strip.items()):
            calls, cost = [], 0.0
            for q0, q1, k0, k1, win in rects:
                if k0 < clean_end:
                    calls.append([q0, q1, k0, min(k1, clean_end), int(win)])
                    cost += rect_cost(q1 - q0, min(k1, clean_end) - k0)
                if k1 > clean_end and longest > max(k0, clean_end):
                    masked.append((bs, hs, q0, q1, max(k0, clean_end), min(k1, longest), win))
            tasks += [(cost, [[*pair, *c] for c in calls]) for pair in pairs if calls]
    tasks.sort(key=lambda t: -t[0])
    bounds, flat = [], []
    for _, calls in tasks:
        bounds.append([len(flat), len(flat) + len(calls)])
        flat += calls
    windowed = any(c[-1] for c in flat)
    return ExtProgram(torch.tensor(bounds, dtype=torch.int64).reshape(-1, 2),
                      torch.tensor(flat, dtype=torch.int64).reshape(-1, 9), tables if windowed else None, masked)


def _merge_into(acc: torch.Tensor, lse: torch.Tensor, out: torch.Tensor, out_lse: torch.Tensor) -> None:
    """``acc, lse`` (fp32 views) <- the log-sum-exp merge of themselves with ``out, out_lse``; -inf rows stay 0."""
    m = torch.maximum(lse, out_lse).clamp_min(torch.finfo(torch.float32).min)
    wa, wb = torch.exp(lse - m), torch.exp(out_lse - m)
    total = wa + wb
    safe = torch.where(total > 0, total, torch.ones_like(total))
    acc.mul_((wa / safe)[..., None]).add_(out.float() * (wb / safe)[..., None])
    lse.copy_(m + torch.log(total))


def _threaded_program(pattern: BlockPattern, b: int, h: int) -> ExtProgram:
    """The program for the intra-op threads: per strip, or per (sample, head) and strip when that alone gives each
    thread at least two tasks."""
    threads = torch.get_num_threads()
    program = _ext_program(pattern, b, h)
    if threads > 1 and len(program.tasks) < 2 * threads and b * h > 1:
        program = _ext_program(pattern, b, h, per_head=True)
    return program


def _launch(op: Any, program: ExtProgram, leading: tuple, scale: float) -> None:
    """``op(*leading, tasks, calls, scale, workers, q_bounds, k_coords)`` (``runs_forward`` / ``runs_backward``):
    with at least two tasks per thread on single-threaded workers, else one worker with the intra-op threads inside
    each call."""
    if not program.calls.numel():
        return
    threads = torch.get_num_threads()
    tables = program.tables if program.tables is not None else (None, None)
    if len(program.tasks) >= 2 * threads:
        with _one_thread_per_call():
            op(*leading, program.tasks, program.calls, scale, threads, *tables)
    else:
        op(*leading, program.tasks, program.calls, scale, 1, *tables)


def _ext_forward(q, k, v, pattern: BlockPattern, scale: float, return_lse: bool):
    """Inference path with the C++ extension: rectangles from ``cpu_plan`` merged in fp32, then the masked calls in
    Python. With at least two tasks per thread the tasks run on single-threaded workers (the fast mode for long
    sequences); with fewer, per (sample, head) tasks are tried, and otherwise one worker runs the calls with the
    intra-op threads inside each call."""
    b, h, sq, _ = q.shape
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    program = _threaded_program(pattern, b, h)
    acc = torch.zeros(b, sq, h, v.shape[-1], dtype=torch.float32).transpose(1, 2)
    lse = torch.full((b, h, sq), float("-inf"), dtype=torch.float32)
    _launch(torch.ops.vidattn_cpu.runs_forward, program, (q, k, v, acc, lse), scale)
    for bs, hs, q0, q1, k0, k1, part in program.masked:
        o, l = _flash(q[bs, hs, q0:q1], k[bs, hs, k0:k1], v[bs, hs, k0:k1],
                      _run_mask(pattern, q0, q1, k0, k1, part, bs), scale)
        _merge_into(acc[bs, hs, q0:q1], lse[bs, hs, q0:q1], o, l)
    out = acc if q.dtype == torch.float32 else acc.to(q.dtype)
    return out, (lse if return_lse else None)


def _gather_forward(q, k, v, pattern: BlockPattern, scale: float, return_lse: bool):
    """Differentiable path: per query chunk, gather its keys and run SDPA with a boolean mask."""
    b, h, sq, d = q.shape
    plans = plan_runs(pattern)
    group_outs = []
    group_lses = []
    for g, bs, hs in _group_slices(pattern, b, h):
        chunks, lchunks = [], []
        qg = q[bs, hs]
        for q0, q1, runs in plans[g]:
            qc = qg[:, :, q0:q1]
            if not runs:
                # Queries that attend to nothing output 0; derived from qc so the graph stays connected.
                chunks.append(qc[..., :1].mul(0).expand(*qc.shape[:-1], v.shape[-1]).to(v.dtype))
                lchunks.append(torch.full(qc.shape[:-1], float("-inf"), device=q.device))
                continue
            idx = torch.cat([torch.arange(k0, k1, device=q.device) for k0, k1, _ in runs])
            kc, vc = k[bs, hs].index_select(2, idx), v[bs, hs].index_select(2, idx)
            masks = [_run_mask(pattern, q0, q1, k0, k1, part, bs) for k0, k1, part in runs]
            mask = None
            if any(m is not None for m in masks):
                nb = kc.shape[0]
                full = [torch.ones(1, 1, q1 - q0, k1 - k0, dtype=torch.bool, device=q.device) if m is None else m
                        for m, (k0, k1, _) in zip(masks, runs)]
                mask = torch.cat([m.expand(nb, 1, q1 - q0, m.shape[-1]) for m in full], -1)
            if mask is not None:
                has_key = mask.any(-1, keepdim=True)
                o = F.scaled_dot_product_attention(qc, kc, vc, attn_mask=mask | ~has_key, scale=scale)
                o = torch.where(has_key, o, torch.zeros((), dtype=o.dtype, device=o.device))
            else:
                o = F.scaled_dot_product_attention(qc, kc, vc, scale=scale)
            chunks.append(o)
            if return_lse:
                s = torch.matmul(qc.float(), kc.float().transpose(-1, -2)) * scale
                if mask is not None:
                    s = s.masked_fill(~mask, float("-inf"))
                lchunks.append(s.logsumexp(-1))
        group_outs.append((bs, hs, torch.cat(chunks, 2)))
        if return_lse:
            group_lses.append(torch.cat(lchunks, 2))
    return _assemble(group_outs, group_lses, pattern, b, h, return_lse)


def _assemble(group_outs, group_lses, pattern: BlockPattern, b: int, h: int, return_lse: bool):
    bp, hp = pattern.groups
    if bp == 1 and hp == 1:
        out = group_outs[0][2]
        lse = group_lses[0] if return_lse else None
        return out, lse
    tensors = [t for _, _, t in group_outs]
    grid = [torch.cat(tensors[i * hp:(i + 1) * hp], 1) for i in range(bp)]
    out = torch.cat(grid, 0)
    lse = None
    if return_lse:
        lgrid = [torch.cat(group_lses[i * hp:(i + 1) * hp], 1) for i in range(bp)]
        lse = torch.cat(lgrid, 0)
    return out, lse


def torch_sparse_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: BlockPattern, *, scale: Optional[float] = None,
    return_lse: bool = False,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Block-sparse attention on ``(B, H, S, D)`` tensors (views welcome); see the module docstring."""
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        from .cpu_autograd import rect_sparse_attention, usable

        if usable(q, return_lse):
            return rect_sparse_attention(q, k, v, pattern, scale), None
        return _gather_forward(q, k, v, pattern, scale, return_lse)
    if q.device.type == "cpu" and q.dtype in _EXT_DTYPES and q.numel() and cpu_extension():
        return _ext_forward(q, k, v, pattern, scale, return_lse)
    return _runs_forward(q, k, v, pattern, scale, return_lse)
