"""BlockPattern: the block-sparse attention pattern every backend consumes.

The sequence of ``q_len`` queries is cut into ``nq = ceil(q_len / block_q)`` query blocks and the ``kv_len`` keys
into ``nk = ceil(kv_len / block_kv)`` key blocks; the last block of each may be short (a *ragged tail*: its missing
tokens simply do not exist, they are never padded into the softmax). For every query block the pattern lists the
key blocks it attends to, as CSR per *group*:

    indptr  int32 (Bp, Hp, nq + 1)     row pointers; row r of group (b, h) is indices[b, h, indptr[r]:indptr[r+1]]
    indices int32 (Bp, Hp, nnz_max)    key-block ids, ascending within a row; padded with 0 past indptr[..., -1]
    partial bool  (Bp, Hp, nnz_max)    entry needs the token predicate (None: every entry is a full block)

``Bp`` is 1 (shared by the batch) or B, ``Hp`` is 1 (shared by all heads) or H. A (query, key) pair of sample b and
head h is attended iff its block is listed for (b, h), and, for a partial entry, ``predicate(q, kv)`` holds, and
``kv < kv_lens[b]`` when per-sample key lengths are given (padded text keys are masked this way).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from .graph_op import PatternHandle

__all__ = ["BlockPattern"]

Predicate = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

_DENSE_LIMIT = 1 << 28


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _check_positive(name: str, value: int) -> None:
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


class BlockPattern:
    """Block-sparse attention pattern (see the module docstring for the exact semantics)."""

    def __init__(
        self,
        *,
        q_len: int,
        kv_len: int,
        block_q: int,
        block_kv: int,
        indptr: torch.Tensor,
        indices: torch.Tensor,
        partial: Optional[torch.Tensor] = None,
        predicate: Optional[Predicate] = None,
        kv_lens: Optional[torch.Tensor] = None,
        validate: bool = True,
    ) -> None:
        if validate:
            self._validate(q_len, kv_len, block_q, block_kv, indptr, indices, partial, predicate, kv_lens)
        self.q_len, self.kv_len = q_len, kv_len
        self.block_q, self.block_kv = block_q, block_kv
        self.indptr = indptr.to(torch.int32)
        self.indices = indices.to(torch.int32)
        self.partial = None if partial is None else partial.to(torch.bool)
        self.predicate = predicate
        self.kv_lens = None if kv_lens is None else kv_lens.to(torch.int32, copy=True)  # plans read it once
        self._cache: dict = {}
        # What depends on the block structure alone (density, backend call plans): shared with with_kv_lens copies.
        self._structure: dict = {}
        # This pattern as an input of compiled graphs (made here, outside any graph: see graph_op.py).
        self.graph_handle = PatternHandle(self)

    @staticmethod
    def _validate(q_len: int, kv_len: int, block_q: int, block_kv: int, indptr: torch.Tensor, indices: torch.Tensor,
                  partial: Optional[torch.Tensor], predicate: Optional[Predicate],
                  kv_lens: Optional[torch.Tensor]) -> None:
        """The constructor's checks (host reads of the CSR: skipped with ``validate=False`` for patterns built on
        an accelerator by trusted code, e.g. :meth:`from_block_mask_on_device`)."""
        for name, value in (("q_len", q_len), ("kv_len", kv_len), ("block_q", block_q), ("block_kv", block_kv)):
            _check_positive(name, value)
        nq = _ceil_div(q_len, block_q)
        if indptr.dim() != 3 or indptr.shape[-1] != nq + 1:
            raise ValueError(f"indptr must have shape (Bp, Hp, {nq + 1}), got {tuple(indptr.shape)}")
        if indices.dim() != 3 or indices.shape[:2] != indptr.shape[:2]:
            raise ValueError(f"indices must have shape {tuple(indptr.shape[:2])} + (nnz,), got {tuple(indices.shape)}")
        if partial is not None and partial.shape != indices.shape:
            raise ValueError(f"partial must match indices' shape {tuple(indices.shape)}, got {tuple(partial.shape)}")
        if partial is not None and predicate is None:
            raise ValueError("partial entries need a predicate")
        if kv_lens is not None:
            if kv_lens.dim() != 1:
                raise ValueError(f"kv_lens must be 1-D (batch,), got shape {tuple(kv_lens.shape)}")
            if kv_lens.numel() and (int(kv_lens.min()) < 0 or int(kv_lens.max()) > kv_len):
                raise ValueError(f"kv_lens must lie in [0, {kv_len}]")
        counts = indptr[..., 1:] - indptr[..., :-1]
        if indptr.numel() and (int(indptr[..., 0].min()) != 0 or int(indptr[..., 0].max()) != 0
                               or int(counts.min()) < 0 or int(indptr[..., -1].max()) > indices.shape[-1]):
            raise ValueError("indptr must start at 0, be non-decreasing and end within indices' last dimension")
        nk = _ceil_div(kv_len, block_kv)
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= nk):
            raise ValueError(f"indices must be key-block ids in [0, {nk}) for kv_len={kv_len}, block_kv={block_kv}")

    def __getstate__(self) -> dict:
        """Pickled and deep-copied without the graph handle (a weak reference); the copy makes its own."""
        state = self.__dict__.copy()
        state.pop("graph_handle", None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.graph_handle = PatternHandle(self)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_block_mask(
        cls,
        block_mask: torch.Tensor,
        *,
        q_len: int,
        kv_len: int,
        block_q: int,
        block_kv: Optional[int] = None,
        partial: Optional[torch.Tensor] = None,
        predicate: Optional[Predicate] = None,
        kv_lens: Optional[torch.Tensor] = None,
    ) -> "BlockPattern":
        """Build from a boolean block bitmap ``(nq, nk)`` or ``(Bp, Hp, nq, nk)``.

        ``partial`` (same shape) marks kept blocks that need ``predicate``; if a predicate is given without
        ``partial``, every kept block is partial.
        """
        block_kv = block_q if block_kv is None else block_kv
        for name, value in (("q_len", q_len), ("kv_len", kv_len), ("block_q", block_q), ("block_kv", block_kv)):
            _check_positive(name, value)
        nq, nk = _ceil_div(q_len, block_q), _ceil_div(kv_len, block_kv)
        mask = block_mask.to(torch.bool)
        if mask.dim() == 2:
            mask = mask[None, None]
        if mask.dim() != 4 or mask.shape[-2:] != (nq, nk):
            raise ValueError(f"block_mask must have shape (nq, nk) = ({nq}, {nk}) or (Bp, Hp, nq, nk), "
                             f"got {tuple(block_mask.shape)}")
        if predicate is not None and partial is None:
            partial = mask
        if partial is not None:
            partial = partial.to(torch.bool)
            if partial.dim() == 2:
                partial = partial[None, None]
            partial = (partial & mask).expand_as(mask)
        counts = mask.sum(-1, dtype=torch.int32)
        indptr = torch.zeros(*mask.shape[:2], nq + 1, dtype=torch.int32, device=mask.device)
        indptr[..., 1:] = counts.cumsum(-1)
        nnz = max(int(indptr[..., -1].max()), 1)
        # Stable sort puts kept columns first in ascending order, row by row; gather them into each group's CSR.
        cols = torch.arange(nk, device=mask.device).expand_as(mask)
        key = (~mask).to(torch.int8)
        order = torch.sort(key, dim=-1, stable=True).indices
        sorted_cols = torch.gather(cols, -1, order)
        keep = torch.gather(mask, -1, order)
        flat_cols = sorted_cols[keep]
        g = mask.shape[0] * mask.shape[1]
        per_group = counts.reshape(g, nq).sum(-1).tolist()
        indices = torch.zeros(g, nnz, dtype=torch.int32, device=mask.device)
        part = None
        if partial is not None:
            part = torch.zeros(g, nnz, dtype=torch.bool, device=mask.device)
            flat_part = torch.gather(partial, -1, order)[keep]
        offset = 0
        for i, n in enumerate(per_group):
            indices[i, :n] = flat_cols[offset:offset + n]
            if part is not None:
                part[i, :n] = flat_part[offset:offset + n]
            offset += n
        shape = (*mask.shape[:2], nnz)
        if part is not None and not bool(part.any()):
            part, predicate = None, None
        return cls(q_len=q_len, kv_len=kv_len, block_q=block_q, block_kv=block_kv, indptr=indptr,
                   indices=indices.reshape(shape), partial=None if part is None else part.reshape(shape),
                   predicate=predicate, kv_lens=kv_lens)

    @classmethod
    def from_block_mask_on_device(cls, block_mask: torch.Tensor, *, q_len: int, kv_len: int, block_q: int,
                                  block_kv: Optional[int] = None,
                                  kv_lens: Optional[torch.Tensor] = None) -> "BlockPattern":
        """:meth:`from_block_mask` without host synchronisation (for dynamic per-head patterns on a GPU).

        ``block_mask`` is bool ``(Bp, Hp, nq, nk)``. Each row's kept columns are scattered to ``indptr[row] +
        rank`` in an index array of fixed width ``nq * nk`` (entries past a group's count are 0), so no size
        depends on the data. The shape facts are checked; the CSR contents are trusted (no host reads).
        """
        block_kv = block_q if block_kv is None else block_kv
        nq, nk = _ceil_div(q_len, block_q), _ceil_div(kv_len, block_kv)
        if block_mask.dim() != 4 or tuple(block_mask.shape[-2:]) != (nq, nk):
            raise ValueError(f"block_mask must have shape (Bp, Hp, {nq}, {nk}), got {tuple(block_mask.shape)}")
        mask = block_mask.to(torch.bool)
        bp, hp = mask.shape[:2]
        counts = mask.sum(-1, dtype=torch.int32)
        indptr = torch.zeros(bp, hp, nq + 1, dtype=torch.int32, device=mask.device)
        indptr[..., 1:] = counts.cumsum(-1)
        rank = mask.to(torch.int32).cumsum(-1) - 1
        dump = nq * nk
        pos = torch.where(mask, indptr[..., :-1, None] + rank, dump).reshape(bp, hp, -1).long()
        cols = torch.arange(nk, dtype=torch.int32, device=mask.device).expand(bp, hp, nq, nk).reshape(bp, hp, -1)
        indices = torch.zeros(bp, hp, dump + 1, dtype=torch.int32, device=mask.device)
        indices.scatter_(-1, pos, cols)
        indices = indices[..., :dump].contiguous()
        return cls(q_len=q_len, kv_len=kv_len, block_q=block_q, block_kv=block_kv, indptr=indptr, indices=indices,
                   kv_lens=kv_lens, validate=False)

    @classmethod
    def full(cls, q_len: int, kv_len: Optional[int] = None, block_q: int = 128,
             block_kv: Optional[int] = None) -> "BlockPattern":
        """The all-ones pattern: every query attends to every key (dense attention through the sparse path)."""
        kv_len = q_len if kv_len is None else kv_len
        block_kv = block_q if block_kv is None else block_kv
        _check_positive("block_q", block_q)
        _check_positive("block_kv", block_kv)
        nq, nk = _ceil_div(q_len, block_q), _ceil_div(kv_len, block_kv)
        return cls.from_block_mask(torch.ones(nq, nk, dtype=torch.bool), q_len=q_len, kv_len=kv_len,
                                   block_q=block_q, block_kv=block_kv)

    # ------------------------------------------------------------------ shape facts
    @property
    def num_q_blocks(self) -> int:
        return self.indptr.shape[-1] - 1

    @property
    def num_kv_blocks(self) -> int:
        return _ceil_div(self.kv_len, self.block_kv)

    @property
    def groups(self) -> tuple[int, int]:
        """``(Bp, Hp)``: 1 where the pattern is shared by the batch / by the heads."""
        return int(self.indptr.shape[0]), int(self.indptr.shape[1])

    @property
    def head_shared(self) -> bool:
        return self.groups[1] == 1

    @property
    def device(self) -> torch.device:
        return self.indptr.device

    def __repr__(self) -> str:
        return (f"BlockPattern(q_len={self.q_len}, kv_len={self.kv_len}, blocks={self.block_q}x{self.block_kv}, "
                f"groups={self.groups}, density={self.density():.4f}, "
                f"partial={'no' if self.partial is None else int(self.partial.sum())}, "
                f"kv_lens={'no' if self.kv_lens is None else self.kv_lens.tolist()})")

    def check_inputs(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Raise ValueError unless ``(B, H, S, D)`` q, k, v agree with each other and with this pattern."""
        if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
            raise ValueError(f"q, k, v must be 4-D (B, H, S, D), got {q.dim()}-D, {k.dim()}-D, {v.dim()}-D")
        b, h, sq, d = q.shape
        if k.shape[:2] != (b, h) or v.shape[:3] != k.shape[:3] or k.shape[-1] != d:
            raise ValueError(f"q, k, v shapes do not agree: {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
        if (self.q_len, self.kv_len) != (sq, k.shape[2]):
            raise ValueError(f"pattern covers q_len={self.q_len}, kv_len={self.kv_len} but the inputs have "
                             f"{sq} queries and {k.shape[2]} keys")
        bp, hp = self.groups
        if bp not in (1, b) or hp not in (1, h):
            raise ValueError(f"pattern groups {self.groups} do not fit batch {b} and heads {h}")
        if self.kv_lens is not None and self.kv_lens.numel() != b:
            raise ValueError(f"pattern.kv_lens has {self.kv_lens.numel()} entries for batch {b}")

    # ------------------------------------------------------------------ views of the pattern
    def block_bitmap(self) -> torch.Tensor:
        """Boolean ``(Bp, Hp, nq, nk)``: True where a block is listed."""
        return self._bitmap(None)

    def partial_bitmap(self) -> torch.Tensor:
        """Boolean ``(Bp, Hp, nq, nk)``: True where a listed block needs the predicate."""
        return self._bitmap(self.partial) if self.partial is not None else torch.zeros_like(self.block_bitmap())

    def _bitmap(self, values: Optional[torch.Tensor]) -> torch.Tensor:
        bp, hp = self.groups
        nq, nk = self.num_q_blocks, self.num_kv_blocks
        counts = (self.indptr[..., 1:] - self.indptr[..., :-1]).long()
        rows = torch.repeat_interleave(torch.arange(nq, device=self.device).repeat(bp * hp), counts.reshape(-1))
        grp = torch.repeat_interleave(torch.arange(bp * hp, device=self.device), counts.reshape(bp * hp, nq).sum(-1))
        nnz = self.indptr[..., -1].reshape(-1).tolist()
        valid = torch.zeros(bp * hp, self.indices.shape[-1], dtype=torch.bool, device=self.device)
        for i, n in enumerate(nnz):
            valid[i, :n] = True
        cols = self.indices.reshape(bp * hp, -1)[valid].long()
        out = torch.zeros(bp * hp, nq, nk, dtype=torch.bool, device=self.device)
        vals = True if values is None else values.reshape(bp * hp, -1)[valid]
        out[grp, rows, cols] = vals
        return out.reshape(bp, hp, nq, nk)

    def block_areas(self) -> torch.Tensor:
        """Float ``(nq, nk)``: number of token pairs each block covers (ragged tails are smaller)."""
        qa = torch.full((self.num_q_blocks,), float(self.block_q))
        qa[-1] = self.q_len - (self.num_q_blocks - 1) * self.block_q
        ka = torch.full((self.num_kv_blocks,), float(self.block_kv))
        ka[-1] = self.kv_len - (self.num_kv_blocks - 1) * self.block_kv
        return qa[:, None] * ka[None, :]

    def density(self) -> float:
        """Fraction of the ``q_len x kv_len`` token pairs inside listed blocks (what the kernels compute).

        Averaged over groups; partial blocks count whole (the kernels compute them and mask inside).
        """
        return self.memo(("density",), lambda: float(self.density_value()))

    def density_value(self) -> torch.Tensor | float:
        """:meth:`density` without host synchronisation: a 0-d tensor on the pattern's device (a float once
        :meth:`density` was computed). Each listed entry counts its block's token pairs."""
        if "density" in self._structure:
            return self._structure["density"]
        nq, nk = self.num_q_blocks, self.num_kv_blocks
        dev = self.device
        dtype = torch.float32 if dev.type == "mps" else torch.float64
        q_area = torch.full((nq,), float(self.block_q), device=dev, dtype=dtype)
        q_area[-1] = self.q_len - (nq - 1) * self.block_q
        k_area = torch.full((nk,), float(self.block_kv), device=dev, dtype=dtype)
        k_area[-1] = self.kv_len - (nk - 1) * self.block_kv
        pos = torch.arange(self.indices.shape[-1], device=dev).expand_as(self.indices).contiguous()
        row = torch.searchsorted(self.indptr[..., 1:].long().contiguous(), pos, right=True)
        listed = row < nq
        area = q_area[row.clamp(max=nq - 1)] * k_area[self.indices.long()]
        kept = torch.where(listed, area, 0.0).sum(-1).mean()
        return kept / (self.q_len * self.kv_len)

    def keys_per_query(self) -> float:
        """Mean number of keys each query's listed blocks cover."""
        return self.density() * self.kv_len

    def to_dense(self, batch: Optional[int] = None) -> torch.Tensor:
        """Exact token-level boolean mask ``(B or Bp, Hp, q_len, kv_len)`` (the test reference; small sizes only)."""
        bp, hp = self.groups
        b = bp if batch is None else batch
        if bp not in (1, b):
            raise ValueError(f"batch={batch} does not match the pattern's batch groups {bp}")
        if self.kv_lens is not None and self.kv_lens.numel() not in (1, b):
            raise ValueError(f"batch={batch} does not match kv_lens of length {self.kv_lens.numel()}")
        if b * hp * self.q_len * self.kv_len > _DENSE_LIMIT:
            raise ValueError(f"to_dense is for small sizes: {b}x{hp}x{self.q_len}x{self.kv_len} elements is too large")
        bm = self.block_bitmap()
        rows = torch.arange(self.q_len, device=self.device) // self.block_q
        cols = torch.arange(self.kv_len, device=self.device) // self.block_kv
        mask = bm[:, :, rows][:, :, :, cols]
        if self.partial is not None:
            pm = self.partial_bitmap()[:, :, rows][:, :, :, cols]
            q_idx = torch.arange(self.q_len, device=self.device)[:, None]
            kv_idx = torch.arange(self.kv_len, device=self.device)[None, :]
            tok = self.predicate.to(self.device)(q_idx, kv_idx) if hasattr(self.predicate, "to") \
                else self.predicate(q_idx, kv_idx)
            mask = mask & (~pm | tok)
        mask = mask.expand(b, hp, self.q_len, self.kv_len)
        if self.kv_lens is not None:
            kv_ok = torch.arange(self.kv_len, device=self.device)[None, :] < self.kv_lens.to(self.device)[:, None]
            mask = mask & kv_ok[:, None, None, :]
        return mask.contiguous()

    def to_image(self, group: tuple[int, int] = (0, 0)) -> torch.Tensor:
        """uint8 ``(nq, nk)`` picture of one group's blocks: 255 full, 128 partial, 0 skipped."""
        b, h = group
        img = self.block_bitmap()[b, h].to(torch.uint8) * 255
        if self.partial is not None:
            img[self.partial_bitmap()[b, h]] = 128
        return img.cpu()

    # ------------------------------------------------------------------ memoised derivations
    def memo(self, key: tuple, build: Callable[[], object], *, structural: bool = True) -> object:
        """``build()`` once per ``key``, memoised on this pattern: the one way backends keep per-pattern plans.

        ``structural=True`` for what depends on the block structure alone (shared with :meth:`with_kv_lens`
        copies); ``False`` for what also depends on ``kv_lens``.
        """
        store = self._structure if structural else self._cache
        if key not in store:
            store[key] = build()
        return store[key]

    # ------------------------------------------------------------------ derived patterns
    def to(self, device: torch.device | str) -> "BlockPattern":
        """This pattern on ``device`` (memoised, so per-call moves cost nothing after the first)."""
        device = torch.device(device)
        if device.type == self.device.type and (device.index is None or device == self.device):
            return self
        key = ("to", str(device))
        if key not in self._cache:
            pred = self.predicate.to(device) if hasattr(self.predicate, "to") else self.predicate
            self._cache[key] = BlockPattern(
                q_len=self.q_len, kv_len=self.kv_len, block_q=self.block_q, block_kv=self.block_kv,
                indptr=self.indptr.to(device), indices=self.indices.to(device),
                partial=None if self.partial is None else self.partial.to(device), predicate=pred,
                kv_lens=None if self.kv_lens is None else self.kv_lens.to(device))
        return self._cache[key]

    def with_kv_lens(self, kv_lens: Optional[torch.Tensor], validate: bool = True) -> "BlockPattern":
        """The same pattern with per-sample valid key counts (keys ``>= kv_lens[b]`` masked for sample b); what was
        derived from the block structure alone (density, backend call plans) is shared, not recomputed.
        ``validate=False`` skips the range check of ``kv_lens`` (a host read) for trusted device tensors."""
        copy = BlockPattern(q_len=self.q_len, kv_len=self.kv_len, block_q=self.block_q, block_kv=self.block_kv,
                            indptr=self.indptr, indices=self.indices, partial=self.partial,
                            predicate=self.predicate, kv_lens=kv_lens, validate=validate)
        copy._structure = self._structure
        return copy

    def _combine(self, other: "BlockPattern", op: str) -> "BlockPattern":
        if (self.q_len, self.kv_len, self.block_q, self.block_kv) != (other.q_len, other.kv_len, other.block_q,
                                                                        other.block_kv):
            raise ValueError("patterns must share q_len, kv_len and block sizes to be combined: "
                             f"{(self.q_len, self.kv_len, self.block_q, self.block_kv)} vs "
                             f"{(other.q_len, other.kv_len, other.block_q, other.block_kv)}")
        if self.predicate is not None and other.predicate is not None and self.predicate is not other.predicate:
            raise ValueError("cannot combine two patterns with different token predicates")
        if self.kv_lens is not None and other.kv_lens is not None and not torch.equal(self.kv_lens, other.kv_lens):
            raise ValueError("cannot combine patterns with different kv_lens")
        if op == "or" and (self.kv_lens is None) != (other.kv_lens is None):
            raise ValueError("union of a pattern with kv_lens and one without would mask keys the other attends; "
                             "set the same kv_lens on both (with_kv_lens)")
        a, b = self.block_bitmap(), other.block_bitmap()
        pa, pb = self.partial_bitmap(), other.partial_bitmap()
        a, b = torch.broadcast_tensors(a, b)
        pa, pb = torch.broadcast_tensors(pa, pb)
        if op == "or":
            mask = a | b
            # A block stays partial only where no operand lists it as full.
            partial = mask & ~((a & ~pa) | (b & ~pb))
        else:
            mask = a & b
            partial = mask & (pa | pb)
        predicate = self.predicate if self.predicate is not None else other.predicate
        kv_lens = self.kv_lens if self.kv_lens is not None else other.kv_lens
        return BlockPattern.from_block_mask(mask, q_len=self.q_len, kv_len=self.kv_len, block_q=self.block_q,
                                            block_kv=self.block_kv, partial=partial if predicate is not None else None,
                                            predicate=predicate, kv_lens=kv_lens)

    def union(self, other: "BlockPattern") -> "BlockPattern":
        """Blocks listed by either pattern; full wherever either operand has the block full."""
        return self._combine(other, "or")

    def intersection(self, other: "BlockPattern") -> "BlockPattern":
        """Blocks listed by both; partial where either operand has the block partial."""
        return self._combine(other, "and")

    __or__ = union
    __and__ = intersection

    def transposed(self) -> "BlockPattern":
        """Pattern over (key blocks -> query blocks), for backward passes that loop over key blocks.

        Its predicate is called as ``predicate(kv_idx, q_idx)`` by construction (arguments swapped back).
        ``kv_lens`` is not carried over (it would mask rows, not columns): callers apply it themselves.
        """
        key = ("T",)
        if key not in self._cache:
            pred = None
            if self.predicate is not None:
                base = self.predicate

                def pred(kv_idx: torch.Tensor, q_idx: torch.Tensor) -> torch.Tensor:
                    return base(q_idx, kv_idx)
            self._cache[key] = BlockPattern.from_block_mask(
                self.block_bitmap().transpose(-1, -2), q_len=self.kv_len, kv_len=self.q_len, block_q=self.block_kv,
                block_kv=self.block_q,
                partial=self.partial_bitmap().transpose(-1, -2) if self.partial is not None else None,
                predicate=pred)
        return self._cache[key]

    def to_block_mask(self, batch: Optional[int] = None, heads: Optional[int] = None):
        """FlexAttention ``BlockMask`` built from the block lists (``BlockMask.from_kv_blocks``), memoised."""
        from .flex_backend import pattern_to_block_mask

        key = ("flex", batch, heads)
        if key not in self._cache:
            self._cache[key] = pattern_to_block_mask(self, batch, heads)
        return self._cache[key]
