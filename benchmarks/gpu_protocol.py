"""The GPU protocol: one prepared command that checks lowmem's CUDA and NCCL path on a lent GPU
machine, in about 5 minutes on one H200 (docs/results.md, "The GPU protocol", has the arithmetic).

    # here, once, before the device run: fill the git-ignored gpu-data/ (corpus + tokenizer JSON)
    python benchmarks/gpu_protocol.py --prepare
    # on the GPU machine (gpu-data carried with the working tree; nothing installed): results into $OUT
    python3 benchmarks/gpu_protocol.py --report-dir "$OUT"
    # anywhere, in about a minute: every item on CPU with a tiny model (tests/test_gpu_protocol.py runs it)
    python benchmarks/gpu_protocol.py --dry --data CORPUS --tokenizer TOKENIZER.json

`--prepare` fills gpu-data/ with `reviews/`, a copy of ../shared/data/reviews (26 MB), and
`tokenizer.json`, the 8192-id byte-level BPE that `--data ../shared/data/reviews --tokenizer bpe`
trains and caches, copied out of lowmem's cache. Every run names that file as its tokenizer, so the
GPU machine (no network, no ../shared, another `tokenizers`) trains on the CPU runs' tokens and never
retrains a vocabulary.

Nothing needs installing: the script puts the repository's src/ first on its own sys.path and on
the PYTHONPATH of every process it starts, and every `lowmem train` process is started through
LAUNCH, which prints the file lowmem was imported from; each item records those files.

Each item is a function that starts its own processes under its own timeout. A failed or timed-out
item is recorded and the next one runs; results.json and report.md are rewritten after every item
(all items are listed as pending at the start), so a run cut short keeps what finished; `--items`
reruns some. The items on the GPU (`--dry`: the same on CPU with cpu-micro, 2-5 steps of micro-batches
of 1-2 x 32, torchrun with gloo; `Settings` holds both sizes):

  environment  python, torch, CUDA, NCCL, the device, where the children import lowmem from.
  methods      llama-60m, bf16-pure, AdamW / SCALE / GaLore / APOLLO-Mini / Muon, 100 steps of
               128 x 256: steady tokens/s (steps 11-100; the first 10 hold CUDA and cuBLAS set-up,
               allocator growth and GaLore's first SVDs), MFU, max_memory_allocated, validation
               perplexity. Tokens/s counts non-pad target tokens (the trainer's count); MFU counts
               every position of the 128 x 256 batch (what the GPU computes), at
               6 N + 12 L h s FLOPs per position (N: the blocks' and the head's weights), over
               `--peak-tflops` (989: the H200's dense bf16 datasheet figure; 790 was measured there).
  distributed  AdamW 20 steps plain, then under `python -m torch.distributed.run --nproc-per-node 1`
               with `--distributed ddp` and `fsdp2`: per step, |loss - plain loss| <= 1e-2 x loss
               (bf16 keeps 8 significant bits, 2^-8 = 3.9e-3: about 2.5 bf16 steps of the loss).
  peak-memory  benchmarks/bench_memory_peak.py, AdamW and SCALE at 64 x 256, bf16-pure, with the
               full-logits loss and the chunked loss: each measurement beside the estimate of the
               same loss path.
  resume       SCALE, bf16-pure, 10 steps with a checkpoint at 5, then a copy of the run resumed
               from step 5: steps 6-10's losses bitwise equal on CPU, within the tolerance above on
               CUDA (cuBLAS and atomics need not repeat bit for bit); the figures say which held.
  gradient-release  llama-7b built directly on the GPU in bf16, SCALE, micro-batch 1 x 256, block
               checkpointing, chunked loss, 5 steps with the update inside backward, then 5 without
               on the same weights (benchmarks/bench_gradient_release.py device-peak): each
               max_memory_allocated beside its estimate; pass: with release <= 16 GB (issue 25).
  large        llama-1b and llama-7b, SCALE, micro-batch 1 x 256, block activation checkpointing,
               chunked loss, 5 steps: max_memory_allocated beside `lowmem memory`'s estimate of the
               same run (estimate_memory, called by the trainer in the same process).
  compile      issue 28: the methods item's AdamW run eager, with `--compile` (each block and the loss compiled), and
               with the optimizer step compiled too (`--opt compiled=true`): steady tokens/s and MFU,
               their ratio to eager, and the first step's seconds (mostly compilation) apart.
  optimizer-steps  issue 28: benchmarks/bench_baselines_step.py on the device, llama-60m: Muon's batched
               Newton–Schulz (bf16) and GaLore's batched r-side Adam vs per matrix, AdamW's, GaLore's
               and SCALE's compiled steps vs eager (ratios
               of interleaved contenders, the compilation's seconds, how far apart the copies end).

To add an item: write a function `(Protocol) -> Result` and append an Item to ITEMS.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
sys.path.insert(0, str(SRC))  # this script's own imports of lowmem (--prepare, FLOPs) need no install

DATA = ROOT / "gpu-data"
METHODS = ("adamw", "scale", "galore", "apollo-mini", "muon")
# The papers' learning rates at 60M (SCALE 1e-3, GaLore/APOLLO-Mini 1e-2, Muon 2e-2; AdamW the
# CPU protocol's best, 1e-3): a throughput and memory protocol, not a tuned comparison.
LRS = {"adamw": 1e-3, "scale": 1e-3, "galore": 1e-2, "apollo-mini": 1e-2, "muon": 2e-2}
# What every `lowmem train` child runs: lowmem's CLI, after saying where lowmem came from (parsed by
# Protocol.run_child), so results.json shows that no installed copy stood in for this checkout.
IMPORTED_FROM = "lowmem imported from "
LAUNCH = (f"import sys, lowmem, lowmem.cli; print({IMPORTED_FROM!r} + lowmem.__file__, file=sys.stderr, flush=True); "
          "sys.exit(lowmem.cli.main(sys.argv[1:]))")
# The same for a benchmark script: `python -c SCRIPT_LAUNCH script.py args...` runs it as __main__.
SCRIPT_LAUNCH = (f"import runpy, sys, lowmem; print({IMPORTED_FROM!r} + lowmem.__file__, file=sys.stderr, flush=True); "
                 "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")
LOSS_RTOL = 1e-2  # per-step loss agreement under bf16 where bitwise equality is not expected
GB = 1e9


@dataclass(frozen=True)
class Settings:
    """Sizes of every item; GPU below, DRY for the CPU check."""

    model: str = "llama-60m"
    precision: str = "bf16-pure"
    device: str = "cuda"
    seq_len: int = 256
    eval_tokens: int = 500_000
    steps: int = 100  # methods
    warm_steps: int = 10  # excluded from steady tokens/s and MFU
    batch_size: int = 128
    distributed_steps: int = 20
    distributed_micro_batch: int = 64  # two micro-batches per step: accumulation runs under DDP/FSDP2 too
    resume_steps: int = 10  # checkpoint at half of it
    peak_batch_size: int = 64
    peak_steps: int = 3
    peak_vocab_size: int | None = None  # a paper preset brings its own
    peak_optimizers: str = "adamw,scale"
    large_models: tuple[str, ...] = ("llama-1b", "llama-7b")
    large_steps: int = 5
    large_eval_tokens: int = 2048
    release_model: str = "llama-7b"
    release_vocab_size: int | None = None  # a paper preset brings its own
    release_steps: int = 5
    release_budget: float = 16e9  # issue 25: 7B with SCALE and release within 16 GB
    step_rounds: int = 5  # optimizer-steps: interleaved rounds and steps per contender per round
    step_steps: int = 5
    step_vocab_size: int | None = None  # a paper preset brings its own
    item_timeout: float | None = None  # seconds for every item; None: each Item's own limit


GPU = Settings()
DRY = Settings(model="cpu-micro", device="cpu", seq_len=32, eval_tokens=200, steps=5, warm_steps=3, batch_size=2,
               distributed_steps=3, distributed_micro_batch=1, resume_steps=4, peak_batch_size=2,
               peak_steps=1, peak_vocab_size=300, peak_optimizers="scale", large_models=("cpu-micro",), large_steps=5,
               large_eval_tokens=200, release_model="cpu-micro", release_vocab_size=300, step_rounds=1,
               step_steps=1, step_vocab_size=300, item_timeout=300)  # a CI machine may be loaded


class ChildFailed(RuntimeError):
    """A child process exited with an error; the message holds the end of its log."""


class ItemTimeout(RuntimeError):
    """The item's time ran out; its running child was killed."""


