"""The trainer: `train(config)`, from a RunConfig to a finished run directory, and the `Trainer` it drives.

    summary = train(config)                        # or train(config, resume="runs/...")

`train` validates the config, turns SIGTERM/SIGINT into a flag, sets up the process group, claims
the run directory (lowmem.train.rundir) and runs a `Trainer`, whose `train()` reads as the run's
sequence:

    trainer = Trainer(config, info, run_dir, stop)   # data, assembly (lowmem.assembly), loader
    trainer.start()            # resume the components from the checkpoint, metrics, first evaluation
    while not trainer.done:
        trainer.step()         # lr = initial_lr x schedule x interventions' factors; train_step; hooks; log
        trainer.maybe_evaluate()
        trainer.maybe_checkpoint()
        if trainer.stop_requested():
            return trainer.stop_early()
    return trainer.finish()    # final checkpoint, evaluation, summary.json, loss.png

One optimizer step is lowmem.train.step.train_step, with the update applied where `Trainer.update`
says (after backward, or inside it with train.gradient_release); its batches come from lowmem.data.loader.DeviceBatches (on a GPU, pinned and
copied one step ahead while the step computes). tokens/s, in the log and the summary, leaves out
each process's first WARMUP_STEPS steps and the summary names the steps it covers (the wall time
counts them all); the memory peak restarts once the run is assembled. SIGTERM/SIGINT, at any time of the run, finish the current step, save and
exit cleanly (after the last step the run simply finishes: its checkpoint is written before the
final evaluation); a second signal stops at once. A non-finite loss stops the run (or is skipped, up
to K); non-finite weights are never checkpointed.
"""

from __future__ import annotations

import json
import signal
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from lowmem import data as lowmem_data
from lowmem.assembly import Run, assemble, autocast
from lowmem.config import RunConfig
from lowmem.data.loader import DeviceBatches
from lowmem.distributed import DistInfo, any_rank, init_distributed, shutdown
from lowmem.errors import ConfigError, LowmemError
from lowmem.memory.measure import reset_peak_memory
from lowmem.models import count_parameters
from lowmem.optim.base import local_tensor
from lowmem.train import checkpoint
from lowmem.train.continued import continue_body, continued_from, describe, load_continued
from lowmem.train.evaluate import EvalResult, evaluate
from lowmem.train.log import MetricsLog, plot_loss_curve, progress_bar, summary_table, write_json
from lowmem.train.rundir import RunDirectory, open_run_dir
from lowmem.train.schedule import lr_factor
from lowmem.train.sinks import check_sinks, open_sinks
from lowmem.train.step import AfterBackward, InBackward, NonFiniteGradient, StepResult, train_step
from lowmem.train.trained import init_from_tokenizer


class TrainingStopped(LowmemError):
    """Training stopped on a non-finite loss; the message names the step and the last good checkpoint."""


class StopRequest:
    """Turns SIGTERM/SIGINT into a flag checked between steps, so a step is never cut in half."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
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


@dataclass
class Progress:
    """How far the run is: a checkpoint component (kept at the file's top level)."""

    step: int = 0
    tokens: int = 0
    skipped: int = 0
    initial_eval: EvalResult | None = None
    # The trained time of every segment so far (a resumed run's summary sums them, see Throughput):
    # processes started (segments), the timed steps' seconds and tokens, and their steady part.
    segments: int = 0
    seconds: float = 0.0
    timed_tokens: int = 0
    steady_seconds: float = 0.0
    steady_tokens: int = 0
    # Where a run started with --continue-from began (checkpoint, its step and tokens), for its summary.
    continued_from: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "tokens": self.tokens, "skipped": self.skipped,
                "initial_eval": vars(self.initial_eval) if self.initial_eval else None,
                "segments": self.segments, "seconds": self.seconds, "timed_tokens": self.timed_tokens,
                "steady_seconds": self.steady_seconds, "steady_tokens": self.steady_tokens,
                "continued_from": self.continued_from}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.tokens, self.skipped = state["step"], state["tokens"], state["skipped"]
        self.initial_eval = EvalResult(**state["initial_eval"]) if state.get("initial_eval") else None
        # Checkpoints from before the segments were timed: the summary covers the segments from here.
        self.segments, self.seconds = state.get("segments", 0), state.get("seconds", 0.0)
        self.timed_tokens = state.get("timed_tokens", 0)
        self.steady_seconds, self.steady_tokens = state.get("steady_seconds", 0.0), state.get("steady_tokens", 0)
        self.continued_from = state.get("continued_from")

    def add_time(self, seconds: float, tokens: int, steady: bool) -> None:
        self.seconds, self.timed_tokens = self.seconds + seconds, self.timed_tokens + tokens
        if steady:
            self.steady_seconds, self.steady_tokens = self.steady_seconds + seconds, self.steady_tokens + tokens

    def throughput(self) -> dict[str, Any]:
        """tokens/s over every segment's steady steps (each process's first steps left out), or over all
        timed steps when none was steady; the wall time of every segment's steps."""
        rate = (self.steady_tokens / self.steady_seconds if self.steady_seconds > 0
                else self.timed_tokens / max(self.seconds, 1e-9))
        return {"tokens_per_second": rate, "wall_seconds": self.seconds, "segments": self.segments}


