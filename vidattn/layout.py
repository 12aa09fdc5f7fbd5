"""TokenLayout: where each token of an attention sequence lives."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal, Optional

__all__ = ["TextSegment", "TokenLayout"]

TOKEN_ORDERS = ("raster", "gilbert", "tiles<R>x<C>")


@dataclass(frozen=True)
class TextSegment:
    """Text tokens joined to the video sequence (joint-attention models).

    ``position`` is ``"first"`` (CogVideoX) or ``"last"`` (HunyuanVideo, Mochi); ``length`` is the padded length in
    the sequence; ``valid`` optionally gives, per sample, how many text tokens are real (a prefix of the segment).
    """

    length: int
    position: Literal["first", "last"] = "last"
    valid: Optional[tuple[int, ...]] = None

    def __post_init__(self) -> None:
        if self.length < 0:
            raise ValueError(f"text length must be >= 0, got {self.length}")
        if self.position not in ("first", "last"):
            raise ValueError(f"text position must be 'first' or 'last', got {self.position!r}")
        if self.valid is not None:
            object.__setattr__(self, "valid", tuple(int(v) for v in self.valid))
            if any(v < 0 or v > self.length for v in self.valid):
                raise ValueError(f"text valid lengths must lie in [0, {self.length}], got {self.valid}")


@dataclass(frozen=True)
class TokenLayout:
    """A video of ``frames x height x width`` latent tokens (after patching), in ``order``, plus optional text.

    In ``order="raster"`` the video tokens are frame-major ``(t, y, x)``: token ``video_start + (t*height + y)*width
    + x``. Another order (``"gilbert"``: the 3-D Gilbert curve of :func:`vidattn.gilbert_order`; ``"tiles8x16"``:
    spatial tiles, :func:`vidattn.token_order.tile_order`) permutes the video tokens among themselves (text stays in place): token ``video_start + i`` is raster token ``perm[i]``
    (:func:`vidattn.token_order.order_permutation`). Hashable, so patterns can be cached per layout.
    """

    frames: int
    height: int
    width: int
    text: Optional[TextSegment] = None
    order: str = "raster"

    def __post_init__(self) -> None:
        for name in ("frames", "height", "width"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        from .token_order import is_token_order

        if not is_token_order(self.order):
            raise ValueError(f"order must be one of {TOKEN_ORDERS}, got {self.order!r}")

    @property
    def tokens_per_frame(self) -> int:
        return self.height * self.width

    @property
    def video_tokens(self) -> int:
        return self.frames * self.tokens_per_frame

    @property
    def text_tokens(self) -> int:
        return 0 if self.text is None else self.text.length

    @property
    def seq_len(self) -> int:
        return self.video_tokens + self.text_tokens

    @property
    def video_start(self) -> int:
        """Index of the first video token (after the text when text comes first)."""
        return self.text_tokens if self.text is not None and self.text.position == "first" else 0

    @property
    def text_start(self) -> int:
        return 0 if self.text is not None and self.text.position == "first" else self.video_tokens

    def key_lengths(self) -> Optional[tuple[int, ...]]:
        """Per-sample number of leading keys that are valid, when padded text sits at the end of the sequence.

        ``None`` when every key is valid. Padded text that comes first cannot be expressed as a key length.
        """
        if self.text is None or self.text.valid is None:
            return None
        if self.text.position != "last":
            if any(v != self.text.length for v in self.text.valid):
                raise ValueError("padded text must come last in the sequence to be masked by key length")
            return None
        return tuple(self.video_tokens + v for v in self.text.valid)

    def without_valid(self) -> "TokenLayout":
        """The same layout without per-sample text validity (what static patterns depend on)."""
        if self.text is None or self.text.valid is None:
            return self
        return replace(self, text=replace(self.text, valid=None))
