"""The GPU protocol: one prepared command for a lent GPU machine (one H200, ~9 minutes).

    # here, before the device run: copy the corpus and train the tokenizer into the git-ignored gpu-data/
    python benchmarks/gpu_protocol.py --prepare
    # on the GPU machine (carry gpu-data/ with the working tree), writes runs/gpu-protocol/
    python benchmarks/gpu_protocol.py
    # anywhere, in seconds (the test suite runs this so the script does not rot): a tiny model on CPU
    python benchmarks/gpu_protocol.py --dry

llama-60m in bf16-pure on the review corpus (a GPU machine has no network and no ../shared: the
corpus is read from `gpu-data/reviews`, filled by `--prepare` from ../shared/data/reviews, and the
BPE tokenizer from `gpu-data/cache`): AdamW, SCALE, GaLore, APOLLO-Mini and Muon, a fixed number of
steps each, each run its own `lowmem train` process (so CUDA peaks do not mix). Reported per
method: tokens/s, model FLOPs utilization (6·N + 12·L·h·s FLOPs per token, N the non-embedding
parameters plus the head, over the device's dense bf16 peak, `--peak-tflops`, 989 for an H200 SXM),
`torch.cuda.max_memory_allocated` over the run, and validation perplexity. Then the peak-memory
benchmark (benchmarks/bench_memory_peak.py) for AdamW and SCALE at 64 x 256. Results: a table on
stdout, `report.md` and `results.json` in the output directory.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "gpu-data"
METHODS = ("adamw", "scale", "galore", "apollo-mini", "muon")
# The papers' learning rates at 60M (SCALE 1e-3, GaLore/APOLLO-Mini 1e-2, Muon 2e-2; AdamW the
# CPU protocol's best, 1e-3): a throughput and memory protocol, not a tuned comparison.
LRS = {"adamw": 1e-3, "scale": 1e-3, "galore": 1e-2, "apollo-mini": 1e-2, "muon": 2e-2}


def prepare(vocab_size: int) -> None:
    """Copy the review corpus into gpu-data/ and train the BPE there, so the GPU run needs neither."""
    source = ROOT.parent / "shared" / "data" / "reviews"
    if not source.is_dir():
        sys.exit(f"--prepare needs the review corpus at {source}")
    target = DATA / "reviews"
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source, target)
    from lowmem.data import load_tokenizer, open_source

    tokenizer = load_tokenizer("bpe", open_source(str(target), "train"), vocab_size=vocab_size, cache_dir=str(DATA / "cache"))
    size = sum(p.stat().st_size for p in DATA.rglob("*") if p.is_file())
    print(f"gpu-data/ ready: corpus and a {tokenizer.vocab_size}-id BPE, {size / 2**20:.1f} MiB; "
          "carry it to the device with the working tree (run(..., carry=['gpu-data']))")


def flops_per_token(model: str, vocab_size: int, seq_len: int) -> float:
    from lowmem.models import resolve_config

    c = resolve_config(model, vocab_size=vocab_size)
    h, f, layers = c.hidden_size, c.intermediate_size, c.num_layers
    non_embedding = layers * (4 * h * h + 3 * h * f) + c.vocab_size * h  # blocks + head
    return 6 * non_embedding + 12 * layers * h * seq_len


def run_method(name: str, args: argparse.Namespace, out: Path) -> dict:
    run_dir = out / name
    if run_dir.exists():
        shutil.rmtree(run_dir)
    config = {
        "model": args.model,
        "data": {"source": str(args.data), "tokenizer": "bpe", "vocab_size": args.vocab_size, "seq_len": args.seq_len,
                 "seq_mode": "pad", "cache_dir": str(args.cache)},
        "optim": {"name": name, "lr": LRS[name]},
        "train": {"steps": args.steps, "batch_size": args.batch_size, "micro_batch_size": args.micro_batch_size,
                  "precision": args.precision, "device": args.device, "eval_every": 0, "eval_tokens": args.eval_tokens,
                  "log_every": max(1, args.steps // 10), "checkpoint_every": 0, "keep_checkpoints": 1,
                  "output_dir": str(run_dir), "progress": False},
    }
    run_dir.mkdir(parents=True)
    (run_dir / "protocol.yaml").write_text(yaml.safe_dump(config))
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "lowmem.cli", "train", "--config", str(run_dir / "protocol.yaml")],
                          capture_output=True, text=True)
    (run_dir / "train.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        return {"method": name, "error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    summary = json.loads((run_dir / "summary.json").read_text())
    tokens_per_second = summary["tokens_per_second"]
    per_token = flops_per_token(args.model, summary["vocab_size"], args.seq_len)
    return {
        "method": name, "lr": LRS[name], "steps": summary["steps"], "tokens": summary["tokens"],
        "tokens_per_second": tokens_per_second,
        "mfu": tokens_per_second * per_token / (args.peak_tflops * 1e12),
        "peak_bytes": summary["memory"]["peak_bytes"], "peak_measure": summary["memory"]["peak_measure"],
        "optimizer_state_bytes": summary["memory"]["optimizer_state_bytes"],
        "val_perplexity": summary["val_perplexity"], "wall_seconds": round(time.perf_counter() - started, 1),
    }


def table(records: list[dict], args: argparse.Namespace) -> str:
    rows = [f"{args.model}, {args.precision}, {args.steps} steps x {args.batch_size} x {args.seq_len} tokens, "
            f"device {args.device}; MFU against {args.peak_tflops:g} TFLOP/s; GB = 1e9 bytes", "",
            "| method | lr | tokens/s | MFU | peak memory (GB) | measure | optimizer state (GB) | val ppl | wall s |",
            "|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        if "error" in r:
            rows.append(f"| {r['method']} | failed: {r['error']} |||||||| ")
            continue
        rows.append(f"| {r['method']} | {r['lr']:g} | {r['tokens_per_second']:,.0f} | {r['mfu']:.3f} | "
                    f"{r['peak_bytes'] / 1e9:.3f} | {r['peak_measure']} | {r['optimizer_state_bytes'] / 1e9:.3f} | "
                    f"{r['val_perplexity']:.2f} | {r['wall_seconds']} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prepare", action="store_true", help="fill gpu-data/ from ../shared and exit")
    parser.add_argument("--dry", action="store_true", help="a tiny model on CPU for 2 steps: checks the script runs")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--model", default="llama-60m")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--micro-batch-size", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--vocab-size", type=int, default=8192, help="of the trained BPE (llama-60m keeps its 32000 rows)")
    parser.add_argument("--precision", default="bf16-pure")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--eval-tokens", type=int, default=500_000)
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the device (H200 SXM: 989)")
    parser.add_argument("--data", type=Path, default=DATA / "reviews")
    parser.add_argument("--cache", type=Path, default=DATA / "cache")
    parser.add_argument("--output", type=Path, default=ROOT / "runs" / "gpu-protocol")
    parser.add_argument("--skip-peak-benchmark", action="store_true")
    args = parser.parse_args(argv)
    if args.prepare:
        prepare(args.vocab_size)
        return 0
    if args.dry:
        args.model, args.steps, args.batch_size, args.micro_batch_size = "cpu-micro", 2, 2, 2
        args.seq_len, args.vocab_size, args.precision, args.device, args.eval_tokens = 32, 300, "fp32", "cpu", 200
    if not args.data.exists():
        sys.exit(f"no corpus at {args.data}: run `python benchmarks/gpu_protocol.py --prepare` first "
                 "(it copies ../shared/data/reviews into the git-ignored gpu-data/), or pass --data")
    args.output.mkdir(parents=True, exist_ok=True)
    records = [run_method(name, args, args.output) for name in args.methods.split(",")]
    text = table(records, args)
    if not args.skip_peak_benchmark:
        peak_args = (["--model", "cpu-micro", "--vocab-size", "300", "--batch-size", "2", "--seq-len", "32",
                      "--steps", "1", "--device", "cpu", "--precision", "fp32"] if args.dry
                     else ["--device", args.device, "--batch-size", "64", "--seq-len", "256", "--precision", args.precision])
        peak = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_memory_peak.py"), *peak_args],
                              capture_output=True, text=True)
        text += "\n\npeak-memory benchmark (benchmarks/bench_memory_peak.py " + " ".join(peak_args) + "):\n"
        text += peak.stdout if peak.returncode == 0 else f"failed: {peak.stderr.strip()[-500:]}"
    (args.output / "results.json").write_text(json.dumps(records, indent=1))
    (args.output / "report.md").write_text(text + "\n")
    print(text)
    return 0 if all("error" not in r for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
