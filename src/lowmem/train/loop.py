"""The training loop: `train(config)`, from a RunConfig to a finished run directory.

The run's parts come from lowmem.assembly (model, structure, optimizer, interventions) and one
optimizer step from lowmem.train.step; this loop owns the rest: per step, every group's lr =
initial_lr x schedule(step) x the interventions' factors; interventions' hooks before and after the
update; logging, evaluation and checkpoints at their intervals. SIGTERM/SIGINT, at any time of the
run, finish the current step, save and exit cleanly (after the last step the run simply finishes: its
checkpoint is written before the final evaluation); a second signal stops at once. A non-finite loss
stops the run (or is skipped, up to K); non-finite weights are never checkpointed. The run directory
is locked for the run's lifetime, so two runs never share one.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lowmem import data as lowmem_data
from lowmem.assembly import Run, assemble
from lowmem.config import RunConfig, results_affecting_differences, save_config
from lowmem.distributed import DistInfo, all_reduce_sum, init_distributed, shutdown
from lowmem.errors import CheckpointError, ConfigError, LowmemError
from lowmem.models import count_parameters
from lowmem.train import checkpoint
from lowmem.train.evaluate import EvalResult, evaluate
from lowmem.train.log import MetricsLog, plot_loss_curve, progress_bar, summary_table, write_json
from lowmem.train.schedule import lr_factor
from lowmem.train.sinks import check_sinks, open_sinks
from lowmem.train.step import train_step


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
        if self.signal_name is not None:  # the second signal: stop now, without saving
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    if precision == "bf16-autocast":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _memory_snapshot(model, optimizer) -> dict[str, Any]:
    from lowmem.memory.measure import snapshot

    return snapshot(model, optimizer)


def _memory_estimate(config: RunConfig, vocab_size: int, hparams: dict[str, Any]) -> dict[str, Any]:
    from lowmem.memory.estimate import estimate_memory

    est = estimate_memory(config.model, config.optim.name, hparams, vocab_size=vocab_size,
                          batch_size=config.train.micro_batch_size, seq_len=config.data.seq_len,
                          precision=config.train.precision, structure=config.structure,
                          activation_checkpointing=config.train.activation_checkpointing,
                          chunked_loss=config.train.chunked_loss, loss_chunk=config.train.loss_chunk)
    return {"estimate_paper_gb": est.paper_gb, "estimate_total_bytes": est.total,
            "estimate_optimizer_state_bytes": est.optimizer_states}


@dataclass
class Progress:
    """How far the run is: a checkpoint component (kept at the file's top level)."""

    step: int = 0
    tokens: int = 0
    skipped: int = 0
    initial_eval: EvalResult | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "tokens": self.tokens, "skipped": self.skipped,
                "initial_eval": vars(self.initial_eval) if self.initial_eval else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.tokens, self.skipped = state["step"], state["tokens"], state["skipped"]
        self.initial_eval = EvalResult(**state["initial_eval"]) if state.get("initial_eval") else None


def default_run_dir(config: RunConfig) -> str:
    """runs/<model>-<optimizer>-<date>-<time>-<microseconds>-<pid>: a new name per run, so no run
    overwrites another (the run that creates the directory claims it; see _claim_default_dir)."""
    now = time.time()
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now)) + f"-{int(now % 1 * 1e6):06d}-{os.getpid()}"
    return str(Path(RUNS_ROOT) / f"{config.model}-{config.optim.name}-{stamp}")


def _claim_default_dir(config: RunConfig) -> str:
    """Create a new default run directory (mkdir fails if it exists, then a suffix is tried)."""
    base = default_run_dir(config)
    Path(base).parent.mkdir(parents=True, exist_ok=True)
    for suffix in range(100):
        name = base if suffix == 0 else f"{base}-{suffix}"
        try:
            Path(name).mkdir()
            return name
        except FileExistsError:
            continue
    raise ConfigError(f"could not create a new run directory next to {base}; pass --output-dir")


