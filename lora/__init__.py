"""LoRA adaptation for longer videos under sparse attention (peft + accelerate): ``vidattn train-lora`` and
``python -m vidattn.lora.train`` / ``accelerate launch -m vidattn.lora.train``.

Modules, one job each: ``config`` (the settings and their options), ``checks`` (every check before work),
``data`` (clips: discovery, decoding, crop), ``cache`` (latents + text embeddings), ``batches`` (data order),
``objective`` (flow-matching loss, seeded draws), ``adapter`` (peft LoRA, processor, ``save_lora_weights``),
``step`` (one training step), ``checkpoint`` (resume), ``report`` (log, loss curve), ``render`` (validation
videos), ``train`` (the run), ``bench`` (``vidattn bench train``), ``synthetic`` (moving-shape clips).
Import the submodules directly; importing this package loads nothing heavy.
"""
