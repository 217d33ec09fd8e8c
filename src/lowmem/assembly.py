"""One assembly for a run: a config becomes its model, optimizer and interventions, in one place.

    run = assemble(config, vocab_size=tokenizer.vocab_size, info=info)
    run.model       # what the trainer calls: wrapped for DDP, or sharded by FSDP2, or the model itself
    run.core        # the unwrapped model (interventions, memory snapshots, checkpoints)
    run.optimizer   # built over run.core's role/kind groups, with the run's hyperparameters
    run.interventions, run.structure

The order is torchtitan's: build the preset, apply the structure (it rewrites the hidden matrices
before anything else sees them), move to the device in the precision's dtype (one move), wrap for
DDP/FSDP2 (FSDP2 under bf16 autocast: gathered in bf16, reduced in fp32),
then build the optimizer over the wrapped parameters and the interventions for the run. The
trainer, `lowmem memory` (on the meta device), `lowmem.testing`, the benchmarks and the bench
runner's runs all come through here, so a structure or a method that works in one works in all.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

import lowmem.optim
from lowmem.config import RunConfig
from lowmem.distributed import DistInfo, unwrap, wrap_model
from lowmem.errors import ConfigError
from lowmem.interventions import Intervention, RunContext, build_interventions
from lowmem.models import LlamaConfig, resolve_config
from lowmem.models import build_model as build_preset
from lowmem.models.chunked_loss import loss_chunk_for
from lowmem.models.hf import load_pretrained
from lowmem.structure import Structure, build_structure


@dataclass
class Run:
    model: nn.Module
    core: nn.Module
    optimizer: Optimizer
    interventions: list[Intervention] = field(default_factory=list)
    structure: Structure | None = None
    hparams: dict[str, Any] = field(default_factory=dict)


def model_vocab(preset: str | LlamaConfig, tokenizer_vocab: int | None) -> int | None:
    """A paper preset keeps its declared vocabulary (32000 for t5-base, whose 100 extra sentinel ids
    never occur in encoded text); a CPU tier takes the tokenizer's."""
    declared = resolve_config(preset).vocab_size
    return tokenizer_vocab if declared is None else declared


def build_model(preset: str | LlamaConfig, vocab_size: int | None = None, structure: dict[str, Any] | Structure | None = None,
                device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                init_from: str | None = None) -> nn.Module:
    """The model of a run, unwrapped: the preset (or config), its weights replaced by a Hugging Face
    LlamaForCausalLM checkpoint if `init_from` names one, the structure applied, then put on `device`
    in `dtype` in one move."""
    # Initialized on the CPU (or meta), so a GPU run starts from the same weights as a CPU run; then one
    # `to(device, dtype)`, which converts each tensor on the host before its copy, so the device never
    # holds an fp32 copy of a bf16 model (a load spike above the training peak at 1B/7B).
    on_meta = device is not None and torch.device(device).type == "meta"
    model = build_preset(preset, vocab_size=vocab_size, device="meta" if on_meta else None)
    if init_from and not on_meta:
        # Before the structure: a structure converts the loaded dense weights (a LoRA base, a low-rank start).
        load_pretrained(model, init_from)
    structure = structure if isinstance(structure, Structure) or structure is None else build_structure(structure)
    if structure is not None:
        structure.apply(model, pretrained=bool(init_from) and not on_meta)
    if (device is not None and not on_meta) or dtype is not None:
        model.to(device=None if on_meta else device, dtype=dtype)
    return model


def optimizer_hparams(name: str, hparams: dict[str, Any] | None = None, lr: float | None = None,
                      steps: int | None = None) -> dict[str, Any]:
    """The hyperparameters a run passes to optimizer `name`: the user's, `lr` if given, and what the
    method takes from the run (Method.from_run) unless the user set it."""
    out = dict(hparams or {})
    if lr is not None:
        out["lr"] = lr
    run_quantities = {"steps": steps}
    for hparam, quantity in lowmem.optim.method(name).from_run.items():
        if hparam not in out and run_quantities.get(quantity) is not None:
            out[hparam] = run_quantities[quantity]
    return out


