"""The `lowmem` command: train, eval, export, tokenizer, memory, bench.

`lowmem train` with no arguments is the main job: a CPU-tier LLaMA trained for a few minutes on text
gathered from the Python installation's own documentation, with SCALE and each update inside backward
(--gradient-release), ending with a table of validation perplexity, tokens/s and memory, and the
estimated memory of the same model under AdamW, SCALE and SCALE with gradient release. Errors caused
by input (LowmemError) print their message, which names the fix, and exit with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from lowmem.errors import ConfigError, LowmemError

# flag -> dotted config key; every flag defaults to None so only flags the user gave override.
TRAIN_FLAGS: dict[str, tuple[str, type, str]] = {
    "--model": ("model.preset", str, "model preset: llama-60m ... llama-7b, or cpu-tiny/cpu-small/cpu-base"),
    "--data": ("data.source", str, "builtin | c4 | a directory, file or glob of json/jsonl(.gz)/txt/parquet"),
    "--text-field": ("data.text_field", str, "JSON/parquet field holding the text (default text)"),
    "--tokenizer": ("data.tokenizer", str, "bpe (trained here, cached) or a Hugging Face name/path, e.g. t5-base"),
    "--vocab-size": ("data.vocab_size", int, "vocabulary of the trained BPE"),
    "--seq-len": ("data.seq_len", int, "tokens per sequence"),
    "--seq-mode": ("data.seq_mode", str, "pad (one document per sequence, the papers') or pack"),
    "--optimizer": ("optim.name", str, "optimizer name (see `lowmem train --list-optimizers`)"),
    "--lr": ("optim.lr", float, "peak learning rate (default: the method's preset for the model)"),
    "--steps": ("train.steps", int, "optimizer steps"),
    "--batch-size": ("train.batch_size", int, "global batch in sequences per optimizer step"),
    "--micro-batch-size": ("train.micro_batch_size", int, "sequences per forward pass per process"),
    "--warmup-ratio": ("train.warmup_ratio", float, "fraction of steps of linear warmup"),
    "--min-lr-ratio": ("train.min_lr_ratio", float, "cosine floor as a fraction of the peak lr"),
    "--schedule": ("train.schedule", str, "lr after warmup: cosine (default) or wsd (warmup-stable-decay)"),
    "--decay-ratio": ("train.decay_ratio", float, "wsd: the fraction of steps of the final linear decay (default 0.2)"),
    "--clip-grad-norm": ("train.clip_grad_norm", float, "clip the global gradient norm (0: off)"),
    "--precision": ("train.precision", str, "fp32 | bf16-autocast | bf16-pure"),
    "--seed": ("train.seed", int, "seed for initialization and data order"),
    "--device": ("train.device", str, "auto | cpu | cuda"),
    "--distributed": ("train.distributed", str, "under torchrun: ddp | fsdp2"),
    "--eval-every": ("train.eval_every", int, "evaluate every N steps (0: only at the end)"),
    "--eval-tokens": ("train.eval_tokens", int, "non-pad validation tokens per evaluation"),
    "--log-every": ("train.log_every", int, "write metrics every N steps"),
    "--checkpoint-every": ("train.checkpoint_every", int, "checkpoint every N steps (0: at the end)"),
    "--keep-checkpoints": ("train.keep_checkpoints", int, "how many newest checkpoints to keep"),
    "--skip-nonfinite": ("train.skip_nonfinite", int, "skip up to K steps with a non-finite loss"),
    "--output-dir": ("train.output_dir", str, "run directory (default: a new runs/<model>-<optimizer>-<time>)"),
    "--init-from": ("train.init_from", str, "start from a Hugging Face LlamaForCausalLM directory's safetensors weights"),
    "--continue-from": ("train.continue_from", str, "start a new run (its own steps and schedule) from a checkpoint's "
                        "weights, optimizer state and data position: how a finished run trains longer"),
    "--log-to": ("train.log_to", lambda text: [name for name in text.split(",") if name],
                 "also log metrics to tensorboard and/or wandb (comma-separated)"),
    "--activation-checkpointing": ("train.activation_checkpointing", str,
                                   "none | block (recompute each block) | selective (recompute each MLP)"),
    "--chunked-loss": ("train.chunked_loss", str, "auto | on | off: the loss in chunks, never the full logits"),
    "--loss-chunk": ("train.loss_chunk", int, "tokens per chunk of the chunked loss (default 1024)"),
}

# `lowmem train` with no arguments (or only flags that watch a run: --no-progress, --output-dir, ...):
# the config's defaults (cpu-tiny on the built-in text, 300 steps of 16 x 128 tokens, one micro-batch
# per step) trained with SCALE at its default lr 1e-3, each update inside backward. Only here: as a
# config default, release would refuse every accumulating run.
MAIN_JOB = {"optim.name": "scale", "train.gradient_release": True}
# The command that compares the methods' perplexity (docs/results.md, "The full CPU grid").
COMPARE_COMMAND = "lowmem bench configs/grid/cpu-1m.yaml --output runs/grid-1m --workers 2"


def add_train_parser(subparsers) -> None:
    p = subparsers.add_parser("train", help="pretrain a model", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML config with sections model/data/optim/train; flags override it")
    for flag, (_, kind, text) in TRAIN_FLAGS.items():
        p.add_argument(flag, type=kind, default=None, help=text)
    p.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE",
                   help="optimizer hyperparameter, repeatable, e.g. --opt rank=128 --opt update_proj_gap=200")
    p.add_argument("--structure", metavar="NAME:KEY=VALUE,...",
                   help="weight structure of the hidden matrices, e.g. lowrank:rank=128,alpha=32 (see --list-structures)")
    p.add_argument("--intervention", action="append", default=[], metavar="NAME:KEY=VALUE,...",
                   help="periodic intervention, e.g. momentum-reset:every=200,lr_ramp_steps=10")
    p.add_argument("--legacy-perplexity", action="store_true", default=None,
                   help="also report the papers' legacy perplexity figure")
    p.add_argument("--gradient-release", action=argparse.BooleanOptionalAction, default=None,
                   help="apply each parameter's update inside backward and free its gradient (one micro-batch "
                        "per step, one process, no clipping): the same weights, gradients held one at a time")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile each transformer block (first step slower: it compiles; then faster)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--resume", nargs="?", const="", default=None, metavar="PATH",
                   help="continue a run: its directory (newest checkpoint) or a checkpoint; alone: the newest run under runs/")
    p.add_argument("--nproc", type=int, default=None, metavar="N",
                   help="run N processes on this machine under torchrun's elastic agent (for several machines "
                        "run torchrun yourself with its rendezvous flags)")
    p.add_argument("--max-restarts", type=int, default=0, metavar="K",
                   help="with --nproc: restart every process up to K times after a failure, resuming from the newest checkpoint")
    p.add_argument("--list-optimizers", action="store_true", help="list registered optimizers and exit")
    p.add_argument("--list-structures", action="store_true", help="list registered structures and exit")
    p.add_argument("--list-interventions", action="store_true", help="list registered interventions and exit")
    p.add_argument("--plugin", action="append", default=[], metavar="FILE.py|MODULE",
                   help="import a Python file or module first (one that registers its own optimizer, "
                        "structure or intervention); repeatable, and needed again on --resume")
    p.set_defaults(func=run_train)


def train_config_from_args(args: argparse.Namespace):
    from lowmem.config import HARMLESS, load_config, parse_key_values, parse_spec

    overrides: dict[str, Any] = {}
    for flag, (key, _, _) in TRAIN_FLAGS.items():
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value is not None:
            overrides[key] = value
    if args.opt:
        overrides["optim.hparams"] = parse_key_values(args.opt, "--opt")
    if args.structure:
        overrides["model.structure"] = parse_spec(args.structure, "structure")
    if args.intervention:
        overrides["optim.interventions"] = [parse_spec(s, "intervention") for s in args.intervention]
    if args.legacy_perplexity:
        overrides["train.legacy_perplexity"] = True
    if args.gradient_release is not None:
        overrides["train.gradient_release"] = args.gradient_release
    if args.compile is not None:
        overrides["train.compile"] = args.compile
    if args.no_progress:
        overrides["train.progress"] = False
    config_path = args.config
    if args.resume is not None and config_path is None:
        # A resume starts from the run's own config; flags may change only what does not alter results.
        from lowmem.train.rundir import latest_run_dir

        target = args.resume or overrides.get("train.output_dir")
        run_dir = Path(target) if target else latest_run_dir()
        for candidate in (run_dir, run_dir.parent, run_dir.parent.parent):  # run, step dir, rank file
            if (candidate / "config.yaml").exists():
                config_path = candidate / "config.yaml"
                overrides.setdefault("train.output_dir", str(candidate))
                break
    if config_path is None and args.resume is None and all(key in HARMLESS for key in overrides):
        overrides = {**MAIN_JOB, **overrides}  # the main job, watched as the flags say
    return load_config(config_path, overrides)


def is_main_job(config) -> bool:
    """Whether `config` computes what the main job does (settings that only watch a run aside)."""
    from lowmem.config import load_config, results_affecting_differences

    return not results_affecting_differences(load_config(None, MAIN_JOB).to_dict(), config.to_dict())


def main_job_story(config, summary: dict[str, Any]) -> str:
    """The main job's ending: its perplexity beside the estimated memory of the same model and batch
    under AdamW, SCALE and SCALE with gradient release, what this run measured, and the command that
    compares perplexity across methods."""
    from lowmem.memory import estimate_memory
    from lowmem.train.log import format_bytes

    t = config.train
    rows = []
    for label, name, hparams, release in (("AdamW", "adamw", {}, False),
                                          ("SCALE", config.optim.name, config.optim.hparams, False),
                                          ("SCALE, gradient release", config.optim.name, config.optim.hparams, True)):
        est = estimate_memory(config.model, name, hparams, vocab_size=summary["vocab_size"],
                              batch_size=t.micro_batch_size, seq_len=config.data.seq_len, precision=t.precision,
                              structure=config.structure, activation_checkpointing=t.activation_checkpointing,
                              chunked_loss=t.chunked_loss, loss_chunk=t.loss_chunk, gradient_release=release)
        rows.append((label, est.weights, est.gradients, est.optimizer_states, est.activation_peak, est.peak))
    memory = summary["memory"]
    lines = [f"SCALE with each update inside backward: validation perplexity {summary['val_perplexity']:.2f} "
             f"after {summary['tokens']:,} tokens.",
             f"Memory of {config.model} at {t.micro_batch_size} x {config.data.seq_len} tokens, {t.precision} "
             "(estimated, lowmem memory):",
             f"  {'':<24}{'weights':>11}{'gradients':>11}{'optimizer':>11}{'activations':>13}{'peak':>11}"]
    lines += [f"  {label:<24}" + "".join(f"{format_bytes(n):>{w}}" for n, w in zip(figures, (11, 11, 11, 13, 11)))
              for label, *figures in rows]
    if memory.get("gradient_release"):
        lines.append(f"Measured here: gradients held at once {format_bytes(memory['gradient_high_water_bytes'])} "
                     f"(estimate {format_bytes(memory['estimate_gradient_bytes'])}); every gradient at once would "
                     f"be {format_bytes(rows[1][2])}.")
    lines.append(f"Which method reaches the lowest perplexity on the same tokens: {COMPARE_COMMAND}")
    return "\n".join(lines)


def _list(registry) -> None:
    for name, entry in registry.items():
        summary = getattr(entry, "summary", None) or (entry.__doc__ or "").strip().splitlines()[0:1]
        print(f"{name:16s} {summary if isinstance(summary, str) else ''.join(summary)}")


def run_train(args: argparse.Namespace) -> int:
    from lowmem import registry

    registry.load_plugins(args.plugin)
    listing = {"list_optimizers": registry.OPTIMIZERS, "list_structures": registry.STRUCTURES,
               "list_interventions": registry.INTERVENTIONS}
    for flag, table in listing.items():
        if getattr(args, flag):
            _list(table)
            return 0
    from lowmem.distributed import launched_by_torchrun
    from lowmem.train.trainer import train

    config = train_config_from_args(args)
    if args.nproc is not None and not launched_by_torchrun():
        return _launch_torchrun(args, config)
    resume = None
    if args.resume is not None:
        resume = args.resume or config.train.output_dir
        if resume is None:
            raise ConfigError("--resume found no run directory; pass --resume RUN_DIR")
    elif int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0 and config.train.output_dir:
        # torchrun's agent restarted the processes after a failure: continue from the newest checkpoint.
        from lowmem.train.checkpoint import list_checkpoints

        resume = config.train.output_dir if list_checkpoints(Path(config.train.output_dir)) else None
    summary = train(config, resume=resume)
    if is_main_job(config) and not summary.get("stopped"):
        print(main_job_story(config, summary))
    return 0


def _launch_torchrun(args: argparse.Namespace, config) -> int:
    """`lowmem train` again as args.nproc processes under torchrun, with the run directory named here
    so that every process, and every restart, uses the same one."""
    from lowmem.distributed import torchrun_command
    from lowmem.train.rundir import default_run_dir

    argv = _without_launch_flags(args.argv)
    if config.train.output_dir is None and args.resume is None:
        argv += ["--output-dir", default_run_dir(config)]
    return subprocess.run(torchrun_command(args.nproc, args.max_restarts, ["train", *argv])).returncode


def _without_launch_flags(argv: list[str]) -> list[str]:
    """The train command's arguments without --nproc and --max-restarts (the workers' own command)."""
    kept, skip = [], False
    for item in argv[1:]:  # argv[0] is "train"
        if skip:
            skip = False
        elif item in ("--nproc", "--max-restarts"):
            skip = True
        elif not item.startswith(("--nproc=", "--max-restarts=")):
            kept.append(item)
    return kept


def add_tokenizer_parser(subparsers) -> None:
    p = subparsers.add_parser("tokenizer", help="train a byte-level BPE tokenizer")
    sub = p.add_subparsers(dest="tokenizer_command", required=True)
    t = sub.add_parser("train", help="train a byte-level BPE on a text source and save it as JSON")
    t.add_argument("--data", default="builtin", help="text source (as for `lowmem train --data`)")
    t.add_argument("--text-field", default="text")
    t.add_argument("--vocab-size", type=int, default=8192)
    t.add_argument("--output", required=True, help="path of the tokenizer JSON to write")
    t.set_defaults(func=run_tokenizer_train)


def run_tokenizer_train(args: argparse.Namespace) -> int:
    from lowmem.data import open_source, train_bpe

    source = open_source(args.data, "train", args.text_field)
    tokenizer = train_bpe(source, args.vocab_size, args.output)
    print(f"wrote {args.output}: byte-level BPE, vocabulary {tokenizer.vocab_size}, trained on {args.data}")
    return 0


def add_bench_parser(subparsers) -> None:
    p = subparsers.add_parser("bench", help="run a grid of training runs and report the table and plots",
                              description="Run every (method, lr) of a grid YAML (see configs/cpu-protocol.yaml) "
                                          "and write report.md and plots into the output directory.")
    p.add_argument("grid", nargs="?", help="grid YAML; omit with --report-only")
    p.add_argument("--output", default="runs/bench", help="directory of the grid's runs")
    p.add_argument("--workers", type=int, default=2, help="runs at a time")
    p.add_argument("--threads-per-run", type=int, default=1)
    p.add_argument("--report-only", action="store_true", help="only rebuild report.md and plots from finished runs")
    p.add_argument("--plugin", action="append", default=[], metavar="FILE.py|MODULE",
                   help="import a file or module that registers its own optimizer, structure or intervention; "
                        "every run of the grid loads it too")
    p.set_defaults(func=run_bench)


def run_bench(args: argparse.Namespace) -> int:
    from lowmem.bench.report import collect, report
    from lowmem.bench.run import GridFailed, load_grid, run_grid
    from lowmem.registry import load_plugins

    load_plugins(args.plugin)  # the grid's methods are checked against the registry while it is planned
    failed: GridFailed | None = None
    if not args.report_only:
        if not args.grid:
            raise ConfigError("lowmem bench needs a grid YAML (e.g. configs/cpu-protocol.yaml) unless --report-only")
        try:
            run_grid(load_grid(args.grid, args.output), workers=args.workers, threads_per_run=args.threads_per_run,
                     plugins=args.plugin)
        except GridFailed as err:  # report the runs that finished, then fail with the list
            failed = err
    if not failed or collect(args.output):
        print(report(args.output))
        print(f"report and plots in {args.output}")
    if failed:
        raise failed
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lowmem", description="Memory-efficient LLM pretraining.")
    subparsers = parser.add_subparsers(dest="command")
    add_train_parser(subparsers)
    add_tokenizer_parser(subparsers)
    add_bench_parser(subparsers)
    from lowmem.memory.cli import add_parser as add_memory_parser

    add_memory_parser(subparsers)
    from lowmem.hf.cli import add_export_parser
    from lowmem.train.trained import add_eval_parser

    add_eval_parser(subparsers)
    add_export_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except LowmemError as err:
        print(f"lowmem: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lowmem: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