@dataclass
class Result:
    """What an item reports: a one-line verdict, a table, and the figures behind it (results.json)."""

    ok: bool
    verdict: str
    columns: list[str]
    rows: list[list[Any]]
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class Protocol:
    """The run's settings and paths, and the one way an item starts a child process."""

    settings: Settings
    data: Path
    tokenizer: Path
    output: Path
    methods: tuple[str, ...]
    peak_tflops: float
    deadline: float = 0.0
    imported_from: set[str] = field(default_factory=set)

    @property
    def env(self) -> dict[str, str]:
        """This environment with the checkout's src/ first on PYTHONPATH (inherited by grandchildren)."""
        path = os.pathsep.join([str(SRC), *filter(None, [os.environ.get("PYTHONPATH")])])
        return {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1"}

    def run_child(self, command: list[str], log: Path) -> None:
        """Run `command` with its output in `log`, within the item's deadline; ChildFailed with the
        log's end if it fails, ItemTimeout (the child's process group killed) if time runs out."""
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise ItemTimeout("no time left for " + " ".join(command[:6]))
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("w") as out:
            # Its own process group, so a timeout also ends torchrun's workers; the same session, so
            # the device machine still ends everything if this script itself is cut off.
            proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=self.env, cwd=ROOT,
                                    preexec_fn=os.setpgrp)
            try:
                proc.wait(timeout=remaining)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                raise ItemTimeout(f"timed out after {remaining:.0f} s: {' '.join(command[:6])} ... (log {log})") from None
        text = log.read_text(errors="replace")
        self.imported_from.update(line.split(IMPORTED_FROM, 1)[1].strip() for line in text.splitlines()
                                  if IMPORTED_FROM in line)
        if proc.returncode != 0:
            raise ChildFailed(f"exit {proc.returncode}: {text.strip()[-1500:]}")

    def config(self, run_dir: Path, optimizer: str, **train: Any) -> dict[str, Any]:
        """A `lowmem train` config: this protocol's data, tokenizer, precision and device, one log line
        (with its step time and memory) per step, evaluation and a checkpoint only at the end; `train`
        overrides train.* keys, and `model`, `seq_len` and `lr` (None: the method's preset)."""
        s = self.settings
        model = train.pop("model", s.model)
        seq_len = train.pop("seq_len", s.seq_len)
        lr = train.pop("lr", LRS.get(optimizer))
        return {
            "model": model,
            "data": {"source": str(self.data), "tokenizer": str(self.tokenizer), "seq_len": seq_len, "seq_mode": "pad"},
            "optim": {"name": optimizer, "lr": lr},
            "train": {"steps": s.steps, "batch_size": s.batch_size, "micro_batch_size": s.batch_size,
                      "precision": s.precision, "device": s.device, "eval_every": 0, "eval_tokens": s.eval_tokens,
                      "log_every": 1, "checkpoint_every": 0, "keep_checkpoints": 1, "output_dir": str(run_dir),
                      "progress": False, **train},
        }

    def train(self, run_dir: Path, config: dict[str, Any] | None = None, *, torchrun: bool = False) -> Run:
        """`lowmem train` on `config` in a fresh `run_dir` (or `--resume run_dir`), optionally under
        torchrun with one process; the finished run's summary and per-step records."""
        if config is not None:
            if run_dir.exists():
                shutil.rmtree(run_dir)
            run_dir.mkdir(parents=True)
            (run_dir / "protocol.yaml").write_text(json.dumps(config, indent=1))  # JSON is YAML
            arguments = ["train", "--config", str(run_dir / "protocol.yaml")]
        else:
            arguments = ["train", "--resume", str(run_dir)]
        launcher = [sys.executable, "-c", LAUNCH]
        if torchrun:
            # `-m torch.distributed.run`: the machine need not have a torchrun script on PATH.
            launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
                        "--no-python", *launcher]
        self.run_child([*launcher, *arguments], run_dir / ("train.log" if config is not None else "resume.log"))
        return Run.read(run_dir)


