"""The LoRA training run: ``vidattn train-lora`` and ``python -m vidattn.lora.train`` /
``accelerate launch -m vidattn.lora.train`` (the same options; one process per GPU under accelerate or torchrun).

Steps: check everything (:mod:`.checks`), load the pipeline, build or reuse the latent cache (main process first),
add the LoRA, install the sparse processor on the (DDP-wrapped) transformer, train with AdamW, checkpoint every
``--checkpointing-steps``, render validation videos, save the adapter with the pipeline's ``save_lora_weights``.
"""
from __future__ import annotations

import argparse
import shlex
import shutil
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from vidattn.validation import UsageError, report, warn

from .config import TrainConfig, add_arguments, config_from_args

__all__ = ["main", "run_training", "train", "build_parser"]

COMMAND = "train-lora"
PROCESS_GROUP_TIMEOUT_S = 4 * 3600  # see _accelerator
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class TrainingRun:
    """What :func:`_setup` builds: the pipeline, the cache, the transformer (``model``: as prepared by accelerate,
    DDP-wrapped with several processes), the LoRA parameters, optimizer, LR schedule, the processor's installation,
    the objective, the LoRA's target modules and the timestep shift."""

    pipe: Any
    cache: Any
    transformer: Any
    model: Any
    params: list
    optimizer: Any
    schedule: Any
    installation: Any
    objective: Any
    targets: list
    shift: float


def build_parser(prog: str = "python -m vidattn.lora.train") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    return add_arguments(parser)


def _accelerator(cfg: TrainConfig, device: str) -> Any:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    # accelerate keeps one state per process; a second run in the same process (tests, notebooks) with another
    # --mixed-precision needs it cleared (the process group, PartialState, stays)
    AcceleratorState._reset_state(reset_partial_state=False)
    # the other processes wait in wait_for_everyone while the main one renders validation videos or builds the
    # cache, which can outlast the usual 10-30 min collective timeout on a large model
    group = InitProcessGroupKwargs(timeout=timedelta(seconds=PROCESS_GROUP_TIMEOUT_S))
    return Accelerator(mixed_precision=cfg.mixed_precision, cpu=device == "cpu",
                       kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False), group])


def _cache(checked: Any, pipe: Any, accelerator: Any) -> Any:
    """The latent cache, built by the main process when missing or stale (the others wait, then read it)."""
    from .cache import LatentCache, build_cache, valid_cache

    with accelerator.main_process_first():
        if accelerator.is_main_process and not valid_cache(checked.cache_dir, checked.settings):
            build_cache(pipe, checked.clips, checked.settings, checked.cache_dir, accelerator.device,
                        warn=lambda m: warn(COMMAND, m), skipped=checked.skipped)
        cache = LatentCache(checked.cache_dir)
    if not len(cache):
        raise UsageError("--data", f"none of the videos in {checked.cfg.data} could be decoded")
    return cache


def _clean_outputs(cfg: TrainConfig, out: Path, accelerator: Any) -> None:
    """With ``--overwrite`` (and no ``--resume``), the earlier run's files go (the cache stays)."""
    from .checks import OUTPUT_FILES

    if accelerator.is_main_process and cfg.overwrite and cfg.resume is None:
        for name in OUTPUT_FILES:
            (out / name).unlink(missing_ok=True)
        for path in out.glob("checkpoint-*"):
            shutil.rmtree(path, ignore_errors=True)
        shutil.rmtree(out / "validation", ignore_errors=True)
    accelerator.wait_for_everyone()


