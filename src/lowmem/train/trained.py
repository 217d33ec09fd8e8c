"""A trained run, read back: its model, config and tokenizer from a checkpoint; `lowmem eval`.

    trained = load_trained("runs/cpu-tiny-scale-...")        # a run directory (its newest checkpoint) or a step dir
    result = evaluate_source(trained, "notes.txt")            # token-weighted perplexity of any source

The model is rebuilt as the run built it (`lowmem.assembly.build_model` with the run's preset, vocabulary
and structure, weights in the run's dtype) and evaluated as the trainer evaluates (`lowmem.train.evaluate`'s
arithmetic, the same autocast), so on the run's own validation batches (same source, `--eval-tokens`
= train.eval_tokens, same seq_len / micro-batch / seq_mode) the figure equals the one the run
reported. The tokenizer is the run's: a trained BPE is found in its cache (never retrained: a
retrained tokenizer could differ), a named one is loaded again; `tokenizer=` overrides it.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowmem import data as lowmem_data
from lowmem.assembly import autocast, build_model, configure_memory, model_vocab, weight_dtype
from lowmem.config import RunConfig
from lowmem.data.tokenizer import bpe_cache_path
from lowmem.distributed import pick_device
from lowmem.errors import CheckpointError, ConfigError, DataError, LowmemError, check_choice
from lowmem.models import count_targets
from lowmem.structure import Structure, build_structure
from lowmem.train import checkpoint
from lowmem.train.evaluate import EvalTotals
from lowmem.train.log import progress_bar, write_json

SPLITS = ("auto", "validation", "all")


@dataclass
class TrainedModel:
    model: nn.Module  # as trained (structured modules kept), on the device it was loaded to, in eval mode
    config: RunConfig
    tokenizer: lowmem_data.Tokenizer
    checkpoint: Path  # the step directory read
    step: int
    tokens: int
    structure: Structure | None = None
    summary: dict[str, Any] | None = None  # the run's summary.json, when the run finished

    @property
    def run_dir(self) -> Path:
        return self.checkpoint.parent.parent


def find_checkpoint(path: str | Path) -> Path:
    """The step directory of a run directory (its newest complete checkpoint) or of a checkpoint path."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist; pass a run directory (runs/...) or one of its checkpoints/step-N directories")
    run_dir = path if path.is_dir() else None
    if run_dir is not None and (run_dir / "config.yaml").is_file() and not checkpoint.list_checkpoints(run_dir):
        raise CheckpointError(
            f"run directory {run_dir} holds no complete checkpoint (a run writes one at its end, or every "
            f"--checkpoint-every steps); finish it with `lowmem train --resume {run_dir}` if it saved one before "
            "stopping, or train it again"
        )
    try:
        return checkpoint.resolve(path)
    except CheckpointError:
        raise CheckpointError(
            f"{path} is neither a run directory with checkpoints nor a checkpoint (checkpoints/step-N); pass one of those"
        ) from None


def run_tokenizer(config: RunConfig, override: str | None = None, where: Path | None = None) -> lowmem_data.Tokenizer:
    """The tokenizer a run trained with, or `override` (a tokenizer .json file or Hugging Face directory)."""
    d = config.data
    if override is not None:
        return lowmem_data.load_tokenizer(override)
    fix = "pass --tokenizer with the run's tokenizer (a .json file written by lowmem, or a Hugging Face directory)"
    if d.tokenizer == "bpe":
        try:
            source = lowmem_data.open_source(d.source, "train", d.text_field)
        except LowmemError as err:
            raise CheckpointError(
                f"the run's BPE tokenizer is found through its training data {d.source!r}, which cannot be opened "
                f"({err}); {fix}"
            ) from None
        path = bpe_cache_path(source, d.vocab_size, d.cache_dir)
        if not path.is_file():
            raise CheckpointError(
                f"the tokenizer of {where or 'the run'} is gone: its trained BPE was cached at {path}, which no longer "
                f"exists (lowmem does not retrain it: a new one could differ). Restore the cache (data.cache_dir), or {fix}"
            )
        return lowmem_data.load_tokenizer(str(path))
    try:
        return lowmem_data.load_tokenizer(d.tokenizer)
    except LowmemError as err:
        raise CheckpointError(f"the tokenizer of {where or 'the run'} ({d.tokenizer!r}) cannot be loaded: {err} Or {fix}") from None


