"""Rectified SpaAttn (spec ``rectified.md`` §2.3-§2.8): dynamic critical blocks from a pooled estimate of full
attention, plus the rectification terms that correct the block-sparse output.

Per (sample b, head h), in fp32 whatever the input dtype, over the ``n = ceil(N_v / B)`` video blocks of the first
``N_v = frames * rows * cols`` tokens (already in curve order; the last block may be ragged, ``c_m`` valid tokens):

    q̄_n, k̄_m, v̄_m = valid-count means;  aq_n, ak_m = valid-count means of |q - q̄|, |k - k̄|   (channel-wise)
    raw[n, m] = q̄_n · k̄_m,   t[n, u] = q̄_n · k_u / sqrt(d)  (valid text keys u only, never pooled)
    P̂[n, m]  = c_m e^{raw/sqrt(d)} / Z,   P̂[n, text] = Σ_u e^{t[n,u]} / Z,   Z = Σ_m c_m e^{raw/sqrt(d)} + Σ_u e^{t}
                                                   (IPAR with valid counts; video-only sequences have no text column)
    selection: sort P̂[n] descending (ties: lower column first), need = max(#{cumsum <= top_p} + 1, top_k),
               top_k = int((1 - drop_rate) * n); OR neighbours, every key block holding valid text, the
               first-frame rule and the diagonal block
    gapr_ok[n, m] = |raw| > |aq_n · k̄_m| + |q̄_n · ak_m|
    keep = crit | ~gapr_ok  (text column always kept);  R = Σ P̂·keep;  O_nc = Σ_m P̂·~keep·v̄_m
    out[i] = R[n] · softmax-attention of query i over the critical key blocks + O_nc[n]       (n = block of i)

The critical matrix is over *raw* key blocks of the whole sequence (``ceil(S / B)`` columns): video block ``m`` is
column ``m``; text starts at token ``N_v``, generally inside a block, so the last video block may also hold text
(the kernel attends every token of a listed block; ``kv_lens`` masks padded text). The text column of P̂ stands
for the key block holding the first text token; it is selected only where the sample has valid text, and then that
block is critical anyway (every valid-text block is). Text query rows are dense over the valid keys.

``first_frame``: ``"corner"`` (upstream: query blocks ``n < F`` attend key blocks ``< F``, ``F = n // frames``;
under the curve order this is not frame 0), ``"frame0"`` (every key block holding at least one frame-0 token,
``t = 0``, is critical for every video query block: the first frame becomes a sink column, a superset of the
corner over frame-0 blocks that upstream's rule meant in raster order), ``"off"``.

Selection runs without host synchronisation (fixed-size sorts, cumsums, scatters; no data-dependent shapes).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional, Union

import torch
import torch.nn.functional as F

from ..kernels import BACKENDS, BlockPattern, Epilogue
from ..plan import AttentionPlan, PlanPart, execute_plan

__all__ = ["RectifiedStats", "critical_pattern", "rectified_attention", "rectified_plan", "rectified_selection"]

FIRST_FRAME_RULES = ("corner", "frame0", "off")

Neighbours = Union[torch.Tensor, bool, None]


@dataclass(frozen=True, eq=False)
class RectifiedStats:
    """Decisions and rectification terms of one call, per (batch, head, video query block).

    critical  bool ``[B, H, n, nk]``   key blocks the sparse kernel attends (``nk = ceil(S / B)`` raw key blocks)
    R         fp32 ``[B, H, n]``       estimated full-attention mass of the kept P̂ columns (epilogue scale)
    O_nc      fp32 ``[B, H, n, Dv]``   compensation Σ P̂·~keep·v̄ (epilogue bias)
    p_hat     fp32 ``[B, H, n, n (+1)]`` pooled full-attention estimate; joint sequences add the text column
    gapr_ok   bool ``[B, H, n, n]``    pooled estimate trustworthy (None when ``gapr=False``)
    """

    critical: torch.Tensor
    R: torch.Tensor
    O_nc: torch.Tensor
    p_hat: torch.Tensor
    gapr_ok: Optional[torch.Tensor]


# ---------------------------------------------------------------------------------------------------- validation
def _check_number(name: str, value: object, ok: bool, accepted: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok:
        raise ValueError(f"{name} must be a number in {accepted}, got {value!r}")
    return float(value)


def _check_grid(grid: object, seq: int) -> tuple[int, int, int]:
    if (not isinstance(grid, (tuple, list)) or len(grid) != 3
            or any(isinstance(g, bool) or not isinstance(g, int) or g < 1 for g in grid)):
        raise ValueError(f"grid must be (frames, rows, cols) positive integers, got {grid!r}")
    if grid[0] * grid[1] * grid[2] > seq:
        raise ValueError(f"grid {tuple(grid)} has {grid[0] * grid[1] * grid[2]} video tokens but the sequence has "
                         f"only {seq}")
    return int(grid[0]), int(grid[1]), int(grid[2])


def _check_text_valid(text_valid: Optional[torch.Tensor], batch: int, n_text: int) -> None:
    if text_valid is None:
        return
    if not isinstance(text_valid, torch.Tensor) or text_valid.shape != (batch,) or text_valid.is_floating_point() \
            or text_valid.dtype == torch.bool:
        raise ValueError(f"text_valid must be an integer tensor of shape ({batch},) or None, got "
                         f"{text_valid if not isinstance(text_valid, torch.Tensor) else tuple(text_valid.shape)}")
    # Range check only where it costs no device synchronisation; on a device, values are clamped to [0, n_text].
    if text_valid.device.type == "cpu" and batch and (int(text_valid.min()) < 0 or int(text_valid.max()) > n_text):
        raise ValueError(f"text_valid must lie in [0, {n_text}] (the text tokens after the video), "
                         f"got {text_valid.tolist()}")


def _validate(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: object, drop_rate: float, top_p: float,
              block_size: int, neighbours: Neighbours, first_frame: str, gapr: bool,
              text_valid: Optional[torch.Tensor], order: Optional[torch.Tensor]) -> tuple[int, int, int]:
    """Raise ValueError naming the bad argument; returns the grid."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be 4-D (B, H, S, D), got {q.dim()}-D, {k.dim()}-D, {v.dim()}-D")
    if k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"q, k, v shapes do not agree: {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    _check_number("drop_rate", drop_rate, 0 <= drop_rate < 1, "[0, 1)")
    _check_number("top_p", top_p, 0 < top_p <= 1, "(0, 1]")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive integer (e.g. 128), got {block_size!r}")
    if first_frame not in FIRST_FRAME_RULES:
        raise ValueError(f"first_frame must be one of {FIRST_FRAME_RULES}, got {first_frame!r}")
    if not isinstance(gapr, bool):
        raise ValueError(f"gapr must be True or False, got {gapr!r}")
    f, r, c = _check_grid(grid, q.shape[2])
    n_video = f * r * c
    nvb = -(-n_video // block_size)
    if isinstance(neighbours, torch.Tensor):
        if neighbours.shape != (nvb, nvb) or neighbours.dtype != torch.bool:
            raise ValueError(f"neighbours must be a bool tensor of shape ({nvb}, {nvb}) (video blocks), False or "
                             f"None, got {neighbours.dtype} {tuple(neighbours.shape)}")
    elif neighbours is not None and neighbours is not False:
        raise ValueError(f"neighbours must be a bool tensor ({nvb}, {nvb}), False (no neighbour rule) or None "
                         f"(from the grid), got {neighbours!r}")
    if order is not None and (not isinstance(order, torch.Tensor) or order.shape != (n_video,)
                              or order.is_floating_point()):
        raise ValueError(f"order must be an integer tensor of shape ({n_video},) (raster index of each curve "
                         f"position) or None, got {order!r}")
    _check_text_valid(text_valid, q.shape[0], q.shape[2] - n_video)
    return f, r, c


# ---------------------------------------------------------------------------------------------------- block math
def _valid_counts(n_video: int, block: int, device: torch.device) -> torch.Tensor:
    """fp32 ``[n]``: valid tokens per video block (``block`` except a ragged last block)."""
    nvb = -(-n_video // block)
    lo = torch.arange(nvb, device=device) * block
    return (torch.clamp(lo + block, max=n_video) - lo).to(torch.float32)


# fp32 elements per block-means chunk: 1 MiB on the CPU (cache-sized temporaries), 256 MiB on a device
# (few launches). Chunks are whole blocks, so the chunk size never changes a result.
_CPU_CHUNK_ELEMENTS = 1 << 18
_DEVICE_CHUNK_ELEMENTS = 1 << 26


def _block_stats(xb: torch.Tensor, counts: torch.Tensor, deviation: bool,
                 valid: Optional[int] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``xb`` ``[B, H, c, block, D]`` (any float dtype; tokens past ``valid`` are zero padding), ``counts`` fp32
    ``[c]``: fp32 means ``Σ x / c_m`` and, with ``deviation``, ``Σ_valid |x - x̄| / c_m`` (upcast before the
    subtraction, so an fp16/bf16 input gives exactly the values of its fp32 upcast). Blocks are made row-major
    first, so the summation order (and the result) does not depend on the input's memory layout."""
    xb = xb.float()
    if xb.stride()[3:] != (xb.shape[4], 1):
        xb = xb.contiguous()
    mean = xb.sum(3).div_(counts[:, None])
    if not deviation:
        return mean, None
    dev = torch.sub(xb, mean[:, :, :, None]).abs_()
    if valid is not None:
        dev[:, :, :, valid:] = 0
    return mean, dev.sum(3).div_(counts[:, None])


def _block_means(x: torch.Tensor, counts: torch.Tensor, n_video: int, block: int,
                 deviation: bool) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Valid-count block means ``x̄_m = Σ x / c_m`` and, with ``deviation``, ``mean |x - x̄_m|`` (``[B, H, n, D]``).

    No padded or full-size fp32 copy: the ``n_video // block`` full blocks are read through a view of ``x`` in
    chunks of whole blocks (``_*_CHUNK_ELEMENTS``: the fp32 temporaries stay small); only the ragged last block
    (``c_m < block`` valid tokens) is copied, zero-padded to ``block`` tokens, so every sum runs exactly as over a
    padded tensor."""
    b, h, _, d = x.shape
    n_full, tail = divmod(n_video, block)
    full = x[:, :, :n_full * block].unflatten(2, (n_full, block))
    budget = _CPU_CHUNK_ELEMENTS if x.device.type == "cpu" else _DEVICE_CHUNK_ELEMENTS
    step = max(1, budget // max(1, b * h * block * d))
    parts = [_block_stats(full[:, :, lo:lo + step], counts[lo:min(lo + step, n_full)], deviation)
             for lo in range(0, n_full, step)]
    if tail:
        ragged = F.pad(x[:, :, n_full * block:n_video].float(), (0, 0, 0, block - tail))[:, :, None]
        parts.append(_block_stats(ragged, counts[n_full:], deviation, valid=tail))
    mean = torch.cat([m for m, _ in parts], dim=2)
    return mean, (torch.cat([a for _, a in parts], dim=2) if deviation else None)


def _text_mask(text_valid: Optional[torch.Tensor], batch: int, n_text: int, device: torch.device) -> torch.Tensor:
    """bool ``[B, n_text]``: valid text keys (a prefix of the segment per sample)."""
    if text_valid is None:
        return torch.ones(batch, n_text, dtype=torch.bool, device=device)
    return torch.arange(n_text, device=device)[None, :] < text_valid.to(device=device, dtype=torch.long)[:, None]


def _pooled_estimate(raw: torch.Tensor, qm: torch.Tensor, k_text: Optional[torch.Tensor],
                     text_ok: Optional[torch.Tensor], counts: torch.Tensor) -> torch.Tensor:
    """P̂ ``[B, H, n, n (+1)]`` (spec §2.3-2.4 with valid counts), as one stable softmax of logits ``s_m + log c_m``
    and, for joint sequences, the text column's ``logsumexp_u t_u`` (``-inf`` without valid text)."""
    scale = qm.shape[-1] ** -0.5
    logits = raw * scale + counts.log()
    if k_text is not None:
        t = torch.einsum("bhnd,bhud->bhnu", qm, k_text.float()) * scale
        t = t.masked_fill(~text_ok[:, None, None, :], float("-inf"))
        logits = torch.cat([logits, torch.logsumexp(t, dim=-1, keepdim=True)], dim=-1)
    return torch.softmax(logits, dim=-1)


def _top_selection(p_hat: torch.Tensor, top_p: float, top_k: int) -> torch.Tensor:
    """bool like ``p_hat``: the ``need = max(#{cumsum <= top_p} + 1, top_k)`` largest columns of each row (ties:
    lower column first, via a stable sort)."""
    sp, idx = torch.sort(p_hat, dim=-1, descending=True, stable=True)
    need = torch.clamp((sp.cumsum(-1) <= top_p).sum(-1, keepdim=True) + 1, min=top_k)
    ranked = torch.arange(p_hat.shape[-1], device=p_hat.device) < need
    return torch.zeros_like(ranked).scatter(-1, idx, ranked)


def _gapr_ok(raw: torch.Tensor, qm: torch.Tensor, km: torch.Tensor, aq: torch.Tensor,
             ak: torch.Tensor) -> torch.Tensor:
    """bool ``[B, H, n, n]``: ``|q̄·k̄| > |aq·k̄| + |q̄·ak|`` (spec §2.6, unscaled logits)."""
    e_q = torch.einsum("bhnd,bhmd->bhnm", aq, km).abs()
    e_k = torch.einsum("bhnd,bhmd->bhnm", qm, ak).abs()
    return raw.abs() > e_q + e_k


# ---------------------------------------------------------------------------------------------------- fixed rules
@lru_cache(maxsize=16)
def _grid_neighbours(frames: int, rows: int, cols: int, block: int, device: str) -> torch.Tensor:
    from ..gilbert import block_neighbours

    return block_neighbours(frames, rows, cols, block).to(device)


def _frame0_blocks(order: torch.Tensor, plane: int, block: int) -> torch.Tensor:
    """bool ``[n]``: video blocks holding at least one frame-0 token (raster index ``< rows * cols``)."""
    n_video = order.numel()
    nvb = -(-n_video // block)
    first = F.pad((order < plane).to(torch.uint8), (0, nvb * block - n_video))
    return first.reshape(nvb, block).amax(-1).bool()


@lru_cache(maxsize=16)
def _grid_frame0_blocks(frames: int, rows: int, cols: int, block: int, device: str) -> torch.Tensor:
    from ..gilbert import gilbert_order

    return _frame0_blocks(gilbert_order(frames, rows, cols), rows * cols, block).to(device)


def _text_blocks(text_ok: torch.Tensor, n_video: int, nk: int, block: int) -> torch.Tensor:
    """bool ``[B, nk]``: raw key blocks overlapping the valid text ``[n_video, n_video + valid_b)``, i.e. blocks
    ``n_video // B .. (n_video + valid_b - 1) // B`` where ``valid_b > 0``."""
    valid = text_ok.sum(-1, keepdim=True)
    j = torch.arange(nk, device=text_ok.device)[None, :]
    return (valid > 0) & (j >= n_video // block) & (j <= (n_video + valid - 1) // block)


def _fixed_rules(nvb: int, grid: tuple[int, int, int], block: int, nk: int, neighbours: Neighbours,
                 first_frame: str, order: Optional[torch.Tensor], device: torch.device) -> torch.Tensor:
    """bool ``[n, nk]``: the head- and sample-shared critical blocks (neighbours, first frame, diagonal)."""
    f, r, c = grid
    rule = torch.zeros(nvb, nk, dtype=torch.bool, device=device)
    if neighbours is None:
        rule[:, :nvb] |= _grid_neighbours(f, r, c, block, str(device))
    elif neighbours is not False:
        rule[:, :nvb] |= neighbours.to(device)
    if first_frame == "corner":
        corner = nvb // f
        rule[:corner, :corner] = True
    elif first_frame == "frame0":
        blocks = (_grid_frame0_blocks(f, r, c, block, str(device)) if order is None
                  else _frame0_blocks(order.to(device), r * c, block))
        rule[:, :nvb] |= blocks[None, :]
    rule[:, :nvb] |= torch.eye(nvb, dtype=torch.bool, device=device)
    return rule


# ---------------------------------------------------------------------------------------------------- public API
def rectified_selection(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, grid: tuple[int, int, int],
                        drop_rate: float = 0.75, top_p: float = 0.3, block_size: int = 128,
                        neighbours: Neighbours = None, first_frame: str = "corner", gapr: bool = True,
                        text_valid: Optional[torch.Tensor] = None,
                        order: Optional[torch.Tensor] = None) -> RectifiedStats:
    """Critical blocks, P̂, GAPR and the rectification terms ``R``, ``O_nc`` (module docstring; spec §2.3-2.7).

    ``q, k, v``: ``[B, H, S, D]`` with the ``frames*rows*cols`` video tokens first (curve order), then text (valid
    first, ``text_valid[b]`` of them; None = all). ``neighbours``: bool ``[n, n]`` over video blocks, ``False`` (no
    neighbour rule) or None (``vidattn.gilbert.block_neighbours`` of the grid). ``order`` (``first_frame="frame0"``
    only): raster index of each curve position, None = ``gilbert_order(*grid)``. ``gapr=False`` compensates every
    non-critical block (ablation). No host synchronisation: a ``text_valid`` on the CPU is range-checked, one on
    a device is taken as clamped to ``[0, S - N_v]``.
    """
    grid = _validate(q, k, v, grid, drop_rate, top_p, block_size, neighbours, first_frame, gapr, text_valid, order)
    bsz, _, seq, _ = q.shape
    n_video = grid[0] * grid[1] * grid[2]
    nvb, nk = -(-n_video // block_size), -(-seq // block_size)
    counts = _valid_counts(n_video, block_size, q.device)
    qm, aq = _block_means(q, counts, n_video, block_size, deviation=gapr)
    km, ak = _block_means(k, counts, n_video, block_size, deviation=gapr)
    vm, _ = _block_means(v, counts, n_video, block_size, deviation=False)
    raw = torch.einsum("bhnd,bhmd->bhnm", qm, km)
    joint = seq > n_video
    text_ok = _text_mask(text_valid, bsz, seq - n_video, q.device) if joint else None
    p_hat = _pooled_estimate(raw, qm, k[:, :, n_video:] if joint else None, text_ok, counts)

    selected = _top_selection(p_hat, float(top_p), int((1 - drop_rate) * nvb))
    critical = torch.zeros(*p_hat.shape[:3], nk, dtype=torch.bool, device=q.device)
    critical[..., :nvb] = selected[..., :nvb]
    critical |= _fixed_rules(nvb, grid, block_size, nk, neighbours, first_frame, order, q.device)
    if joint:
        # The text column maps to the block of the first text token, which is among these whenever text is valid.
        critical |= _text_blocks(text_ok, n_video, nk, block_size)[:, None, None, :]

    ok = _gapr_ok(raw, qm, km, aq, ak) if gapr else None
    keep = critical[..., :nvb] if ok is None else critical[..., :nvb] | ~ok
    R = (p_hat[..., :nvb] * keep).sum(-1)
    if joint:
        R = R + p_hat[..., nvb]
    O_nc = torch.einsum("bhnm,bhmd->bhnd", p_hat[..., :nvb] * ~keep, vm)
    return RectifiedStats(critical=critical, R=R, O_nc=O_nc, p_hat=p_hat, gapr_ok=ok)


def critical_pattern(critical: torch.Tensor, *, q_len: int, kv_len: int, block_size: int,
                     kv_lens: Optional[torch.Tensor] = None) -> BlockPattern:
    """Per-(sample, head) :class:`BlockPattern` of the video query rows (``q_len = N_v``) over all ``kv_len = S``
    keys from the critical bitmap ``[B, H, n, nk]``; ``kv_lens[b]`` masks padded text keys. Built on the device
    without host synchronisation off the CPU (:meth:`BlockPattern.from_block_mask_on_device`); compact on the CPU."""
    if critical.device.type == "cpu":
        return BlockPattern.from_block_mask(critical, q_len=q_len, kv_len=kv_len, block_q=block_size,
                                            kv_lens=kv_lens)
    return BlockPattern.from_block_mask_on_device(critical, q_len=q_len, kv_len=kv_len, block_q=block_size,
                                                  kv_lens=kv_lens)


@lru_cache(maxsize=16)
def _text_rows_pattern(n_text: int, seq: int, block: int, device: str) -> BlockPattern:
    return BlockPattern.full(n_text, seq, block_q=block).to(device)


def rectified_plan(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, grid: tuple[int, int, int],
                   drop_rate: float = 0.75, top_p: float = 0.3, block_size: int = 128,
                   neighbours: Neighbours = None, first_frame: str = "corner", gapr: bool = True,
                   text_valid: Optional[torch.Tensor] = None,
                   order: Optional[torch.Tensor] = None) -> tuple[AttentionPlan, RectifiedStats]:
    """The :class:`~vidattn.plan.AttentionPlan` of one call (BHSD inputs as :func:`rectified_selection`) and its
    statistics: the video rows through the per-head critical pattern with the rectification epilogue
    ``(R, O_nc)``, then the text rows (if any) dense over the valid keys."""
    stats = rectified_selection(q, k, v, grid=grid, drop_rate=drop_rate, top_p=top_p, block_size=block_size,
                                neighbours=neighbours, first_frame=first_frame, gapr=gapr, text_valid=text_valid,
                                order=order)
    seq = q.shape[2]
    n_video = grid[0] * grid[1] * grid[2]
    kv_lens = None
    if text_valid is not None:
        kv_lens = n_video + text_valid.to(device=q.device, dtype=torch.long).clamp(0, seq - n_video)
    pattern = critical_pattern(stats.critical, q_len=n_video, kv_len=seq, block_size=block_size, kv_lens=kv_lens)
    parts = [PlanPart(0, n_video, pattern, Epilogue(stats.R, stats.O_nc))]
    if seq > n_video:
        text = _text_rows_pattern(seq - n_video, seq, block_size, str(q.device))
        parts.append(PlanPart(n_video, seq, text if kv_lens is None else text.with_kv_lens(kv_lens, validate=False)))
    return AttentionPlan(tuple(parts)), stats


def rectified_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, grid: tuple[int, int, int],
                        drop_rate: float = 0.75, top_p: float = 0.3, block_size: int = 128,
                        neighbours: Neighbours = None, first_frame: str = "corner", gapr: bool = True,
                        text_valid: Optional[torch.Tensor] = None, order: Optional[torch.Tensor] = None,
                        backend: str = "auto", return_stats: bool = False):
    """Rectified SpaAttn ``[B, H, S, Dv]`` in q's dtype (spec §2.7): video rows ``R · O_spa + O_nc`` through the
    sparse kernel's fused epilogue, text rows dense over the valid keys (:func:`rectified_plan`, executed).
    Arguments as :func:`rectified_selection`; ``backend`` as :func:`vidattn.kernels.sparse_attention`.
    ``return_stats`` also returns the :class:`RectifiedStats`.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if not isinstance(return_stats, bool):
        raise ValueError(f"return_stats must be True or False, got {return_stats!r}")
    plan, stats = rectified_plan(q, k, v, grid=grid, drop_rate=drop_rate, top_p=top_p, block_size=block_size,
                                 neighbours=neighbours, first_frame=first_frame, gapr=gapr, text_valid=text_valid,
                                 order=order)
    out = execute_plan(plan, q, k, v, backend=backend, layout="bhsd").to(q.dtype)
    return (out, stats) if return_stats else out