@dataclass
class Run:
    """A finished run directory read back: summary.json and the per-step training records."""

    path: Path
    summary: dict[str, Any]
    steps: list[dict[str, Any]]

    @classmethod
    def read(cls, path: Path) -> Run:
        records = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines() if line.strip()]
        steps = sorted((r for r in records if "loss" in r), key=lambda r: r["step"])
        return cls(path, json.loads((path / "summary.json").read_text()), steps)

    @property
    def losses(self) -> dict[int, float]:
        return {r["step"]: r["loss"] for r in self.steps}

    def steady(self, warm_steps: int) -> dict[str, float]:
        """Steps after the first `warm_steps`: their count, seconds, and target tokens per second.
        Each record's window rate covers exactly its step (log_every 1), so a step's seconds are its
        tokens over that rate."""
        previous, seconds, tokens, counted = 0, 0.0, 0, []
        for record in self.steps:
            step_tokens, previous = record["tokens"] - previous, record["tokens"]
            # None: a step the trainer itself counts as warm-up (it leaves its first steps out too).
            if record["step"] > warm_steps and record.get("tokens_per_second"):
                seconds += step_tokens / record["tokens_per_second"]
                tokens, counted = tokens + step_tokens, counted + [record["step"]]
        return {"steps": len(counted), "first_step": counted[0] if counted else None, "seconds": seconds,
                "tokens_per_second": tokens / seconds if seconds else 0.0}


def compare_losses(reference: dict[int, float], other: dict[int, float], steps: list[int]) -> dict[str, Any]:
    """Per-step agreement of two loss curves over `steps`: bitwise or not, the largest relative gap."""
    missing = [s for s in steps if s not in reference or s not in other]
    if missing:
        return {"bitwise": False, "max_rel_diff": float("inf"), "missing_steps": missing}
    gaps = [abs(other[s] - reference[s]) / max(abs(reference[s]), 1e-12) for s in steps]
    return {"bitwise": all(other[s] == reference[s] for s in steps), "max_rel_diff": max(gaps, default=0.0)}


def flops_per_position(model: str, vocab_size: int, seq_len: int) -> float:
    """Training FLOPs per sequence position: 6 N (forward and backward through the weights N of the
    blocks and the head; the embedding is a lookup) + 12 L h s (attention scores and values)."""
    from lowmem.models import resolve_config

    c = resolve_config(model, vocab_size=vocab_size)
    h, f, layers = c.hidden_size, c.intermediate_size, c.num_layers
    weights = layers * (4 * h * h + 3 * h * f) + c.vocab_size * h
    return 6 * weights + 12 * layers * h * seq_len


def _gb(value: float | None) -> str:
    return "-" if value is None else f"{value / GB:.3f}"


