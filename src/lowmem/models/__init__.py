"""LLaMA models: `build_model(preset_or_config, vocab_size=None)`; `model(ids, labels=labels)` is the loss."""

from lowmem.models.chunked_loss import IGNORE_INDEX, count_targets
from lowmem.models.llama import PRESETS, Llama, LlamaConfig, build_model, count_parameters, resolve_config

__all__ = ["IGNORE_INDEX", "PRESETS", "Llama", "LlamaConfig", "build_model", "count_parameters", "count_targets",
           "resolve_config"]