def latest_run_dir(root: str | Path = None) -> Path:
    """The run under `root` (default runs/) for a bare --resume: the one with the newest checkpoint
    (a run that failed at start-up has a config but nothing to resume); without any checkpoint, the
    newest config."""
    root = Path(root or RUNS_ROOT)
    candidates = [p.parent for p in root.glob("*/config.yaml")] if root.is_dir() else []
    if not candidates:
        raise CheckpointError(f"no run to resume under {root}/; pass --resume with a run directory")
    checkpointed = {p: checkpoint.list_checkpoints(p) for p in candidates}
    with_checkpoints = [p for p in candidates if checkpointed[p]]
    if with_checkpoints:
        return max(with_checkpoints, key=lambda p: checkpointed[p][-1].stat().st_mtime)
    return max(candidates, key=lambda p: (p / "config.yaml").stat().st_mtime)


def train(config: RunConfig, resume: str | Path | None = None) -> dict[str, Any]:
    """Train per `config`; return the summary (also written to <output_dir>/summary.json)."""
    config.validate()
    # Held for the whole run, so a signal after the last step (final checkpoint, evaluation,
    # summary) is noted instead of killing the process before the run is written.
    with _StopRequest() as stop:
        info = init_distributed(config.train.device)
        try:
            summary = _train(config, info, resume, stop)
        except BaseException:
            shutdown(info, clean=False)
            raise
        shutdown(info)
    return summary


def _accumulation(config: RunConfig, info: DistInfo) -> int:
    per_step = config.train.micro_batch_size * info.world_size
    if config.train.batch_size % per_step:
        raise ConfigError(
            f"global batch {config.train.batch_size} is not divisible by micro-batch {config.train.micro_batch_size} x "
            f"{info.world_size} process(es) = {per_step}; choose --batch-size a multiple of {per_step}"
        )
    return config.train.batch_size // per_step


def _agree(failed: bool, info: DistInfo) -> bool:
    """True on every rank if `failed` is true on any."""
    return bool(all_reduce_sum(torch.tensor([1 if failed else 0], device=info.device), info).item())


def _default_dir_for_all_ranks(config: RunConfig, info: DistInfo) -> str:
    name = [_claim_default_dir(config) if info.is_main else None]
    if info.enabled:
        import torch.distributed as dist

        dist.broadcast_object_list(name, src=0)
    return name[0]


class _RunLock:
    """An exclusive lock (fcntl.flock) on <run>/.lock for the run's lifetime; the file names its pid."""

    NAME = ".lock"

    def __init__(self, run_dir: Path) -> None:
        import fcntl

        self.path = run_dir / self.NAME
        self._file = open(self.path, "a+")
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            self._file.seek(0)
            holder = self._file.read().strip() or "unknown"
            self._file.close()
            raise ConfigError(
                f"{run_dir} is in use by another lowmem run (pid {holder}); two runs in one directory would mix "
                "their metrics and checkpoints. Wait for it to finish, or choose another --output-dir"
            ) from None
        self._file.seek(0)
        self._file.truncate()
        self._file.write(f"{os.getpid()}\n")
        self._file.flush()

    def release(self) -> None:
        self._file.close()  # closing drops the flock; the file stays (removing it would race a new run)


def _check_writable(directory: Path) -> None:
    """Refuse a directory the run could not write its checkpoints and logs to, before training."""
    probe = directory / f".write-test-{os.getpid()}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"lowmem")
        probe.unlink()
    except OSError as err:
        raise ConfigError(
            f"cannot write to {directory} ({err.strerror or err}); the run could not save its checkpoints there. "
            "Choose a writable --output-dir (nothing was trained)"
        ) from None


def _open_run(config: RunConfig, info: DistInfo, resume: str | Path | None) -> tuple[Path, dict[str, Any] | None, _RunLock | None]:
    """The run directory (created, locked, checked writable, config written), the checkpoint to
    resume from, if any, and the lock (held by the main process; release it when the run ends)."""
    if config.train.output_dir is None:
        config.train.output_dir = _default_dir_for_all_ranks(config, info)
    run_dir = Path(config.train.output_dir)
    lock, refusal = None, None
    if info.is_main:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            lock = _RunLock(run_dir)
            _check_writable(run_dir)
            _check_writable(run_dir / checkpoint.CHECKPOINT_DIR)
        except ConfigError as err:
            refusal = err
        except OSError as err:
            refusal = ConfigError(f"cannot create or lock the run directory {run_dir} ({err.strerror or err}); "
                                  "choose a writable --output-dir")
    if _agree(refusal is not None, info):
        if lock:
            lock.release()
        raise refusal or ConfigError(f"the main process refused the run directory {run_dir}; see its message")
    try:
        return _resume_body(config, info, resume, run_dir) + (lock,)
    except BaseException:
        if lock:
            lock.release()
        raise