def build_optimizer(name: str, model: nn.Module, preset: str | None = None, hparams: dict[str, Any] | None = None,
                    lr: float | None = None, steps: int | None = None) -> Optimizer:
    """Optimizer `name` over `model` with the run's hyperparameters; every group keeps `initial_lr`,
    the base the schedule multiplies."""
    optimizer = lowmem.optim.build(name, model, preset=preset, **optimizer_hparams(name, hparams, lr, steps))
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])
    return optimizer


def weight_dtype(precision: str) -> torch.dtype | None:
    """The dtype a run's weights are cast to: bf16 under "bf16-pure", else left as built (fp32)."""
    return torch.bfloat16 if precision == "bf16-pure" else None


def autocast(precision: str, device: torch.device | str) -> contextlib.AbstractContextManager:
    """The context a run's forward passes run in: bf16 autocast on `device` under "bf16-autocast",
    else nothing (fp32, or bf16-pure weights that need no casting)."""
    if precision == "bf16-autocast":
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def configure_memory(model: nn.Module, activation_checkpointing: str = "none", chunked_loss: str = "auto",
                     loss_chunk: int = 1024, tokens: int = 1) -> int:
    """Set what `model`'s blocks keep for backward and its loss chunk (for micro-batches of `tokens`
    tokens); return the loss chunk (0: the plain loss). ConfigError for a mode the model lacks."""
    if not hasattr(model, "set_activation_checkpointing"):
        if activation_checkpointing != "none":
            raise ConfigError(f"model {type(model).__name__} has no activation checkpointing; use "
                              "--activation-checkpointing none")
    else:
        model.set_activation_checkpointing(activation_checkpointing)
    vocab = getattr(getattr(model, "config", None), "vocab_size", None) or 0
    chunk = loss_chunk_for(chunked_loss, loss_chunk, tokens, vocab)
    if hasattr(model, "loss_chunk"):
        model.loss_chunk = chunk
    elif chunk:
        raise ConfigError(f"model {type(model).__name__} has no chunked loss; use --chunked-loss off")
    return chunk


def assemble(config: RunConfig, vocab_size: int | None = None, info: DistInfo | None = None,
             device: torch.device | str | None = None, init_weights: bool = True) -> Run:
    """The parts of the run `config` describes, on `info`'s device (or `device`), wrapped per `info`.
    `init_weights` False skips `train.init_from` (a resume, whose checkpoint replaces the weights)."""
    info = info or DistInfo()
    target = device if device is not None else info.device
    vocab = model_vocab(config.model, vocab_size)
    structure = build_structure(config.structure)
    core = build_model(config.model, vocab_size=vocab, structure=structure, device=target,
                       dtype=weight_dtype(config.train.precision),
                       init_from=config.train.init_from if init_weights else None)
    if config.data.seq_len > core.config.max_seq_len:
        raise ConfigError(
            f"--seq-len {config.data.seq_len} is above the maximum sequence length {core.config.max_seq_len} of "
            f"model {config.model}; use --seq-len {core.config.max_seq_len} or less"
        )
    configure_memory(core, config.train.activation_checkpointing, config.train.chunked_loss,
                     config.train.loss_chunk, config.train.micro_batch_size * config.data.seq_len)
    if config.train.compile:
        core.compile_blocks()  # before DDP/FSDP2 wraps the blocks, as torchtitan orders it
    model = wrap_model(core, info, config.train.distributed, config.train.precision)
    core = unwrap(model)
    hparams = optimizer_hparams(config.optim.name, config.optim.hparams, config.optim.lr, config.train.steps)
    optimizer = build_optimizer(config.optim.name, core, preset=config.model, hparams=hparams)
    context = RunContext(total_steps=config.train.steps, rank=info.rank, world_size=info.world_size,
                         warmup_ratio=config.train.warmup_ratio, min_lr_ratio=config.train.min_lr_ratio,
                         schedule=config.train.schedule, decay_ratio=config.train.decay_ratio, model=core)
    interventions = build_interventions(config.optim.interventions, context)
    return Run(model=model, core=core, optimizer=optimizer, interventions=interventions, structure=structure,
               hparams=hparams)
