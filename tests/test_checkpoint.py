"""Checkpoints resume exactly, load with weights_only=True, and failures lose nothing."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import lowmem.optim
from lowmem.config import load_config
from lowmem.errors import CheckpointError, ConfigError
from lowmem.models import LlamaConfig, build_model
from lowmem.train import checkpoint
from lowmem.train import loop, step
from lowmem.train.loop import TrainingStopped, train

from conftest import tiny_run_overrides

# Small ranks and gaps so projection refreshes, resets and the like happen inside a 24-step run.
TEST_HPARAMS = {
    "galore": {"rank": 8, "update_proj_gap": 5},
    "fira": {"rank": 8, "update_proj_gap": 5},
    "apollo": {"rank": 8, "update_proj_gap": 5},
    "apollo-mini": {"update_proj_gap": 5},
    "stable-spam": {"update_gap": 7},
}
STEPS = 24


def _losses(run_dir: Path) -> dict[int, float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


def _write_config(path: Path, overrides: dict) -> Path:
    config = load_config(overrides=overrides)
    path.write_text(yaml.safe_dump(config.to_dict()))
    return path


def _lowmem(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "lowmem.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


# The child runs the real CLI and sends itself `sig` during the forward pass of training step
# `at_step`, so the stop lands on exactly that step however fast the machine is.
_SIGNAL_AT_STEP = """
import os, signal, sys
from lowmem import cli
from lowmem.train import loop, step
at_step, sig, real, calls = int(sys.argv[1]), int(sys.argv[2]), step.model_loss_sum, [0]
def counting(*args):
    calls[0] += 1
    if calls[0] == at_step:
        os.kill(os.getpid(), sig)
    return real(*args)
