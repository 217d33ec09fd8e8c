"""lowmem: memory-efficient pretraining of LLaMA-style language models."""

__version__ = "0.1.0"