def init_from_tokenizer(config: RunConfig) -> RunConfig:
    """The config a run started from `--init-from DIR` trains with: DIR's own tokenizer.json (its
    embeddings are indexed by that tokenizer's ids) in place of a BPE trained on the new data; another
    tokenizer named explicitly is refused, since its ids would read the embeddings of other tokens."""
    directory = config.train.init_from
    own = Path(directory).expanduser() / "tokenizer.json" if directory else None
    if own is None or not own.is_file():
        return config
    spec = config.data.tokenizer
    if spec == "bpe":
        return replace(config, data=replace(config.data, tokenizer=str(own)))
    if Path(spec).expanduser().resolve() in (own.resolve(), own.parent.resolve()):
        return config
    raise ConfigError(
        f"--init-from {directory} holds the tokenizer its embeddings were trained with ({own}), but --tokenizer "
        f"{spec} asks for another, whose token ids would read the embeddings of other tokens; drop --tokenizer "
        f"(the directory's is used), or pass --tokenizer {own}")


def load_trained(path: str | Path, tokenizer: str | None = None, device: str | torch.device = "cpu") -> TrainedModel:
    """The model, config and tokenizer of the checkpoint at `path` (a run directory: its newest), the
    model on `device` ("auto": a GPU if there is one; see lowmem.distributed.pick_device)."""
    step_dir = find_checkpoint(path)
    ranks = sorted(step_dir.glob("rank-*.pt"))  # the format before DCP: one file per rank
    body = checkpoint.load_whole(step_dir)  # a DCP checkpoint of any number of processes: one model
    config = RunConfig.from_dict(body["config"])
    tok = run_tokenizer(config, tokenizer, step_dir)
    structure = build_structure(config.structure)
    model = build_model(config.model, vocab_size=model_vocab(config.model, tok.vocab_size), structure=structure,
                        device=pick_device(device) if isinstance(device, str) else device,
                        dtype=weight_dtype(config.train.precision))
    if len(ranks) > 1 and config.train.distributed == "fsdp2":  # before DCP, each rank saved its dim-0 shards
        parts = [body["model"]] + [checkpoint.load(step_dir, r, world_size=len(ranks))["model"] for r in range(1, len(ranks))]
        body["model"] = checkpoint.gather_sharded_model_state(model, parts)
    saved_vocab = body["model"].get("embed_tokens.weight")
    if saved_vocab is not None and saved_vocab.shape[0] != model.config.vocab_size:
        raise CheckpointError(
            f"the tokenizer gives a {model.config.vocab_size}-token model, the checkpoint's embedding has "
            f"{saved_vocab.shape[0]} rows; pass --tokenizer with the tokenizer the run was trained with"
        )
    checkpoint.load_model_state(model, body["model"])
    # The run's loss rule (chunked where the logits would be large), so evaluation never needs more memory than training.
    configure_memory(model, "none", config.train.chunked_loss, config.train.loss_chunk,
                     config.train.micro_batch_size * config.data.seq_len)
    if structure is not None and "structure" in body:
        structure.load_state_dict(body["structure"])
    summary_path = step_dir.parent.parent / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else None
    return TrainedModel(model=model.eval(), config=config, tokenizer=tok, checkpoint=step_dir, step=int(body["step"]),
                        tokens=int(body["tokens"]), structure=structure, summary=summary)


