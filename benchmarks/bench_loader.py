"""Data-layer figures on a corpus: BPE training time, loader tokens/s in both modes, resume time.

Trains (or reuses from a fresh cache directory, so it really trains) the byte-level BPE, then times
TokenLoader over a fixed number of batches in pad and pack mode, with and without the prefetch
thread, and the time to restore a position deep into a shard. Reports token slots/s (rows x
seq_len) and target tokens/s (labels that are not -100).

    python benchmarks/bench_loader.py [--data ../shared/data/reviews] [--vocab 8192] [--seq-len 256]
        [--batch 32] [--batches 400]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from lowmem.data import IGNORE_INDEX, TokenLoader, load_tokenizer, open_source

REVIEWS = Path(__file__).resolve().parents[2] / "shared" / "data" / "reviews"


def time_loader(loader: TokenLoader, batches: int) -> tuple[float, float]:
    slots = targets = 0
    started = time.perf_counter()
    for _ in range(batches):
        batch = next(loader)
        slots += batch["labels"].numel()
        targets += int((batch["labels"] != IGNORE_INDEX).sum())
    seconds = time.perf_counter() - started
    loader.close()
    return slots / seconds, targets / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(REVIEWS))
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--batches", type=int, default=400)
    arguments = parser.parse_args()

    started = time.perf_counter()
    source = open_source(arguments.data)
    print(f"open_source: {time.perf_counter() - started:.2f} s  ({source.identity})")
    with tempfile.TemporaryDirectory() as cache:
        started = time.perf_counter()
        tokenizer = load_tokenizer("bpe", source, vocab_size=arguments.vocab, cache_dir=cache)
        print(f"BPE training ({tokenizer.vocab_size} tokens): {time.perf_counter() - started:.1f} s")
        started = time.perf_counter()
        load_tokenizer("bpe", source, vocab_size=arguments.vocab, cache_dir=cache)
        print(f"BPE cached load: {time.perf_counter() - started:.3f} s")

    for mode in ("pad", "pack"):
        for prefetch in (0, 4):
            loader = TokenLoader(
                source, tokenizer, arguments.seq_len, arguments.batch, mode=mode, prefetch=prefetch
            )
            slots, targets = time_loader(loader, arguments.batches)
            print(f"{mode:4s} prefetch={prefetch}: {slots:>9,.0f} token slots/s  {targets:>9,.0f} targets/s")

    reference = TokenLoader(source, tokenizer, arguments.seq_len, arguments.batch, prefetch=0)
    state = reference.state_dict()
    reference.close()
    smallest = min(len(shard.documents()) for shard in source.shards)
    state["document"] = smallest - arguments.batch  # near the end of the epoch's first shard
    restored = TokenLoader(source, tokenizer, arguments.seq_len, arguments.batch, prefetch=0)
    started = time.perf_counter()
    restored.load_state_dict(state)
    next(restored)
    print(
        f"restore {state['document']:,} documents into a shard + first batch: "
        f"{time.perf_counter() - started:.2f} s"
    )
    print(f"(cpu count {os.cpu_count()}, load average {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
