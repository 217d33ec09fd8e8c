"""`lowmem memory`: how much memory a model + optimizer needs, before training it.

    lowmem memory --model llama-7b --optimizer scale
    lowmem memory --model llama-1b --compare adamw,galore,apollo-mini,scale --hparam galore.rank=256
    lowmem memory --model cpu-small --vocab-size 8192 --optimizer galore --hparam rank=32 --precision fp32
    lowmem memory --model llama-60m --optimizer scale --batch-size 64 --activation-checkpointing block --chunked-loss on
    lowmem memory --model llama-1b --optimizer scale --budget 24GB --seq-len 256 --global-batch 512

Everything is counted on the meta device (see lowmem.memory.estimate), so even 7B answers in seconds.
"""

from __future__ import annotations

import argparse
from typing import Any

import lowmem.optim
from lowmem.config import PRECISIONS, parse_spec, parse_value
from lowmem.errors import ConfigError, check_choice
from lowmem.memory.estimate import GB, MemoryEstimate, compare, estimate_memory, hparams_for
from lowmem.memory.plan import format_plan, parse_bytes, plan
from lowmem.models.chunked_loss import CHUNKED_LOSS_MODES, DEFAULT_CHUNK
from lowmem.models.llama import CHECKPOINTING_MODES, PRESETS

BASELINE = "adamw"


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "memory",
        help="predict the memory of a model + optimizer (weights, gradients, states, activations)",
        description=(
            "Predict training memory. Optimizer states are counted from the real optimizer stepped on "
            "the meta device. Prints the papers' convention (2 bytes x (weights + optimizer-state "
            "elements), GB = 1e9 bytes) and the full figure in the chosen precision (weights + "
            "gradients + optimizer states + activations of one micro-batch)."
        ),
    )
    parser.add_argument("--model", required=True, help=f"model preset: {', '.join(PRESETS)}")
    parser.add_argument("--optimizer", help="optimizer name (see --compare for several)")
    parser.add_argument("--compare", metavar="A,B,C",
                        help=f"comma-separated optimizers printed side by side with the ratio to {BASELINE}")
    parser.add_argument("--rank", type=int, help="projection rank (shorthand for --opt rank=R; "
                        "default: the method's published rank for the preset)")
    parser.add_argument("--lr", type=float,
                        help="learning rate (no effect on memory; accepted for symmetry with train)")
    # --opt as in `lowmem train` (argparse would otherwise read it as an abbreviation of --optimizer);
    # --hparam is its older name.
    parser.add_argument("--opt", "--hparam", dest="hparam", action="append", default=[], metavar="KEY=VALUE",
                        help="optimizer hyperparameter override, repeatable; VALUE is read as by train's --opt "
                             "(a number such as 1e-8, true/false, a list [0.9, 0.95], else a word). "
                             "OPTIMIZER.KEY=VALUE applies to that optimizer only; with --compare an "
                             "unscoped KEY goes to the optimizers that accept it, except where a registered "
                             "variant fixes it (apollo-mini keeps rank 1)")
    parser.add_argument("--batch-size", type=int, default=1, help="micro-batch size for activations (default 1)")
    parser.add_argument("--seq-len", type=int, default=256, help="sequence length (default 256)")
    parser.add_argument("--precision", choices=PRECISIONS, default="bf16-pure",
                        help="bf16-pure (the papers' setting, default), bf16-autocast or fp32")
    parser.add_argument("--activation-checkpointing", nargs="?", const="block", default="none",
                        choices=CHECKPOINTING_MODES,
                        help="none (default); block (alone: keep only block inputs, recompute each block) or "
                             "selective (recompute each MLP sublayer)")
    parser.add_argument("--chunked-loss", choices=CHUNKED_LOSS_MODES, default="auto",
                        help="the loss in chunks, never the full logits: auto (as training: on when one "
                             "micro-batch's fp32 logits reach 256 MiB), on, off")
    parser.add_argument("--loss-chunk", type=int, default=DEFAULT_CHUNK,
                        help=f"tokens per chunk of the chunked loss (default {DEFAULT_CHUNK})")
    parser.add_argument("--budget", metavar="SIZE",
                        help="memory budget, e.g. 24GB (1e9 bytes) or 80GiB: print the largest micro-batch "
                             "that fits for each checkpointing mode, with the plain and the chunked loss")
    parser.add_argument("--global-batch", type=int, metavar="N",
                        help="with --budget: the micro-batch dividing N and the gradient accumulation reaching it")
    parser.add_argument("--processes", type=int, default=1,
                        help="with --global-batch: data-parallel processes sharing it (default 1)")
    parser.add_argument("--gradient-release", action="store_true",
                        help="count the gradients as lowmem train --gradient-release holds them: each is freed by "
                             "its own update in backward, so at most the largest one is alive")
    parser.add_argument("--vocab-size", type=int, help="vocabulary size (required for the cpu-* presets)")
    parser.add_argument("--structure", metavar="NAME:KEY=VALUE,...",
                        help="weight structure of the hidden matrices, as in train, e.g. lowrank:rank=128,alpha=32, "
                             "lora, sltrain:density=0.03, sparse:density=0.5,block=16,storage=compact (rank and alpha "
                             "default to the papers' for llama-60m..1b)")
    parser.set_defaults(func=run_memory)
    return parser