def _resume_body(config: RunConfig, info: DistInfo, resume: str | Path | None, run_dir: Path) -> tuple[Path, dict[str, Any] | None]:
    if resume is None and checkpoint.list_checkpoints(run_dir):
        raise ConfigError(
            f"{run_dir} already holds a run with checkpoints; continue it with --resume {run_dir}, or "
            "choose another --output-dir (nothing was changed)"
        )
    body = None
    if resume is not None:
        body = checkpoint.load(checkpoint.resolve(resume), info.rank, info.world_size)
        differences = results_affecting_differences(body["config"], config.to_dict())
        if differences:
            raise CheckpointError(
                "cannot resume: these settings differ from the checkpoint's and would change results:\n  "
                + "\n  ".join(differences)
                + "\nresume with the original settings, or start a new run in another --output-dir"
            )
    if info.is_main:
        save_config(config, run_dir / "config.yaml")
    return run_dir, body


def _set_lr(run: Run, config: RunConfig, step: int) -> float:
    """Set every group's lr for optimizer step `step` (1-based); return the factor on initial_lr."""
    t = config.train
    factor = lr_factor(step - 1, t.steps, t.warmup_ratio, t.min_lr_ratio)
    for intervention in run.interventions:
        factor *= intervention.lr_factor(step)
    for group in run.optimizer.param_groups:
        group["lr"] = group["initial_lr"] * factor
    return factor


def _train(config: RunConfig, info: DistInfo, resume: str | Path | None, stop: _StopRequest) -> dict[str, Any]:
    accumulation = _accumulation(config, info)
    check_sinks(config.train.log_to)
    run_dir, resume_body, lock = _open_run(config, info, resume)
    try:
        return _prepare(config, info, run_dir, resume_body, accumulation, stop)
    finally:
        if lock:
            lock.release()


def _prepare(config: RunConfig, info: DistInfo, run_dir: Path, resume_body: dict[str, Any] | None,
             accumulation: int, stop: _StopRequest) -> dict[str, Any]:
    t_cfg, d_cfg = config.train, config.data
    torch.manual_seed(t_cfg.seed)
    source = lowmem_data.open_source(d_cfg.source, "train", d_cfg.text_field)
    val_source = lowmem_data.open_source(d_cfg.source, "validation", d_cfg.text_field)
    tokenizer = lowmem_data.load_tokenizer(d_cfg.tokenizer, source, vocab_size=d_cfg.vocab_size, cache_dir=d_cfg.cache_dir)
    run = assemble(config, vocab_size=tokenizer.vocab_size, info=info, init_weights=resume_body is None)
    n_params = count_parameters(run.core)
    loader = lowmem_data.TokenLoader(source, tokenizer, d_cfg.seq_len, t_cfg.micro_batch_size, mode=d_cfg.seq_mode,
                                     seed=t_cfg.seed, rank=info.rank, world_size=info.world_size)
    try:
        return _loop(config, info, run, loader, val_source, tokenizer, run_dir, resume_body, accumulation, n_params, stop)
    finally:
        loader.close()  # its prefetch thread would otherwise outlive an in-process run


