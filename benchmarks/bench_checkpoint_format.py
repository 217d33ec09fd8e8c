"""Checkpoint size and save time: the format before DCP (one torch.save file per rank) vs DCP.

    python benchmarks/bench_checkpoint_format.py --model cpu-small --nproc 2 --repeats 3
    python benchmarks/bench_checkpoint_format.py --model llama-60m --nproc 2 --repeats 3

`--nproc` gloo processes build the model with FSDP2 (lowmem.distributed.wrap_model), take one AdamW
step on random tokens so that the optimizer holds its moments, and save the trainer's model and
optimizer components `--repeats` times in each format, into a fresh directory each time:
  old   each rank torch.save's its local shards (checkpoint._local of the payload), the write the
        trainer made before DCP, then a barrier
  dcp   lowmem.train.checkpoint.save: values files, DCP's collective write, the rename
The time is rank 0's wall time from the first barrier to the end of the save (median of the
repeats); the size is the bytes of every file written. Figures depend on the disk and the machine's
load: compare the two formats within one invocation.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _worker(rank: int, nproc: int, model_name: str, repeats: int, init_file: str, out: str) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=nproc)
    from functools import partial

    from lowmem import optim
    from lowmem.distributed import DistInfo, any_rank, barrier, wrap_model
    from lowmem.models import build_model
    from lowmem.train import checkpoint

    info = DistInfo(rank, nproc, rank, torch.device("cpu"), launched=True)
    torch.manual_seed(0)
    model = wrap_model(build_model(model_name, vocab_size=32000 if model_name.startswith("llama") else 320), info, "fsdp2")
    optimizer = optim.build("adamw", model)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (1, 32))
    model(ids, labels=ids).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    components = {"model": checkpoint.ModelComponent(model), "optimizer": checkpoint.OptimizerComponent(optimizer)}
    root = Path(out)
    times: dict[str, list[float]] = {"old": [], "dcp": []}
    sizes: dict[str, int] = {}
    for repeat in range(repeats):
        for fmt in ("old", "dcp"):
            directory = root / f"{fmt}-{repeat}"
            if rank == 0:
                directory.mkdir(parents=True)
            barrier(info)
            started = time.perf_counter()
            payload = checkpoint.components_state(components)
            if fmt == "old":
                torch.save({"format": checkpoint.LEGACY_FORMAT, "rank": rank, "world_size": nproc,
                            **checkpoint._local(payload)}, directory / f"rank-{rank}.pt")
                barrier(info)
            else:
                checkpoint.save(directory, 1, payload, rank, nproc, keep=1, any_failed=partial(any_rank, info=info))
            times[fmt].append(time.perf_counter() - started)
            barrier(info)
            if rank == 0:
                sizes[fmt] = _bytes(directory)
    if rank == 0:
        print(json.dumps({"model": model_name, "nproc": nproc, "repeats": repeats,
                          **{f"{fmt}_seconds_median": statistics.median(t) for fmt, t in times.items()},
                          **{f"{fmt}_seconds_all": [round(x, 3) for x in t] for fmt, t in times.items()},
                          **{f"{fmt}_bytes": size for fmt, size in sizes.items()}}))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="cpu-small")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    args = parser.parse_args()
    out = args.dir or tempfile.mkdtemp(prefix="lowmem-ckpt-bench-")
    init_file = tempfile.mktemp(prefix="lowmem-ckpt-bench-init-")
    try:
        mp.spawn(_worker, args=(args.nproc, args.model, args.repeats, init_file, out), nprocs=args.nproc)
    finally:
        if args.dir is None:  # 2 x repeats checkpoints: gigabytes at llama-60m
            shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
