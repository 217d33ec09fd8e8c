"""The memory a training run will need, predicted before it starts.

    est = estimate_memory("llama-7b", "scale")
    est.paper_gb   # 13.74: the papers' convention, 2 bytes x (weight + optimizer-state elements) / 1e9
    est.total      # bytes in full: weights + gradients + optimizer states + activations

Optimizer state is not a formula kept beside each method (it would drift from the code): the model is
built on the meta device (no memory), given meta gradients, and the real optimizer from the registry
takes one step there; the state tensors it creates are then counted (tests/test_memory_measure.py
checks, for every registered method, that a few real steps create exactly as many bytes). Only a
method whose step cannot run on meta falls back to a formula declared below, and the estimate says so
(`state_source`).

What the papers' convention counts (docs/protocol.md): 2 bytes per weight element and per
optimizer-state element, GB = 1e9 bytes, no gradients, no activations. A state *element* here is an
element of a state tensor with at least one dimension. Zero-dimensional state tensors (step counters,
per-tensor norm EMAs, clipping thresholds) are bookkeeping: the papers do not count them — the SCALE
cell of methods.md §10 is exactly 2 bytes x (weights + head momentum + Adam m, v of the norm gains),
with no step counters — so they are reported apart (`bookkeeping_elements`) and left out of
`paper_gb`; their bytes are in `optimizer_states` (the full figure). The codes of 8-bit states
(`--opt state_bits=8`, uint8) count 1 byte each, as the 8-bit optimizer papers count them; their
per-block scales count as any state element (`state_code_elements`).

Precision (what the trainer's --precision does):
  fp32           weights, gradients, optimizer states and activations in fp32
  bf16-autocast  fp32 weights, gradients and states; matmuls in bf16 under torch.autocast
  bf16-pure      the whole model cast to bf16 (the papers' setting): 2 bytes for weights, gradients,
                 states (each state tensor at the dtype the optimizer gives it) and most activations
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn

import lowmem.optim
from lowmem.assembly import build_model, build_optimizer
from lowmem.config import PRECISIONS
from lowmem.errors import ConfigError, check_choice
from lowmem.memory.measure import TensorMemory, iter_state_tensors, optimizer_state_bytes
from lowmem.models.chunked_loss import DEFAULT_CHUNK, loss_chunk_for
from lowmem.models.llama import CHECKPOINTING_MODES, LlamaConfig, resolve_config
from lowmem.optim.roles import named_roles

PAPER_BYTES_PER_ELEMENT = 2
GB = 1e9
# Steps taken on meta before the state is counted. Every registered method creates all of its state
# on the first step (checked against real steps in the tests); more steps only cost time.
META_STEPS = 1


@dataclass(frozen=True)
class GradientPiece:
    """Parameters whose gradients backward completes together, in backward's order: the head (with
    the final norm) in the loss's backward, then each block from the last, then the input embedding."""

    name: str  # "head", "layers.N", "embedding"
    gradient_bytes: int  # every gradient of the piece
    largest_gradient: int = 0  # its largest parameter's gradient
    # Under release, the most one parameter of the piece holds while its update runs inside backward:
    # its gradient + the temporaries of its update (0 without release).
    largest_update: int = 0


