"""Token orders: a permutation of a video's tokens, applied once per transformer forward at the model's split points.

A method may want the video tokens in another order than raster ``(t, y, x)``: Rectified SpaAttn wants a 3-D
Gilbert curve, so that a 128-token block is a compact spatio-temporal region. The order is a permutation ``perm`` of
the ``T*H*W`` video tokens (``perm[i]`` = raster index of the i-th token in the new order), cached per grid.

:class:`OrderHooks` applies it **once per forward** at the points where diffusers' context-parallel plans split
and gather a transformer (``SplitPoints``, declared by each model adapter): the rotary tables at the rope module's
output (or a forward argument that carries them), per-token forward arguments (Wan 2.2's per-token timestep), the
hidden states at the first block's input; the inverse is applied at the output projection's output. Every other op
between those points is token-wise (norms, FFN, adaLN, cross-attention queries) or attention, whose processors
read the order from the :class:`~vidattn.layout.TokenLayout`. Nothing patches ``forward``; the hooks are removed by
:func:`vidattn.remove`. Under diffusers' context parallelism the permutation is applied **before** the sequence is
split (torch pre-hooks run ahead of diffusers' split hooks; the rope output is handled in :meth:`OrderHooks.on_rope`),
so each rank holds a contiguous shard of the permuted sequence (:mod:`vidattn.parallel`).
"""
from __future__ import annotations

import inspect
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Optional

import torch
from torch import nn

from .layout import TokenLayout

__all__ = ["SplitPoints", "OrderHooks", "is_token_order", "order_permutation", "parse_tiles", "sequence_permutation",
           "tile_order"]


@dataclass(frozen=True)
class SplitPoints:
    """Where a transformer's forward can be put into another token order and back (module paths from the root).

    ``rope`` — module whose output rotary tables are permuted along ``rope_dim`` (or ``rope_kwarg``: the forward
    argument carrying them); ``token_kwargs`` — forward arguments with a per-token dim 1 (permuted only when that dim
    has the video's length); ``first_block`` — module whose ``hidden_states`` input is permuted (dim 1);
    ``output`` — module whose output is put back in raster order (dim 1).
    """

    first_block: str
    output: str
    rope: Optional[str] = None
    rope_kwarg: Optional[str] = None
    rope_dim: int = 1
    token_kwargs: tuple[str, ...] = ()


def parse_tiles(name: str) -> Optional[tuple[int, int]]:
    """``(tile_rows, tile_cols)`` of a spatial-tile order name ``"tiles<R>x<C>"`` (e.g. ``"tiles8x16"``), else None."""
    match = re.fullmatch(r"tiles(\d+)x(\d+)", name)
    if match is None or int(match.group(1)) < 1 or int(match.group(2)) < 1:
        return None
    return int(match.group(1)), int(match.group(2))


def is_token_order(name: object) -> bool:
    """Whether ``name`` names a token order: ``"raster"``, ``"gilbert"`` or ``"tiles<R>x<C>"``."""
    return isinstance(name, str) and (name in ("raster", "gilbert") or parse_tiles(name) is not None)


