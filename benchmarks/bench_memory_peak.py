"""Measured peak memory of a few training steps, per optimizer and loss path, beside lowmem's estimate.

    # the figure for docs/results.md (needs a GPU): AdamW vs SCALE, llama-60m, 64 x 256, pure bf16,
    # with the full-logits loss and with the chunked loss
    python benchmarks/bench_memory_peak.py --device cuda --batch-size 64 --chunked-loss off,on
    # what runs on a CPU machine: a smaller micro-batch, the peak is the process's peak RSS
    python benchmarks/bench_memory_peak.py --device cpu --batch-size 2 --steps 2

Each (optimizer, loss) runs in its own process: the CPU peak RSS cannot be reset, and a fresh process
keeps one configuration's allocator cache out of the next one's figure. The step is the trainer's:
the model's own loss, `model(ids, labels=labels)`, chunked or over the full logits as
`--chunked-loss` decides it for this micro-batch (the trainer's rule, lowmem.assembly.configure_memory),
and lowmem.memory.estimate_memory is asked about that same loss path, so measurement and estimate
never describe two different runs; each row names the path. On CUDA the peak is
torch.cuda.max_memory_allocated() over `--steps` steps, reset once the model is built (the build's
transient copies are not training memory); on CPU it is ru_maxrss, which also holds the Python
interpreter and torch's libraries, so the process's RSS right after `import torch` is reported as
the baseline and the difference beside it. The estimate leaves out backward temporaries and allocator
overhead, so the gap between the two is what the estimate leaves out.
"""

from __future__ import annotations

import argparse
import json
import sys

from lowmem.bench.peak import baseline_bytes, default_device, report_to_parent, run_child
from lowmem.bench.timing import seconds_per_step

GB = 1e9


def loss_path(chunk: int) -> str:
    """How a row's loss was computed, in words."""
    return f"chunked ({chunk} tokens)" if chunk else "full logits"


def worker(args: argparse.Namespace) -> dict:
    import torch

    import lowmem
    from lowmem.assembly import autocast, build_model, build_optimizer, configure_memory, weight_dtype
    from lowmem.memory import estimate_memory, reset_peak_memory, snapshot

    device = torch.device(args.device)
    baseline = baseline_bytes(device)
    torch.manual_seed(0)
    model = build_model(args.model, vocab_size=args.vocab_size, device=device, dtype=weight_dtype(args.precision))
    chunk = configure_memory(model, args.activation_checkpointing, args.loss, tokens=args.batch_size * args.seq_len)
    optimizer = build_optimizer(args.optimizer, model, preset=args.model)
    reset_peak_memory()  # from here on: weights + training; on CPU a no-op (the baseline covers it)
    context = autocast(args.precision, device)
    vocab = model.config.vocab_size

    def step() -> None:
        tokens = torch.randint(0, vocab, (args.batch_size, args.seq_len + 1), device=device)
        with context:
            loss_sum = model(tokens[:, :-1], labels=tokens[:, 1:])
        (loss_sum / (args.batch_size * args.seq_len)).backward()  # random tokens: every position is scored
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds = seconds_per_step(step, args.steps, device) * args.steps
    measured = snapshot(model, optimizer)
    est = estimate_memory(args.model, args.optimizer, vocab_size=args.vocab_size, batch_size=args.batch_size,
                          seq_len=args.seq_len, precision=args.precision,
                          activation_checkpointing=args.activation_checkpointing, chunked_loss=args.loss)
    return {
        "optimizer": args.optimizer, "model": args.model, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "batch_size": args.batch_size, "seq_len": args.seq_len, "precision": args.precision, "steps": args.steps,
        "chunked_loss": args.loss, "loss_chunk": chunk, "loss": loss_path(chunk),
        "activation_checkpointing": args.activation_checkpointing,
        "seconds": round(seconds, 2), "torch": torch.__version__, "lowmem_file": lowmem.__file__,
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
    parser.add_argument("--chunked-loss", default="auto",
                        help="auto | on | off, or several comma-separated (one row each): the trainer's "
                             "--chunked-loss, used by the measured step and the estimate alike")
    parser.add_argument("--activation-checkpointing", default="none", choices=("none", "block", "selective"))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default=default_device())
    parser.add_argument("--output", help="append one JSON line per (optimizer, loss) to this file")
    parser.add_argument("--optimizer", help=argparse.SUPPRESS)  # set in the per-configuration child process
    parser.add_argument("--loss", help=argparse.SUPPRESS)  # likewise: one --chunked-loss value
    args = parser.parse_args()

    if args.optimizer:  # child: measure one configuration, print its record as JSON
        report_to_parent(worker(args))
        return 0

    records = [run_child([__file__, "--optimizer", name, "--loss", loss, *sys.argv[1:]])
               for name in args.optimizers.split(",") for loss in args.chunked_loss.split(",")]
    first = records[0]
    print(f"{first['model']}, micro-batch {first['batch_size']} x {first['seq_len']}, {first['precision']}, "
          f"activation checkpointing {first['activation_checkpointing']}, {first['steps']} steps on "
          f"{first['device_name']} (torch {first['torch']}); the estimate is for each row's loss path; GB = 1e9 bytes")
    print(f"{'optimizer':<12}{'loss':>22}{'peak':>9}{'measure':>20}{'baseline':>10}{'peak-base':>11}"
          f"{'states':>9}{'est. total':>12}{'est. states':>13}{'s':>8}")
    for r in records:
        print(f"{r['optimizer']:<12}{r['loss']:>22}{r['peak_bytes'] / GB:>9.3f}{r['peak_measure']:>20}"
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