def _failed_cell(err: Exception) -> str:
    """A failure in one table cell: the last line of the message (the whole is in results.json)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return "failed: " + (lines[-1][:200] if lines else type(err).__name__)


# ---------------------------------------------------------------------------------------- items


def environment(p: Protocol) -> Result:
    probe = ("import json, platform, sys, torch, tokenizers, lowmem; cuda = torch.cuda.is_available(); "
             "print(json.dumps({'python': platform.python_version(), 'torch': torch.__version__, "
             "'cuda': torch.version.cuda, 'cuda_available': cuda, "
             "'device': torch.cuda.get_device_name(0) if cuda else platform.processor() or 'cpu', "
             "'device_memory_gib': round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if cuda else None, "
             "'nccl': str(torch.cuda.nccl.version()) if cuda else None, "
             "'tokenizers': tokenizers.__version__, 'cpus': __import__('os').cpu_count()})); "
             f"print({IMPORTED_FROM!r} + lowmem.__file__, file=sys.stderr)")
    log = p.output / "environment.log"
    p.run_child([sys.executable, "-c", probe], log)
    facts = json.loads(next(line for line in log.read_text().splitlines() if line.startswith("{")))
    facts["lowmem"] = sorted(p.imported_from)
    ok = facts["cuda_available"] or p.settings.device == "cpu"
    return Result(ok, f"{facts['device']}, torch {facts['torch']}" + ("" if ok else ": no CUDA device visible"),
                  ["what", "value"], [[k, v] for k, v in facts.items()], facts)


def steady_mfu(p: Protocol, run: Run) -> tuple[dict[str, float], float, float]:
    """A run's steady figures (Run.steady), its FLOPs per position and its MFU over the steady steps."""
    s = p.settings
    steady = run.steady(s.warm_steps)
    per_position = flops_per_position(run.summary["model"], run.summary["vocab_size"], s.seq_len)
    steps_per_second = steady["steps"] / steady["seconds"] if steady["seconds"] else 0.0
    return steady, per_position, steps_per_second * s.batch_size * s.seq_len * per_position / (p.peak_tflops * 1e12)


