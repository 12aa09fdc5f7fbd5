"""Prompt lists for batch generation: ``.txt`` / ``.jsonl`` / ``.csv`` files read into rows, rows expanded into
numbered items with their seed and output name.

A ``.txt`` file holds one prompt a line (blank lines and lines starting with ``#`` are skipped). ``.jsonl`` (one
JSON object a line) and ``.csv`` (a header row) rows have ``prompt`` and optionally ``negative_prompt``, ``seed``,
``num_frames``, ``height``, ``width`` and ``id`` (the output's file name, without suffix). A row that cannot be read
raises :class:`~vidattn.validation.UsageError` naming ``--prompts``, the file, the line and the field.
"""
from __future__ import annotations

import csv
import io
import json
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from vidattn.validation import UsageError, check_seed, shown

__all__ = ["BatchItem", "PromptRow", "ROW_FIELDS", "expand_items", "read_prompt_file", "rows_from_prompts", "slug"]

ROW_FIELDS = ("prompt", "negative_prompt", "seed", "num_frames", "height", "width", "id")
SUFFIXES = (".txt", ".jsonl", ".csv")
_INT_FIELDS = ("seed", "num_frames", "height", "width")
_SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
_OPTION = "--prompts"


@dataclass(frozen=True)
class PromptRow:
    """One prompt as read: its fields (None where the row gives none) and its line in the file (None for
    ``--prompt``)."""

    prompt: str
    negative_prompt: Optional[str] = None
    seed: Optional[int] = None
    num_frames: Optional[int] = None
    height: Optional[int] = None
    width: Optional[int] = None
    id: Optional[str] = None
    line: Optional[int] = None


@dataclass(frozen=True)
class BatchItem:
    """One video of a batch: position ``index``, output ``name`` (no suffix), the row it came from and its seed."""

    index: int
    name: str
    row: PromptRow
    seed: int
    copy: int = 0

    @property
    def where(self) -> str:
        """``"line 7"`` (prompt files) or ``"item 2"`` (``--prompt``), for messages."""
        return f"line {self.row.line}" if self.row.line is not None else f"item {self.index}"


