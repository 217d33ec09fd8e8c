"""The training loop: one function, `train(config)`, from a RunConfig to a finished run directory.

Per optimizer step: set every group's lr to initial_lr x schedule(step) x interventions' factors;
run the micro-batches of this rank (gradient accumulation) with the loss of each micro-batch scaled
so the step's gradient is the token-weighted mean over the whole global batch; optionally clip;
optimizer step; interventions; log, evaluate and checkpoint at their intervals. SIGTERM/SIGINT finish
the current step, save and exit cleanly; a non-finite loss stops the run (or is skipped, up to K).
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

import lowmem.optim
from lowmem import data as lowmem_data
from lowmem.config import RunConfig, results_affecting_differences, save_config
from lowmem.errors import CheckpointError, ConfigError, LowmemError
from lowmem.models import build_model, count_parameters, resolve_config
from lowmem.train import checkpoint
from lowmem.train.distributed import DistInfo, all_reduce_sum, barrier, init_distributed, shutdown, wrap_model
from lowmem.train.evaluate import EvalResult, evaluate, token_loss_sum
from lowmem.train.interventions import Intervention, build_intervention
from lowmem.train.log import MetricsLog, plot_loss_curve, summary_table, write_json
from lowmem.train.schedule import lr_factor


logger = logging.getLogger(__name__)
RUNS_ROOT = "runs"


class TrainingStopped(LowmemError):
    """Training stopped on a non-finite loss; the message names the step and the last good checkpoint."""


class _StopRequest:
    """Turns SIGTERM/SIGINT into a flag checked between steps, so a step is never cut in half."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "_StopRequest":
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: signals stay with the caller
                pass
        return self

    def _handle(self, signum, frame) -> None:
        self.signal_name = signal.Signals(signum).name

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    if precision == "bf16-autocast":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _optimizer_hparams(config: RunConfig) -> dict[str, Any]:
    hparams = dict(config.optim.hparams)
    if config.optim.lr is not None:
        hparams["lr"] = config.optim.lr
    if "total_T" in lowmem.optim.method(config.optim.name).hyperparameters() and "total_T" not in hparams:
        hparams["total_T"] = config.train.steps  # Stable-SPAM's beta1 decay spans the run
    return hparams