def methods(p: Protocol) -> Result:
    s = p.settings
    rows, runs, failed = [], {}, []
    for name in p.methods:
        try:
            run = p.train(p.output / "methods" / name, p.config(p.output / "methods" / name, name))
        except ChildFailed as err:
            failed.append(name)
            rows.append([name, LRS.get(name), _failed_cell(err), *["-"] * 6])
            runs[name] = {"error": str(err)}
            continue
        summary, memory = run.summary, run.summary["memory"]
        steady, per_position, mfu = steady_mfu(p, run)
        runs[name] = {"lr": LRS.get(name), "steps": summary["steps"], "steady": steady, "mfu": mfu,
                      # The trainer's own figure and the steps it covers, beside this protocol's.
                      "trainer_tokens_per_second": summary["tokens_per_second"],
                      "trainer_tokens_per_second_steps": summary.get("tokens_per_second_steps"),
                      "flops_per_position": per_position, "peak_bytes": memory["peak_bytes"],
                      "peak_measure": memory["peak_measure"], "optimizer_state_bytes": memory["optimizer_state_bytes"],
                      "val_perplexity": summary["val_perplexity"], "wall_seconds": summary["wall_seconds"]}
        rows.append([name, LRS.get(name), f"{steady['tokens_per_second']:,.0f}", f"{summary['tokens_per_second']:,.0f}"
                     + (" (steps {}-{})".format(*summary["tokens_per_second_steps"]) if "tokens_per_second_steps" in summary else ""),
                     f"{mfu:.3f}", _gb(memory["peak_bytes"]), memory["peak_measure"],
                     _gb(memory["optimizer_state_bytes"]), f"{summary['val_perplexity']:.2f}"])
    verdict = (f"{s.model}, {s.precision}, {s.steps} steps x {s.batch_size} x {s.seq_len}; steady = steps "
               f"{s.warm_steps + 1}-{s.steps}; tokens/s counts non-pad targets, MFU every position, against "
               f"{p.peak_tflops:g} TFLOP/s" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return Result(not failed, verdict, ["method", "lr", "steady tokens/s", "trainer's tokens/s", "MFU",
                                        "max allocated (GB)", "measure", "optimizer state (GB)", "val ppl"], rows, runs)


def distributed(p: Protocol) -> Result:
    s = p.settings
    settings = {"steps": s.distributed_steps, "micro_batch_size": s.distributed_micro_batch}
    runs = {"plain": p.train(p.output / "distributed" / "plain",
                             p.config(p.output / "distributed" / "plain", "adamw", **settings))}
    for mode in ("ddp", "fsdp2"):
        run_dir = p.output / "distributed" / mode
        try:
            runs[mode] = p.train(run_dir, p.config(run_dir, "adamw", distributed=mode, **settings), torchrun=True)
        except ChildFailed as err:
            runs[mode] = err
    steps = list(range(1, s.distributed_steps + 1))
    plain, rows, data, ok = runs["plain"].losses, [], {}, True
    for name, run in runs.items():
        if isinstance(run, ChildFailed):
            ok = False
            rows.append([name, _failed_cell(run), *["-"] * 5])
            data[name] = {"error": str(run)}
            continue
        agreement = compare_losses(plain, run.losses, steps)
        ok = ok and agreement["max_rel_diff"] <= LOSS_RTOL
        # Whether the run was really wrapped, if the trainer records it (summary["distributed"]).
        wrapped = run.summary.get("distributed", "not recorded")
        data[name] = {"losses": run.losses, **agreement, "distributed": wrapped}
        rows.append([name, "plain" if name == "plain" else "torchrun, 1 process", f"{run.losses.get(1, float('nan')):.6f}",
                     f"{run.losses.get(steps[-1], float('nan')):.6f}", f"{agreement['max_rel_diff']:.2e}",
                     "yes" if agreement["bitwise"] else "no", json.dumps(wrapped)])
    verdict = (f"AdamW, {s.distributed_steps} steps, batch {s.batch_size} in micro-batches of "
               f"{s.distributed_micro_batch} (torchrun: NCCL on CUDA, gloo on CPU); pass: every step's loss within "
               f"{LOSS_RTOL:g} x the plain run's")
    return Result(ok, verdict, ["run", "launcher", "loss step 1", f"loss step {steps[-1]}", "max abs Δ / loss", "bitwise",
                                "distributed (summary.json)"], rows, data)


def peak_memory(p: Protocol) -> Result:
    s = p.settings
    records_file = p.output / "peak-memory" / "records.jsonl"
    if records_file.exists():
        records_file.unlink()
    vocab = ["--vocab-size", str(s.peak_vocab_size)] if s.peak_vocab_size else []
    command = [sys.executable, str(ROOT / "benchmarks" / "bench_memory_peak.py"), "--model", s.model, *vocab,
               "--optimizers", s.peak_optimizers, "--chunked-loss", "off,on", "--batch-size", str(s.peak_batch_size),
               "--seq-len", str(s.seq_len), "--precision", s.precision, "--device", s.device,
               "--steps", str(s.peak_steps), "--output", str(records_file)]
    p.run_child(command, p.output / "peak-memory" / "bench.log")
    records = [json.loads(line) for line in records_file.read_text().splitlines()]
    p.imported_from.update(r["lowmem_file"] for r in records)
    # Above the baseline: on CUDA the peak counter was reset after the build (baseline 0); a CPU
    # peak RSS also holds the interpreter and libraries, which the baseline is.
    rows = [[r["optimizer"], r["loss"], _gb(r["peak_bytes"] - r["baseline_bytes"]), r["peak_measure"],
             _gb(r["estimate_total_bytes"]), f"{(r['peak_bytes'] - r['baseline_bytes']) / r['estimate_total_bytes']:.2f}",
             _gb(r["optimizer_state_bytes"]), _gb(r["estimate_optimizer_state_bytes"])] for r in records]
    verdict = (f"{s.model}, micro-batch {s.peak_batch_size} x {s.seq_len}, {s.precision}, {s.peak_steps} step(s); "
               "each row's estimate is for its own loss path")
    return Result(True, verdict, ["optimizer", "loss", "peak - baseline (GB)", "measure", "estimate (GB)",
                                  "measured / estimate", "states (GB)", "est. states (GB)"], rows, {"records": records})


def resume(p: Protocol) -> Result:
    s = p.settings
    total, middle = s.resume_steps, s.resume_steps // 2
    whole_dir, resumed_dir = p.output / "resume" / "whole", p.output / "resume" / "resumed"
    whole = p.train(whole_dir, p.config(whole_dir, "scale", steps=total, checkpoint_every=middle, keep_checkpoints=2))
    # The resumed run: a copy of the whole run as it stood after step `middle` (the later checkpoint
    # and the summary removed; the trainer itself cuts metrics.jsonl back to the resumed step).
    if resumed_dir.exists():
        shutil.rmtree(resumed_dir)
    shutil.copytree(whole_dir, resumed_dir, ignore=shutil.ignore_patterns("*.log", ".lock"))
    for step_dir in (resumed_dir / "checkpoints").glob("step-*"):
        if int(step_dir.name.split("-")[1]) > middle:
            shutil.rmtree(step_dir)
    (resumed_dir / "summary.json").unlink()
    resumed = p.train(resumed_dir)  # --resume: its newest checkpoint, step `middle`
    steps = list(range(middle + 1, total + 1))
    agreement = compare_losses(whole.losses, resumed.losses, steps)
    on_cuda = s.device == "cuda"
    ok = agreement["max_rel_diff"] <= LOSS_RTOL if on_cuda else agreement["bitwise"]
    rows = [[step, f"{whole.losses.get(step, float('nan')):.7f}", f"{resumed.losses.get(step, float('nan')):.7f}",
             f"{abs(resumed.losses.get(step, float('nan')) - whole.losses.get(step, float('nan'))):.2e}"] for step in steps]
    rule = f"within {LOSS_RTOL:g} x loss (CUDA)" if on_cuda else "bitwise (CPU)"
    verdict = (f"SCALE, {s.precision}, {total} steps with a checkpoint at {middle}, resumed from it; pass: {rule}; "
               f"bitwise: {'yes' if agreement['bitwise'] else 'no'}, max abs Δ / loss {agreement['max_rel_diff']:.2e}")
    return Result(ok, verdict, ["step", "uninterrupted loss", "resumed loss", "abs Δ"], rows,
                  {"whole": whole.losses, "resumed": resumed.losses, **agreement})


def gradient_release(p: Protocol) -> Result:
    s = p.settings
    output = p.output / "gradient-release" / "peak.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.unlink(missing_ok=True)
    vocab = ["--vocab-size", str(s.release_vocab_size)] if s.release_vocab_size else []
    command = [sys.executable, str(ROOT / "benchmarks" / "bench_gradient_release.py"), "device-peak",
               "--model", s.release_model, *vocab, "--optimizer", "scale", "--release", "on,off",
               "--device", s.device, "--precision", s.precision, "--batch-size", "1", "--seq-len", str(s.seq_len),
               "--activation-checkpointing", "block", "--chunked-loss", "on", "--steps", str(s.release_steps),
               "--output", str(output)]
    p.run_child(command, p.output / "gradient-release" / "bench.log")
    result = json.loads(output.read_text())
    p.imported_from.add(result["lowmem_file"])
    records = {("on" if r["release"] else "off"): r for r in result["records"]}
    rows = [[release, _gb(r["peak_bytes"]), r["peak_measure"], _gb(r["estimate_peak_bytes"]),
             f"{r['estimate_peak_bytes'] / r['peak_bytes']:.2f}", r["estimate_peak_phase"],
             _gb(r["gradient_high_water_bytes"])] for release, r in records.items()]
    released = records["on"]["peak_bytes"]
    saving = records["off"]["peak_bytes"] - released
    freed = records["off"]["estimate_peak_bytes"] - records["on"]["estimate_peak_bytes"]
    ok = released <= s.release_budget
    verdict = (f"{s.release_model}, SCALE, {s.precision}, micro-batch 1 x {s.seq_len}, block checkpointing, chunked "
               f"loss, {s.release_steps} steps each; pass: with release <= {s.release_budget / GB:g} GB: "
               f"{released / GB:.3f} GB; saving {saving / GB:.3f} GB of {freed / GB:.3f} GB the estimate frees")
    return Result(ok, verdict, ["release", "peak (GB)", "measure", "estimate (GB)", "estimate / peak",
                                "estimate's peak at", "gradient high-water (GB)"], rows,
                  {**result, "saving_bytes": saving, "estimate_freed_bytes": freed})


def large(p: Protocol) -> Result:
    s = p.settings
    rows, data, failed = [], {}, []
    for model in s.large_models:
        run_dir = p.output / "large" / model
        config = p.config(run_dir, "scale", model=model, lr=None, steps=s.large_steps,
                          batch_size=1, micro_batch_size=1, eval_tokens=s.large_eval_tokens,
                          activation_checkpointing="block", chunked_loss="on")
        try:
            run = p.train(run_dir, config)
        except ChildFailed as err:
            failed.append(model)
            rows.append([model, _failed_cell(err), *["-"] * 6])
            data[model] = {"error": str(err)}
            continue
        finally:
            shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # 7B's is 14 GB of a 64 GiB disk
        memory = run.summary["memory"]
        steady = run.steady(2)  # steps 3-5 at most: the first steps pay CUDA's set-up
        data[model] = {"parameters": run.summary["parameters"], **memory, "steady": steady}
        rows.append([model, f"{run.summary['parameters'] / 1e9:.2f} B", _gb(memory["peak_bytes"]), memory["peak_measure"],
                     _gb(memory["estimate_total_bytes"]), f"{memory['peak_bytes'] / memory['estimate_total_bytes']:.2f}",
                     f"{memory['estimate_paper_gb']:.2f}",
                     f"{steady['seconds'] / max(steady['steps'], 1):.3f} (from step {steady['first_step']})"])
    verdict = (f"SCALE, {s.precision}, micro-batch 1 x {s.seq_len}, block checkpointing, chunked loss, "
               f"{s.large_steps} steps; peak = the run's max_memory_allocated (summary.json)"
               + (f"; failed: {', '.join(failed)}" if failed else ""))
    return Result(not failed, verdict, ["model", "parameters", "peak (GB)", "measure", "estimate (GB)",
                                        "peak / estimate", "paper GB", "s / step"], rows, data)


# The compile item's variants of the methods item's AdamW run: (name, train.* keys, optimizer hparams).
COMPILE_VARIANTS = (("eager", {}, {}), ("compiled blocks", {"compile": True}, {}),
                    ("compiled blocks + step", {"compile": True}, {"compiled": True}))


def compile_runs(p: Protocol) -> Result:
    """AdamW as in the methods item, eager, with `--compile` (each block and the loss compiled) and with the optimizer
    step compiled too (`--opt compiled=true`), one after another: steady tokens/s and MFU beside the
    eager run's, and the first step's seconds (mostly compilation) apart."""
    s = p.settings
    rows, data, failed, eager = [], {}, [], None
    for name, train, hparams in COMPILE_VARIANTS:
        run_dir = p.output / "compile" / name.replace(" ", "-").replace("+", "and")
        config = p.config(run_dir, "adamw", **train)
        config["optim"]["hparams"] = hparams
        try:
            run = p.train(run_dir, config)
        except ChildFailed as err:
            failed.append(name)
            rows.append([name, _failed_cell(err), *["-"] * 5])
            data[name] = {"error": str(err)}
            continue
        steady, _, mfu = steady_mfu(p, run)
        eager = steady["tokens_per_second"] if name == "eager" else eager
        ratio = steady["tokens_per_second"] / eager if eager else None
        data[name] = {"steady": steady, "mfu": mfu, "ratio_to_eager": ratio,
                      "first_step_seconds": run.summary.get("first_step_seconds"),
                      "peak_bytes": run.summary["memory"]["peak_bytes"], "val_perplexity": run.summary["val_perplexity"]}
        rows.append([name, f"{run.summary.get('first_step_seconds', 0.0):.1f}", f"{steady['tokens_per_second']:,.0f}",
                     f"{mfu:.3f}", "-" if ratio is None else f"{ratio:.3f}", _gb(run.summary["memory"]["peak_bytes"]),
                     f"{run.summary['val_perplexity']:.2f}"])
    verdict = (f"AdamW, {s.model}, {s.precision}, {s.steps} steps x {s.batch_size} x {s.seq_len}; steady = steps "
               f"{s.warm_steps + 1}-{s.steps} (the first step, with the compilation, apart)"
               + (f"; failed: {', '.join(failed)}" if failed else ""))
    return Result(not failed, verdict, ["variant", "first step (s)", "steady tokens/s", "MFU", "tokens/s / eager",
                                        "max allocated (GB)", "val ppl"], rows, data)


STEP_PAIRS = ("muon-batched", "galore-batched", "adamw-compiled", "galore-compiled", "scale-compiled")


def optimizer_steps(p: Protocol) -> Result:
    """benchmarks/bench_baselines_step.py on the device: Muon's batched Newton–Schulz (bf16 on CUDA, the
    default there) and GaLore's batched r-side Adam against one matrix at a time, and AdamW's, GaLore's and
    SCALE's compiled steps against eager;
    each pair's contenders interleaved, the median ratio, and how far apart the two end."""
    s = p.settings
    log = p.output / "optimizer-steps.log"
    ns_dtype = "bfloat16" if s.device == "cuda" else "float32"
    p.run_child([sys.executable, "-c", SCRIPT_LAUNCH, str(ROOT / "benchmarks" / "bench_baselines_step.py"), "--device", s.device,
                 "--model", s.model, "--pairs", *STEP_PAIRS, "--rounds", str(s.step_rounds), "--steps",
                 str(s.step_steps), "--check-steps", "3", "--ns-dtype", ns_dtype,
                 *(["--vocab-size", str(s.step_vocab_size)] if s.step_vocab_size else [])], log)
    lines = [line.strip() for line in log.read_text().splitlines()
             if line.startswith(tuple(f"{pair} " for pair in STEP_PAIRS)) or line.startswith(tuple(f"{pair}:" for pair in STEP_PAIRS))]
    timed = [line for line in lines if "ms/step" in line]
    ok = len(timed) == len(STEP_PAIRS)
    return Result(ok, f"{s.model}, fp32 weights, {s.device}, {s.step_rounds} rounds x {s.step_steps} steps per contender"
                  + ("" if ok else f"; {len(timed)} of {len(STEP_PAIRS)} pairs timed (see {log})"),
                  ["benchmarks/bench_baselines_step.py"], [[line] for line in lines], {"lines": lines})


@dataclass(frozen=True)
class Item:
    name: str
    title: str
    run: Callable[[Protocol], Result]
    # Seconds on the GPU: about twice the item's expected time (docs/results.md), so one stuck item
    # cannot take the time of the items after it.
    timeout: float


ITEMS = (
    Item("environment", "the machine, and where lowmem is imported from", environment, 60),
    Item("methods", "each method: steady tokens/s, MFU, peak, perplexity", methods, 150),
    Item("distributed", "torchrun with one process, DDP and FSDP2, against the plain run", distributed, 100),
    Item("peak-memory", "measured peak beside the estimate of the same loss path", peak_memory, 75),
    Item("resume", "a bf16-pure run stopped and resumed", resume, 75),
    Item("gradient-release", "7B with SCALE inside backward: peak within 16 GB", gradient_release, 120),
    Item("large", "1B and 7B with SCALE: peak beside the estimate", large, 240),
    # Last: the least needed, so a command cut off at the device's per-call limit loses only it.
    Item("compile", "AdamW eager, blocks compiled, blocks and step compiled: tokens/s, MFU", compile_runs, 240),
    Item("optimizer-steps", "Muon and GaLore batched vs per matrix; AdamW, GaLore and SCALE compiled vs eager",
         optimizer_steps, 240),
)


# ---------------------------------------------------------------------------------------- report


def render(records: list[dict[str, Any]], header: str) -> str:
    lines = [f"# GPU protocol ({header})", ""]
    for r in records:
        lines += [f"## {r['name']}: {r['title']} — {r['status']}" + (f" ({r['seconds']:.0f} s)" if "seconds" in r else ""), ""]
        if r.get("verdict"):
            lines += [r["verdict"], ""]
        if r.get("error"):
            lines += ["```", r["error"][-1500:], "```", ""]
        if r.get("columns"):
            lines += ["| " + " | ".join(r["columns"]) + " |", "|" + "---|" * len(r["columns"])]
            lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in r["rows"]]
            lines.append("")
    return "\n".join(lines)


