"""LoRA for Qwen3VLMoeModel: settings (config.py), the adapted linears (layers.py), apply_lora (apply.py),
peft's names and layouts for transformers' Qwen3VLMoeForConditionalGeneration (peft_io.py) and what the trainer
does with them: frozen base, adapter-only checkpoints, the base reference a resume checks (training.py).

Only `config` is imported eagerly (the training schema needs it without megatron)."""

from qwenvl_mcore.lora.config import GROUPS, TARGETS, LoRAConfig, LoRAConfigError, resolve_targets

__all__ = ["GROUPS", "TARGETS", "LoRAConfig", "LoRAConfigError", "resolve_targets"]
