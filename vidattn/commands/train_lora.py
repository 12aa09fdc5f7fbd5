"""``vidattn train-lora``: LoRA training for longer videos under sparse attention (``vidattn.lora``).

The options are :class:`vidattn.lora.config.TrainConfig`'s, the same as ``python -m vidattn.lora.train`` /
``accelerate launch -m vidattn.lora.train``; the training code is imported only when the command runs.
"""
from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    from vidattn.lora.config import add_arguments  # standard library only

    p = sub.add_parser("train-lora", help="train a LoRA for longer videos under sparse attention",
                       description="Train a LoRA on a folder of captioned videos with Radial attention (or dense) in "
                                   "the forward and backward pass; writes the adapter in diffusers format "
                                   "(load_lora_weights), lora_config.json, log.jsonl, loss.png and checkpoint-N "
                                   "folders. Same options under 'accelerate launch -m vidattn.lora.train' for one or "
                                   "many GPUs.")
    add_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vidattn.lora.config import config_from_args
    from vidattn.lora.train import run_training

    return run_training(config_from_args(args), ["vidattn", *getattr(args, "argv", [])])