def eval_source(spec: str, split: str = "auto", text_field: str = "text") -> lowmem_data.TextSource:
    """The documents `lowmem eval` reads from `spec`: with `split` "validation" its validation split
    (files named validation/valid/val, else the held-out fraction); "all" every document; "auto" the
    validation files if the source has them, else every document (a .txt the run never saw)."""
    check_choice("--split", split, SPLITS, ConfigError)
    validation = lowmem_data.open_source(spec, "validation", text_field, require_documents=False)
    held_out = any(shard.held_out is not None for shard in validation.shards)
    if split == "validation" or (split == "auto" and not held_out):
        source = validation
    else:
        train = lowmem_data.open_source(spec, "train", text_field, require_documents=False)
        if not held_out:
            shards = train.shards + validation.shards
        else:  # the held-out rule splits each file: read each file once, whole
            shards = tuple(type(s)(name=s.name, reader=s.reader, held_out=None) for s in train.shards)
        # Labelled "validation" so the batch iterator takes it as it is.
        source = type(validation)(spec=spec, split="validation", text_field=text_field,
                                  identity=f"all of {train.identity}", shards=shards)
    if next(source.iter_documents(), None) is None:
        raise DataError(f"{spec!r} gives no documents to evaluate with --split {split}"
                        + ("; use --split all (every document) or another source" if split == "validation" else ""))
    return source


@torch.no_grad()
def evaluate_source(trained: TrainedModel, data: str, tokens: int | None = None, seq_len: int | None = None,
                    batch_size: int | None = None, seq_mode: str | None = None, split: str = "auto",
                    text_field: str | None = None, progress: bool = False) -> dict[str, Any]:
    """Token-weighted perplexity of `trained` on `data` (and the legacy figure), streamed batch by batch.

    Defaults follow the run: seq_len, micro-batch size, seq_mode and text field; `tokens` None reads
    the whole source. The sums are `lowmem.train.evaluate.EvalTotals`, as the trainer's evaluation adds them.
    """
    d, t = trained.config.data, trained.config.train
    seq_len, batch_size, seq_mode = seq_len or d.seq_len, batch_size or t.micro_batch_size, seq_mode or d.seq_mode
    if seq_len > trained.model.config.max_seq_len:
        raise ConfigError(f"--seq-len {seq_len} is above the model's maximum {trained.model.config.max_seq_len}; "
                          f"use --seq-len {trained.model.config.max_seq_len} or less")
    if tokens is not None and (not isinstance(tokens, int) or tokens < 1):
        raise ConfigError(f"--eval-tokens must be a positive integer (or left out for the whole source), got {tokens!r}")
    source = eval_source(data, split, text_field or d.text_field)
    unscored: dict[str, int] = {}
    batches = lowmem_data.iter_validation_batches(source, trained.tokenizer, seq_len, batch_size, tokens, mode=seq_mode,
                                                  unscored=unscored)
    model = trained.model.eval()
    device = next(model.parameters()).device
    context, totals = autocast(t.precision, device), EvalTotals(device)
    bar = progress_bar(total=tokens, desc="eval", unit="tok", enabled=progress)
    for index, batch in enumerate(batches, start=1):
        labels = batch["labels"].to(device)
        with context:
            loss = model(batch["input_ids"].to(device), labels=labels)
        totals.add(loss, labels)
        if bar is not None:
            if index % 50 == 0:
                bar.set_postfix(loss=f"{totals.mean_loss:.4f}")
            bar.update(count_targets(batch["labels"]))  # the host's labels: no wait for the device
    if bar is not None:
        bar.close()
    if not totals.tokens:
        raise ConfigError(f"{data} gave no tokens to evaluate (split {split}); choose --split all or another source")
    scores = totals.result()
    result = {
        "checkpoint": str(trained.checkpoint), "step": trained.step, "model": trained.config.model,
        "optimizer": trained.config.optim.name, "data": data, "split": split, "seq_len": seq_len,
        "batch_size": batch_size, "seq_mode": seq_mode, "tokens": scores.tokens, "batches": totals.batches,
        "loss": scores.loss, "perplexity": scores.perplexity, "legacy_perplexity": scores.legacy_perplexity,
        "unscored_tokens": unscored.get("cut", 0) + unscored.get("tail", 0), "unscored": dict(unscored),
    }
    if trained.summary:
        result["run_val_perplexity"] = trained.summary.get("val_perplexity")
    return result


