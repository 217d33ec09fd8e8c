"""Training throughput of lowmem's LLaMA vs transformers' LlamaForCausalLM, same config and batch.

Both models get the same weights, batch, precision and optimizer (torch AdamW); one training step is
forward + cross-entropy (lowmem: its own `model(ids, labels=...)`, as training) + backward + optimizer step. The two alternate over several rounds in one
process and the median tokens/s of each is reported with their ratio (goal: lowmem >= 1.2x).
With --compiled a third contender, lowmem with every block and the loss through torch.compile (`--compile`),
runs beside them from the same weights; its first step (the compilation) is timed apart. A fourth, "lowmem
compiled+step", adds lowmem's compiled AdamW step (`--compile --opt compiled=true`, the same AdamW math):
the whole of what lowmem compiles, against transformers with torch's AdamW.

    python benchmarks/bench_model_throughput.py --model cpu-small --batch 8 --seq-len 256 --compiled
"""

from __future__ import annotations

import argparse
import copy
import functools
import statistics
import time

import torch
import torch.nn.functional as F

from lowmem.assembly import build_model
from lowmem.bench.timing import interleaved, seconds_per_step
from lowmem.models import resolve_config
from lowmem.optim.adamw import AdamW


def hf_twin(ours):
    import transformers

    c = ours.config
    hf_config = transformers.LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_attention_heads=c.num_heads, num_key_value_heads=c.num_heads, num_hidden_layers=c.num_layers,
        max_position_embeddings=c.max_seq_len, rms_norm_eps=c.rms_norm_eps, rope_theta=c.rope_theta,
        tie_word_embeddings=False, attention_bias=False, mlp_bias=False, attn_implementation="sdpa",
    )
    hf = transformers.LlamaForCausalLM(hf_config)
    hf.model.load_state_dict({k: v for k, v in ours.state_dict().items() if not k.startswith("lm_head")}, strict=False)
    hf.lm_head.weight.data.copy_(ours.lm_head.weight.data)
    return hf


def step_fn(model, optimizer, tokens, is_hf, dtype):
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16-autocast"):
        if is_hf:
            logits = model(inputs).logits
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1))
        else:  # lowmem's own loss, as training computes it (compiled with the blocks under --compile)
            loss = model(inputs, labels=labels) / labels.numel()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="cpu-small")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16-autocast"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps-per-round", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    parser.add_argument("--compiled", action="store_true", help="also lowmem with torch.compile per block")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    ours = build_model(args.model, vocab_size=args.vocab_size)
    hf = hf_twin(ours)
    contenders = {
        "lowmem": (ours, torch.optim.AdamW(ours.parameters(), lr=1e-4), False),
        "transformers": (hf, torch.optim.AdamW(hf.parameters(), lr=1e-4), True),
    }
    tokens = torch.randint(0, args.vocab_size, (args.batch, args.seq_len + 1))
    compile_seconds = None
    if args.compiled:
        compiled = copy.deepcopy(ours)
        compiled.compile_blocks()
        contenders["lowmem compiled"] = (compiled, torch.optim.AdamW(compiled.parameters(), lr=1e-4), False)
        started = time.perf_counter()
        step_fn(compiled, contenders["lowmem compiled"][1], tokens, False, args.precision)
        compile_seconds = time.perf_counter() - started
        whole = copy.deepcopy(ours)
        whole.compile_blocks()
        # torch's AdamW defaults (weight decay 0.01), lowmem's implementation with its step compiled
        contenders["lowmem compiled+step"] = (whole, AdamW(whole.parameters(), lr=1e-4, weight_decay=0.01,
                                                           compiled=True), False)
        started = time.perf_counter()
        step_fn(whole, contenders["lowmem compiled+step"][1], tokens, False, args.precision)
        step_compile_seconds = time.perf_counter() - started
    steps = {name: functools.partial(step_fn, model, opt, tokens, is_hf, args.precision)
             for name, (model, opt, is_hf) in contenders.items()}
    # One warm-up step each (allocators, kernels); the same order every round.
    seconds = interleaved(steps, args.rounds, lambda step: seconds_per_step(step, args.steps_per_round), rotate=False)
    rates = {name: [args.batch * args.seq_len / s for s in values] for name, values in seconds.items()}
    config = resolve_config(args.model, vocab_size=args.vocab_size)
    print(f"model {args.model} ({config.hidden_size}x{config.num_layers}, vocab {args.vocab_size}), "
          f"batch {args.batch}x{args.seq_len}, {args.precision}, threads {torch.get_num_threads()}, "
          f"{args.rounds} rounds x {args.steps_per_round} steps")
    for name, values in rates.items():
        print(f"  {name:20s} median {statistics.median(values):9.0f} tokens/s  (rounds: {', '.join(f'{v:.0f}' for v in values)})")
    median = {name: statistics.median(values) for name, values in rates.items()}
    print(f"  ratio lowmem / transformers: {median['lowmem'] / median['transformers']:.2f}x")
    if compile_seconds is not None:
        print(f"  ratio lowmem compiled / transformers: {median['lowmem compiled'] / median['transformers']:.2f}x, "
              f"compiled / eager lowmem: {median['lowmem compiled'] / median['lowmem']:.2f}x, "
              f"first compiled step (compiles): {compile_seconds:.1f} s")
        print(f"  ratio lowmem compiled+step / transformers: "
              f"{median['lowmem compiled+step'] / median['transformers']:.2f}x, "
              f"first step (compiles the optimizer's graph): {step_compile_seconds:.1f} s")


if __name__ == "__main__":
    main()
