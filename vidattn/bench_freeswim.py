"""FreeSwim benchmark (spec ``freeswim.md`` §2.2, §7): the inward window against dense attention, and the per-step
cost of FreeSwim's refinement modes, measured in one process.

Two parts:

* **window attention** (:func:`time_window`): per latent grid, dense SDPA and ``sparse_attention(q, k, v,
  window_pattern(...))`` in raster order and in a spatial-tile order (``tiles<R>x<C>``; q, k, v are permuted into
  that order once, before timing — the permutation is not timed), interleaved rounds, medians. Each row carries the
  token density (keys kept per query, exact) and the block density (token pairs inside listed blocks) of its order,
  the pattern's build time (cold) and the largest difference against the exact masked reference (256 sampled rows;
  the tiled output is put back in raster order first).
* **refinement step cost** (:func:`time_steps`, :func:`step_costs`): a random Wan 2.1 transformer at a scaled-down
  size, timed per call kind with :class:`~vidattn.processors.freeswim.FreeSwimProcessor` installed
  (:func:`vidattn.apply`) and the passes declared with ``StepContext.passing`` as ``FreeSwimPipeline`` declares
  them: ``full`` (full self-attention, cross-attention recorded), ``window_replay`` (window, cross-attention
  replayed), ``window_own`` (window, own cross-attention), and ``direct`` (a copy of the transformer with the stock
  dense processors). Per denoising step with CFG (cond + uncond calls):

      direct        2 x direct
      nocache       2 x (full + window_replay)
      cache c       (full + c x window_replay + c x window_own) / c      (refresh every c steps; uncond window only)
      window only   2 x window_own                                       (no full branch at all: the lower bound)
"""
from __future__ import annotations

import copy
import re
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from .modeling import cast_like_pretrained, seeded

__all__ = ["GRID_RE", "StepCosts", "WindowRow", "build_wan_transformer", "parse_grid", "step_costs",
           "target_for", "time_steps", "time_window", "window_densities"]

GRID_RE = re.compile(r"^(\d+)x(\d+)x(\d+)(?::(\d+))?$")

# Window-attention speed targets (issue): >= 1.5x dense SDPA at 2.25x the base grid per axis (68x120, ~1080p),
# >= 3x at 4.5x (135x240, ~4K); keyed by the per-axis scale over the base grid.
TARGET_SPEEDUPS = ((2.25, 1.5), (4.5, 3.0))


def parse_grid(text: str) -> tuple[int, int, int, Optional[int]]:
    """``"FxRxC"`` or ``"FxRxC:H"`` -> ``(frames, rows, cols, heads or None)``; ValueError otherwise."""
    m = GRID_RE.match(text.strip())
    if m is None:
        raise ValueError(f"expected FRAMESxROWSxCOLS[:HEADS], e.g. 2x68x120:2, got {text!r}")
    f, r, c = (int(m.group(i)) for i in (1, 2, 3))
    heads = None if m.group(4) is None else int(m.group(4))
    if min(f, r, c) < 1 or (heads is not None and heads < 1):
        raise ValueError(f"frames, rows, cols and heads must be >= 1, got {text!r}")
    return f, r, c, heads


def target_for(rows: int, cols: int, base: tuple[int, int]) -> Optional[float]:
    """The issue's speedup target for a ``rows x cols`` frame over the ``base`` grid (None: no target there): both
    axes within 5 % of the target's scale (68x120 over 30x52 is 2.27x and 2.31x, 135x240 is 4.5x and 4.6x)."""
    for scale, speedup in TARGET_SPEEDUPS:
        if all(abs(n / b / scale - 1) <= 0.05 for n, b in zip((rows, cols), base)):
            return speedup
    return None


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(fn: Callable[[], Any], device: str) -> float:
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def _clear_window_cache() -> None:
    """Empty window_pattern's per-layout cache so that the next build is timed cold."""
    from .patterns import window as window_module

    clear = getattr(getattr(window_module, "_build", None), "cache_clear", None)
    if clear is not None:
        clear()


# ---------------------------------------------------------------------------------------------------- window
def window_densities(frames: int, rows: int, cols: int, *, base: tuple[int, int], tiles: tuple[int, int],
                     block_size: int = 128) -> dict[str, float]:
    """Token density and the block densities in raster and tiled order of the inward window of ``base`` on a
    ``frames x rows x cols`` grid: ``{"token", "raster", "tiled"}``."""
    from .layout import TokenLayout
    from .patterns.window import window_pattern, window_token_density

    raster = TokenLayout(frames, rows, cols)
    tiled = TokenLayout(frames, rows, cols, order=f"tiles{tiles[0]}x{tiles[1]}")
    knobs = dict(base_rows=base[0], base_cols=base[1])
    return {"token": window_token_density(raster, **knobs),
            "raster": window_pattern(raster, block_size=block_size, **knobs).density(),
            "tiled": window_pattern(tiled, block_size=block_size, **knobs).density()}


