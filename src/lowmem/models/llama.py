"""The LLaMA family used by every paper lowmem reproduces (GaLore's recipe).

Touvron et al., "LLaMA: Open and Efficient Foundation Language Models" (arXiv 2302.13971):
  x = embed(tokens)
  for each block:  x = x + Attention(RMSNorm(x))   (rotary q/k, causal, no biases)
                   x = x + SwiGLU(RMSNorm(x))       (down(silu(gate(x)) * up(x)))
  logits = lm_head(RMSNorm(x))                      (head untied from the embedding)
Init N(0, 0.02) for every matrix, RMSNorm eps 1e-6. Parameter names follow Hugging Face's
`LlamaForCausalLM` so weights move between the two without renaming.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lowmem.compiled import compiled
from lowmem.errors import ConfigError, check_choice
from lowmem.models.chunked_loss import IGNORE_INDEX, chunked_head_loss_sum

# What each block keeps for backward (Block.checkpointing; set with Llama.set_activation_checkpointing):
#   none       everything autograd saves (the plain model)
#   block      only the block's input; the whole block is recomputed in backward
#   selective  the attention sublayer as usual; the MLP sublayer (its RMSNorm, gate/up/down, SiLU,
#              product: 4 x tokens x intermediate, the block's largest share) is recomputed from its
#              input, which is kept. At llama-60m (16 x 256, bf16) the MLP sublayer is 65% of a
#              block's activations for 62% of its forward FLOPs; recomputing the attention sublayer
#              instead would free 35% for 38% (flash attention keeps no s x s matrix to drop), so the
#              MLP frees more, and slightly more per recomputed FLOP.
# Both checkpoint with torch.utils.checkpoint.checkpoint(use_reentrant=False) inside Block.forward,
# so DDP, FSDP2 (fully_shard on the block) and structures (which replace the block's Linears) see
# an ordinary module. Recomputation is the same ops on the same inputs: gradients are bitwise equal.
CHECKPOINTING_MODES = ("none", "block", "selective")


@dataclass(frozen=True)
class LlamaConfig:
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_layers: int
    vocab_size: int | None = 32000  # None: taken from the tokenizer when the model is built
    max_seq_len: int = 1024
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    init_std: float = 0.02

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}; "
                "choose a head count that divides the hidden size"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for rotary embeddings")


# The papers' sizes (vocab 32000, T5 tokenizer) and the CPU tiers of the CPU protocol, whose
# vocabulary follows the tokenizer. CPU tiers are fixed once results are published (docs/results.md).
PRESETS: dict[str, LlamaConfig] = {
    "llama-60m": LlamaConfig(512, 1376, 8, 8),
    "llama-130m": LlamaConfig(768, 2048, 12, 12),
    "llama-350m": LlamaConfig(1024, 2736, 16, 24),
    "llama-1b": LlamaConfig(2048, 5461, 32, 24),
    "llama-7b": LlamaConfig(4096, 11008, 32, 32),
    "cpu-tiny": LlamaConfig(128, 352, 4, 2, vocab_size=None, max_seq_len=512),
    "cpu-small": LlamaConfig(256, 688, 4, 4, vocab_size=None, max_seq_len=512),
    "cpu-base": LlamaConfig(384, 1024, 6, 6, vocab_size=None, max_seq_len=512),
    # Kilobytes of weights: for tests and fixtures that need a whole run in a fraction of a second.
    "cpu-micro": LlamaConfig(16, 32, 2, 1, vocab_size=None, max_seq_len=64),
}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalize in at least fp32 even under bf16: the mean of squares loses too much in 8 bits.
        wide = x.to(torch.promote_types(x.dtype, torch.float32))
        wide = wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * wide.to(x.dtype)


def rotary_tables(head_dim: int, max_seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)  # the "rotate half" layout of HF LLaMA
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        d = config.hidden_size
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        shape = (b, t, self.num_heads, self.head_dim)
        q = self.q_proj(x).view(shape).transpose(1, 2)
        k = self.k_proj(x).view(shape).transpose(1, 2)
        v = self.v_proj(x).view(shape).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        # Right-padded sequences need no mask beyond causality: a pad only ever follows real tokens.
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, d))


class MLP(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)
        self.checkpointing = "none"  # one of CHECKPOINTING_MODES

    def _mlp_residual(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.post_attention_layernorm(x))

    def _forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return self._mlp_residual(x)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if self.checkpointing == "none" or not torch.is_grad_enabled():
            return self._forward(x, cos, sin)
        if self.checkpointing == "block":
            return checkpoint(self._forward, x, cos, sin, use_reentrant=False)
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return checkpoint(self._mlp_residual, x, use_reentrant=False)


# What torch.compile lowers each block and the loss with: inductor (fused kernels, C++ on a CPU, Triton
# on a GPU). Tests set "aot_eager" to check the traced graphs without paying inductor's code generation.
COMPILE_BACKEND = "inductor"


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The training objective from full logits: cast to fp32, the summed next-token cross-entropy over
    the positions whose label is not IGNORE_INDEX."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def head_loss_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """`cross_entropy_sum` of a bias-free linear head's logits `hidden @ weight^T`: the plain loss, in one
    function so that `--compile` traces the head's matmul with the softmax around it: inductor fuses the
    fp32 cast, log-softmax and their backward (benchmarks/bench_head_loss.py times it)."""
    return cross_entropy_sum(F.linear(hidden, weight), labels)


def compiled_head_loss() -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """`head_loss_sum` compiled with COMPILE_BACKEND (lowmem.compiled's cache)."""
    return compiled(head_loss_sum, COMPILE_BACKEND)


class Llama(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        if config.vocab_size is None:
            raise ValueError("LlamaConfig.vocab_size is None: pass vocab_size= (the tokenizer's size) to build_model")
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        cos, sin = rotary_tables(config.head_dim, config.max_seq_len, config.rope_theta)
        # Not persistent: derived from the config, so checkpoints hold only learned weights.
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        # Tokens per chunk of the loss when forward is given labels (0: the plain loss over full
        # logits). Set by the run's assembly from train.chunked_loss / train.loss_chunk.
        self.loss_chunk = 0
        # Whether the loss of a bias-free linear head runs compiled (`compile_blocks`).
        self.compiled_loss = False
        self.reset_parameters()

    def compile_blocks(self) -> None:
        """torch.compile each block in place (nn.Module.compile: names and state_dict unchanged, so
        checkpoints, structures and FSDP2's per-block sharding see the same module tree). Per block, as
        torchtitan does, because every block has the same graph: compiled once, reused by all, and a
        structure the compiler cannot trace breaks only its own block's graph. The loss of a bias-free
        linear head is compiled too: the plain one whole (`head_loss_sum`), the chunked one chunk by
        chunk around its matmuls (chunked_loss.chunk_loss_and_grad_); a structured head's loss stays
        eager."""
        for block in self.layers:
            block.compile(backend=COMPILE_BACKEND)
        self.compiled_loss = True

    def set_activation_checkpointing(self, mode: str) -> None:
        """What each block keeps for backward: "none", "block" or "selective" (see CHECKPOINTING_MODES)."""
        check_choice("activation checkpointing mode", mode, CHECKPOINTING_MODES, ConfigError)
        for block in self.layers:
            block.checkpointing = mode

    @property
    def activation_checkpointing(self) -> str:
        modes = {block.checkpointing for block in self.layers}
        return modes.pop() if len(modes) == 1 else "mixed"

    def reset_parameters(self) -> None:
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    # The model declares its input embedding and output head (Hugging Face's method names), so
    # optimizers find them by role rather than by parameter-name substrings.
    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                return_hidden: bool = False) -> torch.Tensor:
        """Logits [batch, seq, vocab]; with `return_hidden`, the final hidden states (the head's
        input, after the last RMSNorm) instead; with `labels`, the training objective: the summed
        fp32 next-token cross-entropy over positions whose label is not IGNORE_INDEX, through the
        chunked loss when `self.loss_chunk` > 0 (the full logits never exist), else over the full
        logits. This is the one place lowmem computes the loss: training, evaluation and `lowmem
        eval` call `model(ids, labels=labels)` (through a DDP/FSDP2 wrapper's forward in a run)."""
        hidden = self.forward_hidden(input_ids)
        if return_hidden:
            return hidden
        if labels is None:
            return self.lm_head(hidden)
        labels = labels.to(hidden.device)
        if not (isinstance(self.lm_head, nn.Linear) and self.lm_head.bias is None):  # a structured head
            return cross_entropy_sum(self.lm_head(hidden), labels)
        if self.loss_chunk > 0:
            return chunked_head_loss_sum(hidden, self.lm_head.weight, labels, self.loss_chunk, IGNORE_INDEX,
                                         compile_backend=COMPILE_BACKEND if self.compiled_loss else None)
        loss = compiled_head_loss() if self.compiled_loss else head_loss_sum
        return loss(hidden, self.lm_head.weight, labels)

    def forward_hidden(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The final hidden states [batch, seq, hidden]: everything but the head."""
        t = input_ids.shape[1]
        if t > self.config.max_seq_len:
            raise ValueError(
                f"sequence length {t} exceeds the model's maximum {self.config.max_seq_len}; "
                "use a shorter --seq-len or a config with a larger max_seq_len"
            )
        x = self.embed_tokens(input_ids)
        cos = self.rope_cos[:t].to(x.dtype)
        sin = self.rope_sin[:t].to(x.dtype)
        for block in self.layers:
            x = block(x, cos, sin)
        return self.norm(x)


def resolve_config(preset_or_config: str | LlamaConfig, vocab_size: int | None = None, **overrides) -> LlamaConfig:
    if isinstance(preset_or_config, LlamaConfig):
        config = preset_or_config
    elif preset_or_config in PRESETS:
        config = PRESETS[preset_or_config]
    else:
        check_choice("model preset", preset_or_config, PRESETS, ConfigError)
    if vocab_size is not None:
        overrides["vocab_size"] = vocab_size
    return dataclasses.replace(config, **overrides) if overrides else config


def build_model(
    preset_or_config: str | LlamaConfig,
    vocab_size: int | None = None,
    device: torch.device | str | None = None,
    **overrides,
) -> Llama:
    """Build a LLaMA from a preset name or config. `device="meta"` allocates nothing (estimates use it)."""
    config = resolve_config(preset_or_config, vocab_size, **overrides)
    with torch.device(device) if device is not None else contextlib.nullcontext():
        return Llama(config)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())