def _setup(checked: Any, accelerator: Any) -> TrainingRun:
    """Pipeline, cache, LoRA, optimizer, schedule and the installed processor."""
    import vidattn
    from vidattn.pipelines.generate import load_pipeline

    from .adapter import add_lora, lora_parameters
    from .objective import flow_settings
    from .step import Objective, make_lr_schedule, make_optimizer

    cfg = checked.cfg
    pipe, _ = load_pipeline(cfg.model, str(accelerator.device), _DTYPES[checked.dtype])
    cache = _cache(checked, pipe, accelerator)
    shift, timesteps = flow_settings(pipe.scheduler, cfg.flow_shift)
    transformer = pipe.transformer
    try:
        targets = add_lora(transformer, cfg)
    except ValueError as err:
        raise UsageError("--lora-targets", str(err).removeprefix("--lora-targets: ")) from None
    if cfg.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    transformer.train()
    params = lora_parameters(transformer)
    optimizer = make_optimizer(params, cfg.learning_rate, (cfg.adam_beta1, cfg.adam_beta2), cfg.adam_weight_decay,
                               cfg.adam_epsilon)
    schedule = make_lr_schedule(optimizer, cfg.lr_scheduler, cfg.lr_warmup_steps, cfg.max_steps)
    model, optimizer = accelerator.prepare(transformer, optimizer)
    installation = vidattn.apply(model, checked.processor)  # through the DDP / compile wrapper
    objective = Objective(cfg.weighting_scheme, shift, timesteps, cfg.logit_mean, cfg.logit_std, cfg.seed)
    return TrainingRun(pipe=pipe, cache=cache, transformer=transformer, model=model, params=params,
                       optimizer=optimizer, schedule=schedule, installation=installation, objective=objective,
                       targets=targets, shift=shift)


def _resume(checked: Any, run: TrainingRun, accelerator: Any) -> tuple[int, int]:
    """``(step, position)`` to start from: the checkpoint's, or ``(0, 0)``."""
    if checked.resume is None:
        return 0, 0
    from peft.utils import set_peft_model_state_dict

    from .checkpoint import load_checkpoint

    try:
        state = load_checkpoint(checked.resume, accelerator.process_index, accelerator.num_processes, run.optimizer,
                                run.schedule)
    except ValueError as err:
        raise UsageError("--resume", str(err)) from None
    device = accelerator.device
    set_peft_model_state_dict(run.transformer, {k: v.to(device) for k, v in state["lora"].items()})
    return int(state["step"]), int(state["position"])


def _after_step(checked: Any, run: TrainingRun, accelerator: Any, step: int, position: int) -> None:
    """Checkpoint and validation videos due after optimizer step ``step`` (1-based)."""
    from peft.utils import get_peft_model_state_dict

    from .checkpoint import prune_checkpoints, save_checkpoint
    from .render import render_validation

    cfg, out = checked.cfg, checked.output_dir
    # every N steps and at the last one, so a finished run can be continued with a larger --max-steps
    if cfg.checkpointing_steps and (step % cfg.checkpointing_steps == 0 or step == cfg.max_steps):
        state = get_peft_model_state_dict(run.transformer)
        save_checkpoint(accelerator, out, step, position, state, run.optimizer, run.schedule, cfg.to_dict())
        if accelerator.is_main_process:
            prune_checkpoints(out, cfg.checkpoints_total_limit)
    due = cfg.validation_steps and (step % cfg.validation_steps == 0 or step == cfg.max_steps)
    if due and cfg.validation_prompt:
        if accelerator.is_main_process:
            render_validation(run.pipe, cfg.validation_prompt, step, out / "validation", cfg.frames, cfg.height,
                              cfg.width, cfg.validation_inference_steps, cfg.seed)
        accelerator.wait_for_everyone()


def _loop(checked: Any, run: TrainingRun, accelerator: Any, start: int, position: int, log: Any) -> list[float]:
    from tqdm import tqdm

    from .batches import BatchPlan
    from .step import training_step

    cfg = checked.cfg
    cache, rank = run.cache, accelerator.process_index
    plan = BatchPlan(len(cache), cfg.train_batch_size, accelerator.num_processes, cfg.seed)
    losses = []
    bar = tqdm(total=cfg.max_steps, initial=start, desc="training", unit="step", file=sys.stderr,
               disable=not accelerator.is_main_process)
    context = run.installation.context
    for step in range(start, cfg.max_steps):
        t0 = time.perf_counter()

        def batches(micro: int, base: int = position) -> tuple[dict, list[int]]:
            indices, slots = plan.local(base + micro, rank)
            return cache.batch(indices), slots

        loss, norm = training_step(accelerator, run.model, context, run.params, run.optimizer,
                                   run.schedule, batches, cfg.gradient_accumulation_steps, run.objective, step,
                                   cfg.max_grad_norm)
        position += cfg.gradient_accumulation_steps
        loss = float(accelerator.reduce(loss.to(accelerator.device), reduction="mean"))
        seconds = time.perf_counter() - t0
        lr = run.schedule.get_last_lr()[0]
        losses.append(loss)
        if accelerator.is_main_process:
            log.write({"step": step + 1, "loss": loss, "lr": lr, "grad_norm": norm, "seconds": round(seconds, 4),
                       "epoch": plan.epoch(position - 1), "position": position})
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", s_step=f"{seconds:.2f}")
        bar.update()
        _after_step(checked, run, accelerator, step + 1, position)
    bar.close()
    return losses