@dataclass
class WindowRow:
    """One timed attention row: ``order`` is ``dense`` (SDPA), ``raster`` or ``tiles<R>x<C>``."""

    grid: tuple[int, int, int]
    heads: int
    order: str
    backend: str
    token_density: float
    block_density: float
    seconds: float
    dense_seconds: float
    build_seconds: Optional[float] = None
    max_diff: Optional[float] = None
    times: list[float] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]

    @property
    def speedup(self) -> float:
        return self.dense_seconds / self.seconds

    @property
    def efficiency(self) -> float:
        """speedup x block density (1.0: the listed blocks run as fast as dense attention runs all pairs)."""
        return self.speedup * self.block_density


def time_window(grid: tuple[int, int, int], heads: int, *, base: tuple[int, int], tiles: tuple[int, int],
                head_dim: int = 128, block_size: int = 128, backends: tuple[str, ...] = ("auto",),
                repeats: int = 3, warmup: int = 1, dtype: torch.dtype = torch.float32, device: str = "cpu",
                seed: int = 0, check: bool = True,
                progress: Optional[Callable[[str], None]] = None) -> list[WindowRow]:
    """Dense SDPA and the window in raster and tiled order per backend on the same Gaussian q, k, v (module
    docstring); rounds interleaved (dense, then every (order, backend)), medians. Returns the dense row first."""
    from .bench import masked_sdpa_rows
    from .kernels import sparse_attention
    from .layout import TokenLayout
    from .patterns.window import window_pattern, window_token_density
    from .token_order import sequence_permutation

    f, r, c = grid
    tick = progress or (lambda label: None)
    raster = TokenLayout(f, r, c)
    tile_order = f"tiles{tiles[0]}x{tiles[1]}"
    layouts = {"raster": raster, tile_order: TokenLayout(f, r, c, order=tile_order)}
    knobs = dict(base_rows=base[0], base_cols=base[1], block_size=block_size)
    token_density = window_token_density(raster, base_rows=base[0], base_cols=base[1])
    patterns, builds = {}, {}
    for order, layout in layouts.items():
        _clear_window_cache()
        start = time.perf_counter()
        patterns[order] = window_pattern(layout, **knobs)
        builds[order] = time.perf_counter() - start
        tick(f"built {order}")
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, heads, raster.seq_len, head_dim, generator=g).to(device=device, dtype=dtype)
               for _ in range(3))
    perm, inverse = sequence_permutation(raster, tile_order)
    perm, inverse = perm.to(device), inverse.to(device)
    tq, tk, tv = (x.index_select(2, perm).contiguous() for x in (q, k, v))  # outside the timed region
    inputs = {"raster": (q, k, v), tile_order: (tq, tk, tv)}
    fns: dict[tuple[str, str], Callable[[], torch.Tensor]] = {
        ("dense", "sdpa"): lambda: F.scaled_dot_product_attention(q, k, v)}
    for backend in backends:
        for order, pattern in patterns.items():
            pat = pattern.to(device)
            fns[(order, backend)] = (lambda a, p, b: lambda: sparse_attention(*a, p, backend=b))(inputs[order], pat,
                                                                                                 backend)
    diffs: dict[tuple[str, str], float] = {}
    times: dict[tuple[str, str], list[float]] = {key: [] for key in fns}
    with torch.inference_mode():
        outs = {}
        for key, fn in fns.items():
            for _ in range(max(warmup, 1)):
                outs[key] = fn()
            _sync(device)
            tick(f"warm-up {key[0]} {key[1]}")
        if check:
            rows = torch.randperm(raster.seq_len, generator=g)[:256].sort().values.to(device)
            ref = masked_sdpa_rows(q, k, v, patterns["raster"].to(device), rows).float()
            for key, out in outs.items():
                if key[0] == "dense":
                    continue
                if key[0] == tile_order:
                    out = out.index_select(2, inverse)
                diffs[key] = float((out[:, :, rows].float() - ref).abs().max())
        del outs
        for i in range(repeats):
            for key, fn in fns.items():
                times[key].append(_timed(fn, device))
            tick(f"round {i + 1}/{repeats}")
    dense = statistics.median(times[("dense", "sdpa")])
    out_rows = [WindowRow(grid, heads, "dense", "sdpa", 1.0, 1.0, dense, dense, times=times[("dense", "sdpa")])]
    for (order, backend), t in times.items():
        if order == "dense":
            continue
        out_rows.append(WindowRow(grid, heads, order, backend, token_density, patterns[order].density(),
                                  statistics.median(t), dense, builds[order], diffs.get((order, backend)), t))
    return out_rows