# A process's first training steps are left out of tokens/s: they pay one-time costs (CUDA and
# cuBLAS set-up, the allocator growing, a projection method's first SVDs) that differ by method.
WARMUP_STEPS = 3


@dataclass
class Throughput:
    """Seconds and tokens of this process's training steps only (not evaluation or checkpoint
    writing): all of them (`seconds`: the wall time), and the steady state after the first `warmup`,
    whole and in the window since the last logged step."""

    warmup: int = WARMUP_STEPS
    steps: int = 0
    seconds: float = 0.0
    tokens: int = 0
    first_step: int = 0  # the first step this process timed, and the last
    last_step: int = 0
    steady_seconds: float = 0.0
    steady_tokens: int = 0
    window_seconds: float = 0.0
    window_tokens: int = 0
    first_step_seconds: float = 0.0  # this process's first step: with --compile, mostly compilation

    def add(self, step: int, seconds: float, tokens: int) -> None:
        self.first_step_seconds = self.first_step_seconds or seconds
        self.steps, self.seconds, self.tokens, self.last_step = self.steps + 1, self.seconds + seconds, self.tokens + tokens, step
        self.first_step = self.first_step or step
        if self.steps > self.warmup:
            self.steady_seconds, self.steady_tokens = self.steady_seconds + seconds, self.steady_tokens + tokens
            self.window_seconds, self.window_tokens = self.window_seconds + seconds, self.window_tokens + tokens

    def take_window_rate(self) -> float | None:
        """Tokens per second over the window's steady steps (None: warm-up steps only), which starts again."""
        rate = self.window_tokens / self.window_seconds if self.window_seconds > 0 else None
        self.window_seconds, self.window_tokens = 0.0, 0
        return rate

    def summary(self) -> dict[str, Any]:
        """tokens/s of the steady steps, the steps it covers ([first, last]) and how many warm-up steps
        it leaves out (0, every step, when there were no more than `warmup`); the wall time of every step."""
        if self.steady_seconds > 0:
            rate, first, left_out = self.steady_tokens / self.steady_seconds, self.first_step + self.warmup, self.warmup
        else:
            rate, first, left_out = self.tokens / max(self.seconds, 1e-9), self.first_step, 0
        return {"tokens_per_second": rate, "tokens_per_second_steps": [first, self.last_step],
                "warmup_steps_excluded": left_out, "wall_seconds": self.seconds,
                "first_step_seconds": self.first_step_seconds}


def micro_batches_per_step(config: RunConfig, info: DistInfo) -> int:
    """Gradient accumulation: micro-batches per rank per optimizer step (ConfigError if it is not whole)."""
    per_step = config.train.micro_batch_size * info.world_size
    if config.train.batch_size % per_step:
        raise ConfigError(
            f"global batch {config.train.batch_size} is not divisible by micro-batch {config.train.micro_batch_size} x "
            f"{info.world_size} process(es) = {per_step}; choose --batch-size a multiple of {per_step}"
        )
    return config.train.batch_size // per_step


