"""LLaMA models: `build_model(preset_or_config, vocab_size=None)`."""

from lowmem.models.llama import PRESETS, Llama, LlamaConfig, build_model, count_parameters, resolve_config

__all__ = ["PRESETS", "Llama", "LlamaConfig", "build_model", "count_parameters", "resolve_config"]
