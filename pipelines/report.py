"""The end of a batch run: the summary table (console and ``report.md``), averages, and a contact sheet of each
video's first, middle and last frames (next to the dense reference's with ``--compare dense``)."""
from __future__ import annotations

import datetime
import shlex
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

__all__ = ["REPORT", "SHEET", "contact_sheet", "summary", "summary_table", "write_report"]

REPORT = "report.md"
SHEET = "contact_sheet.png"
THUMB_HEIGHT = 96  # pixels per frame thumbnail on the contact sheet
SHEET_ROWS = 200  # items drawn at most (the report says how many were left out)


def _mean(values: Sequence[Optional[float]]) -> Optional[float]:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def summary(rows: Sequence[dict]) -> dict:
    """Counts, total and mean times, mean density; with a comparison the overall speedup (dense time over sparse
    time, summed), mean per-item speedup, mean PSNR over items that differ from dense and mean SSIM."""
    ok = [r for r in rows if r["status"] == "ok"]
    out: dict[str, Any] = {
        "items": len(rows), "ok": len(ok), "failed": [r["name"] for r in rows if r["status"] != "ok"],
        "generate_s": round(sum(r["generate_s"] for r in ok), 3),
        "mean_generate_s": _mean([r["generate_s"] for r in ok]), "mean_density": _mean([r["density"] for r in ok])}
    compared = [r for r in ok if "speedup" in r]
    if compared:
        sparse_s = sum(r["generate_s"] for r in compared)
        out.update(dense_generate_s=round(sum(r["dense_generate_s"] for r in compared), 3),
                   speedup=sum(r["dense_generate_s"] for r in compared) / sparse_s if sparse_s else None,
                   mean_speedup=_mean([r["speedup"] for r in compared]),
                   mean_psnr_db=_mean([r["psnr_db"] for r in compared]),
                   mean_ssim=_mean([r["ssim"] for r in compared]),
                   identical=sum(bool(r["identical"]) for r in compared))
    return out


def _num(value: Optional[float], digits: int = 2, none: str = "–") -> str:
    return none if value is None else f"{value:.{digits}f}"


def summary_table(rows: Sequence[dict], compare: Optional[str]) -> str:
    """A Markdown table: per item its status, time and density (and speedup, PSNR, SSIM against dense), then the
    means over the items (its speedup is the mean of the items' speedups, not the total time ratio of
    :func:`summary`'s ``speedup``)."""
    head = ["#", "item", "status", "time s", "density"]
    if compare:
        head += [f"{compare} s", "speedup", "PSNR dB", "SSIM"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def cells(r: dict) -> list[str]:
        base = [str(r["index"]), r["name"], r["status"], _num(r.get("generate_s")), _num(r.get("density"), 3)]
        if compare:
            psnr = "inf" if r.get("identical") else _num(r.get("psnr_db"))
            base += [_num(r.get("dense_generate_s")), _num(r.get("speedup")), psnr, _num(r.get("ssim"), 4)]
        return base

    lines += ["| " + " | ".join(cells(r)) + " |" for r in rows]
    s = summary(rows)
    total = ["", "**mean of items**", f"{s['ok']}/{s['items']} ok", _num(s["mean_generate_s"]),
             _num(s["mean_density"], 3)]
    if compare:
        total += ["", _num(s.get("mean_speedup")), _num(s.get("mean_psnr_db"), none="inf" if s.get("identical")
                                                         else "–"), _num(s.get("mean_ssim"), 4)]
    lines.append("| " + " | ".join(total) + " |")
    return "\n".join(lines)


def _thumbs(video: np.ndarray) -> list[np.ndarray]:
    """First, middle and last frame, resized to :data:`THUMB_HEIGHT` pixels high."""
    from PIL import Image

    picks = [video[0], video[len(video) // 2], video[-1]]
    height, width = video.shape[1:3]
    size = (max(1, round(width * THUMB_HEIGHT / height)), THUMB_HEIGHT)
    return [np.asarray(Image.fromarray(f).resize(size, Image.BILINEAR)) for f in picks]


def contact_sheet(out_dir: Path, rows: Sequence[dict], compare: Optional[str]) -> Optional[Path]:
    """``contact_sheet.png``: one row per rendered item (first :data:`SHEET_ROWS`), its name above its first /
    middle / last frames, then the dense reference's; None when no item rendered."""
    from PIL import Image, ImageDraw

    from .video_io import read_video, write_png

    ok = [r for r in rows if r["status"] == "ok"][:SHEET_ROWS]
    strips = []
    for r in ok:
        tiles = _thumbs(read_video(out_dir / r["video"]))
        if compare and r.get("dense_video"):
            gap = np.full((THUMB_HEIGHT, 8, 3), 255, np.uint8)
            tiles += [gap, *_thumbs(read_video(out_dir / r["dense_video"]))]
        strip = np.concatenate(tiles, axis=1)
        label = Image.new("RGB", (strip.shape[1], 14), "white")
        ImageDraw.Draw(label).text((2, 1), r["name"] + (f"  (left: sparse, right: {compare})" if compare else ""),
                                   fill="black")
        strips.append(np.concatenate([np.asarray(label), strip], axis=0))
    if not strips:
        return None
    width = max(s.shape[1] for s in strips)
    sheet = np.concatenate([np.pad(s, ((0, 0), (0, width - s.shape[1]), (0, 0)), constant_values=255)
                            for s in strips], axis=0)
    return write_png(sheet, out_dir / SHEET, overwrite=True)


def write_report(out_dir: Path, rows: Sequence[dict], compare: Optional[str], *,
                 command: Optional[Sequence[str]] = None, method: Optional[dict] = None) -> Path:
    """``report.md``: the command, the table, the failed items and the contact sheet."""
    from .video_io import atomic_write

    sheet = contact_sheet(out_dir, rows, compare)
    s = summary(rows)
    parts = ["# vidattn batch report", "",
             f"- when: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}"]
    if command is not None:
        parts.append(f"- command: `{shlex.join(['vidattn', *command])}`")
    if method:
        parts.append(f"- method: {method.get('method')}" + (f" (preset {method['preset']})" if method.get("preset")
                                                           else ""))
    if compare and s.get("speedup") is not None:
        parts.append(f"- overall speedup against {compare} (total time ratio): {s['speedup']:.2f}x "
                     f"({s['dense_generate_s']:.1f} s {compare}, {s['generate_s']:.1f} s sparse); the table's last "
                     "row is the mean of the items' speedups")
    parts += ["", summary_table(rows, compare), ""]
    failed = [r for r in rows if r["status"] != "ok"]
    if failed:
        parts += ["## Failed items", ""] + [f"- {r['name']} ({r['status']}): {r.get('error', '')}" for r in failed]
        parts.append("")
    if sheet is not None:
        left = len([r for r in rows if r["status"] == "ok"]) - SHEET_ROWS
        caption = "first / middle / last frame" + (f", then {compare}" if compare else "")
        parts += [f"![contact sheet: {caption}]({SHEET})", ""]
        if left > 0:
            parts += [f"({left} more items are not drawn)", ""]
    text = "\n".join(parts)
    return atomic_write(out_dir / REPORT, True, lambda tmp: tmp.write_text(text, encoding="utf-8"))