def tile_order(frames: int, rows: int, cols: int, tile_rows: int, tile_cols: int) -> torch.Tensor:
    """Spatial tiles: frame by frame, first the whole ``tile_rows x tile_cols`` tiles in raster order of tiles, each
    tile's cells in raster order, then the cells of the smaller edge tiles (when the frame is not a multiple of the
    tile), so that the whole tiles stay aligned to blocks of a multiple of the tile size. ``perm[i]`` is the raster
    index of the i-th token."""
    t, y, x = torch.meshgrid(torch.arange(frames), torch.arange(rows), torch.arange(cols), indexing="ij")
    tiles_per_row = -(-cols // tile_cols)
    tile = (y // tile_rows) * tiles_per_row + x // tile_cols
    edge = ((y // tile_rows + 1) * tile_rows > rows) | ((x // tile_cols + 1) * tile_cols > cols)
    cells = tile_rows * tile_cols
    per_frame = -(-rows // tile_rows) * tiles_per_row
    key = ((t * 2 + edge.long()) * per_frame + tile) * cells + (y % tile_rows) * tile_cols + x % tile_cols
    return torch.argsort(key.flatten())


@lru_cache(maxsize=32)
def _cached_order(name: str, frames: int, rows: int, cols: int) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    if name == "raster":
        return None
    tiles = parse_tiles(name)
    if name == "gilbert":
        from .gilbert import gilbert_order

        perm = gilbert_order(frames, rows, cols).clone()
    elif tiles is not None:
        perm = tile_order(frames, rows, cols, *tiles)
    else:
        raise ValueError(f"unknown token order {name!r}: expected 'raster', 'gilbert' or 'tiles<R>x<C>'")
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.numel())
    return perm, inverse


def order_permutation(name: str, frames: int, rows: int, cols: int) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """``(perm, inverse)`` of the video tokens for order ``name`` on a ``frames x rows x cols`` grid (``None`` for
    raster): ``perm[i]`` is the raster index of the i-th token, ``inverse[perm[i]] = i``. Cached per grid; treat the
    tensors as read-only."""
    return _cached_order(name, frames, rows, cols)


def sequence_permutation(layout: TokenLayout, order: str) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """``(perm, inverse)`` over the whole attention sequence of a raster ``layout`` that puts its video tokens in
    ``order`` (text tokens stay where they are); ``None`` when nothing moves."""
    found = order_permutation(order, layout.frames, layout.height, layout.width)
    if found is None:
        return None
    video = found[0] + layout.video_start
    perm = torch.arange(layout.seq_len)
    perm[layout.video_start:layout.video_start + layout.video_tokens] = video
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.numel())
    return perm, inverse


def _module(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path) if path else root


class OrderHooks:
    """The hooks that run one transformer's forward in ``context.layout.order`` (see the module docstring).

    A plain object holding the step context and the hook ids it registered, so that it pickles with the model and
    :meth:`remove` acts on the module it was registered on. Each hook is a no-op while the call's layout is raster
    or unknown, or a tensor does not have the video's length on the split dim.
    """

    def __init__(self, context: Any, points: SplitPoints) -> None:
        self.context = context
        self.points = points
        self.handles: list[tuple[str, str, int]] = []  # (module path, hook kind, id)
        self.forward_params: list[str] = []  # the transformer's forward parameters (arguments passed by position)
        self._device_cache: dict = {}
        self._cp: Any = None  # diffusers' context-parallel config of the forward in progress (None: not split)

    # ------------------------------------------------------------------ the permutation of the call in progress
    def _perm(self, device: torch.device, inverse: bool = False) -> Optional[torch.Tensor]:
        layout = self.context.layout
        if layout is None or layout.order == "raster":
            return None
        key = (layout.order, layout.frames, layout.height, layout.width, str(device), inverse)
        if key not in self._device_cache:
            if len(self._device_cache) >= 8:
                self._device_cache.pop(next(iter(self._device_cache)))
            found = order_permutation(layout.order, layout.frames, layout.height, layout.width)
            self._device_cache[key] = None if found is None else found[1 if inverse else 0].to(device)
        return self._device_cache[key]

    def _move(self, x: Any, dim: int, inverse: bool = False) -> Any:
        if not isinstance(x, torch.Tensor) or x.dim() <= dim:
            return x
        perm = self._perm(x.device, inverse)
        if perm is None or x.shape[dim] != perm.numel():
            return x
        return x.index_select(dim, perm)

    def _move_tables(self, tables: Any, dim: int) -> Any:
        if isinstance(tables, (tuple, list)):
            return type(tables)(self._move(t, dim) for t in tables)
        return self._move(tables, dim)

    # ------------------------------------------------------------------ hooks
    def on_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """Transformer pre-hook (after the step hook): per-token arguments and rotary tables passed in, by keyword or
        by position."""
        self._cp = getattr(getattr(module, "_parallel_config", None), "context_parallel_config", None)
        args = list(args)
        for i, name in enumerate(self.forward_params[:len(args)]):
            if name in self.points.token_kwargs:
                args[i] = self._move(args[i], 1)
            elif name == self.points.rope_kwarg:
                args[i] = self._move_tables(args[i], self.points.rope_dim)
        args = tuple(args)
        kwargs = dict(kwargs)
        for name in self.points.token_kwargs:
            if name in kwargs:
                kwargs[name] = self._move(kwargs[name], 1)
        if self.points.rope_kwarg and self.points.rope_kwarg in kwargs:
            kwargs[self.points.rope_kwarg] = self._move_tables(kwargs[self.points.rope_kwarg], self.points.rope_dim)
        return args, kwargs

    def on_rope(self, module: nn.Module, args: tuple, output: Any) -> Any:
        """The rotary tables in the call's order. Under diffusers' context parallelism the model's ``_cp_plan`` may
        split the rope output in a hook that wraps the module's ``forward``, so it runs before this one and the
        tables arrive as this rank's raster shard: they are then recomputed whole (the class's own ``forward``,
        cheap), permuted and cut like diffusers' equal split, so the split follows the permuted order as it does
        for the hidden states (permuted by :meth:`on_first_block` before diffusers' split of the same input)."""
        dim, cp = self.points.rope_dim, getattr(self, "_cp", None)
        first = output[0] if isinstance(output, (tuple, list)) else output
        if cp is not None and isinstance(first, torch.Tensor) and first.dim() > dim:
            perm = self._perm(first.device)
            mesh = cp._flattened_mesh
            if perm is not None and first.shape[dim] * mesh.size() == perm.numel():
                import torch.distributed as dist

                full = self._move_tables(type(module).forward(module, *args), dim)
                rank = dist.get_rank(mesh.get_group())
                pick = lambda t: t.chunk(mesh.size(), dim)[rank]  # noqa: E731  diffusers' EquipartitionSharder
                return type(full)(map(pick, full)) if isinstance(full, (tuple, list)) else pick(full)
        return self._move_tables(output, dim)

    def on_first_block(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if "hidden_states" in kwargs:
            return args, {**kwargs, "hidden_states": self._move(kwargs["hidden_states"], 1)}
        if args:
            return (self._move(args[0], 1), *args[1:]), kwargs
        return args, kwargs

    def on_output(self, module: nn.Module, args: tuple, output: Any) -> Any:
        return self._move(output, 1, inverse=True)

    # ------------------------------------------------------------------ install / remove
    def install(self, transformer: nn.Module) -> None:
        """Register the hooks on ``transformer`` (the step hook must already be registered: it sets the layout)."""
        p = self.points
        self.forward_params = [name for name in inspect.signature(transformer.forward).parameters if name != "self"]
        plan = [("", "pre", self.on_forward)]
        if p.rope:
            plan.append((p.rope, "post", self.on_rope))
        plan += [(p.first_block, "pre", self.on_first_block), (p.output, "post", self.on_output)]
        for path, kind, fn in plan:
            module = _module(transformer, path)
            if kind == "pre":
                handle = module.register_forward_pre_hook(fn, with_kwargs=True)
            else:
                handle = module.register_forward_hook(fn)
            self.handles.append((path, kind, handle.id))

    def remove(self, transformer: nn.Module) -> None:
        """Remove exactly the hooks this object registered on ``transformer`` (or on a copy of it)."""
        for path, kind, hook_id in self.handles:
            try:
                module = _module(transformer, path)
            except AttributeError:
                continue
            if kind == "pre":
                module._forward_pre_hooks.pop(hook_id, None)
                module._forward_pre_hooks_with_kwargs.pop(hook_id, None)
            else:
                module._forward_hooks.pop(hook_id, None)
        self.handles.clear()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_device_cache": {}, "_cp": None}
