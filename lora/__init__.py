"""LoRA adaptation for longer videos under sparse attention (peft + accelerate): not implemented yet."""