@dataclass(frozen=True)
class MemoryEstimate:
    """Predicted memory of one training configuration; bytes unless the name says otherwise."""

    model: str
    optimizer: str
    hparams: dict[str, Any]
    precision: str
    batch_size: int
    seq_len: int
    activation_checkpointing: str  # none | block | selective
    loss_chunk: int  # tokens per chunk of the chunked loss; 0: the plain loss over full logits
    weight_elements: int
    optimizer_state_elements: int  # elements of state tensors with >= 1 dimension (papers' count)
    bookkeeping_elements: int  # elements of 0-dim state tensors (step counters etc.), not in paper_gb
    state_elements_by_role: dict[str, int]
    weights: int
    gradients: int
    optimizer_states: int  # every state tensor at its real dtype, bookkeeping included
    activations: int  # what the forward leaves for backward, plus the plain loss's logits (activation_bytes)
    activation_peak: int  # the high-water mark over forward and backward (activation_peak_bytes)
    state_source: str  # "meta step" or "formula (...why...)"
    notes: tuple[str, ...] = field(default=())
    # Integer buffers a structure keeps beside its weights (a sparse layer's block index, SLTrain's
    # support): in `total` and `peak`, not in the papers' convention, which counts weight and state
    # elements only.
    index_bytes: int = 0
    structure: dict[str, Any] | None = None
    trainable_weight_elements: int | None = None  # None: every weight is trained
    # Each parameter's update runs as soon as its gradient is complete and the gradient is freed
    # (--gradient-release): `gradients` is then the high-water mark, the largest one gradient.
    gradient_release: bool = False
    # Micro-batches per optimizer step: above 1 (no release) every gradient is held from the first
    # micro-batch's backward on, through the later ones' forward.
    accumulation: int = 1
    # The optimizer's own temporaries: of `step()` after backward, or, with release, the most one
    # parameter's update inside backward creates (measured on the meta device, as the state is).
    update_temporaries: int = 0
    # The gradients in backward's order (step_phases' input, for the planner) and the step's timeline
    # (step_phases): each moment's bytes beside weights, states and index buffers.
    gradient_pieces: tuple[GradientPiece, ...] = ()
    phases: tuple[tuple[str, int], ...] = ()
    # Of optimizer_state_elements, the uint8 codes of 8-bit states: 1 byte each in the papers' convention.
    state_code_elements: int = 0

    @property
    def trainable_elements(self) -> int:
        return self.weight_elements if self.trainable_weight_elements is None else self.trainable_weight_elements

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer_states + self.activations + self.index_bytes

    @property
    def peak(self) -> int:
        """Weights + optimizer states + the step's worst moment (`phases`: the activations, gradients
        and temporaries alive together at each moment of forward, backward and the update)."""
        return self.weights + self.optimizer_states + self.index_bytes + max(nbytes for _, nbytes in self.phases)

    @property
    def peak_phase(self) -> str:
        """The moment of the step `peak` is reached at."""
        return max(self.phases, key=lambda phase: phase[1])[0]

    @property
    def paper_bytes(self) -> int:
        wide = self.weight_elements + self.optimizer_state_elements - self.state_code_elements
        return PAPER_BYTES_PER_ELEMENT * wide + self.state_code_elements

    @property
    def paper_gb(self) -> float:
        return self.paper_bytes / GB


def _dtypes(precision: str) -> tuple[torch.dtype, int, int]:
    """(weight dtype, activation bytes, residual-stream bytes)."""
    check_choice("precision", precision, PRECISIONS, ConfigError)
    return {
        "fp32": (torch.float32, 4, 4),
        "bf16-autocast": (torch.float32, 2, 4),  # the residual stream stays fp32: embedding + bf16 branches
        "bf16-pure": (torch.bfloat16, 2, 2),
    }[precision]


def _config(model: str | LlamaConfig, vocab_size: int | None) -> LlamaConfig:
    try:
        config = resolve_config(model, vocab_size)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if config.vocab_size is None:
        raise ConfigError(
            f"model {model!r} takes its vocabulary size from the tokenizer; pass vocab_size= "
            "(on the command line: --vocab-size N)"
        )
    return config


def _checkpointing_mode(activation_checkpointing: bool | str) -> str:
    if activation_checkpointing is True:
        return "block"
    if activation_checkpointing is False or activation_checkpointing is None:
        return "none"
    check_choice("activation checkpointing mode", activation_checkpointing, CHECKPOINTING_MODES, ConfigError)
    return activation_checkpointing


