"""Fidelity benchmark: structured synthetic q, k, v with spatio-temporal locality, and the rows of the fidelity
table (relative L2 error against dense attention, density and time, in one run).

Generator (:func:`structured_qkv`), per sample and head, for the video tokens of a ``frames x rows x cols`` grid in
raster order ``(t, y, x)``:

1. **Smooth random field.** ``channels`` (32) latent channels, each a sum of ``modes`` (16) random Fourier modes
   ``cos(ω·p + φ)`` at the token position ``p = (t, y, x)`` with angular frequencies ``ω ~ N(0, diag(1/ℓ²))``
   (random Fourier features of a Gaussian-covariance field: correlation ``≈ exp(-|Δ/ℓ|²/2)``), normalised to
   unit variance per channel. Neighbouring tokens carry similar features; tokens a few ``ℓ`` apart are
   unrelated. Default ``ℓ = length = (4, 8, 8)`` latent tokens ``(t, y, x)``: at Wan's 4 frames x 16 x 16 px per
   latent token, regions of about 128 px that persist for about 16 video frames (1 s at 16 fps).
2. **Projection** to ``head_dim`` per head: ``q = f W_q``, ``k = f W_k``, ``v = f W_v`` with Gaussian ``W`` (unit
   output variance); ``W_k = ρ W_q + sqrt(1 - ρ²) W'`` (``ρ = content``, 0.5), so content alone makes similar
   tokens attend each other.
3. **Positional component.** A per-head vector ``c ~ N(0, locality²)`` per channel (``locality`` 0.6) is added to
   q and k before the rotary embedding; after RoPE, ``q_i · k_j`` contains ``Σ_pairs |c_pair|² cos(θ_pair
   (p_j - p_i))``, a relative-position kernel peaked at ``Δ = 0`` (about ``locality² sqrt(head_dim)`` in scaled
   logits): the learned-RoPE locality of video DiTs.
4. **Wan-style 3-D RoPE** on q and k (as diffusers' ``WanRotaryPosEmbed``): the head dimension is split
   ``t | h | w`` with ``h = w = 2 * (head_dim // 6)`` and ``t`` the rest; each axis rotates adjacent channel pairs
   ``(2i, 2i+1)`` by ``pos * theta ** (-2i / dim_axis)``, ``theta = 10000``.
5. **Per-token noise** ``noise * N(0, 1)`` (0.3) on q, k and v, independent of position.

The pooled estimate of Rectified SpaAttn is only as good as the block means are representative: with fields that
vary inside a 128-token block (``ℓ`` below the block's ~5-token extent per axis) and sharp positional attention,
the rectified error can exceed plain block-sparse (``docs/benchmarks.md``, sensitivity table).

Optional ``text`` tokens (appended after the video, no RoPE) are Gaussian. Everything is drawn from one
``torch.Generator(seed)`` on the CPU in fp64 and returned as ``(B, H, S, D)`` in ``dtype``: deterministic per seed.

Fidelity rows (:func:`fidelity_rows`): the dense reference is SDPA in fp32. Rectified and plain block-sparse run on
the inputs permuted into the Gilbert curve order of the grid (``vidattn.gilbert_order``), as the method needs; the
dense output is permuted the same way, so errors compare the same tokens. *plain* attends exactly the critical
blocks of the rectified selection (``critical_pattern(stats.critical)``) without the epilogue; *rectified* is
``rectified_attention`` (selection, GAPR, ``R · O_spa + O_nc``). The *radial* reference row runs
``radial_pattern`` on the raster layout at its own density. Error = ``||out - dense|| / ||dense||`` over the video
query rows (text rows, where present, are dense in every method).
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence

import torch
import torch.nn.functional as F

__all__ = ["DROP_RATES", "FidelityRow", "fidelity_rows", "relative_l2", "rope_3d", "smooth_field", "structured_qkv"]

DROP_RATES = (0.75, 0.85, 0.9)


# ---------------------------------------------------------------------------------------------------- generator
def _positions(frames: int, rows: int, cols: int) -> torch.Tensor:
    """fp64 ``(N, 3)`` raster positions ``(t, y, x)``."""
    t, y, x = torch.meshgrid(torch.arange(frames), torch.arange(rows), torch.arange(cols), indexing="ij")
    return torch.stack([t.reshape(-1), y.reshape(-1), x.reshape(-1)], -1).double()


def smooth_field(frames: int, rows: int, cols: int, channels: int, *, batch: int = 1, modes: int = 16,
                 length: Sequence[float] = (4.0, 8.0, 8.0), generator: Optional[torch.Generator] = None
                 ) -> torch.Tensor:
    """fp64 ``(batch, N, channels)`` smooth random field over the raster grid: per channel, ``modes`` random Fourier
    modes ``sqrt(2/modes) cos(2π ω·p + φ)``, ``ω ~ N(0, diag(1/(2π ℓ)²))`` (Gaussian correlation of length ``ℓ``
    per axis ``(t, y, x)``), then normalised to zero mean and unit variance per channel."""
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    pos = _positions(frames, rows, cols)                                                     # (N, 3)
    scale = 1.0 / (2 * math.pi * torch.tensor([float(v) for v in length], dtype=torch.float64))
    omega = torch.randn(batch, channels, modes, 3, generator=g, dtype=torch.float64) * scale   # cycles per token
    phase = torch.rand(batch, channels, modes, generator=g, dtype=torch.float64) * 2 * math.pi
    arg = torch.einsum("bcmk,nk->bncm", omega, pos) * (2 * math.pi) + phase[:, None]
    field = torch.cos(arg).sum(-1) * math.sqrt(2.0 / modes)                                  # (B, N, C)
    field = field - field.mean(1, keepdim=True)
    return field / field.std(1, keepdim=True).clamp_min(1e-12)


def _axis_dims(head_dim: int) -> tuple[int, int, int]:
    h = w = 2 * (head_dim // 6)
    return head_dim - h - w, h, w


def rope_3d(x: torch.Tensor, frames: int, rows: int, cols: int, theta: float = 10000.0) -> torch.Tensor:
    """Wan-style 3-D rotary embedding of ``x`` ``(..., N, D)`` (raster video tokens, ``D`` even): channels split
    ``t | h | w`` (``h = w = 2 (D // 6)``), adjacent pairs of each axis rotated by ``pos * theta ** (-2i/dim)``."""
    d = x.shape[-1]
    if d % 2:
        raise ValueError(f"head_dim must be even for the rotary embedding, got {d}")
    pos = _positions(frames, rows, cols).to(x.device)
    angles = []
    for axis, dim in enumerate(_axis_dims(d)):
        if dim == 0:
            continue
        freqs = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=x.device) / dim)
        angles.append(pos[:, axis, None] * freqs)
    ang = torch.cat(angles, -1)                                                               # (N, D/2)
    cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    xr = x.unflatten(-1, (-1, 2))
    a, b = xr[..., 0], xr[..., 1]
    return torch.stack([a * cos - b * sin, a * sin + b * cos], -1).flatten(-2)