def write(report_dir: Path, meta: dict[str, Any], records: list[dict[str, Any]]) -> None:
    """Rewrite results.json and report.md, each through a temporary file, so either is always whole."""
    report_dir.mkdir(parents=True, exist_ok=True)
    header = f"{meta['mode']}, started {meta['started']}"
    for name, text in (("results.json", json.dumps({**meta, "items": records}, indent=1, default=str)),
                       ("report.md", render(records, header) + "\n")):
        tmp = report_dir / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(report_dir / name)


def run_items(p: Protocol, items: list[Item], report_dir: Path, meta: dict[str, Any]) -> bool:
    records = [{"name": item.name, "title": item.title, "status": "pending"} for item in items]
    write(report_dir, meta, records)
    for item, record in zip(items, records):
        started = time.monotonic()
        p.deadline, p.imported_from = started + (p.settings.item_timeout or item.timeout), set()
        print(f"[{time.strftime('%H:%M:%S')}] {item.name}: {item.title} ...", flush=True)
        try:
            result = item.run(p)
            record.update(status="ok" if result.ok else "failed", verdict=result.verdict, columns=result.columns,
                          rows=result.rows, data=result.data)
        except ItemTimeout as err:
            record.update(status="timeout", error=str(err))
        except Exception as err:  # noqa: BLE001 - recorded; the next item runs
            record.update(status="failed", error=f"{type(err).__name__}: {err}")
        record.update(seconds=round(time.monotonic() - started, 1), lowmem_imported_from=sorted(p.imported_from))
        write(report_dir, meta, records)
        print(f"[{time.strftime('%H:%M:%S')}] {item.name}: {record['status']} in {record['seconds']} s"
              + (f" ({record.get('verdict') or record.get('error', '')[-300:]})"), flush=True)
    print(render(records, f"{meta['mode']}, started {meta['started']}"), flush=True)
    return all(r["status"] == "ok" for r in records)