step.model_loss_sum = counting
sys.exit(cli.main(sys.argv[3:]))
"""


def _stop_midway(config_path: Path, run_dir: Path, at_step: int, sig=signal.SIGTERM) -> tuple[int, str]:
    """Run training in a subprocess that receives `sig` during step `at_step`; return (exit code, stdout)."""
    proc = subprocess.run([sys.executable, "-c", _SIGNAL_AT_STEP, str(at_step), str(int(sig)),
                           "train", "--config", str(config_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.returncode, proc.stdout


@pytest.mark.parametrize("name", lowmem.optim.available())
def test_stopped_and_resumed_run_logs_bitwise_identical_losses(name, tiny_corpus, token_cache, tmp_path):
    hparams = TEST_HPARAMS.get(name, {})
    common = {"train.steps": STEPS, "optim.name": name, "optim.hparams": hparams, "optim.lr": None}
    whole_dir, split_dir = tmp_path / "whole", tmp_path / "split"
    whole_cfg = _write_config(tmp_path / "whole.yaml", tiny_run_overrides(tiny_corpus, token_cache, whole_dir, **common))
    split_cfg = _write_config(tmp_path / "split.yaml", tiny_run_overrides(tiny_corpus, token_cache, split_dir, **common))

    whole = _lowmem("train", "--config", str(whole_cfg))
    _, out = _stop_midway(split_cfg, split_dir, at_step=STEPS // 2)
    assert whole.wait(timeout=300) == 0, whole.stderr.read()
    assert "checkpoint saved" in out
    assert max(_losses(split_dir)) == STEPS // 2  # stopped after finishing the step it was signalled in

    resumed = _lowmem("train", "--resume", str(split_dir))
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    expected, got = _losses(whole_dir), _losses(split_dir)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert got == expected  # bitwise: floats compared exactly
    whole_summary = json.loads((whole_dir / "summary.json").read_text())
    split_summary = json.loads((split_dir / "summary.json").read_text())
    assert split_summary["val_perplexity"] == whole_summary["val_perplexity"]


@pytest.mark.parametrize("mode,micro", [("pad", 2), ("pack", 4), ("pack", 2)])
def test_exact_resume_in_both_sequence_modes_and_with_accumulation(mode, micro, tiny_corpus, token_cache, tmp_path):
    common = {"train.steps": 10, "data.seq_mode": mode, "train.micro_batch_size": micro}
    whole = train(load_config(overrides=tiny_run_overrides(tiny_corpus, token_cache, tmp_path / "whole", **common)))
    first = load_config(overrides=tiny_run_overrides(tiny_corpus, token_cache, tmp_path / "split",
                                                     **common, **{"train.checkpoint_every": 4, "train.keep_checkpoints": 5}))
    # A run of 10 steps checkpoints at 4 and 8; resuming from step 4 must reproduce steps 5..10 exactly.
    train(first)
    step4 = checkpoint.step_dir(tmp_path / "split", 4)
    assert step4.exists()
    resumed = train(first, resume=step4)
    assert _losses(tmp_path / "split") == _losses(tmp_path / "whole")
    assert resumed["val_perplexity"] == whole["val_perplexity"]


@pytest.mark.parametrize("name", lowmem.optim.available())
def test_every_optimizer_state_dict_loads_with_weights_only(name):
    torch.manual_seed(0)
    model = build_model(LlamaConfig(64, 160, 4, 2, vocab_size=96, max_seq_len=32))
    optimizer = lowmem.optim.build(name, model, **TEST_HPARAMS.get(name, {}))
    for _ in range(3):
        logits = model(torch.randint(0, 96, (2, 16)))
        logits.float().pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    assert len(loaded["state"]) == len(optimizer.state_dict()["state"]) > 0


def test_sigint_also_saves_and_exits_cleanly(tiny_corpus, token_cache, tmp_path):
    run_dir = tmp_path / "run"
    cfg = _write_config(tmp_path / "c.yaml", tiny_run_overrides(tiny_corpus, token_cache, run_dir, **{"train.steps": 40}))
    _, out = _stop_midway(cfg, run_dir, at_step=3, sig=signal.SIGINT)
    assert "SIGINT received" in out and "checkpoint saved" in out
    assert [p.name for p in checkpoint.list_checkpoints(run_dir)] == ["step-00000003"]


def test_checkpoints_are_atomic_keep_the_last_k_and_hold_only_plain_data(tiny_corpus, token_cache, tmp_path):
    run_dir = tmp_path / "run"
    train(load_config(overrides=tiny_run_overrides(tiny_corpus, token_cache, run_dir, **{
        "train.steps": 12, "train.checkpoint_every": 3, "train.keep_checkpoints": 2})))
    kept = checkpoint.list_checkpoints(run_dir)
    assert [p.name for p in kept] == ["step-00000009", "step-00000012"]
    assert not list((run_dir / "checkpoints").glob("*.tmp"))
    body = torch.load(kept[-1] / "rank-0.pt", weights_only=True)
    assert {"model", "optimizer", "loader", "rng", "config", "step", "tokens", "interventions"} <= set(body)
    assert body["step"] == 12


def test_truncated_checkpoint_names_the_file_and_the_previous_one_still_resumes(tiny_corpus, token_cache, tmp_path):
    run_dir = tmp_path / "run"
    config = load_config(overrides=tiny_run_overrides(tiny_corpus, token_cache, run_dir, **{
        "train.steps": 8, "train.checkpoint_every": 4}))
    train(config)
    older, newest = checkpoint.list_checkpoints(run_dir)
    part = newest / "rank-0.pt"
    part.write_bytes(part.read_bytes()[: part.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=str(part).replace("/", ".")) as err:
        train(config, resume=run_dir)
    assert "truncated or corrupt" in str(err.value)
    assert (older / "rank-0.pt").exists()
    summary = train(config, resume=older)  # the earlier checkpoint is intact and resumes
    assert summary["steps"] == 8


class _Evil:
    def __reduce__(self):
        return (os.getcwd, ())


def test_checkpoint_that_needs_unpickling_is_refused_with_the_reason(tmp_path):
    step = tmp_path / "checkpoints" / "step-00000001"
    step.mkdir(parents=True)
    torch.save({"format": checkpoint.FORMAT, "world_size": 1, "payload": _Evil()}, step / "rank-0.pt")
    with pytest.raises(CheckpointError, match=r"needs torch.load\(weights_only=False\), which lowmem refuses"):
        checkpoint.load(checkpoint.resolve(tmp_path))


def test_resume_refuses_a_results_changing_config_and_lists_the_differences(tiny_corpus, token_cache, tmp_path):
    run_dir = tmp_path / "run"
    overrides = tiny_run_overrides(tiny_corpus, token_cache, run_dir, **{"train.steps": 4})
    train(load_config(overrides=overrides))
    changed = load_config(overrides={**overrides, "optim.lr": 1e-2, "train.seed": 7, "train.steps": 6})
    with pytest.raises(CheckpointError) as err:
        train(changed, resume=run_dir)
    message = str(err.value)
    assert "optim.lr: 0.003 -> 0.01" in message and "train.seed: 42 -> 7" in message
    harmless = load_config(overrides={**overrides, "train.log_every": 2, "train.eval_every": 1})
    assert train(harmless, resume=run_dir)["steps"] == 4


def test_non_finite_loss_stops_with_the_step_and_last_good_checkpoint(tiny_corpus, token_cache, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    real = step.model_loss_sum
    calls = {"n": 0}

    def poisoned(*args):
        calls["n"] += 1
        value = real(*args)
        return value * float("nan") if calls["n"] == 6 else value  # training step 6 (evaluation has its own)

    monkeypatch.setattr(step, "model_loss_sum", poisoned)
    config = load_config(overrides=tiny_run_overrides(tiny_corpus, token_cache, run_dir, **{
        "train.steps": 10, "train.checkpoint_every": 4, "train.eval_tokens": 100, "train.micro_batch_size": 4}))
    with pytest.raises(TrainingStopped) as err:
        train(config)
    message = str(err.value)
    assert "step 6" in message and "step-00000004" in message
    assert checkpoint.list_checkpoints(run_dir)[-1].name == "step-00000004"

    calls["n"] = 0
    skipping = load_config(overrides={**tiny_run_overrides(tiny_corpus, token_cache, tmp_path / "skip", **{
        "train.steps": 10, "train.eval_tokens": 100}), "train.skip_nonfinite": 1})
    summary = train(skipping)
    assert summary["skipped_steps"] == 1 and summary["steps"] == 10


def test_a_new_run_never_overwrites_a_run_with_checkpoints(tiny_corpus, token_cache, tmp_path):
    run_dir = tmp_path / "run"
    config = load_config(overrides=tiny_run_overrides(tiny_corpus, token_cache, run_dir, **{"train.steps": 2}))
    train(config)
    before = sorted(p.name for p in checkpoint.list_checkpoints(run_dir))
    with pytest.raises(ConfigError, match="already holds a run"):
        train(load_config(overrides=tiny_run_overrides(tiny_corpus, token_cache, run_dir, **{"train.steps": 2})))
    assert sorted(p.name for p in checkpoint.list_checkpoints(run_dir)) == before


def test_default_run_directories_are_new_per_run_and_a_bare_resume_finds_the_newest(tmp_path, monkeypatch):
    from lowmem.train.loop import default_run_dir, latest_run_dir

    monkeypatch.setattr(loop, "RUNS_ROOT", str(tmp_path / "runs"))
    name = default_run_dir(load_config())
    assert name.startswith(str(tmp_path / "runs" / "cpu-tiny-adamw-"))
    for i, sub in enumerate(["a", "b"]):
        (tmp_path / "runs" / sub).mkdir(parents=True)
        (tmp_path / "runs" / sub / "config.yaml").write_text("model: cpu-tiny\n")
        os.utime(tmp_path / "runs" / sub / "config.yaml", (1000 + i, 1000 + i))
    assert latest_run_dir().name == "b"
