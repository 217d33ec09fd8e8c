"""Measured peak memory and speed of each way of keeping activations, beside lowmem's estimate.

    # the six combinations (checkpointing none / block / selective x plain / chunked loss), one process each
    python benchmarks/bench_activation_memory.py --model llama-60m --optimizer scale --batch-size 16 --precision fp32
    # one combination at the papers' micro-batch
    python benchmarks/bench_activation_memory.py --batch-size 64 --precision bf16-pure --combos block:chunked --steps 1
    # the planner's micro-batch for a budget, run: the measured peak must stay under the budget
    python benchmarks/bench_activation_memory.py --model cpu-small --vocab-size 8192 --precision fp32 \\
        --budget 0.5GB --combos none:plain,block:chunked,selective:chunked

Each combination runs in a fresh process (the CPU peak RSS cannot be reset, and one run's allocator
cache would hide in the next one's figure), one after another, so their times are side by side on the
same machine load. A process builds the run as the trainer does (lowmem.assembly: model, dtype,
checkpointing and loss chunk, optimizer), takes one untimed warm-up step and `--steps` timed
train_step calls on random tokens, then reports:
  peak-base   on CPU, the process's peak RSS (ru_maxrss) minus its RSS after `import torch`, lowmem
              and a tiny step that loads the kernels' libraries; the children run with glibc's
              MALLOC_MMAP_THRESHOLD_=131072 (--malloc-mmap-threshold) so freed blocks go back to the
              system rather than stay in the heap; with CUDA, torch.cuda.max_memory_allocated()
  tensors     (with --tensor-peak, CPU) the most bytes of tensors alive at once during one more step
              (lowmem.memory.TensorMemory: every storage ops create, weights and states included) —
              the quantity the estimate predicts, without the allocator's caching and rounding
  est. peak   lowmem.memory.estimate_memory(...).peak for the same configuration
  tok/s       tokens per second of the timed steps; x plain: step time over the same loss's
              uncheckpointed step
"""

from __future__ import annotations

import argparse
import json
import sys

from lowmem.bench.peak import baseline_bytes, default_device, mmap_threshold_env, report_to_parent, run_child
from lowmem.bench.timing import seconds_per_step

GB = 1e9
ALL_COMBOS = "none:plain,none:chunked,selective:plain,selective:chunked,block:plain,block:chunked"


