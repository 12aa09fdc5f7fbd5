"""What a run leaves to read: the JSON-lines log (one object per optimizer step) and the loss curve PNG."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

__all__ = ["StepLog", "read_log", "plot_loss"]

LOG_NAME = "log.jsonl"
PLOT_NAME = "loss.png"


def read_log(path: Path) -> list[dict]:
    """The step records of a ``log.jsonl`` (empty when missing)."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


class StepLog:
    """Appends one JSON object per step to ``<output-dir>/log.jsonl`` (main process). A resumed run first drops
    the records after its checkpoint's step, so the log is the run's one loss curve."""

    def __init__(self, output_dir: Path, resume_step: Optional[int] = None) -> None:
        self.path = output_dir / LOG_NAME
        kept = [r for r in read_log(self.path) if resume_step is not None and r.get("step", 0) <= resume_step]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")

    def write(self, record: dict) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def _running_mean(values: list[float], window: int) -> list[float]:
    return [sum(values[max(0, i - window + 1):i + 1]) / len(values[max(0, i - window + 1):i + 1])
            for i in range(len(values))]


def _plot_without_matplotlib(losses: list[float], out: Path) -> Path:
    """A bare line chart with PIL (matplotlib is an optional dependency): loss per step, scaled to the frame."""
    from PIL import Image, ImageDraw

    width, height, pad = 700, 400, 20
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    low, high = min(losses), max(losses)
    span = (high - low) or 1.0
    points = [(pad + i * (width - 2 * pad) / max(1, len(losses) - 1),
               height - pad - (v - low) / span * (height - 2 * pad)) for i, v in enumerate(losses)]
    draw.rectangle((pad, pad, width - pad, height - pad), outline="black")
    draw.line(points, fill=(31, 119, 180), width=2)
    draw.text((pad + 4, pad + 4), f"loss {high:.4g} (top) .. {low:.4g} (bottom), {len(losses)} steps", fill="black")
    image.save(out, format="PNG")
    return out


def plot_loss(log: Path, out: Path, title: str = "") -> Path:
    """Loss per step (points) and its running mean (line) as a PNG; returns ``out``."""
    records = read_log(log)
    steps = [r["step"] for r in records]
    losses = [r["loss"] for r in records]
    try:
        import matplotlib
    except ImportError:
        return _plot_without_matplotlib(losses, out)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    window = max(1, len(losses) // 10)
    smooth = _running_mean(losses, window)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(steps, losses, ".", alpha=0.4, label="loss")
    ax.plot(steps, smooth, "-", label=f"running mean ({window} steps)")
    ax.set_xlabel("step")
    ax.set_ylabel("flow-matching loss")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, format="png")
    plt.close(fig)
    return out
