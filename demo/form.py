"""The demo's method form, generated from the method registry: one field per knob with its type, default and
choices (read from the processor's signature), presets, and the parsing of the submitted values."""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

from vidattn.kernels import BACKENDS
from vidattn.methods import METHODS
from vidattn.patterns.rectified import FIRST_FRAME_RULES
from vidattn.token_order import parse_tiles

__all__ = ["KnobField", "NO_PRESET", "START_KNOBS", "knob_fields", "parse_knobs", "preset_values"]

NO_PRESET = "(none)"
# Values the form starts with where the processor's default does not suit the default tiny model (80 tokens:
# 128-token blocks would make every call dense).
START_KNOBS = {"block_size": 16}
CHOICES: dict[str, tuple[str, ...]] = {"backend": tuple(BACKENDS), "first_frame": FIRST_FRAME_RULES,
                                       "token_order": ("gilbert", "raster")}


@dataclass(frozen=True)
class KnobField:
    """One knob of a method as a form field: ``kind`` is ``float``, ``int``, ``bool``, ``choice`` or ``text``;
    ``optional`` fields may stay empty (the processor's / model's default)."""

    method: str
    name: str
    kind: str
    default: Any
    optional: bool
    choices: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        return self.name.replace("_", " ") + (" (optional)" if self.optional else "")


def _kind(name: str, annotation: str) -> str:
    if name in CHOICES:
        return "choice"
    for kind in ("bool", "float", "int"):
        if kind in annotation.replace("Optional", "") and "tuple" not in annotation:
            return kind
    return "text"


def _parameter(factory: Any, name: str) -> inspect.Parameter:
    """``name``'s parameter in the factory's signature, or in a base class's ``__init__`` (``**kwargs`` passed on)."""
    for cls in getattr(factory, "__mro__", (factory,)):
        params = inspect.signature(cls).parameters if cls is factory else inspect.signature(cls.__init__).parameters
        if name in params:
            return params[name]
    raise KeyError(f"{getattr(factory, '__name__', factory)} declares no knob {name!r}")


def knob_fields(method: str) -> list[KnobField]:
    """The fields of ``method``'s knobs, in the registry's order."""
    spec = METHODS[method]
    fields = []
    for name in spec.knobs:
        param = _parameter(spec.factory, name)
        annotation = param.annotation if isinstance(param.annotation, str) else getattr(
            param.annotation, "__name__", str(param.annotation))
        required = param.default is inspect.Parameter.empty
        default = None if required else param.default
        fields.append(KnobField(method, name, _kind(name, annotation), START_KNOBS.get(name, default),
                                optional=required or default is None, choices=CHOICES.get(name, ())))
    return fields


def preset_values(method: str, preset: Optional[str]) -> list[Any]:
    """The field values of ``method`` after choosing ``preset`` (:data:`NO_PRESET`: the start values)."""
    knobs = METHODS[method].presets.get(preset, {}) if preset not in (None, NO_PRESET) else {}
    values = [knobs.get(f.name, f.default) for f in knob_fields(method)]
    return ["x".join(map(str, v)) if isinstance(v, tuple) else v for v in values]


def _parse(field: KnobField, value: Any) -> Any:
    if value is None or (isinstance(value, str) and not value.strip()):
        if field.optional:
            return None
        raise ValueError(f"{field.name} needs a value")
    if field.kind == "int":
        if float(value) != int(float(value)):
            raise ValueError(f"{field.name} must be a whole number, got {value}")
        return int(float(value))
    if field.kind == "float":
        return float(value)
    if field.kind == "bool":
        return bool(value)
    if field.name == "tiles":
        tiles = parse_tiles(f"tiles{str(value).strip().lower()}")
        if tiles is None:
            raise ValueError(f"tiles must be RxC with positive integers such as 8x16, got {value!r}")
        return tiles
    return str(value).strip()


def parse_knobs(method: str, values: Sequence[Any]) -> dict:
    """Knob keyword arguments from ``method``'s submitted field values (empty optional fields left out);
    ValueError naming the knob on a value of the wrong kind."""
    parsed = {f.name: _parse(f, v) for f, v in zip(knob_fields(method), values)}
    return {k: v for k, v in parsed.items() if v is not None}


def fields_by_method(methods: Mapping[str, Any] = METHODS) -> dict[str, list[KnobField]]:
    """Every registered method's fields (the registry's order)."""
    return {name: knob_fields(name) for name in methods}
