"""Resumable checkpoints, ``<output-dir>/checkpoint-N`` (the diffusers training scripts' layout): the LoRA
weights, the optimizer and LR-scheduler states, each process's RNG states, the data position and the settings.

Written by the main process into ``checkpoint-N.tmp`` and renamed when complete (RNG files by each process
first), so an interrupted save never looks like a checkpoint.
"""
from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

__all__ = ["checkpoint_dir", "save_checkpoint", "load_checkpoint", "latest_checkpoint", "prune_checkpoints",
           "RESUME_KEYS", "resume_problem"]

_NAME = re.compile(r"^checkpoint-(\d+)$")
STATE = "state.json"
# settings a resumed run must share with the checkpoint (others, e.g. --max-steps, may change)
RESUME_KEYS = ("model", "frames", "height", "width", "frame_stride", "method", "decay", "block_size",
               "dense_layers", "rank", "lora_alpha", "lora_targets", "lora_dropout", "train_batch_size",
               "gradient_accumulation_steps", "seed", "weighting_scheme", "logit_mean", "logit_std", "flow_shift",
               "max_sequence_length", "learning_rate", "lr_scheduler", "lr_warmup_steps", "adam_beta1", "adam_beta2",
               "adam_weight_decay", "adam_epsilon", "max_grad_norm", "mixed_precision", "dtype")


def checkpoint_dir(output_dir: Path, step: int) -> Path:
    return output_dir / f"checkpoint-{step}"


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(accelerator: Any, output_dir: Path, step: int, position: int, lora_state: dict,
                    optimizer: Any, scheduler: Any, settings: dict) -> Path:
    """Save a checkpoint at optimizer step ``step`` (every process calls it); returns its folder."""
    from safetensors.torch import save_file

    final = checkpoint_dir(output_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    torch.save(_rng_state(), rng_file(tmp, accelerator.process_index))
    if accelerator.is_main_process:
        save_file({k: v.detach().float().cpu().contiguous() for k, v in lora_state.items()}, str(tmp / "lora.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        state = {"step": step, "position": position, "processes": accelerator.num_processes, "settings": settings}
        (tmp / STATE).write_text(json.dumps(state, indent=1))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
    accelerator.wait_for_everyone()
    return final


def read_state(folder: Path) -> dict:
    """The ``state.json`` of a checkpoint (ValueError when it is not one)."""
    try:
        return json.loads((folder / STATE).read_text())
    except (OSError, ValueError):
        raise ValueError(f"{folder} is not a checkpoint folder (no readable {STATE})") from None


def rng_file(folder: Path, process_index: int) -> Path:
    return folder / f"rng_state_{process_index}.pt"


def resume_problem(state: dict, folder: Path, processes: int) -> Optional[str]:
    """Why a run on ``processes`` processes cannot resume from ``folder`` (its ``state``): another process count
    (older checkpoints without the count: by their RNG files), or a process's RNG file missing; None when it can."""
    saved = state.get("processes")
    if saved is not None and saved != processes:
        return (f"{folder} was trained on {saved} process(es) but this run has {processes}; resume with the same "
                f"number of processes")
    missing = [rng_file(folder, i).name for i in range(processes) if not rng_file(folder, i).is_file()]
    if missing:
        return (f"{folder} lacks {', '.join(missing)} (one RNG state per process); it cannot resume "
                f"{processes} process(es)")
    return None


def load_checkpoint(folder: Path, process_index: int, processes: int, optimizer: Any, scheduler: Any) -> dict:
    """Restore the optimizer, the scheduler and this process's RNG from ``folder`` (ValueError when it does not
    fit ``processes`` processes); returns ``{"step", "position", "settings", "lora": state dict}`` (the caller
    loads the LoRA weights into its model)."""
    from safetensors.torch import load_file

    state = read_state(folder)
    problem = resume_problem(state, folder, processes)
    if problem:  # checked before the run (checks.py); kept here for callers that skip the checks
        raise ValueError(problem)
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=False))
    scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=False))
    _set_rng_state(torch.load(rng_file(folder, process_index), weights_only=False))
    state["lora"] = load_file(str(folder / "lora.safetensors"))
    return state


def _steps(output_dir: Path) -> list[tuple[int, Path]]:
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if (m := _NAME.match(p.name)) and p.is_dir()]
    return sorted(found)


def latest_checkpoint(output_dir: Path) -> Optional[Path]:
    found = _steps(output_dir)
    return found[-1][1] if found else None


def prune_checkpoints(output_dir: Path, keep: Optional[int]) -> None:
    """Remove all but the newest ``keep`` checkpoints (None: keep all)."""
    if keep is None:
        return
    for _, path in _steps(output_dir)[:-keep] if keep > 0 else _steps(output_dir):
        shutil.rmtree(path, ignore_errors=True)
