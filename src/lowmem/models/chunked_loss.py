"""Cross-entropy through the output head without ever holding the full logits.

    loss_sum = chunked_head_loss_sum(hidden, head_weight, labels, chunk=1024)

The plain path builds logits = hidden @ W^T for every token ([tokens, vocab], e.g. 16 384 x 32 000 at
llama-60m micro-batch 64 x 256) and an fp32 copy for the loss, and autograd keeps both for backward:
at llama-60m that is most of a step's activation memory. Here the tokens are cut into chunks of
`chunk` rows; for each chunk the head's matmul, the fp32 log-sum-exp and the gradient of the summed
loss with respect to the chunk's logits (softmax - one-hot) are computed, and that gradient is pushed
straight through the head's two matmuls (d hidden = g @ W, d W += g^T @ hidden, accumulated in fp32).
Only d hidden ([tokens, hidden]) and d W ([vocab, hidden]) outlive the forward; backward multiplies them
by the incoming scalar gradient (the loss is a sum, so its gradient is linear in that scalar). No
logits are recomputed: the matmuls are the same three the plain path does (forward, d hidden, d W).
This is the "fused linear cross-entropy" of Liger-Kernel (Hsu et al., arXiv 2410.10989), in PyTorch.

Numerics follow the plain path: logits in the compute dtype (bf16 under bf16 weights or autocast,
else fp32), cast to fp32 for the softmax, the logits' gradient cast back to the compute dtype for the
two matmuls. In fp32 the loss and gradients equal the plain path's to rounding (tests check 1e-6
relative); d W's sum over chunks is taken in fp32, so in bf16 it is at least as accurate.

When no gradient is needed (evaluation), only the loss is computed, chunk by chunk.

Under `--compile` (`compile_backend`), each chunk's elementwise work (`chunk_loss_and_grad_`: the fp32
log-sum-exp, the target's logit, softmax - one-hot and the cast back) is one compiled graph that writes
the gradient over the chunk's logits: inductor does a row's reduction and its gradient in one loop, with
no fp32 copy of the chunk. The three matmuls stay as they are.

Lives in the models layer: the model computes its loss when asked (`model(ids, labels=labels)`, plain
or chunked behind that one call), so FSDP2's gathered head weight is used inside the root module's
forward. `IGNORE_INDEX`, the label of a position nothing is scored at, is defined here, once: the
data layer writes it for padding and imports it from here.
"""

from __future__ import annotations

from typing import Any

import torch

from lowmem.compiled import compiled
from lowmem.errors import ConfigError, check_choice

IGNORE_INDEX = -100  # the label of an unscored position (padding): PyTorch's cross-entropy default
DEFAULT_CHUNK = 1024  # tokens per chunk: 1024 x 32000 fp32 logits are 131 MB
# "auto" turns the chunked loss on when one micro-batch's fp32 logits would take at least this many
# bytes (256 MiB: llama-60m from micro-batch 2 x 256 on; the CPU main job, 16 x 128 x 8192, stays dense).
AUTO_THRESHOLD_BYTES = 1 << 28
CHUNKED_LOSS_MODES = ("auto", "on", "off")


def loss_chunk_for(mode: str, chunk: int, tokens: int, vocab_size: int) -> int:
    """Tokens per loss chunk for a micro-batch of `tokens` tokens (0: the plain, dense loss).

    mode "on" always chunks, "off" never, "auto" when the fp32 logits would reach AUTO_THRESHOLD_BYTES.
    """
    check_choice("chunked_loss mode", mode, CHUNKED_LOSS_MODES, ConfigError)
    if not isinstance(chunk, int) or chunk < 1:
        raise ConfigError(f"loss_chunk must be a positive number of tokens, got {chunk!r}; e.g. --loss-chunk 1024")
    if mode == "off" or (mode == "auto" and tokens * vocab_size * 4 < AUTO_THRESHOLD_BYTES):
        return 0
    return chunk


def count_targets(labels: torch.Tensor) -> int:
    """How many positions of `labels` are scored (not IGNORE_INDEX): the tokens a summed loss is over."""
    return int((labels != IGNORE_INDEX).sum())


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return torch.promote_types(hidden.dtype, weight.dtype)


