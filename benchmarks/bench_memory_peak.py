"""Measured peak memory of a few training steps, per optimizer, beside lowmem's estimate.

    # the figure for docs/results.md (needs a GPU): AdamW vs SCALE, llama-60m, 64 x 256, pure bf16
    python benchmarks/bench_memory_peak.py --device cuda --batch-size 64
    # what runs on a CPU machine: a smaller micro-batch, the peak is the process's peak RSS
    python benchmarks/bench_memory_peak.py --device cpu --batch-size 2 --steps 2

Each optimizer runs in its own process: the CPU peak RSS cannot be reset, and a fresh process keeps
one method's allocator cache out of the next one's figure. On CUDA the peak is
torch.cuda.max_memory_allocated() over model build + `--steps` steps (weights, gradients, optimizer
state, activations and backward temporaries); on CPU it is ru_maxrss, which also holds the Python
interpreter and torch's libraries, so the process's RSS right after `import torch` is reported as
the baseline and the difference beside it. The estimate printed next to the measurement is
lowmem.memory.estimate_memory for the same configuration (no backward temporaries, no allocator
overhead), so the gap between the two is what the estimate leaves out.
"""

from __future__ import annotations

import argparse
import json
import sys

from lowmem.bench.peak import baseline_bytes, default_device, report_to_parent, run_child
from lowmem.bench.timing import seconds_per_step

GB = 1e9


def worker(args: argparse.Namespace) -> dict:
    import torch
    import torch.nn.functional as F

    import lowmem.optim
    from lowmem.memory import estimate_memory, snapshot
    from lowmem.models import build_model

    device = torch.device(args.device)
    baseline = baseline_bytes(device)
    torch.manual_seed(0)
    model = build_model(args.model, vocab_size=args.vocab_size, device=device)
    if args.precision == "bf16-pure":
        model.to(torch.bfloat16)
    optimizer = lowmem.optim.build(args.optimizer, model, preset=args.model)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16-autocast")
    vocab = model.config.vocab_size

    def step() -> None:
        tokens = torch.randint(0, vocab, (args.batch_size, args.seq_len + 1), device=device)
        with autocast:
            logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, vocab).float(), tokens[:, 1:].reshape(-1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds = seconds_per_step(step, args.steps, device) * args.steps
    measured = snapshot(model, optimizer)
    est = estimate_memory(args.model, args.optimizer, vocab_size=args.vocab_size, batch_size=args.batch_size,
                          seq_len=args.seq_len, precision=args.precision)
    return {
        "optimizer": args.optimizer, "model": args.model, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "batch_size": args.batch_size, "seq_len": args.seq_len, "precision": args.precision, "steps": args.steps,
        "seconds": round(seconds, 2), "torch": torch.__version__,
        **measured, "baseline_bytes": baseline,
        "estimate_total_bytes": est.total, "estimate_optimizer_state_bytes": est.optimizer_states,
        "estimate_activation_bytes": est.activations, "estimate_paper_gb": round(est.paper_gb, 4),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-60m")
    parser.add_argument("--vocab-size", type=int, help="required for the cpu-* presets")
    parser.add_argument("--optimizers", default="adamw,scale")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--precision", default="bf16-pure", choices=("fp32", "bf16-autocast", "bf16-pure"))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default=default_device())
    parser.add_argument("--output", help="append one JSON line per optimizer to this file")
    parser.add_argument("--optimizer", help=argparse.SUPPRESS)  # set in the per-optimizer child process
    args = parser.parse_args()

    if args.optimizer:  # child: measure one optimizer, print its record as JSON
        report_to_parent(worker(args))
        return 0

    records = [run_child([__file__, "--optimizer", name, *sys.argv[1:]]) for name in args.optimizers.split(",")]
    first = records[0]
    print(f"{first['model']}, micro-batch {first['batch_size']} x {first['seq_len']}, {first['precision']}, "
          f"{first['steps']} steps on {first['device_name']} (torch {first['torch']}); GB = 1e9 bytes")
    print(f"{'optimizer':<12}{'peak':>10}{'measure':>20}{'baseline':>10}{'peak-base':>11}"
          f"{'states':>9}{'est. total':>12}{'est. states':>13}{'s':>8}")
    for r in records:
        print(f"{r['optimizer']:<12}{r['peak_bytes'] / GB:>10.3f}{r['peak_measure']:>20}"
              f"{r['baseline_bytes'] / GB:>10.3f}{(r['peak_bytes'] - r['baseline_bytes']) / GB:>11.3f}"
              f"{r['optimizer_state_bytes'] / GB:>9.3f}{r['estimate_total_bytes'] / GB:>12.3f}"
              f"{r['estimate_optimizer_state_bytes'] / GB:>13.3f}{r['seconds']:>8.1f}")
    if args.output:
        with open(args.output, "a") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