def _replicas(params: list, accelerator: Any) -> dict:
    """Per-process checksums (sum, sum of squares) of every LoRA weight, gathered from all processes: whether
    the replicas ended identical, and the totals per process."""
    sums = torch.stack([torch.stack([p.detach().double().sum(), p.detach().double().pow(2).sum()])
                        for p in params]).to(accelerator.device)
    gathered = accelerator.gather(sums[None]).cpu()
    identical = bool((gathered == gathered[:1]).all())
    return {"identical": identical, "checksums": gathered.sum(1).tolist()}


def train(checked: Any, command: Optional[Sequence[str]] = None) -> dict:
    """Run a checked configuration (every process); returns the summary (paths, steps, losses, timings)."""
    from .adapter import adapter_metadata, save_adapter
    from .report import StepLog, plot_loss

    cfg, out = checked.cfg, checked.output_dir
    accelerator = _accelerator(cfg, checked.device)
    _clean_outputs(cfg, out, accelerator)
    started = time.perf_counter()
    run = _setup(checked, accelerator)
    start, position = _resume(checked, run, accelerator)
    log = StepLog(out, start if checked.resume is not None else None) if accelerator.is_main_process else None
    losses = _loop(checked, run, accelerator, start, position, log)
    accelerator.wait_for_everyone()
    replicas = _replicas(run.params, accelerator)
    summary = {"output_dir": str(out), "steps": cfg.max_steps, "resumed_from": start if checked.resume else None,
               "losses": losses, "clips": len(run.cache), "skipped": len(run.cache.skipped),
               "processes": accelerator.num_processes, "seconds": round(time.perf_counter() - started, 2)}
    if accelerator.is_main_process:
        extra = {"steps": cfg.max_steps, "processes": accelerator.num_processes,
                 "global_batch": cfg.train_batch_size * accelerator.num_processes * cfg.gradient_accumulation_steps,
                 "attention": run.installation.stats.summary(), "replicas": replicas,
                 "command": shlex.join(command) if command else None}
        meta = adapter_metadata(cfg, run.targets, checked.processor, extra, flow_shift=run.shift)
        summary["adapter"] = str(save_adapter(type(run.pipe), accelerator.unwrap_model(run.model), out, meta))
        summary["loss_plot"] = str(plot_loss(out / "log.jsonl", out / "loss.png", f"LoRA on {cfg.model}, "
                                             f"{cfg.method}, {cfg.frames} frames"))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


def run_training(cfg: TrainConfig, command: Optional[Sequence[str]] = None) -> int:
    """Check, train, print the summary; 2 on a user error (one line, nothing written)."""
    from .checks import check_config

    try:
        checked = check_config(cfg)
        for message in checked.warnings:
            warn(COMMAND, message)
        summary = train(checked, command)
    except UsageError as err:
        return report(COMMAND, err)
    if "adapter" in summary:
        first, last = summary["losses"][:1], summary["losses"][-1:]
        print(f"adapter   {summary['adapter']}")
        print(f"log       {Path(summary['output_dir']) / 'log.jsonl'}  (loss {first} -> {last})")
        print(f"clips     {summary['clips']} cached, {summary['skipped']} skipped; {summary['processes']} "
              f"process(es), {summary['seconds']} s")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    return run_training(config_from_args(args), ["python", "-m", "vidattn.lora.train", *argv])


if __name__ == "__main__":
    sys.exit(main())