def _memory_snapshot(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    from lowmem.memory.measure import snapshot

    return snapshot(model, optimizer)


def _memory_estimate(config: RunConfig, vocab_size: int, hparams: dict[str, Any]) -> dict[str, Any]:
    from lowmem.memory.estimate import estimate_memory

    est = estimate_memory(config.model, config.optim.name, hparams, vocab_size=vocab_size,
                          batch_size=config.train.micro_batch_size, seq_len=config.data.seq_len,
                          precision=config.train.precision)
    return {"estimate_paper_gb": est.paper_gb, "estimate_total_bytes": est.total,
            "estimate_optimizer_state_bytes": est.optimizer_states}


def default_run_dir(config: RunConfig) -> str:
    """runs/<model>-<optimizer>-<date>-<time>: a new directory per run, so no run overwrites another."""
    return str(Path(RUNS_ROOT) / f"{config.model}-{config.optim.name}-{time.strftime('%Y%m%d-%H%M%S')}")


def latest_run_dir(root: str | Path = None) -> Path:
    """The most recently written run directory under `root` (default runs/), for a bare --resume."""
    root = Path(root or RUNS_ROOT)
    candidates = [p.parent for p in root.glob("*/config.yaml")] if root.is_dir() else []
    if not candidates:
        raise CheckpointError(f"no run to resume under {root}/; pass --resume with a run directory")
    return max(candidates, key=lambda p: (p / "config.yaml").stat().st_mtime)


def _model_vocab(preset: str, tokenizer_vocab: int) -> int:
    """A paper preset keeps its declared vocabulary (32000 for t5-base, whose 100 extra sentinel ids
    never occur in encoded text); a CPU tier takes the tokenizer's."""
    declared = resolve_config(preset).vocab_size
    if declared is None:
        return tokenizer_vocab
    if tokenizer_vocab > declared:
        logger.info("tokenizer has %d ids, model %s keeps its %d (ids above are never produced for t5-base)",
                    tokenizer_vocab, preset, declared)
    return declared


def train(config: RunConfig, resume: str | Path | None = None) -> dict[str, Any]:
    """Train per `config`; return the summary (also written to <output_dir>/summary.json)."""
    config.validate()
    info = init_distributed(config.train.device)
    try:
        summary = _train(config, info, resume)
    except BaseException:
        shutdown(info, clean=False)
        raise
    shutdown(info)
    return summary


def _train(config: RunConfig, info: DistInfo, resume: str | Path | None) -> dict[str, Any]:
    t_cfg, d_cfg = config.train, config.data
    if t_cfg.output_dir is None:
        t_cfg.output_dir = default_run_dir(config)
    run_dir = Path(t_cfg.output_dir)
    if resume is None and checkpoint.list_checkpoints(run_dir):
        raise ConfigError(
            f"{run_dir} already holds a run with checkpoints; continue it with --resume {run_dir}, or "
            "choose another --output-dir (nothing was changed)"
        )
    per_step = t_cfg.micro_batch_size * info.world_size
    if t_cfg.batch_size % per_step:
        raise ConfigError(
            f"global batch {t_cfg.batch_size} is not divisible by micro-batch {t_cfg.micro_batch_size} x "
            f"{info.world_size} process(es) = {per_step}; choose --batch-size a multiple of {per_step}"
        )
    accumulation = t_cfg.batch_size // per_step

    resume_body = None
    if resume is not None:
        resume_body = checkpoint.load(checkpoint.resolve(resume), info.rank, info.world_size)
        differences = results_affecting_differences(resume_body["config"], config.to_dict())
        if differences:
            raise CheckpointError(
                "cannot resume: these settings differ from the checkpoint's and would change results:\n  "
                + "\n  ".join(differences)
                + "\nresume with the original settings, or start a new run in another --output-dir"
            )
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir / "config.yaml")

    torch.manual_seed(t_cfg.seed)
    source = lowmem_data.open_source(d_cfg.source, "train", d_cfg.text_field)
    val_source = lowmem_data.open_source(d_cfg.source, "validation", d_cfg.text_field)
    tokenizer = lowmem_data.load_tokenizer(d_cfg.tokenizer, source, vocab_size=d_cfg.vocab_size, cache_dir=d_cfg.cache_dir)

    model = build_model(config.model, vocab_size=_model_vocab(config.model, tokenizer.vocab_size))
    if d_cfg.seq_len > model.config.max_seq_len:
        raise ConfigError(
            f"--seq-len {d_cfg.seq_len} is above the maximum sequence length {model.config.max_seq_len} of "
            f"model {config.model}; use --seq-len {model.config.max_seq_len} or less"
        )
    model.to(info.device)
    if t_cfg.precision == "bf16-pure":
        model.to(torch.bfloat16)
    n_params = count_parameters(model)
    model = wrap_model(model, info, t_cfg.distributed)
    core = model.module if hasattr(model, "module") else model

    hparams = _optimizer_hparams(config)
    optimizer = lowmem.optim.build(config.optim.name, core, preset=config.model, **hparams)
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])
    interventions: list[Intervention] = [
        build_intervention(spec["name"], **{k: v for k, v in spec.items() if k != "name"})
        for spec in config.optim.interventions
    ]

    loader = lowmem_data.TokenLoader(source, tokenizer, d_cfg.seq_len, t_cfg.micro_batch_size, mode=d_cfg.seq_mode,
                                     seed=t_cfg.seed, rank=info.rank, world_size=info.world_size)
    val_batches = lowmem_data.validation_batches(val_source, tokenizer, d_cfg.seq_len, t_cfg.micro_batch_size,
                                                 t_cfg.eval_tokens, mode=d_cfg.seq_mode)
    autocast = _autocast(t_cfg.precision, info.device)
    try:

        step, tokens, skipped, initial_eval = 0, 0, 0, None
        if resume_body is not None:
            checkpoint.load_model_state(model, resume_body["model"])
            checkpoint.load_optimizer_state(optimizer, resume_body["optimizer"])
            loader.load_state_dict(resume_body["loader"])
            for intervention in interventions:
                intervention.load_state_dict(resume_body["interventions"][intervention.name])
            checkpoint.set_rng_state(resume_body["rng"])
            step, tokens, skipped = resume_body["step"], resume_body["tokens"], resume_body["skipped"]
            initial_eval = EvalResult(**resume_body["initial_eval"])
        metrics = MetricsLog(run_dir / "metrics.jsonl", resume_step=step if resume_body is not None else None) if info.is_main else None
        existing = checkpoint.list_checkpoints(run_dir)
        last_checkpoint = existing[-1] if existing else None

        def save_checkpoint() -> Path:
            payload = {
                "step": step, "tokens": tokens, "skipped": skipped,
                "model": checkpoint.model_state(model),
                "optimizer": checkpoint.optimizer_state(optimizer),
                "loader": loader.state_dict(),
                "interventions": {i.name: i.state_dict() for i in interventions},
                "rng": checkpoint.rng_state(),
                "config": config.to_dict(),
                "initial_eval": vars(initial_eval) if initial_eval else None,
            }
            return checkpoint.save(run_dir, step, payload, info.rank, info.world_size, t_cfg.keep_checkpoints,
                                   barrier=(lambda: barrier(info)) if info.enabled else None)

        if initial_eval is None:
            initial_eval = evaluate(model, val_batches, info.device, autocast, info)
            if metrics:
                metrics.write({"step": 0, "tokens": 0, "val_loss": initial_eval.loss, "val_perplexity": initial_eval.perplexity})

        progress = None
        if info.is_main and t_cfg.progress:
            from tqdm.auto import tqdm

            progress = tqdm(total=t_cfg.steps, initial=step, desc=f"{config.optim.name}", unit="step", dynamic_ncols=True)

        model.train()
        batches = iter(loader)
        window_seconds, window_tokens, train_seconds = 0.0, 0, 0.0
        last_gradient_bytes = 0
        stop = _StopRequest()
        with stop:
            while step < t_cfg.steps:
                step_start = time.perf_counter()
                factor = lr_factor(step, t_cfg.steps, t_cfg.warmup_ratio, t_cfg.min_lr_ratio)
                for intervention in interventions:
                    factor *= intervention.lr_factor(step + 1)
                for group in optimizer.param_groups:
                    group["lr"] = group["initial_lr"] * factor

                micro_batches = [next(batches) for _ in range(accumulation)]
                local_targets = sum(int((mb["labels"] != -100).sum()) for mb in micro_batches)
                global_targets = int(all_reduce_sum(torch.tensor([local_targets], dtype=torch.int64), info).item())
                # DDP and FSDP average gradients over ranks, hence the factor world_size.
                scale = info.world_size / max(global_targets, 1)
                loss_sum = torch.zeros((), dtype=torch.float64)
                for i, mb in enumerate(micro_batches):
                    sync = contextlib.nullcontext()
                    if info.enabled and t_cfg.distributed == "ddp" and i < accumulation - 1:
                        sync = model.no_sync()
                    with sync:
                        with autocast:
                            logits = model(mb["input_ids"].to(info.device))
                        micro_loss = token_loss_sum(logits, mb["labels"].to(info.device))
                        (micro_loss * scale).backward()
                    loss_sum += micro_loss.detach().double().cpu()
                loss = all_reduce_sum(loss_sum, info).item() / max(global_targets, 1)

                log_now = (step + 1) % t_cfg.log_every == 0 or step + 1 == t_cfg.steps
                if not math.isfinite(loss):
                    optimizer.zero_grad(set_to_none=True)
                    skipped += 1
                    if skipped > t_cfg.skip_nonfinite:
                        where = f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was saved yet"
                        raise TrainingStopped(
                            f"non-finite loss ({loss}) at step {step + 1}; {where}. Lower the learning rate or "
                            "resume from that checkpoint; --skip-nonfinite K skips up to K such steps"
                        )
                    if info.is_main:
                        print(f"warning: non-finite loss at step {step + 1}, update skipped ({skipped}/{t_cfg.skip_nonfinite})")
                else:
                    if t_cfg.clip_grad_norm > 0:
                        torch.nn.utils.clip_grad_norm_(model.parameters(), t_cfg.clip_grad_norm)
                    optimizer.step()
                # Measured while gradients still exist, so gradient bytes are real, not zero.
                memory = _memory_snapshot(core, optimizer) if log_now else {}
                last_gradient_bytes = memory.get("gradient_bytes", last_gradient_bytes)
                optimizer.zero_grad(set_to_none=True)
                step += 1
                tokens += global_targets
                for intervention in interventions:
                    intervention.after_step(step, core, optimizer)
                # Throughput counts training steps only, not evaluation or checkpoint writing.
                step_seconds = time.perf_counter() - step_start
                train_seconds += step_seconds
                window_seconds += step_seconds
                window_tokens += global_targets

                if log_now:
                    record = {"step": step, "tokens": tokens, "loss": loss, "lr": factor * optimizer.param_groups[0]["initial_lr"],
                              "tokens_per_second": window_tokens / max(window_seconds, 1e-9), **memory}
                    if metrics:
                        metrics.write(record)
                    if progress:
                        progress.set_postfix(loss=f"{loss:.3f}", lr=f"{record['lr']:.2e}", tok_s=f"{record['tokens_per_second']:,.0f}")
                    window_seconds, window_tokens = 0.0, 0
                if progress:
                    progress.update(1)
                if t_cfg.eval_every and step % t_cfg.eval_every == 0 and step < t_cfg.steps:
                    result = evaluate(model, val_batches, info.device, autocast, info)
                    if metrics:
                        metrics.write({"step": step, "tokens": tokens, "val_loss": result.loss, "val_perplexity": result.perplexity})
                if t_cfg.checkpoint_every and step % t_cfg.checkpoint_every == 0 and step < t_cfg.steps:
                    last_checkpoint = save_checkpoint()
                stop_flag = torch.tensor([1 if stop.signal_name else 0])
                if all_reduce_sum(stop_flag, info).item() and step < t_cfg.steps:
                    last_checkpoint = save_checkpoint()
                    if progress:
                        progress.close()
                    if info.is_main:
                        print(f"{stop.signal_name or 'stop signal'} received: stopped after step {step}; checkpoint saved "
                              f"to {last_checkpoint}. Continue with: lowmem train --resume {run_dir}")
                    return {"stopped": True, "step": step, "checkpoint": str(last_checkpoint)}
        if progress:
            progress.close()

        final = evaluate(model, val_batches, info.device, autocast, info)
        last_checkpoint = save_checkpoint()
        summary = {
            "model": config.model, "optimizer": config.optim.name, "data": d_cfg.source,
            "parameters": n_params, "vocab_size": core.config.vocab_size, "steps": step, "tokens": tokens,
            "val_loss": final.loss, "val_perplexity": final.perplexity,
            "val_legacy_perplexity": final.legacy_perplexity if t_cfg.legacy_perplexity else None,
            "val_tokens": final.tokens, "initial_val_perplexity": initial_eval.perplexity,
            "tokens_per_second": tokens / max(train_seconds, 1e-9), "wall_seconds": train_seconds,
            "skipped_steps": skipped, "checkpoint": str(last_checkpoint),
            "memory": {**_memory_snapshot(core, optimizer), "gradient_bytes": last_gradient_bytes,
                       **_memory_estimate(config, core.config.vocab_size, hparams)},
        }
        if info.is_main:
            metrics.write({"step": step, "tokens": tokens, "val_loss": final.loss, "val_perplexity": final.perplexity})
            write_json(run_dir / "summary.json", summary)
            plot_loss_curve(run_dir / "metrics.jsonl", run_dir / "loss.png", f"{config.model} + {config.optim.name}")
            print(summary_table(summary))
            print(f"run directory: {run_dir}")
        return summary
    finally:
        loader.close()  # its prefetch thread would otherwise outlive an in-process run
