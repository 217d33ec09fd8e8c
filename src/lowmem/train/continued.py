"""A new run that continues another's training: `lowmem train --continue-from CHECKPOINT`.

A finished run cannot be made longer by `--resume --steps N`: its cosine depends on the total, so the
steps already taken would have had other learning rates. Continuing is a new run, in its own
directory, with its own steps and schedule, that starts from a checkpoint's

    weights and structure      the model as it was (masks, factors, indices included)
    optimizer state            moments, counters, projectors: no cold start
    data position              the next sequence after the last one the checkpoint's run trained on
    RNG                        so the continuation draws what the first run would have drawn

while its step count, schedule, evaluations, interventions and summary start afresh (the summary
names the checkpoint it continued). The optimizer keeps the new run's hyperparameters (its lr,
betas, weight decay), so a continuation may train at another learning rate.

What must match, because the state would not fit or the data position would mean something else, is
the model, structure, data, optimizer and its hyperparameters that shape the state (`optim.hparams`),
seed, precision and the number of processes; a difference is refused before anything is written,
naming it. For a schedule that extends without rewriting the past, train the first run with
`--schedule wsd` and continue from a checkpoint of its stable phase with `--warmup-ratio 0`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lowmem.config import RunConfig, results_affecting_differences
from lowmem.distributed import DistInfo
from lowmem.errors import CheckpointError, ConfigError
from lowmem.train import checkpoint

# Settings under which the checkpoint's state means the same thing in the new run (prefixes of the
# flattened config, see lowmem.config.results_affecting_differences).
MUST_MATCH = ("model", "structure", "data.", "optim.name", "optim.hparams", "train.seed", "train.precision")
# The components a continuation takes from the checkpoint; progress and interventions start afresh.
CONTINUED_COMPONENTS = ("model", "structure", "optimizer", "loader", "rng")


def continue_body(config: RunConfig, info: DistInfo) -> dict[str, Any] | None:
    """This rank's part of `train.continue_from`'s checkpoint (None when the run does not continue one),
    after refusing what cannot continue: ConfigError/CheckpointError naming the setting and the fix."""
    source = config.train.continue_from
    if source is None:
        return None
    if config.train.init_from:
        raise ConfigError(
            f"--continue-from {source} and --init-from {config.train.init_from} both set the starting weights; "
            "keep one (--continue-from also brings the optimizer state and the data position)")
    step_directory = checkpoint.resolve(source)
    body = checkpoint.load(step_directory, info.rank, info.world_size)
    differences = [line for line in results_affecting_differences(body["config"], config.to_dict())
                   if line.startswith(MUST_MATCH)]
    if differences:
        raise ConfigError(
            f"cannot continue from {step_directory}: these settings differ from its run's, so its weights, "
            "optimizer state or data position would not fit:\n  " + "\n  ".join(differences)
            + "\nuse the checkpoint run's values for them (steps, schedule, lr, batch size and evaluation may differ)")
    return body | {"continued_from": {"checkpoint": str(step_directory), "step": body["step"],
                                      "tokens": body["tokens"]}}


def load_continued(components: dict[str, checkpoint.Stateful], body: dict[str, Any]) -> None:
    """Give the continued components their checkpoint state; the optimizer keeps its own hyperparameters."""
    body = checkpoint.with_tensors(components, body)
    for name in CONTINUED_COMPONENTS:
        if name not in components:
            continue
        if name not in body:
            raise CheckpointError(f"the checkpoint holds no {name!r} state, which a continued run takes from it; "
                                  "continue from a checkpoint of a run with the same settings")
        if name == "optimizer":
            _load_optimizer_keeping_hyperparameters(components[name], body[name])
        else:
            components[name].load_state_dict(body[name])


def _load_optimizer_keeping_hyperparameters(component: checkpoint.OptimizerComponent, saved: dict[str, Any]) -> None:
    # torch's load_state_dict also restores every group's hyperparameters (lr, initial_lr, betas); the
    # continuation trains with its own config's, and only the per-parameter state carries over.
    optimizer = component.optimizer
    own = [{key: value for key, value in group.items() if key != "params"} for group in optimizer.param_groups]
    component.load_state_dict(saved)
    for group, settings in zip(optimizer.param_groups, own):
        group.update(settings)


def continued_from(body: dict[str, Any] | None) -> dict[str, Any] | None:
    """The summary's record of where a continued run started (None for any other run)."""
    return None if body is None else body["continued_from"]


def describe(body: dict[str, Any]) -> str:
    origin = body["continued_from"]
    return (f"continuing from {Path(origin['checkpoint'])} (step {origin['step']}, {origin['tokens']:,} tokens "
            "trained): weights, optimizer state, data position and RNG")