def structured_qkv(frames: int, rows: int, cols: int, heads: int, head_dim: int, *, text: int = 0, batch: int = 1,
                   seed: int = 0, dtype: torch.dtype = torch.float32, channels: int = 32, modes: int = 16,
                   length: Sequence[float] = (4.0, 8.0, 8.0), content: float = 0.5, locality: float = 0.6,
                   noise: float = 0.3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Structured ``q, k, v`` ``(batch, heads, frames*rows*cols + text, head_dim)`` in raster order (module
    docstring): smooth random fields projected per head, a shared positional component, Wan-style 3-D RoPE on q
    and k, per-token noise. Deterministic per ``seed`` (drawn on the CPU in fp64, cast to ``dtype``)."""
    for name, value in (("frames", frames), ("rows", rows), ("cols", cols), ("heads", heads),
                        ("head_dim", head_dim), ("batch", batch), ("channels", channels), ("modes", modes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if isinstance(text, bool) or not isinstance(text, int) or text < 0:
        raise ValueError(f"text must be a non-negative integer, got {text!r}")
    if head_dim % 2:
        raise ValueError(f"head_dim must be even (rotary pairs), got {head_dim}")
    if not -1 <= content <= 1:
        raise ValueError(f"content must lie in [-1, 1], got {content!r}")
    g = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    field = smooth_field(frames, rows, cols, channels, batch=batch, modes=modes, length=length, generator=g)
    w = torch.randn(3, heads, channels, head_dim, generator=g, dtype=f64) / math.sqrt(channels)
    w_other = torch.randn(heads, channels, head_dim, generator=g, dtype=f64) / math.sqrt(channels)
    wq, wv = w[0], w[2]
    wk = content * wq + math.sqrt(1 - content ** 2) * w_other
    q = torch.einsum("bnc,hcd->bhnd", field, wq)
    k = torch.einsum("bnc,hcd->bhnd", field, wk)
    v = torch.einsum("bnc,hcd->bhnd", field, wv)
    c = torch.randn(1, heads, 1, head_dim, generator=g, dtype=f64) * locality
    q, k = q + c, k + c
    q, k = (rope_3d(x, frames, rows, cols) for x in (q, k))
    q, k, v = (x + noise * torch.randn(x.shape, generator=g, dtype=f64) for x in (q, k, v))
    if text:
        extra = [torch.randn(batch, heads, text, head_dim, generator=g, dtype=f64) for _ in range(3)]
        q, k, v = (torch.cat([x, e], 2) for x, e in zip((q, k, v), extra))
    return tuple(x.to(dtype).contiguous() for x in (q, k, v))


def relative_l2(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in fp64."""
    ref = ref.double()
    return float((out.double() - ref).norm() / ref.norm())


# ---------------------------------------------------------------------------------------------------- table rows
@dataclass
class FidelityRow:
    """One row of the fidelity table. Times are medians over interleaved repeats (seconds per call).

    ``selection_seconds``: the method's per-call pattern work (rectified: ``rectified_plan``, i.e. pooling, P̂,
    top-p/top-k and fixed rules, GAPR, ``R``, ``O_nc`` and the CSR pattern); ``plan_seconds``: the CPU backend's
    rectangle planning of a fresh pattern (``vidattn.kernels.cpu_plan``; None where the backend plans nothing
    separately, or the pattern is static and planned once); ``attention_seconds``: the kernel call (with the
    epilogue for rectified). ``seconds`` is their sum, ``speedup = dense_seconds / seconds``.
    """

    method: str
    drop_rate: Optional[float]
    density: float
    error: float
    attention_seconds: float
    dense_seconds: float
    selection_seconds: Optional[float] = None
    plan_seconds: Optional[float] = None

    @property
    def seconds(self) -> float:
        return self.attention_seconds + (self.selection_seconds or 0.0) + (self.plan_seconds or 0.0)

    @property
    def speedup(self) -> float:
        return self.dense_seconds / self.seconds

    @property
    def selection_share(self) -> Optional[float]:
        """Selection time as a fraction of the dense attention time."""
        return None if self.selection_seconds is None else self.selection_seconds / self.dense_seconds


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _host_planner(q: torch.Tensor, backend: str) -> Optional[Callable]:
    """The CPU backend's per-pattern planning function (memoised on the pattern), to time it apart from the kernel;
    None where the backend has none."""
    if q.device.type != "cpu" or backend not in ("auto", "torch"):
        return None
    from .kernels.cpu_ext import cpu_extension
    from .kernels.cpu_plan import plan_rects
    from .kernels.torch_backend import plan_runs

    if q.dtype in (torch.float32, torch.float16, torch.bfloat16) and cpu_extension():
        return plan_rects
    return plan_runs


def fidelity_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: tuple[int, int, int], *,
                  drop_rates: Iterable[float] = DROP_RATES, top_p: float = 0.3, block_size: int = 128,
                  backend: str = "auto", radial: bool = True, radial_decay: float = 1.0, radial_sink_frames: int = 1,
                  repeats: int = 3, warmup: int = 1,
                  progress: Optional[Callable[[str], None]] = None) -> list[FidelityRow]:
    """Rows of the fidelity table on raster-order ``q, k, v`` ``(B, H, N_v + text, D)`` (video first): dense SDPA,
    then per drop rate *rectified* and *plain* (the same critical blocks, no epilogue; text rows dense in both),
    then *radial* at its own density (module docstring). Everything runs ``warmup`` untimed rounds (the first gives
    the outputs the errors are computed from), then ``repeats`` rounds interleaved in the row order; times are
    medians. ``progress(label)`` is called after every timed step."""
    from .gilbert import gilbert_order
    from .kernels import sparse_attention
    from .layout import TextSegment, TokenLayout
    from .patterns import radial_pattern
    from .patterns.rectified import critical_pattern, rectified_plan
    from .plan import AttentionPlan, PlanPart, execute_plan

    drop_rates = [float(d) for d in drop_rates]
    f, r, c = grid
    n_video = f * r * c
    seq = q.shape[2]
    if seq < n_video:
        raise ValueError(f"grid {tuple(grid)} has {n_video} video tokens but the sequence has only {seq}")
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats} and {warmup}")
    device = q.device
    order = torch.cat([gilbert_order(f, r, c), torch.arange(n_video, seq)]).to(device)
    qc, kc, vc = (x.index_select(2, order).contiguous() for x in (q, k, v))
    planner = _host_planner(q, backend)
    report = progress or (lambda label: None)

    with torch.inference_mode():
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())[:, :, :n_video]
        ref_curve = ref.index_select(2, order[:n_video])

        def timed(fn: Callable[[], object]) -> tuple[float, object]:
            _sync(device)
            start = time.perf_counter()
            out = fn()
            _sync(device)
            return time.perf_counter() - start, out

        def plan_cost(plan: AttentionPlan) -> Optional[float]:
            if planner is None:
                return None
            return timed(lambda: [planner(part.pattern) for part in plan.parts])[0]

        def run_rectified(drop: float) -> dict:
            t_sel, (plan, stats) = timed(lambda: rectified_plan(qc, kc, vc, grid=(f, r, c), drop_rate=drop,
                                                                top_p=top_p, block_size=block_size))
            t_plan = plan_cost(plan)
            t_att, out = timed(lambda: execute_plan(plan, qc, kc, vc, backend=backend, layout="bhsd"))
            # Plain block-sparse: the same critical blocks as a fresh pattern (planned like the rectified one).
            video = critical_pattern(stats.critical, q_len=n_video, kv_len=seq, block_size=block_size,
                                     kv_lens=plan.parts[0].pattern.kv_lens)
            plain_plan = AttentionPlan((PlanPart(0, n_video, video), *plan.parts[1:]))
            p_plan = plan_cost(plain_plan)
            p_att, p_out = timed(lambda: execute_plan(plain_plan, qc, kc, vc, backend=backend, layout="bhsd"))
            return {"plain": (None, p_plan, p_att, p_out, float(plain_plan.density())),
                    "rectified": (t_sel, t_plan, t_att, out, float(plan.density()))}

        radial_p = None
        if radial:
            text = TextSegment(seq - n_video) if seq > n_video else None
            radial_p = radial_pattern(TokenLayout(f, r, c, text=text), decay=radial_decay, block_size=block_size,
                                      sink_frames=min(radial_sink_frames, f))

        times: dict[tuple, list[list[Optional[float]]]] = {}
        outputs: dict[tuple, tuple[torch.Tensor, float]] = {}

        def record(key: tuple, sel: Optional[float], plan: Optional[float], att: float, out: torch.Tensor,
                   density: float, timed_round: bool) -> None:
            if key not in outputs:
                outputs[key] = (out, density)
            if timed_round:
                times.setdefault(key, []).append([sel, plan, att])

        for i in range(warmup + repeats):
            timed_round = i >= warmup
            t, out = timed(lambda: F.scaled_dot_product_attention(q, k, v))
            record(("dense", None), None, None, t, out, 1.0, timed_round)
            report("dense")
            for drop in drop_rates:
                for name, (sel, plan, att, out, density) in run_rectified(drop).items():
                    record((name, drop), sel, plan, att, out, density, timed_round)
                report(f"drop {drop:g}")
            if radial_p is not None:
                t, out = timed(lambda: sparse_attention(q, k, v, radial_p, backend=backend))
                record(("radial", None), None, None, t, out, radial_p.density(), timed_round)
                report("radial")

    def median(values: list[Optional[float]]) -> Optional[float]:
        return None if values[0] is None else statistics.median(values)

    dense_seconds = statistics.median(t[2] for t in times[("dense", None)])
    rows = []
    for key, samples in times.items():
        method, drop = key
        out, density = outputs[key]
        video = out[:, :, :n_video]
        error = relative_l2(video, ref if method in ("dense", "radial") else ref_curve)
        sel, plan, att = (median([s[j] for s in samples]) for j in range(3))
        rows.append(FidelityRow(method, drop, density, error, att, dense_seconds, sel, plan))
    return rows