def slug(text: str, limit: int = 40) -> str:
    """A file-name-safe ASCII slug of ``text`` (``"video"`` when nothing is left)."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    words = re.sub(r"[^a-z0-9]+", "-", ascii_text.lower()).strip("-")
    return words[:limit].rstrip("-") or "video"


def _fail(path: Path, line: Optional[int], field: Optional[str], message: str) -> UsageError:
    where = f" line {line}" if line is not None else ""
    what = f", field {field!r}" if field else ""
    return UsageError(_OPTION, f"{shown(path)}{where}{what}: {message}")


def _read_text(path: Path) -> str:
    try:
        if path.is_dir():
            raise _fail(path, None, None, "is a folder, not a prompt file")
        data = path.read_bytes()
    except FileNotFoundError:
        raise _fail(path, None, None, "no such file") from None
    except OSError as err:
        raise _fail(path, None, None, f"cannot be read ({err.strerror or err})") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise _fail(path, None, None, f"is not UTF-8 text (byte {err.start})") from None


def _int_value(path: Path, line: int, field: str, value: Any, from_text: bool) -> int:
    if from_text and isinstance(value, str) and re.fullmatch(r"[+-]?\d+", value.strip()):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(path, line, field, f"must be an integer, got {value!r}")
    if field == "seed":
        try:
            return check_seed(field, value)
        except UsageError as err:
            raise _fail(path, line, field, err.message) from None
    if value < 1:
        raise _fail(path, line, field, f"must be >= 1, got {value}")
    return value


def _row(path: Path, line: int, record: Any, from_text: bool) -> PromptRow:
    """A row from a JSON object or a CSV record (``from_text``: values are strings; empty cells are absent)."""
    if not isinstance(record, dict):
        raise _fail(path, line, None, f"must be a JSON object with a 'prompt', got {type(record).__name__}")
    unknown = [k for k in record if k not in ROW_FIELDS]
    if unknown:
        raise _fail(path, line, str(unknown[0]), f"is not a row field (fields: {', '.join(ROW_FIELDS)})")
    fields: dict[str, Any] = {}
    for key, value in record.items():
        if value is None or (from_text and isinstance(value, str) and not value.strip()):
            continue
        if key in _INT_FIELDS:
            fields[key] = _int_value(path, line, key, value, from_text)
        elif not isinstance(value, str):
            raise _fail(path, line, key, f"must be text, got {value!r}")
        else:
            fields[key] = value
    prompt = fields.get("prompt", "")
    if not prompt.strip():
        raise _fail(path, line, "prompt", "is missing or empty")
    name = fields.get("id")
    if name is not None and (not _SAFE_ID.fullmatch(name) or name.endswith(".")):
        raise _fail(path, line, "id", f"must be a safe file name (letters, digits, '.', '_', '-'; first a letter or "
                                      f"digit; at most 100), got {name!r}")
    return PromptRow(line=line, **fields)


def _parse_jsonl(path: Path, text: str) -> list[PromptRow]:
    rows = []
    for line, raw in enumerate(text.splitlines(), 1):
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        try:
            record = json.loads(raw)
        except json.JSONDecodeError as err:
            raise _fail(path, line, None, f"is not JSON ({err.msg} at column {err.colno})") from None
        rows.append(_row(path, line, record, from_text=False))
    return rows


def _parse_csv(path: Path, text: str) -> list[PromptRow]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    header = reader.fieldnames or []
    if "prompt" not in header:
        raise _fail(path, 1, "prompt", f"the header row has no 'prompt' column (got {', '.join(header) or 'none'})")
    rows = []
    try:
        for record in reader:
            if None in record:
                raise _fail(path, reader.line_num, None, "has more cells than the header")
            if not any((v or "").strip() for v in record.values()):
                continue
            rows.append(_row(path, reader.line_num, record, from_text=True))
    except csv.Error as err:
        raise _fail(path, reader.line_num, None, f"is not valid CSV ({err})") from None
    return rows


def read_prompt_file(value: Any) -> list[PromptRow]:
    """The rows of a ``.txt``, ``.jsonl`` or ``.csv`` prompt file; UsageError (``--prompts``) for a missing, empty,
    unreadable or malformed file, naming the line and field of a bad row, and for duplicate ``id`` values."""
    path = Path(str(value)).expanduser()
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise _fail(path, None, None, f"must end in {', '.join(SUFFIXES)}")
    text = _read_text(path)
    if suffix == ".txt":
        rows = [PromptRow(prompt=raw.strip(), line=n) for n, raw in enumerate(text.splitlines(), 1)
                if raw.strip() and not raw.lstrip().startswith("#")]
    elif suffix == ".jsonl":
        rows = _parse_jsonl(path, text)
    else:
        rows = _parse_csv(path, text)
    if not rows:
        raise _fail(path, None, None, "holds no prompts (blank and '#' lines are skipped)")
    seen: dict[str, int] = {}
    for row in rows:
        if row.id is not None:
            if row.id in seen:
                raise _fail(path, row.line, "id", f"{row.id!r} is also the id of line {seen[row.id]}")
            seen[row.id] = row.line
    return rows


def rows_from_prompts(prompts: Sequence[str], negative_prompt: str = "") -> list[PromptRow]:
    """Rows for ``--prompt`` values (UsageError naming ``--prompt`` for an empty one)."""
    rows = []
    for n, prompt in enumerate(prompts, 1):
        if not prompt.strip():
            raise UsageError("--prompt", f"prompt {n} is empty")
        rows.append(PromptRow(prompt=prompt, negative_prompt=negative_prompt or None))
    return rows


def _item_seed(row: PromptRow, index: int, copy: int, base_seed: int, source: Any) -> int:
    """Item ``index``'s seed (row seed + copy, else ``base_seed + index``), checked: UsageError naming the row's
    file and line, or ``--seed``, when it leaves the range ``torch.Generator.manual_seed`` takes."""
    seed = (row.seed + copy) if row.seed is not None else base_seed + index
    try:
        return check_seed("seed", seed)
    except UsageError:
        pass
    if row.seed is not None:
        message = (f"video {copy + 1} of this row gets seed {seed} (row seed + {copy}), above 2**64 - 1; lower "
                   "the seed or --num-videos-per-prompt")
        if source is None:
            raise UsageError(_OPTION, f"line {row.line}, field 'seed': {message}")
        raise _fail(Path(str(source)), row.line, "seed", message)
    where = f"line {row.line}" if row.line is not None else f"prompt {index + 1}"
    raise UsageError("--seed", f"item {index} ({where}) gets seed {seed} (--seed + {index}), outside "
                               "[-2**63, 2**64 - 1]; lower --seed")


def expand_items(rows: Sequence[PromptRow], base_seed: int, per_prompt: int = 1,
                 source: Any = None) -> list[BatchItem]:
    """``per_prompt`` items per row, numbered in order. Item ``i``'s seed is ``base_seed + i`` unless its row gives
    one (then row seed + copy); its name is ``{i:05d}-{slug}`` or the row's ``id`` (``{id}-{copy}`` when
    ``per_prompt > 1``). A seed out of range raises UsageError naming ``source`` (the prompt file) and the line, or
    ``--seed``."""
    items = []
    for r, row in enumerate(rows):
        for copy in range(per_prompt):
            index = r * per_prompt + copy
            seed = _item_seed(row, index, copy, base_seed, source)
            if row.id is not None:
                name = row.id if per_prompt == 1 else f"{row.id}-{copy}"
            else:
                name = f"{index:05d}-{slug(row.prompt)}"
            items.append(BatchItem(index=index, name=name, row=row, seed=seed, copy=copy))
    seen: dict[str, BatchItem] = {}
    for item in items:
        if item.name in seen:
            raise UsageError(_OPTION, f"{seen[item.name].where} and {item.where} would both be written as "
                                      f"{item.name}.mp4; change an id")
        seen[item.name] = item
    return items