def _loop(config: RunConfig, info: DistInfo, run: Run, loader, val_source, tokenizer, run_dir: Path,
          resume_body: dict[str, Any] | None, accumulation: int, n_params: int, stop: _StopRequest) -> dict[str, Any]:
    t_cfg = config.train
    val_batches = lowmem_data.validation_batches(val_source, tokenizer, config.data.seq_len, t_cfg.micro_batch_size,
                                                 t_cfg.eval_tokens, mode=config.data.seq_mode)
    autocast = _autocast(t_cfg.precision, info.device)
    progress = Progress()
    components: dict[str, checkpoint.Stateful] = {
        "progress": progress, "model": checkpoint.ModelComponent(run.model),
        "optimizer": checkpoint.OptimizerComponent(run.optimizer), "loader": loader,
        "interventions": checkpoint.NamedComponents(run.interventions), "rng": checkpoint.RngComponent(),
    }
    if run.structure is not None:
        components["structure"] = run.structure
    if resume_body is not None:
        checkpoint.load_components(components, resume_body)
    resume_step = progress.step if resume_body else None
    metrics = MetricsLog(run_dir / "metrics.jsonl", resume_step=resume_step,
                         sinks=open_sinks(t_cfg.log_to, run_dir, config.to_dict(), resume_step)) if info.is_main else None
    existing = checkpoint.list_checkpoints(run_dir)
    last_checkpoint = existing[-1] if existing else None

    def save_checkpoint() -> Path:
        # Checked before anything is written, so no checkpoint with NaN/inf weights is ever called good.
        bad = _first_nonfinite(run)
        if _agree(bad is not None, info):
            where = f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was saved before"
            raise TrainingStopped(
                f"non-finite values in {bad or 'the weights or optimizer state of another process'} after step "
                f"{progress.step}; no checkpoint was written for it, {where}. Lower the learning rate "
                "(or clip gradients with --clip-grad-norm) and resume from that checkpoint"
            )
        payload = {**checkpoint.components_state(components), "config": config.to_dict()}
        return checkpoint.save(run_dir, progress.step, payload, info.rank, info.world_size, t_cfg.keep_checkpoints,
                               any_failed=(lambda failed: _agree(failed, info)) if info.enabled else None)

    def log_eval(result: EvalResult) -> None:
        if metrics:
            metrics.write({"step": progress.step, "tokens": progress.tokens, "val_loss": result.loss,
                           "val_perplexity": result.perplexity})

    if progress.initial_eval is None:
        progress.initial_eval = evaluate(run.model, val_batches, info.device, autocast, info)
        log_eval(progress.initial_eval)
    bar = _progress_bar(config, info, progress.step)
    run.model.train()
    batches = iter(loader)
    window_seconds, window_tokens, train_seconds, last_gradient_bytes = 0.0, 0, 0.0, 0
    while progress.step < t_cfg.steps:
        started, step = time.perf_counter(), progress.step + 1
        factor = _set_lr(run, config, step)
        result = train_step(
            run.model, run.optimizer, [next(batches) for _ in range(accumulation)], info=info, autocast=autocast,
            before_update=lambda: [i.before_step(step, run.core, run.optimizer) for i in run.interventions],
            clip_grad_norm=t_cfg.clip_grad_norm, distributed=t_cfg.distributed)
        if not result.updated:
            progress.skipped += 1
            _check_skips(progress, t_cfg.skip_nonfinite, result.loss, step, last_checkpoint, info)
        log_now = step % t_cfg.log_every == 0 or step == t_cfg.steps
        # Measured while gradients still exist, so gradient bytes are real, not zero.
        memory = _memory_snapshot(run.core, run.optimizer) if log_now else {}
        last_gradient_bytes = memory.get("gradient_bytes", last_gradient_bytes)
        run.optimizer.zero_grad(set_to_none=True)
        progress.step, progress.tokens = step, progress.tokens + result.targets
        for intervention in run.interventions:
            intervention.after_step(step, run.core, run.optimizer)
        # Throughput counts training steps only, not evaluation or checkpoint writing.
        seconds = time.perf_counter() - started
        train_seconds, window_seconds, window_tokens = train_seconds + seconds, window_seconds + seconds, window_tokens + result.targets
        if log_now:
            record = {"step": step, "tokens": progress.tokens, "loss": result.loss,
                      "lr": factor * run.optimizer.param_groups[0]["initial_lr"],
                      "tokens_per_second": window_tokens / max(window_seconds, 1e-9), **memory}
            if metrics:
                metrics.write(record)
            if bar:
                bar.set_postfix(loss=f"{result.loss:.3f}", lr=f"{record['lr']:.2e}", tok_s=f"{record['tokens_per_second']:,.0f}")
            window_seconds, window_tokens = 0.0, 0
        if bar:
            bar.update(1)
        if t_cfg.eval_every and step % t_cfg.eval_every == 0 and step < t_cfg.steps:
            log_eval(evaluate(run.model, val_batches, info.device, autocast, info))
        if t_cfg.checkpoint_every and step % t_cfg.checkpoint_every == 0 and step < t_cfg.steps:
            last_checkpoint = save_checkpoint()
        if all_reduce_sum(torch.tensor([1 if stop.signal_name else 0]), info).item() and step < t_cfg.steps:
            last_checkpoint = save_checkpoint()
            if bar:
                bar.close()
            if metrics:
                metrics.close()
            if info.is_main:
                print(f"{stop.signal_name or 'stop signal'} received: stopped after step {step}; checkpoint saved "
                      f"to {last_checkpoint}. Continue with: lowmem train --resume {run_dir}")
            return {"stopped": True, "step": step, "checkpoint": str(last_checkpoint)}
    if bar:
        bar.close()
    # The checkpoint first: a signal from here on is only noted, and the trained steps are safe
    # whatever happens during the evaluation.
    last_checkpoint = save_checkpoint()
    final = evaluate(run.model, val_batches, info.device, autocast, info)
    summary = _summary(config, run, progress, final, n_params, train_seconds, last_checkpoint, last_gradient_bytes)
    if info.is_main:
        log_eval(final)
        metrics.close()
        write_json(run_dir / "summary.json", summary)
        plot_loss_curve(run_dir / "metrics.jsonl", run_dir / "loss.png", f"{config.model} + {config.optim.name}")
        print(summary_table(summary))
        print(f"run directory: {run_dir}")
        if stop.signal_name:
            print(f"{stop.signal_name} received after the last step; the run was finished and written first")
    return summary


