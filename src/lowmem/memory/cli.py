"""`lowmem memory`: how much memory a model + optimizer needs, before training it.

    lowmem memory --model llama-7b --optimizer scale
    lowmem memory --model llama-1b --compare adamw,galore,apollo-mini,scale --hparam galore.rank=256
    lowmem memory --model cpu-small --vocab-size 8192 --optimizer galore --hparam rank=32 --precision fp32

Everything is counted on the meta device (see lowmem.memory.estimate), so even 7B answers in seconds.
"""

from __future__ import annotations

import argparse
from typing import Any

import lowmem.optim
from lowmem.errors import ConfigError
from lowmem.config import PRECISIONS, parse_value
from lowmem.memory.estimate import GB, MemoryEstimate, compare, estimate_memory, hparams_for
from lowmem.models.llama import PRESETS

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
    parser.add_argument("--rank", type=int, help="projection rank (shorthand for --hparam rank=R; "
                        "default: the method's published rank for the preset)")
    parser.add_argument("--lr", type=float,
                        help="learning rate (no effect on memory; accepted for symmetry with train)")
    parser.add_argument("--hparam", action="append", default=[], metavar="KEY=VALUE",
                        help="optimizer hyperparameter override, repeatable; VALUE is read as by --opt "
                             "(a number such as 1e-8, true/false, a list [0.9, 0.95], else a word). "
                             "OPTIMIZER.KEY=VALUE applies to that optimizer only; with --compare an "
                             "unscoped KEY goes to the optimizers that accept it, except where a registered "
                             "variant fixes it (apollo-mini keeps rank 1)")
    parser.add_argument("--batch-size", type=int, default=1, help="micro-batch size for activations (default 1)")
    parser.add_argument("--seq-len", type=int, default=256, help="sequence length (default 256)")
    parser.add_argument("--precision", choices=PRECISIONS, default="bf16-pure",
                        help="bf16-pure (the papers' setting, default), bf16-autocast or fp32")
    parser.add_argument("--activation-checkpointing", action="store_true",
                        help="keep only block inputs (plus one block during recomputation)")
    parser.add_argument("--vocab-size", type=int, help="vocabulary size (required for the cpu-* presets)")
    parser.set_defaults(func=run_memory)
    return parser


def parse_hparams(args: argparse.Namespace) -> dict[str, Any]:
    hparams: dict[str, Any] = {}
    for item in args.hparam:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--hparam {item!r} is not KEY=VALUE; write e.g. --hparam rank=128")
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


def format_breakdown(est: MemoryEstimate) -> str:
    roles = ", ".join(f"{role} {n:,}" for role, n in est.state_elements_by_role.items()) or "none"
    checkpointing = ", activation checkpointing" if est.activation_checkpointing else ""
    rows = [
        f"model {est.model}, optimizer {est.optimizer} ({_settings(est)})",
        f"precision {est.precision}, micro-batch {est.batch_size} x {est.seq_len}{checkpointing}; GB = 1e9 bytes",
        "",
        f"{'':<22}{'elements':>16}{'bytes':>14}",
        f"{'weights':<22}{est.weight_elements:>16,}{_gb(est.weights):>14}",
        f"{'gradients':<22}{est.weight_elements:>16,}{_gb(est.gradients):>14}",
        f"{'optimizer states':<22}{est.optimizer_state_elements:>16,}{_gb(est.optimizer_states):>14}",
        f"{'activations':<22}{'':>16}{_gb(est.activations):>14}",
        f"{'total':<22}{'':>16}{_gb(est.total):>14}",
        "",
        f"papers' convention, 2 B x (weights + optimizer states): {est.paper_gb:.2f} GB",
        f"optimizer-state elements by role: {roles}; plus {est.bookkeeping_elements} scalar "
        "bookkeeping elements (step counters etc., not in the papers' figure)",
        f"optimizer state counted from: {est.state_source}",
    ]
    rows += [f"note: {note}" for note in est.notes]
    return "\n".join(rows)


def format_comparison(estimates: list[MemoryEstimate], baseline: MemoryEstimate) -> str:
    first = estimates[0]
    ratio = f"/{baseline.optimizer}"
    checkpointing = ", activation checkpointing" if first.activation_checkpointing else ""
    rows = [
        f"model {first.model}, precision {first.precision}, micro-batch {first.batch_size} x {first.seq_len}"
        f"{checkpointing}; GB = 1e9 bytes; ratios to {baseline.optimizer}",
        "",
        f"{'optimizer':<14}{'state elements':>16}{'paper GB':>10}{ratio:>8}{'total GB':>10}{ratio:>8}  state from",
    ]
    for est in estimates:
        rows.append(
            f"{est.optimizer:<14}{est.optimizer_state_elements:>16,}{est.paper_gb:>10.2f}"
            f"{est.paper_bytes / baseline.paper_bytes:>8.2f}{est.total / GB:>10.2f}"
            f"{est.total / baseline.total:>8.2f}  {est.state_source}"
        )
    rows += ["", "paper GB = 2 B x (weights + optimizer states); total = weights + gradients + states + activations"]
    return "\n".join(rows)


def run_memory(args: argparse.Namespace) -> int:
    if args.model not in PRESETS:  # the model first: it is what every other setting is read against
        raise ConfigError(f"--model {args.model!r} is not a model preset; choose one of: {', '.join(PRESETS)}")
    hparams = parse_hparams(args)
    options = dict(vocab_size=args.vocab_size, batch_size=args.batch_size, seq_len=args.seq_len,
                   precision=args.precision, activation_checkpointing=args.activation_checkpointing)
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