def parse_hparams(args: argparse.Namespace) -> dict[str, Any]:
    hparams: dict[str, Any] = {}
    for item in args.hparam:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--opt {item!r} is not KEY=VALUE; write e.g. --opt rank=128")
        hparams[key.strip()] = parse_value(text)  # the parser of --opt and config values
    if args.rank is not None:
        hparams["rank"] = args.rank
    if args.lr is not None:
        hparams["lr"] = args.lr
    return hparams


def _gb(nbytes: float) -> str:
    return f"{nbytes / GB:.2f} GB"


def _settings(est: MemoryEstimate) -> str:
    settings = lowmem.optim.method(est.optimizer).settings(est.model, est.hparams)
    return ", ".join(f"{k}={v}" for k, v in settings.items()) or "class defaults"


def _memory_settings(est: MemoryEstimate) -> str:
    parts = []
    if est.activation_checkpointing != "none":
        parts.append(f"activation checkpointing {est.activation_checkpointing}")
    if est.loss_chunk:
        parts.append(f"chunked loss ({est.loss_chunk} tokens per chunk)")
    return "".join(f", {part}" for part in parts)


def format_breakdown(est: MemoryEstimate) -> str:
    roles = ", ".join(f"{role} {n:,}" for role, n in est.state_elements_by_role.items()) or "none"
    structure = ""
    if est.structure:
        structure = ", structure " + est.structure["name"] + "".join(
            f" {k}={v}" for k, v in est.structure.items() if k != "name")
    rows = [
        f"model {est.model}{structure}, optimizer {est.optimizer} ({_settings(est)})",
        f"precision {est.precision}, micro-batch {est.batch_size} x {est.seq_len}{_memory_settings(est)}; GB = 1e9 bytes",
        "",
        f"{'':<22}{'elements':>16}{'bytes':>14}",
        f"{'weights':<22}{est.weight_elements:>16,}{_gb(est.weights):>14}",
        f"{'gradients':<22}{est.trainable_elements:>16,}{_gb(est.gradients):>14}"
        + ("  (released in backward: the largest one)" if est.gradient_release else ""),
        f"{'optimizer states':<22}{est.optimizer_state_elements:>16,}{_gb(est.optimizer_states):>14}",
        f"{'activations':<22}{'':>16}{_gb(est.activations):>14}",
        *([f"{'structure indices':<22}{'':>16}{_gb(est.index_bytes):>14}"] if est.index_bytes else []),
        f"{'total':<22}{'':>16}{_gb(est.total):>14}",
        f"{'peak':<22}{'':>16}{_gb(est.peak):>14}",
        "",
        "activations: what the forward leaves for backward, plus the plain loss's logits (their high-water mark "
        f"over forward and backward: {_gb(est.activation_peak)}); peak: weights + states + the step's worst moment, "
        f"here {est.peak_phase} (activations, gradients and the update's temporaries alive together)",
        f"papers' convention, 2 B x (weights + optimizer states): {est.paper_gb:.2f} GB",
        f"optimizer-state elements by role: {roles}; plus {est.bookkeeping_elements} scalar "
        "bookkeeping elements (step counters etc., not in the papers' figure)",
        f"optimizer state counted from: {est.state_source}",
    ]
    if est.index_bytes:
        rows.append(f"structure index bytes (SLTrain's sparse support): {est.index_bytes:,} "
                    f"({_gb(est.index_bytes)}), in the total, not in the papers' figure")
    if est.trainable_elements != est.weight_elements:
        rows.append(f"trainable weights: {est.trainable_elements:,} of {est.weight_elements:,} (the rest frozen)")
    rows += [f"note: {note}" for note in est.notes]
    return "\n".join(rows)