def _activation_terms(config: LlamaConfig, batch_size: int, seq_len: int, precision: str,
                      activation_checkpointing: bool | str, loss_chunk: int) -> dict[str, int]:
    """The pieces activation_bytes and activation_peak_bytes add up (bytes; see their docstrings)."""
    _, act, resid = _dtypes(precision)
    mode = _checkpointing_mode(activation_checkpointing)
    b, s, vocab = batch_size, seq_len, config.vocab_size
    h, f, a = config.hidden_size, config.intermediate_size, config.num_heads
    tokens = b * s
    normalized = act if precision == "bf16-pure" else 4
    norm = tokens * h * (4 + normalized) + tokens * 4
    attn_inputs, mlp_inputs = (3, 2) if precision == "bf16-autocast" else (1, 1)
    linear_input = act if precision != "fp32" else 4
    attention = norm + tokens * h * attn_inputs * linear_input + 4 * tokens * h * act + b * a * s * 4
    mlp = norm + tokens * h * mlp_inputs * linear_input + 4 * tokens * f * act
    layers = config.num_layers
    blocks, recompute = {
        "none": (layers * (attention + mlp), 0),
        "block": (layers * tokens * h * resid, attention + mlp),
        "selective": (layers * (attention + tokens * h * resid), mlp),
    }[mode]
    terms = {"blocks": blocks, "per_block": blocks // max(layers, 1), "recompute": recompute, "ids": 2 * tokens * 8,
             # the gradients of the MLP's intermediates while a block runs backward
             "block_backward": 2 * tokens * f * act,
             # the gradient reaching the embedding's output, while the embedding's own is computed
             "embedding_backward": tokens * h * resid}
    if loss_chunk > 0:
        weight_bytes = 2 if precision == "bf16-pure" else 4
        chunk = min(loss_chunk, tokens)
        terms["head"] = norm + tokens * h * resid + vocab * h * weight_bytes
        terms["logits_held"] = 0
        # Per chunk: the fp32 logits (beside the bf16 ones they are cast from; torch's log-sum-exp
        # makes no temporary of their size: measured on CPU); then the logits' gradient in the compute
        # dtype beside d W's product for the chunk (V*h, and under bf16 its fp32 copy).
        chunk_moment = max(chunk * vocab * (4 + (2 if act == 2 else 0)),
                           chunk * vocab * act + vocab * h * (4 if act == 4 else 6))
        autocast_head = vocab * h * 2 if precision == "bf16-autocast" else 0  # the head's bf16 copy in the loop
        # d W accumulates in fp32 (`head` counts it at the weight's bytes, as it is saved): the rest
        fp32_accumulator = vocab * h * (4 - weight_bytes)
        terms["loss_forward"] = tokens * h * resid + chunk_moment + autocast_head + fp32_accumulator
        terms["loss_backward"] = tokens * h * resid
        terms["head_backward"] = tokens * h * resid  # d hidden times the incoming scale, as d W's is made
    else:
        terms["head"] = norm + tokens * h * linear_input + tokens * vocab * 4
        terms["logits_held"] = tokens * vocab * act
        terms["loss_forward"] = tokens * vocab * (act + 4 if act == 2 else act)
        terms["loss_backward"] = tokens * vocab * 8
        terms["head_backward"] = tokens * vocab * act  # the logits' gradient, through the head's matmuls
    autocast_weights = 0
    if precision == "bf16-autocast":
        attention_linear, mlp_linear = 4 * h * h, 3 * h * f
        kept = {"none": layers * (attention_linear + mlp_linear),
                "block": attention_linear + mlp_linear,  # the block being recomputed
                "selective": layers * attention_linear + mlp_linear}[mode]
        autocast_weights = 2 * (kept + (0 if loss_chunk > 0 else vocab * h))
    terms["autocast_weights"] = autocast_weights
    return terms


