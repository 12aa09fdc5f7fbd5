"""``vidattn bench train``: seconds per LoRA training step and peak memory, dense vs Radial, at several frame
counts, each case in a fresh process (so its peak memory is its own).

A case is the trainer's own step (:func:`vidattn.lora.step.training_step`: flow-matching loss, backward through the
attention, AdamW on the LoRA) on random latents and text of the clip's shape; no VAE, no data loading.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional

import torch

__all__ = ["TrainCase", "run_case", "run_cases", "table_lines"]


@dataclass(frozen=True)
class TrainCase:
    model: str
    method: str
    scale: int
    frames: int
    height: int
    width: int
    steps: int = 3
    warmup: int = 1
    rank: int = 16
    block_size: int = 128
    decay: float = 1.0
    dense_layers: int = 0
    backend: str = "auto"
    device: str = "cpu"
    seed: int = 0
    text_len: int = 512


def _inputs(pipe: Any, case: TrainCase) -> dict:
    t_factor, s_factor = pipe.vae_scale_factor_temporal, pipe.vae_scale_factor_spatial
    cfg = pipe.transformer.config
    gen = torch.Generator().manual_seed(case.seed)
    latents = torch.randn(1, cfg.in_channels, (case.frames - 1) // t_factor + 1, case.height // s_factor,
                          case.width // s_factor, generator=gen)
    return {"latents": latents, "text": torch.randn(1, case.text_len, cfg.text_dim, generator=gen)}


def run_case(case: TrainCase) -> dict:
    """Time ``case.steps`` training steps after ``case.warmup`` (in this process); seconds are the median."""
    import vidattn
    from accelerate import Accelerator
    from vidattn.pipelines.generate import load_pipeline, peak_memory

    from .adapter import add_lora, lora_parameters, training_processor
    from .config import TrainConfig
    from .objective import flow_settings
    from .step import Objective, make_lr_schedule, make_optimizer, training_step

    cfg = TrainConfig(model=case.model, method=case.method, rank=case.rank, block_size=case.block_size,
                      decay=case.decay, dense_layers=case.dense_layers, backend=case.backend, seed=case.seed)
    pipe, _ = load_pipeline(case.model, case.device, torch.float32)
    transformer = pipe.transformer
    add_lora(transformer, cfg)
    transformer.train()
    params = lora_parameters(transformer)
    optimizer = make_optimizer(params, 1e-4, (0.9, 0.999), 1e-4, 1e-8)
    schedule = make_lr_schedule(optimizer, "constant", 0, case.warmup + case.steps)
    accelerator = Accelerator(cpu=case.device == "cpu")
    model, optimizer = accelerator.prepare(transformer, optimizer)
    inst = vidattn.apply(model, training_processor(cfg))
    batch = _inputs(pipe, case)
    shift, timesteps = flow_settings(pipe.scheduler)
    objective = Objective("uniform", shift, timesteps, seed=case.seed)
    if case.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    seconds = []
    for step in range(case.warmup + case.steps):
        if case.device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        training_step(accelerator, model, inst.context, params, optimizer, schedule, lambda m: (batch, [0]), 1,
                      objective, step, 1.0)
        if case.device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - t0)
    stats = inst.stats.summary()
    timed = seconds[case.warmup:]
    return {**asdict(case), "tokens": int(batch["latents"][0, 0].numel() // 4), "seconds": statistics.median(timed),
            "all_seconds": [round(s, 3) for s in seconds], "density": stats["sparse_density"],
            "computed_fraction": stats["computed_fraction"], "peak": peak_memory(case.device)}


def run_cases(cases: list[TrainCase], isolate: bool = True,
              progress: Optional[Callable[[dict], None]] = None) -> list[dict]:
    """Each case in its own spawned process (``isolate``), one after the other; ``progress`` sees each result."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    results = []
    for case in cases:
        if isolate:
            with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
                result = pool.submit(run_case, case).result()
        else:
            result = run_case(case)
        results.append(result)
        if progress is not None:
            progress(result)
    return results


def table_lines(results: list[dict]) -> list[str]:
    """A markdown table: one row per case, with the speedup against dense at the same frame count."""
    dense = {r["scale"]: r["seconds"] for r in results if r["method"] == "dense"}
    lines = ["| frames | latent tokens | method | density | s / step | speedup vs dense | peak memory (GiB) |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        peak = r["peak"].get("bytes")
        speed = dense.get(r["scale"])
        density = "1.000" if r["method"] == "dense" else (
            "-" if r["density"] is None else f"{r['computed_fraction']:.3f}")
        ratio = "-" if speed is None else f"{speed / r['seconds']:.2f}x"
        memory = "-" if peak is None else f"{peak / 2 ** 30:.2f}"
        lines.append(f"| {r['frames']} ({r['scale']}x) | {r['tokens']} | {r['method']} | {density} | "
                     f"{r['seconds']:.2f} | {ratio} | {memory} |")
    return lines