# ---------------------------------------------------------------------------------------------------- steps
def build_wan_transformer(*, heads: int, head_dim: int, layers: int, ffn_mult: float = 5.8, text_dim: int = 32,
                          seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A random Wan 2.1 transformer (patch 1x2x2, 16 latent channels, QK RMS norm) of ``heads x head_dim`` and
    ``layers`` blocks; FFN width ``ffn_mult x dim`` (Wan 1.3B: 8960 / 1536 = 5.8). Seeded, global RNG untouched."""
    from diffusers import WanTransformer3DModel

    dim = heads * head_dim

    def build() -> torch.nn.Module:
        return WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=head_dim, in_channels=16,
            out_channels=16, text_dim=text_dim, freq_dim=256, ffn_dim=max(1, int(round(ffn_mult * dim))),
            num_layers=layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=1024,
        ).eval()

    return cast_like_pretrained(seeded(seed, build), dtype)  # as from_pretrained: fp32 modules stay fp32


CALL_KINDS = ("direct", "full", "window_replay", "window_own")


@dataclass
class StepCosts:
    """Median seconds per transformer call kind (``CALL_KINDS``) and the composed per-step seconds per mode."""

    calls: dict[str, float]
    modes: dict[str, float]
    runs: dict[str, list[float]] = field(default_factory=dict)

    def relative(self, mode: str) -> float:
        """Time per step of ``mode`` over direct full attention's (< 1: faster than direct)."""
        return self.modes[mode] / self.modes["direct"]


def step_costs(calls: dict[str, float], cache_steps: tuple[int, ...] = (2, 5)) -> dict[str, float]:
    """Per-step seconds with CFG of each mode from the per-call seconds (module docstring)."""
    full, replay, own = calls["full"], calls["window_replay"], calls["window_own"]
    modes = {"direct": 2 * calls["direct"], "nocache": 2 * (full + replay)}
    for c in cache_steps:
        modes[f"cache c={c}"] = (full + c * replay + c * own) / c
    modes["window only"] = 2 * own
    return modes


def _wan_inputs(grid: tuple[int, int, int], text_len: int, text_dim: int, seed: int, dtype: torch.dtype,
                device: str) -> tuple[dict, dict]:
    f, r, c = grid
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, 16, f, 2 * r, 2 * c, generator=g).to(device=device, dtype=dtype)
    cond = torch.randn(1, text_len, text_dim, generator=g).to(device=device, dtype=dtype)
    uncond = torch.randn(1, text_len, text_dim, generator=g).to(device=device, dtype=dtype)
    t = torch.full((1,), 900.0, device=device)
    base = dict(hidden_states=latents, timestep=t, return_dict=False)
    return {**base, "encoder_hidden_states": cond}, {**base, "encoder_hidden_states": uncond}


def time_steps(grid: tuple[int, int, int], *, base: tuple[int, int], heads: int = 2, head_dim: int = 128,
               layers: int = 2, ffn_mult: float = 5.8, text_len: int = 512, tiles: Optional[tuple[int, int]] = None,
               block_size: int = 128, cache_steps: tuple[int, ...] = (2, 5), repeats: int = 3, warmup: int = 1,
               dtype: torch.dtype = torch.float32, device: str = "cpu", seed: int = 0, backend: str = "auto",
               progress: Optional[Callable[[str], None]] = None) -> StepCosts:
    """Times the four call kinds on a random Wan transformer at ``grid`` (latent frames x token rows x token cols,
    after patching) in interleaved rounds (direct, full, window_replay, window_own) and composes the modes.

    ``tiles``: the FreeSwim processor's spatial-tile token order (None: raster). Raises RuntimeError when a window
    pass did not run sparse (a dense fallback would make the comparison meaningless)."""
    import vidattn
    from .processors.freeswim import FreeSwimProcessor

    tick = progress or (lambda label: None)
    text_dim = 32
    model = build_wan_transformer(heads=heads, head_dim=head_dim, layers=layers, ffn_mult=ffn_mult,
                                  text_dim=text_dim, seed=seed, dtype=dtype).to(device)
    stock = copy.deepcopy(model)  # the same weights with diffusers' own processors: direct full attention
    proc = FreeSwimProcessor(base[0], base[1], scale_ratio=2.0, block_size=block_size, tiles=tiles, backend=backend)
    inst = vidattn.apply(model, proc)
    ctx = inst.context
    cond, uncond = _wan_inputs(grid, text_len, text_dim, seed, dtype, device)

    def passing(inputs: dict, **fields: Any) -> Callable[[], Any]:
        def call() -> Any:
            with ctx.passing(**fields):
                return model(**inputs)
        return call

    fns = {"direct": lambda: stock(**cond),
           "full": passing(cond, branch="full", cross="record", cfg="cond", step=0),
           "window_replay": passing(cond, branch="window", cross="replay", cfg="cond", step=0),
           "window_own": passing(uncond, branch="window", cross="own", cfg="uncond", step=0)}
    runs: dict[str, list[float]] = {kind: [] for kind in fns}
    try:
        with torch.no_grad():
            for _ in range(max(warmup, 1)):
                for kind, fn in fns.items():
                    fn()
                    _sync(device)
                    tick(f"warm-up {kind}")
            sparse = inst.stats.sparse_calls
            if sparse < layers * 2:
                raise RuntimeError(f"the window passes ran {sparse} sparse attention calls, expected "
                                   f"{layers * 2} or more: the window pass fell back to dense attention "
                                   f"({inst.stats.summary()})")
            for i in range(repeats):
                for kind, fn in fns.items():
                    runs[kind].append(_timed(fn, device))
                tick(f"round {i + 1}/{repeats}")
    finally:
        vidattn.remove(model)
    calls = {kind: statistics.median(t) for kind, t in runs.items()}
    return StepCosts(calls=calls, modes=step_costs(calls, cache_steps), runs=runs)
