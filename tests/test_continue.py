"""`lowmem train --continue-from`: a new run, with its own steps and schedule, that starts from another
run's checkpoint (weights, optimizer state, data position, RNG). The way a finished run trains longer
(issue 30); `--resume --steps N` stays refused."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import tiny_run_overrides

from lowmem.config import load_config
from lowmem.errors import CheckpointError, ConfigError
from lowmem.train.trainer import train

# A constant lr (warmup-stable-decay with no warmup and no decay), so a continuation that trains the
# steps 11-20 of a 20-step run sees their learning rates exactly.
CONSTANT_LR = {"train.schedule": "wsd", "train.warmup_ratio": 0.0, "train.decay_ratio": 0.0}


def _losses(run_dir) -> list[float]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [record["loss"] for record in lines if "loss" in record]


def _run(tiny_corpus, token_cache, output, **extra) -> dict:
    return train(load_config(overrides=tiny_run_overrides(tiny_corpus, token_cache, output, **extra)))


@pytest.fixture
def first_run(tiny_corpus, token_cache, tmp_path):
    """A 20-step AdamW run with a checkpoint at step 10, and its losses."""
    run_dir = tmp_path / "first"
    _run(tiny_corpus, token_cache, run_dir, **CONSTANT_LR, **{
        "train.steps": 20, "train.checkpoint_every": 10, "train.keep_checkpoints": 2})
    return run_dir


def test_a_continuation_trains_the_steps_the_first_run_would_have_trained(first_run, tiny_corpus, token_cache, tmp_path):
    continued = tmp_path / "continued"
    summary = _run(tiny_corpus, token_cache, continued, **CONSTANT_LR, **{
        "train.steps": 10, "train.continue_from": str(first_run / "checkpoints" / "step-00000010")})
    # Weights, Adam's moments and step counts, the data position and the RNG all carried over: the
    # same losses, bit for bit, as the uninterrupted run's steps 11-20.
    assert _losses(continued) == _losses(first_run)[10:20]
    assert summary["steps"] == 10
    assert summary["continued_from"]["step"] == 10
    assert summary["continued_from"]["checkpoint"].endswith("step-00000010")


def test_a_continuation_trains_with_its_own_lr_and_schedule(first_run, tiny_corpus, token_cache, tmp_path):
    continued = tmp_path / "continued"
    _run(tiny_corpus, token_cache, continued, **{
        "train.steps": 8, "train.warmup_ratio": 0.25, "optim.lr": 1e-3, "train.continue_from": str(first_run)})
    records = [json.loads(line) for line in (continued / "metrics.jsonl").read_text().splitlines()]
    lrs = [record["lr"] for record in records if "lr" in record]
    # Its own warmup (2 of 8 steps) up to its own lr, then its own cosine: not the checkpoint's 3e-3.
    assert lrs[0] == pytest.approx(0.5e-3) and lrs[1] == pytest.approx(1e-3) and lrs[-1] < 1e-3
    # From the newest checkpoint (step 20): the first loss is near where the first run ended.
    assert _losses(continued)[0] < _losses(first_run)[0]


def test_a_resumed_continuation_keeps_where_it_started(first_run, tiny_corpus, token_cache, tmp_path):
    continued = tmp_path / "continued"
    overrides = {**CONSTANT_LR, "train.steps": 10, "train.checkpoint_every": 5,
                 "train.continue_from": str(first_run / "checkpoints" / "step-00000010")}
    _run(tiny_corpus, token_cache, continued, **overrides)
    whole = _losses(continued)
    # Resume the continuation from its own step-5 checkpoint: it resumes, not continues again.
    shutil.rmtree(continued / "checkpoints" / "step-00000010")
    (continued / "summary.json").unlink()
    resumed = train(load_config(overrides=tiny_run_overrides(tiny_corpus, token_cache, continued, **overrides)),
                    resume=continued)
    assert resumed["continued_from"]["step"] == 10
    assert _losses(continued)[-5:] == whole[-5:]


def test_a_continuation_refuses_a_model_or_seed_the_checkpoint_does_not_fit(first_run, tiny_corpus, token_cache, tmp_path):
    with pytest.raises(ConfigError) as refused:
        _run(tiny_corpus, token_cache, tmp_path / "other", **{
            "train.steps": 4, "train.seed": 7, "optim.name": "scale", "train.continue_from": str(first_run)})
    message = str(refused.value)
    assert "optim.name: 'adamw' -> 'scale'" in message and "train.seed: 42 -> 7" in message
    assert not (tmp_path / "other").exists()  # refused before the run directory was claimed


def test_a_continuation_refuses_init_from_too(first_run, tiny_corpus, token_cache, tmp_path):
    with pytest.raises(ConfigError, match="keep one"):
        _run(tiny_corpus, token_cache, tmp_path / "other", **{
            "train.continue_from": str(first_run), "train.init_from": str(tmp_path)})


def test_a_continuation_from_nothing_names_the_path(tiny_corpus, token_cache, tmp_path):
    with pytest.raises(CheckpointError, match="neither a run directory with checkpoints nor a checkpoint"):
        _run(tiny_corpus, token_cache, tmp_path / "other", **{"train.continue_from": str(tmp_path / "missing")})


def test_resume_with_more_steps_is_refused_and_points_to_continue_from(first_run, tiny_corpus, token_cache):
    overrides = tiny_run_overrides(tiny_corpus, token_cache, first_run, **CONSTANT_LR, **{
        "train.steps": 30, "train.checkpoint_every": 10, "train.keep_checkpoints": 2})
    with pytest.raises(CheckpointError) as refused:
        train(load_config(overrides=overrides), resume=first_run)
    assert "train.steps: 20 -> 30" in str(refused.value) and f"--continue-from {first_run}" in str(refused.value)