def prepare(vocab_size: int) -> None:
    """Copy the review corpus into gpu-data/ and put its BPE there as tokenizer.json."""
    source = ROOT.parent / "shared" / "data" / "reviews"
    if not source.is_dir():
        sys.exit(f"--prepare needs the review corpus at {source}")
    target = DATA / "reviews"
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    for path in source.iterdir():  # file by file: ../shared is read-only, and its modes would be copied
        if path.is_file():
            shutil.copyfile(path, target / path.name)
    from lowmem.data import load_tokenizer, open_source
    from lowmem.data.tokenizer import bpe_cache_path

    train = open_source(str(target), "train")
    # The BPE the CPU runs train on this corpus (the cache key ignores where the corpus lies): reused
    # from lowmem's cache, or trained once here.
    tokenizer = load_tokenizer("bpe", train, vocab_size=vocab_size)
    shutil.copyfile(bpe_cache_path(train, vocab_size), DATA / "tokenizer.json")
    size = sum(p.stat().st_size for p in DATA.rglob("*") if p.is_file())
    print(f"gpu-data/ ready: reviews/ and tokenizer.json ({tokenizer.vocab_size} ids), {size / 2**20:.1f} MiB; "
          "carry it to the device with the working tree: run(..., carry=['gpu-data'])")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prepare", action="store_true", help="fill gpu-data/ from ../shared and exit")
    parser.add_argument("--dry", action="store_true", help="every item on CPU with a tiny model: checks the script runs")
    parser.add_argument("--items", default=",".join(item.name for item in ITEMS),
                        help="comma-separated items to run (e.g. to rerun the failed ones)")
    parser.add_argument("--methods", default=",".join(METHODS), help="the methods item's optimizers")
    parser.add_argument("--vocab-size", type=int, default=8192, help="of the BPE --prepare writes")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the device (H200 SXM: 989)")
    parser.add_argument("--data", type=Path, default=DATA / "reviews")
    parser.add_argument("--tokenizer", type=Path, default=DATA / "tokenizer.json")
    parser.add_argument("--output", type=Path, default=ROOT / "runs" / "gpu-protocol", help="the runs' directories")
    parser.add_argument("--report-dir", type=Path, help="where results.json and report.md go (default: --output)")
    args = parser.parse_args(argv)
    if args.prepare:
        prepare(args.vocab_size)
        return 0
    if not args.data.exists() or not args.tokenizer.is_file():
        sys.exit(f"no corpus at {args.data} or no tokenizer at {args.tokenizer}: run `python benchmarks/gpu_protocol.py "
                 "--prepare` first (it copies ../shared/data/reviews into the git-ignored gpu-data/ and writes "
                 "gpu-data/tokenizer.json), or pass --data and --tokenizer")
    names = args.items.split(",")
    unknown = [n for n in names if n not in {item.name for item in ITEMS}]
    if unknown:
        sys.exit(f"unknown item(s) {unknown}; choose from {', '.join(item.name for item in ITEMS)}")
    settings = DRY if args.dry else GPU
    protocol = Protocol(settings, args.data.resolve(), args.tokenizer.resolve(), args.output.resolve(),
                        tuple(args.methods.split(",")), args.peak_tflops)
    meta = {"mode": "dry (CPU)" if args.dry else "GPU", "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "host": platform.node(), "checkout": str(ROOT), "settings": asdict(settings), "methods": protocol.methods,
            "peak_tflops": args.peak_tflops, "loss_rtol": LOSS_RTOL}
    ok = run_items(protocol, [item for item in ITEMS if item.name in names], args.report_dir or args.output, meta)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