def activation_bytes(config: LlamaConfig, batch_size: int, seq_len: int, precision: str,
                     activation_checkpointing: bool | str = False, loss_chunk: int = 0) -> int:
    """Bytes autograd keeps for backward after one forward of a micro-batch, plus the logits.

    b = batch_size, s = seq_len, h = hidden, f = intermediate, a = heads, V = vocab, L = layers;
    A = activation bytes (4 fp32, else 2), X = residual-stream bytes (2 under bf16-pure, else 4).
    Per LLaMA block (what lowmem's model saves; checked against saved_tensors_hooks in the tests):
      two RMSNorms: each keeps its fp32 input (the residual itself when X = 4, else an fp32 copy),
        the normalized tensor (A under bf16-pure, 4 otherwise) and 1/rms (b*s fp32)
      inputs of the projections: the norm output, once per sublayer — under autocast each Linear
        keeps its own bf16 cast of it (3 for q/k/v, 2 for gate/up)
      attention: rotated q, k, v and the output (4*b*s*h*A; o_proj's input is a view of the output)
        and the log-sum-exp of flash attention (b*a*s fp32) — never an s x s matrix
      MLP: gate, silu(gate), up and their product (4*b*s*f*A)
    Once: the final norm and the head's input as above, the logits of the plain loss (b*s*V*A),
    the fp32 log-softmax its cross-entropy keeps (b*s*V*4), input ids and targets (int64).
    Under bf16-autocast, autocast's bf16 copies of every Linear weight are saved too (2 bytes x
    hidden + head elements).
    `activation_checkpointing` (lowmem.models.llama.CHECKPOINTING_MODES; True means "block"):
      block      each block keeps only its input (b*s*h*X), plus one block's worth while that block
                 is recomputed in backward
      selective  each block keeps its attention sublayer and the MLP sublayer's input (b*s*h*X),
                 plus one MLP sublayer's worth while it is recomputed
    `loss_chunk` > 0 (lowmem.models.chunked_loss): no logits and no log-softmax; the head's input
    gradient (b*s*h*X) and weight gradient (V*h at the weight's bytes) instead.
    Not counted: gradients of activations and temporaries (activation_peak_bytes adds them), the
    allocator's rounding and fragmentation, the rotary tables (buffers of the model).
    """
    t = _activation_terms(config, batch_size, seq_len, precision, activation_checkpointing, loss_chunk)
    return t["blocks"] + t["recompute"] + t["head"] + t["logits_held"] + t["ids"] + t["autocast_weights"]


def activation_peak_bytes(config: LlamaConfig, batch_size: int, seq_len: int, precision: str,
                          activation_checkpointing: bool | str = False, loss_chunk: int = 0) -> int:
    """The high-water mark of activation memory over one micro-batch's forward and backward.

    The largest of three moments, each on top of what the blocks keep (activation_bytes' terms):
      the loss's forward   the head's saved tensors plus, for a moment, the plain loss's logits
                           (b*s*V*A) and under bf16 their fp32 copy (b*s*V*4) — or, chunked, the
                           head's input (b*s*h*X), d W's fp32 accumulator (V*h*4) and one chunk of
                           c = min(loss_chunk, b*s) tokens: fp32 logits (c*V*4, beside their bf16
                           original under bf16), or the logits' gradient (c*V*A) beside the chunk's
                           d W product (V*h*4; under bf16 V*h*2 and its fp32 copy)
      the loss's backward  plain: the gradient of the log-softmax and of the logits (b*s*V*8);
                           chunked: the head's input gradient times the incoming scale (b*s*h*X)
      a block's backward   the recomputed block or MLP sublayer (checkpointing) and the gradients
                           of the MLP's intermediates (2*b*s*f*A)
    Measured by lowmem.memory.measure.TensorMemory (every storage ops create, gradients of the
    weights excluded) in tests/test_activation_memory.py: within 10% for every precision, mode and
    loss. Weight gradients are not activations; estimate_memory adds them.
    """
    t = _activation_terms(config, batch_size, seq_len, precision, activation_checkpointing, loss_chunk)
    base = t["blocks"] + t["ids"] + t["autocast_weights"]
    return base + max(t["head"] + t["loss_forward"], t["head"] + t["loss_backward"],
                      t["recompute"] + t["block_backward"])


