"""The `lowmem export` command."""

from __future__ import annotations

import argparse


def add_export_parser(subparsers) -> None:
    p = subparsers.add_parser("export", help="export a trained run as a Hugging Face model directory",
                              description="Write a run's checkpoint as a directory that transformers loads offline "
                                          "(LlamaForCausalLM.from_pretrained, AutoTokenizer.from_pretrained).")
    p.add_argument("checkpoint", metavar="RUN_OR_CHECKPOINT", help="a run directory (its newest checkpoint) or checkpoints/step-N")
    p.add_argument("--to", nargs=2, required=True, metavar=("FORMAT", "DIR"), help="hf and a new (or empty) directory")
    p.add_argument("--tokenizer", default=None, help="tokenizer .json or Hugging Face directory, if the run's is gone")
    p.set_defaults(func=run_export)


def run_export(args: argparse.Namespace) -> int:
    from lowmem.hf.export import describe_export, export

    out = export(args.checkpoint, args.to[0], args.to[1], args.tokenizer)
    print(describe_export(out))
    return 0