def check_gradient_release(config: RunConfig, info: DistInfo) -> None:
    """Refuse, before anything trains, what the update inside backward (lowmem.train.step.InBackward)
    cannot do: ConfigError naming the setting and the fix. Nothing to check without it."""
    if not config.train.gradient_release:
        return
    from lowmem import optim
    from lowmem.interventions import build_intervention

    t, off = config.train, "or train without --gradient-release"
    if info.enabled:
        raise ConfigError(
            "--gradient-release runs in one process: under DDP the gradients are all-reduced in buckets after each "
            "parameter's hook has fired, and FSDP2 assigns its sharded gradients after its reduce-scatter, so the "
            f"update inside backward would see a local gradient or none; run it without torchrun, {off}")
    if t.batch_size != t.micro_batch_size:
        raise ConfigError(
            f"--gradient-release needs the step's whole gradient from one backward, but batch {t.batch_size} is "
            f"accumulated over micro-batches of {t.micro_batch_size}; set --micro-batch-size {t.batch_size} (or "
            f"--batch-size {t.micro_batch_size}), {off}")
    if t.clip_grad_norm > 0:
        raise ConfigError(
            "--gradient-release cannot clip the global gradient norm: the norm needs every gradient before any "
            f"update, and each update runs as its gradient completes; set --clip-grad-norm 0, {off}")
    if not getattr(optim.method(config.optim.name).load(), "updates_per_parameter", False):
        able = [name for name in optim.available() if getattr(optim.method(name).load(), "updates_per_parameter", False)]
        raise ConfigError(
            f"optimizer {config.optim.name!r} does not declare that a parameter's update needs that parameter's "
            f"gradient alone (updates_per_parameter), so it cannot update inside backward; choose one of "
            f"{', '.join(able)}, {off}")
    for spec in config.optim.interventions:
        intervention = build_intervention(spec["name"], **{k: v for k, v in spec.items() if k != "name"})
        if getattr(intervention, "reads_gradients", lambda: True)():
            raise ConfigError(
                f"intervention {spec['name']!r} reads the step's gradients before the update (its before_step), "
                f"and under --gradient-release each gradient is applied and freed as backward goes; drop it, {off}")


def first_nonfinite(run: Run) -> str | None:
    """The name of the first weight or optimizer-state tensor (this process's shard) holding NaN/inf."""
    for name, param in run.core.named_parameters():
        local = local_tensor(param.detach())
        if local.is_floating_point() and not bool(torch.isfinite(local).all()):
            return f"weight {name}"
    names = {id(p): n for n, p in run.core.named_parameters()}
    for param, state in run.optimizer.state.items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and value.is_floating_point() and value.numel():
                local = local_tensor(value)
                if local.device.type != "meta" and not bool(torch.isfinite(local).all()):
                    return f"optimizer state {key!r} of {names.get(id(param), 'a parameter')}"
    return None


def _memory_snapshot(run: Run) -> dict[str, Any]:
    from lowmem.memory.measure import snapshot

    return snapshot(run.core, run.optimizer)


def _memory_estimate(config: RunConfig, vocab_size: int, hparams: dict[str, Any], accumulation: int) -> dict[str, Any]:
    from lowmem.memory.estimate import estimate_memory

    est = estimate_memory(config.model, config.optim.name, hparams, vocab_size=vocab_size,
                          batch_size=config.train.micro_batch_size, seq_len=config.data.seq_len,
                          precision=config.train.precision, structure=config.structure,
                          activation_checkpointing=config.train.activation_checkpointing,
                          chunked_loss=config.train.chunked_loss, loss_chunk=config.train.loss_chunk,
                          gradient_release=config.train.gradient_release, accumulation=accumulation)
    return {"estimate_paper_gb": est.paper_gb, "estimate_total_bytes": est.total,
            "estimate_optimizer_state_bytes": est.optimizer_states, "estimate_gradient_bytes": est.gradients}