def _scored_loss(scores: torch.Tensor, labels: torch.Tensor, ignore_index: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One chunk's fp32 logits `scores` -> (summed cross-entropy over scored rows, each row's log-sum-exp,
    mask of scored rows, labels with ignored rows set to 0): what evaluation, the eager gradient and the
    compiled one all start from."""
    mask = labels != ignore_index
    safe = torch.where(mask, labels, torch.zeros_like(labels))
    lse = torch.logsumexp(scores, dim=-1)
    losses = lse - scores.gather(1, safe[:, None]).squeeze(1)
    return torch.where(mask, losses, torch.zeros_like(losses)).sum(), lse, mask, safe


def chunk_loss_and_grad_(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """The summed cross-entropy of one chunk's logits (in fp32), and, written over `logits` in their
    dtype, its gradient: softmax - one-hot on scored rows, 0 on ignored ones. The eager loop's per-chunk
    work written out of place for torch.compile (`--compile`), which fuses it into a pass or two over the
    chunk; eagerly it would allocate several chunk-sized temporaries, so the eager loop keeps its own."""
    scores = logits.float()
    total, lse, mask, safe = _scored_loss(scores, labels, ignore_index)
    one_hot = torch.arange(scores.shape[1], device=scores.device)[None, :] == safe[:, None]
    grad = (scores - lse[:, None]).exp() - one_hot.to(scores.dtype)
    logits.copy_(torch.where(mask[:, None], grad, torch.zeros_like(grad)))
    return total


class _ChunkedHeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int,
                ignore_index: int, compute_dtype: torch.dtype, compiled_chunk) -> torch.Tensor:
        w = weight.to(compute_dtype)
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, hidden.shape[0], chunk):
                h = hidden[start:start + chunk].to(compute_dtype)
                if compiled_chunk is not None:
                    g = h @ w.t()
                    total += compiled_chunk(g, labels[start:start + chunk], ignore_index)  # g: now the gradient
                else:  # in place on the fp32 logits: one [chunk, vocab] fp32 buffer at a time
                    logits = (h @ w.t()).float()
                    loss, lse, mask, safe = _scored_loss(logits, labels[start:start + chunk], ignore_index)
                    total += loss
                    # d(sum of losses)/d logits = softmax - one-hot on scored rows, 0 on ignored ones
                    grad = logits.sub_(lse[:, None]).exp_()
                    grad[torch.arange(grad.shape[0], device=grad.device), safe] -= 1.0
                    grad.mul_(mask[:, None])
                    g = grad.to(compute_dtype)
                    del logits, grad
                grad_hidden[start:start + chunk] = (g @ w).to(hidden.dtype)
                grad_weight += (g.t() @ h).float()
        ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype))
        return total

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_output.to(grad_hidden.dtype), grad_weight * grad_output.to(grad_weight.dtype), \
            None, None, None, None, None


def chunked_head_loss_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                          chunk: int = DEFAULT_CHUNK, ignore_index: int = IGNORE_INDEX,
                          compile_backend: Any = None) -> torch.Tensor:
    """Sum over scored tokens of cross-entropy(hidden @ weight^T, labels), in fp32, chunk by chunk.

    hidden: [..., hidden_size] (the head's input), weight: [vocab, hidden_size] (the head's weight, no
    bias), labels: [...] with `ignore_index` where nothing is scored. Returns a 0-dim fp32 tensor.
    `compile_backend` (a torch.compile backend, None: eager): the training loss's per-chunk elementwise
    work through `chunk_loss_and_grad_` compiled with it.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1).to(hidden.device)
    compute_dtype = _compute_dtype(hidden, weight)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        compiled_chunk = None if compile_backend is None else compiled(chunk_loss_and_grad_, compile_backend)
        return _ChunkedHeadLoss.apply(hidden, weight, labels, chunk, ignore_index, compute_dtype, compiled_chunk)
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    w = weight.to(compute_dtype)
    with torch.no_grad(), torch.autocast(hidden.device.type, enabled=False):
        for start in range(0, hidden.shape[0], chunk):
            logits = (hidden[start:start + chunk].to(compute_dtype) @ w.t()).float()
            total += _scored_loss(logits, labels[start:start + chunk], ignore_index)[0]
    return total