def step_phases(config: LlamaConfig, batch_size: int, seq_len: int, precision: str,
                activation_checkpointing: bool | str, loss_chunk: int, pieces: Sequence[GradientPiece],
                update_temporaries: int, gradient_release: bool = False, accumulation: int = 1) -> dict[str, int]:
    """Bytes alive at each moment of one optimizer step, beside the weights, states and index buffers.

    The activations are activation_peak_bytes' terms, placed in time; the gradients are `pieces`
    (head, blocks last first, embedding: backward's order) as backward completes them:
      forward             everything the blocks keep, the head's saved tensors and the loss's forward
                          (activation_peak_bytes' first moment); no gradient yet (with accumulation
                          above 1, every gradient: the earlier micro-batches')
      backward: the loss  the same minus the loss's forward, plus its backward
      backward: the head  the head's gradient beside the logits' gradient (plain) or the scaled
                          gradient of the head's input (chunked); under release then its update, once
                          the loss's saved tensors are freed
      backward: block i   the blocks kept up to i (block i's own, recomputed under checkpointing),
                          the gradients of the MLP's intermediates, and every gradient completed so far
                          (head, blocks after i, block i's largest, being made); backward frees each
                          block's activations as it goes while gradients accumulate, so the two never
                          peak together
      backward: the embedding  the gradient reaching the embedding, and every gradient
      the update          every gradient and `optimizer.step()`'s temporaries
    With `gradient_release` the gradients held at a moment are one parameter's with its update's
    temporaries (GradientPiece.largest_update of the piece being completed), and there is no update
    after backward. Measured against lowmem.memory.measure.TensorMemory over whole steps in
    benchmarks/bench_gradient_release.py and tests/test_memory_estimate.py.
    """
    if gradient_release and accumulation > 1:
        raise ConfigError("the update inside backward cannot accumulate micro-batches: use accumulation 1")
    t = _activation_terms(config, batch_size, seq_len, precision, activation_checkpointing, loss_chunk)
    every = sum(piece.gradient_bytes for piece in pieces)
    earlier = every if accumulation > 1 else 0  # the earlier micro-batches' gradients, held throughout

    def held(completed: int, piece: GradientPiece) -> int:
        return piece.largest_update if gradient_release else max(completed, earlier)

    always = t["ids"] + t["autocast_weights"]
    kept = always + t["blocks"]
    head, *blocks, embedding = pieces
    phases = {"forward": kept + t["head"] + t["loss_forward"] + (0 if gradient_release else earlier)}
    phases["backward: the loss"] = kept + t["head"] + t["loss_backward"] + (0 if gradient_release else earlier)
    # The head's gradient appears beside the logits' gradient (the plain loss) or as the chunked loss's
    # backward scales it; under release its update runs once that node is done, its saved tensors freed.
    completed = head.gradient_bytes
    gradient = head.largest_gradient if gradient_release else max(completed, earlier)
    phases["backward: the head"] = kept + t["head"] + t["head_backward"] + gradient
    if gradient_release:
        phases["backward: the head's update"] = kept + t["head_backward"] + head.largest_update
    for index in range(len(blocks) - 1, -1, -1):
        # A block's backward peaks in its MLP, first: the later blocks' gradients are complete, of its
        # own only the one being made (the attention's come after the MLP's intermediates are freed).
        block = always + (index + 1) * t["per_block"] + t["recompute"] + t["block_backward"]
        phases[f"backward: block {index}"] = block + held(completed + blocks[index].largest_gradient, blocks[index])
        completed += blocks[index].gradient_bytes
    completed += embedding.gradient_bytes
    phases["backward: the embedding"] = always + t["embedding_backward"] + held(completed, embedding)
    if not gradient_release:
        phases["the update"] = every + update_temporaries
    return phases