class Trainer:
    """One run: its config, processes (`info`), directory, assembled parts (`run`), data, progress,
    checkpoint components, metrics log and progress bar. Built from the config; `start()` resumes
    from the run directory's checkpoint if there is one; then `step()`, `maybe_evaluate()`,
    `maybe_checkpoint()` until `done`, and `finish()` (or `stop_early()` on a signal). A context
    manager: leaving it stops the data loader's prefetch thread."""

    def __init__(self, config: RunConfig, info: DistInfo, run_dir: RunDirectory, stop: StopRequest | None = None,
                 continued: dict[str, Any] | None = None) -> None:
        self.config, self.info, self.stop = config, info, stop
        self.run_dir, self._resume_body = run_dir.path, run_dir.resume_body
        # A new run continuing another's checkpoint (lowmem.train.continued); a resume has its own.
        self._continue_body = continued if self._resume_body is None else None
        t, d = config.train, config.data
        self.accumulation = micro_batches_per_step(config, info)
        check_gradient_release(config, info)
        torch.manual_seed(t.seed)
        source = lowmem_data.open_source(d.source, "train", d.text_field)
        val_source = lowmem_data.open_source(d.source, "validation", d.text_field)
        tokenizer = lowmem_data.load_tokenizer(d.tokenizer, source, vocab_size=d.vocab_size, cache_dir=d.cache_dir)
        self.run = assemble(config, vocab_size=tokenizer.vocab_size, info=info,
                            init_weights=self._resume_body is None and self._continue_body is None)
        self.n_params = count_parameters(self.run.core)
        self.val_batches = lowmem_data.validation_batches(val_source, tokenizer, d.seq_len, t.micro_batch_size,
                                                          t.eval_tokens, mode=d.seq_mode)
        self.autocast = autocast(t.precision, info.device)
        self.update = (InBackward(self.run.optimizer, self.run.core) if t.gradient_release
                       else AfterBackward(self.run.optimizer, t.clip_grad_norm))
        self.progress, self.throughput, self.gradient_bytes = Progress(), Throughput(), 0
        self.finished_before = False
        self.metrics: MetricsLog | None = None
        self.bar, self.last_checkpoint = None, None
        # Last: the loader starts a prefetch thread, which close() stops.
        self.loader = lowmem_data.TokenLoader(source, tokenizer, d.seq_len, t.micro_batch_size, mode=d.seq_mode,
                                              seed=t.seed, rank=info.rank, world_size=info.world_size)
        self.batches = DeviceBatches(self.loader, self.accumulation, info.device)
        self.components = self._components()

    def _components(self) -> dict[str, checkpoint.Stateful]:
        """What a checkpoint holds, by name (lowmem.train.checkpoint.components_state)."""
        components: dict[str, checkpoint.Stateful] = {
            "progress": self.progress, "model": checkpoint.ModelComponent(self.run.model),
            "optimizer": checkpoint.OptimizerComponent(self.run.optimizer), "loader": self.batches,
            "interventions": checkpoint.NamedComponents(self.run.interventions), "rng": checkpoint.RngComponent(),
        }
        if self.run.structure is not None:
            components["structure"] = self.run.structure
        return components

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.loader.close()  # its prefetch thread would otherwise outlive an in-process run

    @property
    def done(self) -> bool:
        return self.progress.step >= self.config.train.steps

    def train(self) -> dict[str, Any]:
        """The whole run: start, steps with their evaluations and checkpoints, finish (or stop on a signal)."""
        self.start()
        if self.finished_before:
            return self.already_finished()
        while not self.done:
            self.step()
            self.maybe_evaluate()
            self.maybe_checkpoint()
            if self.stop_requested():
                return self.stop_early()
        return self.finish()

    def start(self) -> None:
        """Resume the components from the checkpoint (if any), open the metrics, evaluate the start."""
        t = self.config.train
        resume_step = None
        if self._resume_body is not None:
            checkpoint.load_components(self.components, self._resume_body)
            resume_step, self._resume_body = self.progress.step, None
            # Nothing to train and the run was written whole: its directory stays as it is. A run stopped
            # after its last checkpoint but before its summary (SIGTERM during the final evaluation)
            # goes on to finish().
            if self.done and (self.run_dir / "summary.json").exists():
                self.finished_before = True
                return
        elif self._continue_body is not None:
            load_continued(self.components, self._continue_body)
            self.progress.continued_from = continued_from(self._continue_body)
            if self.info.is_main:
                print(describe(self._continue_body))
            self._continue_body = None
        self.progress.segments += 1
        if self.info.is_main:
            sinks = open_sinks(t.log_to, self.run_dir, self.config.to_dict(), resume_step)
            self.metrics = MetricsLog(self.run_dir / "metrics.jsonl", resume_step=resume_step, sinks=sinks)
        existing = checkpoint.list_checkpoints(self.run_dir)
        self.last_checkpoint = existing[-1] if existing else None
        if self.progress.initial_eval is None:
            self.progress.initial_eval = self._evaluate_and_log()
        if self.info.is_main and t.progress:
            # A bar redrawn in place on a terminal; one plain line per log interval in a log file.
            self.bar = progress_bar(total=t.steps, initial=self.progress.step, desc=self.config.optim.name, unit="step")
        self.run.model.train()
        # The peak from here on is the training's, not the model's loading or the resume's.
        reset_peak_memory()

    def step(self) -> StepResult:
        """One optimizer step, its interventions' hooks, and its log line at the log interval."""
        t, run = self.config.train, self.run
        started, step = time.perf_counter(), self.progress.step + 1
        factor = self._set_lr(step)
        try:
            result = train_step(run.model, self.update, next(self.batches), info=self.info, autocast=self.autocast,
                                before_update=self._before_update, distributed=t.distributed,
                                while_computing=self.batches.read_ahead)
        except NonFiniteGradient as err:  # under release the update already ran: stop, naming where to resume
            raise TrainingStopped(f"step {step}: {err}; {self._last_good_checkpoint()}") from None
        if not result.updated:
            self._skip_nonfinite(result.loss, step)
        log_now = step % t.log_every == 0 or step == t.steps
        # Measured while gradients still exist, so gradient bytes are real, not zero.
        memory = _memory_snapshot(run) if log_now else {}
        self.gradient_bytes = memory.get("gradient_bytes", self.gradient_bytes)
        run.optimizer.zero_grad(set_to_none=True)
        self.progress.step, self.progress.tokens = step, self.progress.tokens + result.targets
        for intervention in run.interventions:
            intervention.after_step(step, run.core, run.optimizer)
        seconds = time.perf_counter() - started
        self.throughput.add(step, seconds, result.targets)
        self.progress.add_time(seconds, result.targets, steady=self.throughput.steps > self.throughput.warmup)
        if log_now:
            self._log_step(result, factor * run.optimizer.param_groups[0]["initial_lr"], memory)
        if self.bar:
            self.bar.update(1)
        return result

    def maybe_evaluate(self) -> None:
        """Evaluate every train.eval_every steps (the last step's evaluation is finish()'s)."""
        t, step = self.config.train, self.progress.step
        if t.eval_every and step % t.eval_every == 0 and step < t.steps:
            self._evaluate_and_log()

    def maybe_checkpoint(self) -> None:
        """Checkpoint every train.checkpoint_every steps (the last step's checkpoint is finish()'s)."""
        t, step = self.config.train, self.progress.step
        if t.checkpoint_every and step % t.checkpoint_every == 0 and step < t.steps:
            self.save_checkpoint()

    def stop_requested(self) -> bool:
        """Whether a signal reached any rank before the last step (a collective: every rank calls it)."""
        signalled = self.stop is not None and self.stop.signal_name is not None
        return any_rank(signalled, self.info) and not self.done

    def stop_early(self) -> dict[str, Any]:
        """Save, close the logs and say how to continue."""
        self.save_checkpoint()
        if self.bar:
            self.bar.close()
        if self.metrics:
            self.metrics.close()
        if self.info.is_main:
            signal_name = (self.stop and self.stop.signal_name) or "stop signal"
            print(f"{signal_name} received: stopped after step {self.progress.step}; checkpoint saved "
                  f"to {self.last_checkpoint}. Continue with: lowmem train --resume {self.run_dir}")
        return {"stopped": True, "step": self.progress.step, "checkpoint": str(self.last_checkpoint)}

    def already_finished(self) -> dict[str, Any]:
        """A resumed run that had already finished: say so, and return its summary unchanged."""
        summary_path = self.run_dir / "summary.json"
        summary = json.loads(summary_path.read_text()) if summary_path.exists() else {"step": self.progress.step}
        if self.info.is_main:
            print(f"{self.run_dir} is finished: it trained all {self.config.train.steps} steps, so nothing was "
                  "changed (its summary.json stands). A longer run needs its own schedule: continue it as a new run "
                  f"with lowmem train --continue-from {self.run_dir} --steps N --output-dir NEW_DIR")
        return summary

    def finish(self) -> dict[str, Any]:
        """The final checkpoint, then the final evaluation, summary.json, loss.png and the table."""
        if self.bar:
            self.bar.close()
        # The checkpoint first: a signal from here on is only noted, and the trained steps are safe
        # whatever happens during the evaluation.
        self.save_checkpoint()
        final = evaluate(self.run.model, self.val_batches, self.info.device, self.autocast, self.info)
        summary = self._summary(final)
        if self.info.is_main:
            self._log_eval(final)
            self.metrics.close()
            write_json(self.run_dir / "summary.json", summary)
            plot_loss_curve(self.run_dir / "metrics.jsonl", self.run_dir / "loss.png",
                            f"{self.config.model} + {self.config.optim.name}")
            print(summary_table(summary))
            print(f"run directory: {self.run_dir}")
            if self.stop is not None and self.stop.signal_name:
                print(f"{self.stop.signal_name} received after the last step; the run was finished and written first")
        return summary

    def _last_good_checkpoint(self) -> str:
        """Where a stopped run resumes from, for its message."""
        return (f"the last good checkpoint is {self.last_checkpoint}" if self.last_checkpoint
                else "no checkpoint was saved yet")

    def save_checkpoint(self) -> Path:
        """Write the components' state at the current step; never when a weight or state is non-finite."""
        # Checked before anything is written, so no checkpoint with NaN/inf weights is ever called good.
        bad = first_nonfinite(self.run)
        if any_rank(bad is not None, self.info):
            raise TrainingStopped(
                f"non-finite values in {bad or 'the weights or optimizer state of another process'} after step "
                f"{self.progress.step}; no checkpoint was written for it, {self._last_good_checkpoint()}. Lower the learning rate "
                "(or clip gradients with --clip-grad-norm) and resume from that checkpoint"
            )
        info = self.info
        checkpoint.check_replicated_state_agrees(self.run.optimizer)
        payload = {**checkpoint.components_state(self.components), "config": self.config.to_dict()}
        self.last_checkpoint = checkpoint.save(
            self.run_dir, self.progress.step, payload, info.rank, info.world_size, self.config.train.keep_checkpoints,
            any_failed=partial(any_rank, info=info) if info.enabled else None)
        return self.last_checkpoint

    def _set_lr(self, step: int) -> float:
        """Set every group's lr for optimizer step `step` (1-based); return the factor on initial_lr."""
        t = self.config.train
        factor = lr_factor(step - 1, t.steps, t.warmup_ratio, t.min_lr_ratio, t.schedule, t.decay_ratio)
        for intervention in self.run.interventions:
            factor *= intervention.lr_factor(step)
        for group in self.run.optimizer.param_groups:
            group["lr"] = group["initial_lr"] * factor
        return factor

    def _before_update(self) -> None:
        """The interventions' hook with the step's gradients alive (train_step calls it before the update;
        inside backward, after it, where only interventions that read no gradients are allowed)."""
        for intervention in self.run.interventions:
            intervention.before_step(self.progress.step + 1, self.run.core, self.run.optimizer)

    def _skip_nonfinite(self, loss: float, step: int) -> None:
        # Inside backward a finite loss can meet a non-finite gradient, which stops the step's updates.
        bad_gradient = getattr(self.update, "nonfinite", None)
        what = f"non-finite gradient of {bad_gradient}" if bad_gradient else f"non-finite loss ({loss})"
        self.progress.skipped += 1
        allowed = self.config.train.skip_nonfinite
        if self.progress.skipped > allowed:
            raise TrainingStopped(
                f"{what} at step {step}; {self._last_good_checkpoint()}. Lower the learning rate or "
                "resume from that checkpoint; --skip-nonfinite K skips up to K such steps"
            )
        if self.info.is_main:
            print(f"warning: {what} at step {step}, update skipped ({self.progress.skipped}/{allowed})")

    def _log_step(self, result: StepResult, lr: float, memory: dict[str, Any]) -> None:
        record = {"step": self.progress.step, "tokens": self.progress.tokens, "loss": result.loss, "lr": lr,
                  "tokens_per_second": self.throughput.take_window_rate(), **memory}
        if self.metrics:
            self.metrics.write(record)
        if self.bar:
            rate = record["tokens_per_second"]
            self.bar.set_postfix(loss=f"{result.loss:.3f}", lr=f"{lr:.2e}", tok_s="warm-up" if rate is None else f"{rate:,.0f}")

    def _evaluate_and_log(self) -> EvalResult:
        result = evaluate(self.run.model, self.val_batches, self.info.device, self.autocast, self.info)
        self._log_eval(result)
        return result

    def _log_eval(self, result: EvalResult) -> None:
        if self.metrics:
            self.metrics.write({"step": self.progress.step, "tokens": self.progress.tokens, "val_loss": result.loss,
                                "val_perplexity": result.perplexity})

    def _gradient_release(self) -> dict[str, Any]:
        """Under release the gradients at a log step are gone (0 bytes): what counts is the most held at
        once inside backward, measured by the update (the estimate's `estimate_gradient_bytes` beside it)."""
        if not isinstance(self.update, InBackward):
            return {"gradient_release": False}
        return {"gradient_release": True, "gradient_high_water_bytes": self.update.gradient_peak}

    def _summary(self, final: EvalResult) -> dict[str, Any]:
        config, run, progress = self.config, self.run, self.progress
        return {
            "model": config.model, "optimizer": config.optim.name, "data": config.data.source,
            "structure": config.structure, "parameters": self.n_params,
            "trainable_parameters": sum(p.numel() for p in run.core.parameters() if p.requires_grad),
            "vocab_size": run.core.config.vocab_size,
            "steps": progress.step, "tokens": progress.tokens,
            "val_loss": final.loss, "val_perplexity": final.perplexity,
            "val_legacy_perplexity": final.legacy_perplexity if config.train.legacy_perplexity else None,
            "val_tokens": final.tokens, "initial_val_perplexity": progress.initial_eval.perplexity,
            **self.throughput.summary(), **progress.throughput(),
            "skipped_steps": progress.skipped, "checkpoint": str(self.last_checkpoint), "compiled": config.train.compile,
            "continued_from": progress.continued_from,
            "memory": {**_memory_snapshot(run), "gradient_bytes": self.gradient_bytes, **self._gradient_release(),
                       **_memory_estimate(config, run.core.config.vocab_size, run.hparams, self.accumulation)},
        }


def train(config: RunConfig, resume: str | Path | None = None) -> dict[str, Any]:
    """Train per `config`; return the summary (also written to <output_dir>/summary.json)."""
    config.validate()
    # Held for the whole run, so a signal after the last step (final checkpoint, evaluation,
    # summary) is noted instead of killing the process before the run is written.
    with StopRequest() as stop:
        info = init_distributed(config.train.device)
        try:
            summary = _train(config, info, resume, stop)
        except BaseException:
            shutdown(info, clean=False)
            raise
        shutdown(info)
    return summary


def _train(config: RunConfig, info: DistInfo, resume: str | Path | None, stop: StopRequest) -> dict[str, Any]:
    # Settings refused before the run directory is claimed, so a refused run leaves nothing behind.
    config = init_from_tokenizer(config)
    micro_batches_per_step(config, info)
    check_gradient_release(config, info)
    check_sinks(config.train.log_to)
    continued = continue_body(config, info) if resume is None else None
    with open_run_dir(config, info, resume) as run_dir, Trainer(config, info, run_dir, stop, continued) as trainer:
        return trainer.train()