def format_comparison(estimates: list[MemoryEstimate], baseline: MemoryEstimate) -> str:
    first = estimates[0]
    ratio = f"/{baseline.optimizer}"
    rows = [
        f"model {first.model}, precision {first.precision}, micro-batch {first.batch_size} x {first.seq_len}"
        f"{_memory_settings(first)}; GB = 1e9 bytes; ratios to {baseline.optimizer}",
        "",
        f"{'optimizer':<14}{'state elements':>16}{'paper GB':>10}{ratio:>8}{'total GB':>10}{ratio:>8}"
        f"{'peak GB':>9}  state from",
    ]
    for est in estimates:
        rows.append(
            f"{est.optimizer:<14}{est.optimizer_state_elements:>16,}{est.paper_gb:>10.2f}"
            f"{est.paper_bytes / baseline.paper_bytes:>8.2f}{est.total / GB:>10.2f}"
            f"{est.total / baseline.total:>8.2f}{est.peak / GB:>9.2f}  {est.state_source}"
        )
    rows += ["", "paper GB = 2 B x (weights + optimizer states); total = weights + gradients + states + activations; "
             "peak = weights + states + the step's worst moment" + (" (gradients released in backward)"
                                                                    if first.gradient_release else "")]
    return "\n".join(rows)


def run_memory(args: argparse.Namespace) -> int:
    # The model first: it is what every other setting is read against.
    check_choice("--model preset", args.model, PRESETS, ConfigError)
    hparams = parse_hparams(args)
    structure = parse_spec(args.structure, "structure") if args.structure else None
    if args.global_batch is not None and args.budget is None:
        raise ConfigError("--global-batch needs --budget SIZE (e.g. --budget 24GB)")
    if args.budget is not None:
        if not args.optimizer or args.compare:
            raise ConfigError("--budget plans for one optimizer: give --optimizer NAME, not --compare")
        budget = parse_bytes(args.budget)
        rows = plan(args.model, args.optimizer, hparams_for(args.optimizer, hparams), budget=budget,
                    vocab_size=args.vocab_size, seq_len=args.seq_len, precision=args.precision,
                    structure=structure, loss_chunk=args.loss_chunk, global_batch=args.global_batch,
                    processes=args.processes, gradient_release=args.gradient_release)
        print(format_plan(rows, model=args.model, optimizer=args.optimizer, budget=budget, seq_len=args.seq_len,
                          precision=args.precision, global_batch=args.global_batch, processes=args.processes))
        if not any(row.micro_batch for row in rows):
            least = min(rows, key=lambda row: row.peak)
            raise ConfigError(
                f"nothing fits in --budget {args.budget} ({budget / 1e9:.3g} GB): one sequence of {args.seq_len} "
                f"tokens needs {least.peak / 1e9:.3g} GB at the least ({least.setting}). Raise --budget, shorten "
                "--seq-len, or compare lighter optimizers with --compare adamw,scale,galore"
            )
        return 0
    options = dict(vocab_size=args.vocab_size, batch_size=args.batch_size, seq_len=args.seq_len,
                   precision=args.precision, activation_checkpointing=args.activation_checkpointing,
                   chunked_loss=args.chunked_loss, loss_chunk=args.loss_chunk, structure=structure,
                   gradient_release=args.gradient_release)
    if args.compare:
        names = [name.strip() for name in args.compare.split(",") if name.strip()]
        if not names:
            raise ConfigError("--compare got no optimizer names; write e.g. --compare adamw,scale,galore")
        estimates = compare(args.model, names, hparams, **options)
        by_name = {est.optimizer: est for est in estimates}
        baseline = by_name.get(BASELINE) or compare(args.model, [BASELINE], hparams, **options)[0]
        print(format_comparison(estimates, baseline))
        return 0
    if not args.optimizer:
        raise ConfigError("lowmem memory needs --optimizer NAME or --compare A,B,C")
    est = estimate_memory(args.model, args.optimizer, hparams_for(args.optimizer, hparams), **options)
    print(format_breakdown(est))
    return 0