def _gradient_pieces(model: nn.Module, update_bytes: dict[int, int] | None = None) -> list[GradientPiece]:
    """The trainable parameters' gradient bytes per piece (GradientPiece), head first; `update_bytes`
    (parameter id -> its update's temporaries) gives each piece its largest release update."""
    layers = len(model.layers)
    embedding = {id(p) for p in model.get_input_embeddings().parameters()}
    totals = {"head": 0, **{f"layers.{i}": 0 for i in range(layers)}, "embedding": 0}
    largest, largest_gradient = dict.fromkeys(totals, 0), dict.fromkeys(totals, 0)
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue  # frozen weights (LoRA's W0) get no gradient
        parts = name.split(".")
        piece = ("embedding" if id(param) in embedding
                 else f"layers.{parts[1]}" if parts[0] == "layers" else "head")
        nbytes = param.numel() * param.element_size()
        totals[piece] += nbytes
        largest_gradient[piece] = max(largest_gradient[piece], nbytes)
        if update_bytes is not None:
            largest[piece] = max(largest[piece], nbytes + update_bytes[id(param)])
    return [GradientPiece(name, totals[name], largest_gradient[name], largest[name]) for name in totals]


def _existing_tensors(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [*model.parameters(), *model.buffers(), *(t for _, _, t in iter_state_tensors(optimizer)),
            *(p.grad for p in model.parameters() if p.grad is not None)]


def _update_temporaries(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """The most bytes `optimizer.step()` creates beyond the state it already has, on meta."""
    with TensorMemory(exclude=_existing_tensors(model, optimizer)) as mem:
        optimizer.step()
    return mem.peak


def _per_parameter_update_temporaries(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[int, int]:
    """parameter id -> the bytes its update inside backward creates (step_parameter, on meta, its
    gradient the only one present, as under release)."""
    if not getattr(optimizer, "updates_per_parameter", False):
        raise ConfigError(f"{type(optimizer).__name__} cannot update inside backward (it does not declare "
                          "updates_per_parameter); estimate it without gradient release")
    grads = {id(p): p.grad for p in model.parameters()}
    existing = _existing_tensors(model, optimizer)
    for param in model.parameters():
        param.grad = None
    temporaries = {}
    for param in model.parameters():
        if grads[id(param)] is None:
            continue
        param.grad = grads[id(param)]
        with TensorMemory(exclude=existing) as mem:
            optimizer.step_parameter(param)
        temporaries[id(param)] = mem.peak
        param.grad = None
    for param in model.parameters():
        param.grad = grads[id(param)]
    return temporaries


# Methods whose step cannot run on the meta device get their state from a formula here, named in
# the estimate's state_source. Each maps (model, built optimizer) to the state's (role, shape, dtype).
StateFormula = Callable[[nn.Module, torch.optim.Optimizer], list[tuple[str, tuple[int, ...], torch.dtype]]]
STATE_FORMULAS: dict[str, StateFormula] = {}


def _meta_model(config: LlamaConfig, dtype: torch.dtype, structure: dict[str, Any] | None) -> nn.Module:
    model = build_model(config, structure=structure, device="meta", dtype=dtype)
    for param in model.parameters():
        if param.requires_grad:
            param.grad = torch.empty_like(param)
    return model


def _build_optimizer(name: str, model: nn.Module, preset: str | None, hparams: dict[str, Any]) -> torch.optim.Optimizer:
    try:
        return build_optimizer(name, model, preset=preset, hparams=hparams)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def _count_state(model: nn.Module,
                 optimizer: torch.optim.Optimizer) -> tuple[int, int, dict[str, int], int, int]:
    """(state elements with >= 1 dim, 0-dim elements, elements by role, bytes, uint8 code elements) of a
    stepped optimizer."""
    roles = named_roles(model)
    role_of = {id(p): roles[name] for name, p in model.named_parameters() if name in roles}
    by_role: dict[str, int] = {}
    elements = bookkeeping = codes = 0
    seen: set[int] = set()
    for param, _, tensor in iter_state_tensors(optimizer):
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        if tensor.dim() == 0:
            bookkeeping += tensor.numel()
            continue
        elements += tensor.numel()
        if tensor.dtype == torch.uint8:
            codes += tensor.numel()
        role = role_of.get(id(param), "other")
        by_role[role] = by_role.get(role, 0) + tensor.numel()
    return elements, bookkeeping, by_role, optimizer_state_bytes(optimizer), codes


def _count_formula(name: str, model: nn.Module,
                   optimizer: torch.optim.Optimizer) -> tuple[int, int, dict[str, int], int, int]:
    by_role: dict[str, int] = {}
    elements = nbytes = 0
    for role, shape, dtype in STATE_FORMULAS[name](model, optimizer):
        numel = 1
        for size in shape:
            numel *= size
        elements += numel
        nbytes += numel * torch.empty((), dtype=dtype).element_size()
        by_role[role] = by_role.get(role, 0) + numel
    return elements, 0, by_role, nbytes, 0


def estimate_memory(
    model: str | LlamaConfig,
    optimizer: str,
    hparams: dict[str, Any] | None = None,
    *,
    vocab_size: int | None = None,
    batch_size: int = 1,
    seq_len: int = 256,
    precision: str = "bf16-pure",
    activation_checkpointing: bool | str = False,
    structure: dict[str, Any] | None = None,
    chunked_loss: str = "auto",
    loss_chunk: int = DEFAULT_CHUNK,
    gradient_release: bool = False,
    accumulation: int = 1,
) -> MemoryEstimate:
    """Predict the memory of training `model` with `optimizer` (see the module docstring).

    `model` is a preset name (its name also picks the optimizer's per-size defaults, as in training)
    or a LlamaConfig; `structure` a structure spec ({"name": "lowrank", "rank": 128}) applied to its
    hidden matrices, as in training; `hparams` override the optimizer's defaults.
    `activation_checkpointing` is none | block | selective (True: block); `chunked_loss` on | off |
    auto with `loss_chunk` tokens per chunk, decided as the trainer decides it. With
    `gradient_release` each parameter's gradient is freed by its own update in backward, so the
    gradients held at once are at most the largest one. Raises ConfigError for an unknown preset,
    optimizer, hyperparameter, precision or mode. `accumulation`: micro-batches per optimizer step (the
    gradients of the first are held through the rest); the update inside backward needs 1.
    """
    mode = _checkpointing_mode(activation_checkpointing)
    hparams = dict(hparams or {})
    weight_dtype, _, _ = _dtypes(precision)
    if batch_size < 1 or seq_len < 1 or accumulation < 1:
        raise ConfigError(f"batch_size {batch_size}, seq_len {seq_len} and accumulation {accumulation} must all "
                          "be >= 1")
    config = _config(model, vocab_size)
    if seq_len > config.max_seq_len:
        raise ConfigError(
            f"seq_len {seq_len} is above the model's maximum sequence length {config.max_seq_len}; "
            f"use {config.max_seq_len} or less"
        )
    chunk = loss_chunk_for(chunked_loss, loss_chunk, batch_size * seq_len, config.vocab_size)
    preset = model if isinstance(model, str) else None
    meta = _meta_model(config, weight_dtype, structure)
    opt = _build_optimizer(optimizer, meta, preset, hparams)
    notes: list[str] = []
    try:
        for _ in range(META_STEPS):
            opt.step()
        counted = _count_state(meta, opt)
        source = "meta step"
        per_parameter = _per_parameter_update_temporaries(meta, opt) if gradient_release else None
        temporaries = max(per_parameter.values(), default=0) if per_parameter else _update_temporaries(meta, opt)
    except RuntimeError as err:  # NotImplementedError (a missing meta kernel) included
        if optimizer not in STATE_FORMULAS:
            raise RuntimeError(
                f"optimizer {optimizer!r} cannot step on the meta device ({err}) and has no declared "
                "state formula in lowmem.memory.estimate.STATE_FORMULAS; make its step meta-safe or add one"
            ) from err
        opt = _build_optimizer(optimizer, meta, preset, hparams)
        counted = _count_formula(optimizer, meta, opt)
        source = f"formula (its step fails on the meta device: {str(err).splitlines()[0]})"
        notes.append(f"optimizer state of {optimizer!r} comes from a declared formula, not from its code; "
                     "its update's temporaries are not counted")
        per_parameter = {id(p): 0 for p in meta.parameters()} if gradient_release else None
        temporaries = 0
    elements, bookkeeping, by_role, state_bytes, code_elements = counted
    weight_elements = sum(p.numel() for p in meta.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in meta.parameters())
    gradient_bytes = [p.numel() * p.element_size() for p in meta.parameters() if p.requires_grad]
    index_bytes = sum(b.numel() * b.element_size() for m in meta.modules() if getattr(m, "param_kinds", None)
                      for b in m.buffers(recurse=False))
    pieces = _gradient_pieces(meta, per_parameter)
    phases = step_phases(config, batch_size, seq_len, precision, mode, chunk, pieces, temporaries, gradient_release,
                         accumulation)
    return MemoryEstimate(
        model=model if isinstance(model, str) else "custom",
        optimizer=optimizer,
        hparams=hparams,
        precision=precision,
        batch_size=batch_size,
        seq_len=seq_len,
        activation_checkpointing=mode,
        loss_chunk=chunk,
        weight_elements=weight_elements,
        optimizer_state_elements=elements,
        bookkeeping_elements=bookkeeping,
        state_elements_by_role=by_role,
        weights=weight_bytes,
        # Frozen weights (LoRA's W0) get none.
        gradients=max(gradient_bytes, default=0) if gradient_release else sum(gradient_bytes),
        optimizer_states=state_bytes,
        activations=activation_bytes(config, batch_size, seq_len, precision, mode, chunk),
        activation_peak=activation_peak_bytes(config, batch_size, seq_len, precision, mode, chunk),
        state_source=source,
        notes=tuple(notes),
        index_bytes=index_bytes,
        structure=dict(structure) if structure else None,
        trainable_weight_elements=sum(p.numel() for p in meta.parameters() if p.requires_grad),
        gradient_release=gradient_release,
        accumulation=accumulation,
        update_temporaries=temporaries,
        gradient_pieces=tuple(pieces),
        phases=tuple(phases.items()),
        state_code_elements=code_elements,
    )


def accepted_hparams(optimizer: str) -> set[str]:
    """The hyperparameter names optimizer `optimizer`'s constructor takes (ConfigError if unknown)."""
    return lowmem.optim.method(optimizer).hyperparameters()


def hparams_for(optimizer: str, hparams: dict[str, Any], shared: bool = False) -> dict[str, Any]:
    """The hyperparameters of `hparams` that go to `optimizer`.

    A key "name.key" is scoped: it goes to optimizer `name` only. An unscoped key goes to every
    optimizer when `shared` is false; when true (several optimizers compared), only to those whose
    constructor accepts it and whose registry variant does not fix it (apollo-mini's rank 1 stays 1
    under a shared --rank 512; write apollo-mini.rank=... to change it).
    """
    chosen: dict[str, Any] = {}
    accepted = accepted_hparams(optimizer) if shared else set()
    fixed = lowmem.optim.method(optimizer).defaults if shared else {}
    for key, value in hparams.items():
        scope, dot, name = key.rpartition(".")
        if dot:
            if scope == optimizer:
                chosen[name] = value
            elif not shared:
                raise ConfigError(f"hyperparameter {key!r} is scoped to optimizer {scope!r}, not {optimizer!r}; "
                                  f"write {name}=... or {optimizer}.{name}=...")
        elif not shared or (key in accepted and key not in fixed):
            chosen.setdefault(key, value)
    return chosen


def compare(
    model: str | LlamaConfig,
    optimizers: Sequence[str],
    hparams: dict[str, Any] | None = None,
    **options: Any,
) -> list[MemoryEstimate]:
    """Estimates for several optimizers on one model, in the given order.

    `hparams` are shared as hparams_for(shared=True) says: a `rank` reaches the low-rank methods and
    not AdamW; "galore.rank" reaches GaLore alone. `options` are estimate_memory's keyword options.
    """
    hparams = dict(hparams or {})
    return [estimate_memory(model, name, hparams_for(name, hparams, shared=True), **options) for name in optimizers]


__all__ = ["GB", "PRECISIONS", "GradientPiece", "MemoryEstimate", "STATE_FORMULAS", "accepted_hparams",
           "activation_bytes", "activation_peak_bytes", "compare", "estimate_memory", "hparams_for", "step_phases"]