def worker(args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    from lowmem.assembly import autocast as lowmem_autocast
    from lowmem.assembly import build_model, build_optimizer, configure_memory, model_vocab, weight_dtype
    from lowmem.distributed import DistInfo
    from lowmem.memory import TensorMemory, estimate_memory, peak_memory
    from lowmem.memory.plan import plan
    from lowmem.train.step import train_step

    device = torch.device(args.device)
    # Load the kernels' libraries (oneDNN, attention) with a tiny step before the baseline is read,
    # so the baseline holds them and the difference holds the run.
    tiny = torch.randn(2, 4, 8, 8, requires_grad=True)
    torch.nn.functional.scaled_dot_product_attention(tiny, tiny, tiny, is_causal=True).sum().backward()
    (tiny.bfloat16() @ tiny.bfloat16().transpose(-1, -2)).float().logsumexp(-1).sum().backward()
    del tiny
    baseline = baseline_bytes(device)
    mode, loss = args.combo.split(":")
    chunked = "on" if loss == "chunked" else "off"
    micro = args.batch_size
    if args.budget:
        row = next(r for r in plan(args.model, args.optimizer, vocab_size=args.vocab_size, budget=args.budget,
                                   seq_len=args.seq_len, precision=args.precision, loss_chunk=args.loss_chunk)
                   if (r.checkpointing, r.chunked) == (mode, loss == "chunked"))
        micro = row.micro_batch
    vocab = model_vocab(args.model, args.vocab_size)
    torch.manual_seed(0)
    model = build_model(args.model, vocab_size=vocab, device=device, dtype=weight_dtype(args.precision))
    chunk = configure_memory(model, mode, chunked, args.loss_chunk, micro * args.seq_len)
    optimizer = build_optimizer(args.optimizer, model, preset=args.model)
    autocast = lowmem_autocast(args.precision, device)
    gen = torch.Generator().manual_seed(1)

    def step() -> None:
        tokens = torch.randint(0, vocab, (micro, args.seq_len + 1), generator=gen).to(device)
        train_step(model, optimizer, [{"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}], info=DistInfo(device=device),
                   autocast=autocast)
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up: allocates the optimizer state, loads kernels
    seconds = seconds_per_step(step, args.steps, device)
    measured = peak_memory()
    tensor_peak = None
    if args.tensor_peak and device.type == "cpu":
        with TensorMemory() as mem:  # weights and state were built outside: add them
            step()
        held = sum(t.numel() * t.element_size() for t in model.parameters())
        held += sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
                    if isinstance(v, torch.Tensor))
        tensor_peak = mem.peak + held
    est = estimate_memory(args.model, args.optimizer, vocab_size=args.vocab_size, batch_size=micro,
                          seq_len=args.seq_len, precision=args.precision, activation_checkpointing=mode,
                          chunked_loss=chunked, loss_chunk=args.loss_chunk)
    return {
        "combo": args.combo, "checkpointing": mode, "loss": loss, "loss_chunk": chunk, "model": args.model,
        "optimizer": args.optimizer, "device": str(device), "micro_batch": micro, "seq_len": args.seq_len,
        "precision": args.precision, "steps": args.steps, "threads": args.threads, "torch": torch.__version__,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "seconds_per_step": seconds, "tokens_per_second": micro * args.seq_len / seconds,
        **measured, "baseline_bytes": baseline, "tensor_peak_bytes": tensor_peak,
        "estimate_peak_bytes": est.peak, "estimate_activation_peak_bytes": est.activation_peak,
        "estimate_total_bytes": est.total, "budget": args.budget,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-60m")
    parser.add_argument("--vocab-size", type=int, help="required for the cpu-* presets")
    parser.add_argument("--optimizer", default="scale")
    parser.add_argument("--batch-size", type=int, default=16, help="micro-batch (ignored with --budget)")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16-autocast", "bf16-pure"))
    parser.add_argument("--combos", default=ALL_COMBOS, help=f"CHECKPOINTING:LOSS,... (default {ALL_COMBOS})")
    parser.add_argument("--loss-chunk", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up step")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--budget", help="run each combination at the planner's micro-batch for this budget")
    parser.add_argument("--tensor-peak", action="store_true", help="one more step under TensorMemory (CPU)")
    parser.add_argument("--malloc-mmap-threshold", type=int, default=131072,
                        help="MALLOC_MMAP_THRESHOLD_ for the child processes (glibc): blocks above it are "
                             "mmapped and given back when freed, so the peak RSS follows the tensors instead "
                             "of glibc's heap, which otherwise keeps freed blocks (0: glibc's default)")
    parser.add_argument("--device", default=default_device())
    parser.add_argument("--output", help="append one JSON line per combination to this file")
    parser.add_argument("--combo", help=argparse.SUPPRESS)  # set in the per-combination child process
    args = parser.parse_args()

    if args.combo:
        report_to_parent(worker(args))
        return 0

    records = []
    env = mmap_threshold_env(args.malloc_mmap_threshold)
    for combo in args.combos.split(","):
        records.append(run_child([__file__, "--combo", combo, *sys.argv[1:]], env))
        if args.output:
            with open(args.output, "a") as f:
                f.write(json.dumps(records[-1]) + "\n")
    first = records[0]
    print(f"{first['model']} + {first['optimizer']}, {first['precision']}, seq {first['seq_len']}, "
          f"{first['steps']} timed steps, {first['threads']} thread(s) on {first['device_name']} "
          f"(torch {first['torch']}); GB = 1e9 bytes" + (f"; budget {args.budget}" if args.budget else ""))
    print(f"{'combination':<20}{'micro':>6}{'peak-base':>11}{'tensors':>9}{'est. peak':>11}{'tok/s':>9}{'x plain':>9}")
    plain_time = {r["loss"]: r["seconds_per_step"] for r in records if r["checkpointing"] == "none"}
    for r in records:
        measured = r["peak_bytes"] - (r["baseline_bytes"] if r["peak_measure"] == "cpu_peak_rss" else 0)
        tensors = f"{r['tensor_peak_bytes'] / GB:.3f}" if r["tensor_peak_bytes"] else "-"
        ratio = f"{r['seconds_per_step'] / plain_time[r['loss']]:.2f}" if r["loss"] in plain_time else "-"
        print(f"{r['combo']:<20}{r['micro_batch']:>6}{measured / GB:>11.3f}{tensors:>9}"
              f"{r['estimate_peak_bytes'] / GB:>11.3f}{r['tokens_per_second']:>9.0f}{ratio:>9}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