def _first_nonfinite(run: Run) -> str | None:
    """The name of the first weight or optimizer-state tensor (this process's shard) holding NaN/inf."""
    for name, param in run.core.named_parameters():
        local = param.detach().to_local() if hasattr(param, "to_local") else param.detach()
        if local.is_floating_point() and not bool(torch.isfinite(local).all()):
            return f"weight {name}"
    names = {id(p): n for n, p in run.core.named_parameters()}
    for param, state in run.optimizer.state.items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and value.is_floating_point() and value.numel():
                local = value.to_local() if hasattr(value, "to_local") else value
                if local.device.type != "meta" and not bool(torch.isfinite(local).all()):
                    return f"optimizer state {key!r} of {names.get(id(param), 'a parameter')}"
    return None


def _progress_bar(config: RunConfig, info: DistInfo, start: int):
    if not (info.is_main and config.train.progress):
        return None
    # A bar redrawn in place on a terminal; one plain line per log interval in a log file.
    return progress_bar(total=config.train.steps, initial=start, desc=config.optim.name, unit="step")


def _check_skips(progress: Progress, allowed: int, loss: float, step: int, last_checkpoint: Path | None, info: DistInfo) -> None:
    if progress.skipped > allowed:
        where = f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was saved yet"
        raise TrainingStopped(
            f"non-finite loss ({loss}) at step {step}; {where}. Lower the learning rate or "
            "resume from that checkpoint; --skip-nonfinite K skips up to K such steps"
        )
    if info.is_main:
        print(f"warning: non-finite loss at step {step}, update skipped ({progress.skipped}/{allowed})")


def _summary(config: RunConfig, run: Run, progress: Progress, final: EvalResult, n_params: int, train_seconds: float,
             last_checkpoint: Path, last_gradient_bytes: int) -> dict[str, Any]:
    return {
        "model": config.model, "optimizer": config.optim.name, "data": config.data.source,
        "structure": config.structure, "parameters": n_params,
        "trainable_parameters": sum(p.numel() for p in run.core.parameters() if p.requires_grad),
        "vocab_size": run.core.config.vocab_size,
        "steps": progress.step, "tokens": progress.tokens,
        "val_loss": final.loss, "val_perplexity": final.perplexity,
        "val_legacy_perplexity": final.legacy_perplexity if config.train.legacy_perplexity else None,
        "val_tokens": final.tokens, "initial_val_perplexity": progress.initial_eval.perplexity,
        "tokens_per_second": progress.tokens / max(train_seconds, 1e-9), "wall_seconds": train_seconds,
        "skipped_steps": progress.skipped, "checkpoint": str(last_checkpoint),
        "memory": {**_memory_snapshot(run.core, run.optimizer), "gradient_bytes": last_gradient_bytes,
                   **_memory_estimate(config, run.core.config.vocab_size, run.hparams)},
    }