def result_table(result: dict[str, Any], legacy: bool = False) -> str:
    rows = [("perplexity (token-weighted)", f"{result['perplexity']:.4f}"), ("loss (nats/token)", f"{result['loss']:.6f}")]
    if legacy:
        rows.append(("legacy perplexity (papers' code)", f"{result['legacy_perplexity']:.4f}"))
    rows += [("tokens scored", f"{result['tokens']:,}")]
    if result.get("unscored_tokens"):
        why = {"cut": "the ends of documents longer than a sequence (pad mode)",
               "tail": "the last partial sequence of the packed stream (pack mode)"}
        reasons = "; ".join(f"{n:,} {why[k]}" for k, n in result["unscored"].items() if n)
        rows.append(("tokens left out", f"{result['unscored_tokens']:,}: {reasons}"))
    rows += [("sequences", f"{result['batches']} batches x <= {result['batch_size']} x {result['seq_len']} ({result['seq_mode']})")]
    if result.get("run_val_perplexity") is not None:
        rows.append(("the run's own validation perplexity", f"{result['run_val_perplexity']:.4f}"))
    width = max(len(name) for name, _ in rows)
    head = f"{result['model']} + {result['optimizer']} (step {result['step']}) on {result['data']}"
    return "\n".join([head] + [f"  {name:<{width}}  {value}" for name, value in rows])


def add_eval_parser(subparsers) -> None:
    p = subparsers.add_parser("eval", help="perplexity of a trained run on any text source",
                              description="Token-weighted perplexity of a run's checkpoint on a text source, "
                                          "with the run's own tokenizer.")
    p.add_argument("checkpoint", metavar="RUN_OR_CHECKPOINT", help="a run directory (its newest checkpoint) or checkpoints/step-N")
    p.add_argument("--data", required=True, help="any source `lowmem train --data` accepts (a .txt file too)")
    p.add_argument("--split", default="auto", choices=SPLITS,
                   help="auto: the validation files if the source has them, else every document; validation; all")
    # One name with `lowmem train` (--eval-tokens); --tokens, its older name here, stays an alias.
    p.add_argument("--eval-tokens", "--tokens", dest="tokens", type=int, default=None,
                   help="stop after N scored tokens (default: the whole source)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: the run's)")
    p.add_argument("--batch-size", type=int, default=None, help="sequences per forward pass (default: the run's micro-batch)")
    p.add_argument("--seq-mode", default=None, help="pad or pack (default: the run's)")
    p.add_argument("--text-field", default=None, help="JSON/parquet field holding the text (default: the run's)")
    p.add_argument("--tokenizer", default=None, help="tokenizer .json or Hugging Face directory, if the run's is gone")
    p.add_argument("--legacy-perplexity", action="store_true", help="also print the papers' legacy figure")
    p.add_argument("--output", default=None, help="write the result as JSON here")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="where the model runs (auto: a GPU if there is one, else the CPU)")
    p.set_defaults(func=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    trained = load_trained(args.checkpoint, args.tokenizer, device=args.device)
    result = evaluate_source(trained, args.data, tokens=args.tokens, seq_len=args.seq_len, batch_size=args.batch_size,
                             seq_mode=args.seq_mode, split=args.split, text_field=args.text_field,
                             progress=not args.no_progress)
    print(result_table(result, legacy=args.legacy_perplexity))
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        write_json(Path(args.output), result)
        print(f"wrote {args.output}")
    return 0
