"""Checkpoints resume exactly, load with weights_only=True, and failures lose nothing.

Only what needs a process of its own runs as one: a real signal to the real command, and the resume
in a fresh interpreter after it (one method). Exact resume of every registered optimizer is checked
in process: a run saves at step RESUME_AT, a fresh Trainer resumes from that checkpoint, and its
losses must equal the uninterrupted run's bit for bit.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_run_overrides

import lowmem.optim
from lowmem.config import load_config
from lowmem.errors import CheckpointError, ConfigError
from lowmem.models.llama import Llama
from lowmem.train import checkpoint, rundir
from lowmem.train.trainer import TrainingStopped, train

# Small ranks and gaps so projection refreshes, resets and the like happen on both sides of the resume.
TEST_HPARAMS = {
    "galore": {"rank": 8, "update_proj_gap": 5},
    "fira": {"rank": 8, "update_proj_gap": 5},
    "apollo": {"rank": 8, "update_proj_gap": 5},
    "apollo-mini": {"update_proj_gap": 5},
    "stable-spam": {"update_gap": 4},
}
STEPS, RESUME_AT = 12, 6


def _losses(run_dir: Path) -> dict[int, float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


def _method_overrides(name: str) -> dict:
    return {"train.steps": STEPS, "optim.name": name, "optim.hparams": TEST_HPARAMS.get(name, {}), "optim.lr": None}


@pytest.mark.parametrize("name", lowmem.optim.available())
def test_every_optimizer_resumes_in_a_fresh_trainer_to_bitwise_identical_losses(name, tiny_corpus, token_cache, tmp_path):
    assert_resumes_bitwise(tmp_path / "run", tiny_corpus, token_cache, **_method_overrides(name))


def assert_resumes_bitwise(run_dir: Path, corpus: Path, cache: Path, **overrides) -> None:
    """An uninterrupted in-process run, then the same run resumed from its step-RESUME_AT checkpoint
    in a fresh Trainer: the same losses and final perplexity, floats compared exactly."""
    config = load_config(overrides=tiny_run_overrides(corpus, cache, run_dir, **overrides, **{
        "train.checkpoint_every": RESUME_AT, "train.keep_checkpoints": 5}))
    whole = train(config)
    uninterrupted = _losses(run_dir)
    assert sorted(uninterrupted) == list(range(1, STEPS + 1))
    resumed = train(config, resume=checkpoint.step_dir(run_dir, RESUME_AT))
    assert _losses(run_dir) == uninterrupted
    assert resumed["val_perplexity"] == whole["val_perplexity"]


def _env() -> dict:
    # The same threads as this process (conftest sets one), so the subprocesses' floats are comparable.
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _write_config(path: Path, overrides: dict) -> Path:
    config = load_config(overrides=overrides)
    path.write_text(yaml.safe_dump(config.to_dict()))
    return path


# The child runs the real CLI and sends itself `sig` inside training step `at_step` (in its
# train_step call), so the stop lands on exactly that step however fast the machine is.
_SIGNAL_AT_STEP = """
import os, signal, sys
from lowmem import cli
from lowmem.train import trainer
at_step, sig, real, calls = int(sys.argv[1]), int(sys.argv[2]), trainer.train_step, [0]
def signalling(*args, **kwargs):
    calls[0] += 1
    if calls[0] == at_step:
        os.kill(os.getpid(), sig)
    return real(*args, **kwargs)
trainer.train_step = signalling
sys.exit(cli.main(sys.argv[3:]))
"""


def _stop_midway(config_path: Path, at_step: int, sig=signal.SIGTERM) -> str:
    """Run training in a subprocess that receives `sig` during step `at_step`; return its stdout."""
    proc = subprocess.run([sys.executable, "-c", _SIGNAL_AT_STEP, str(at_step), str(int(sig)),
                           "train", "--config", str(config_path)], capture_output=True, text=True, timeout=300, env=_env())
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_a_sigterm_mid_run_saves_and_a_fresh_process_resumes_to_bitwise_identical_losses(tiny_corpus, token_cache, tmp_path):
    # APOLLO: its random projections are regenerated from a stored seed, which a fresh process must find.
    whole = train(load_config(overrides=tiny_run_overrides(tiny_corpus, token_cache, tmp_path / "whole",
                                                           **_method_overrides("apollo"))))
    split_dir = tmp_path / "split"
    split_cfg = _write_config(tmp_path / "split.yaml", tiny_run_overrides(tiny_corpus, token_cache, split_dir,
                                                                          **_method_overrides("apollo")))
    out = _stop_midway(split_cfg, at_step=RESUME_AT)
    assert "SIGTERM received" in out and "checkpoint saved" in out
    assert max(_losses(split_dir)) == RESUME_AT  # stopped after finishing the step it was signalled in
    assert [p.name for p in checkpoint.list_checkpoints(split_dir)] == [f"step-{RESUME_AT:08d}"]

    resumed = subprocess.run([sys.executable, "-m", "lowmem.cli", "train", "--resume", str(split_dir)],
                             capture_output=True, text=True, timeout=300, env=_env())
    assert resumed.returncode == 0, resumed.stderr
    got = _losses(split_dir)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert got == _losses(tmp_path / "whole")  # bitwise: floats compared exactly
    assert json.loads((split_dir / "summary.json").read_text())["val_perplexity"] == whole["val_perplexity"]


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


def test_sigint_also_saves_and_exits_cleanly(tiny_corpus, token_cache, tmp_path):
    run_dir = tmp_path / "run"
    cfg = _write_config(tmp_path / "c.yaml", tiny_run_overrides(tiny_corpus, token_cache, run_dir, **{"train.steps": 40}))
    out = _stop_midway(cfg, at_step=3, sig=signal.SIGINT)
    assert "SIGINT received" in out and "checkpoint saved" in out
    assert [p.name for p in checkpoint.list_checkpoints(run_dir)] == ["step-00000003"]


def test_checkpoints_are_atomic_keep_the_last_k_and_hold_only_plain_data(tiny_corpus, token_cache, tmp_path):
    run_dir = tmp_path / "run"
    train(load_config(overrides=tiny_run_overrides(tiny_corpus, token_cache, run_dir, **{
        "train.steps": 12, "train.checkpoint_every": 3, "train.keep_checkpoints": 2})))
    kept = checkpoint.list_checkpoints(run_dir)
    assert [p.name for p in kept] == ["step-00000009", "step-00000012"]
    assert not list((run_dir / "checkpoints").glob("*.tmp"))
    # DCP's files and the values file, which loads with weights_only=True
    assert sorted(p.name for p in kept[-1].iterdir()) == [".metadata", "__0_0.distcp", "values-rank-0.pt"]
    values = torch.load(kept[-1] / "values-rank-0.pt", weights_only=True)
    assert values["format"] == checkpoint.FORMAT and values["step"] == 12
    body = checkpoint.load_whole(kept[-1])
    assert {"model", "optimizer", "loader", "rng", "config", "step", "tokens", "interventions"} <= set(body)
    assert body["step"] == 12 and isinstance(body["model"]["embed_tokens.weight"], torch.Tensor)


def test_truncated_checkpoint_names_the_file_and_the_previous_one_still_resumes(tiny_corpus, token_cache, tmp_path):
    run_dir = tmp_path / "run"
    config = load_config(overrides=tiny_run_overrides(tiny_corpus, token_cache, run_dir, **{
        "train.steps": 8, "train.checkpoint_every": 4}))
    train(config)
    older, newest = checkpoint.list_checkpoints(run_dir)
    part = newest / "__0_0.distcp"
    part.write_bytes(part.read_bytes()[: part.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=str(newest).replace("/", ".")) as err:
        train(config, resume=run_dir)
    assert "truncated or corrupt" in str(err.value) and f"the older checkpoint {older} is intact" in str(err.value)
    assert (older / "__0_0.distcp").exists()
    summary = train(config, resume=older)  # the earlier checkpoint is intact and resumes
    assert summary["steps"] == 8


class _Evil:
    def __reduce__(self):
        return (os.getcwd, ())


def test_checkpoint_that_needs_unpickling_is_refused_with_the_reason(tmp_path):
    step = tmp_path / "checkpoints" / "step-00000001"
    step.mkdir(parents=True)
    torch.save({"format": checkpoint.LEGACY_FORMAT, "world_size": 1, "payload": _Evil()}, step / "rank-0.pt")
    with pytest.raises(CheckpointError, match=r"needs torch.load\(weights_only=False\), which lowmem refuses"):
        checkpoint.load(checkpoint.resolve(tmp_path))


def test_dcp_metadata_that_would_run_code_is_refused(tmp_path):
    import pickle

    step = checkpoint.save(tmp_path, 1, {"step": 1, "model": {"w": torch.zeros(2)}})
    assert checkpoint.load_whole(step)["step"] == 1
    (step / checkpoint.DCP_METADATA).write_bytes(pickle.dumps(_Evil()))
    with pytest.raises(CheckpointError, match="holds more than DCP's metadata.*refuses to unpickle"):
        checkpoint.load(step)
    step = checkpoint.save(tmp_path, 2, {"step": 2, "model": {"w": torch.zeros(2)}})
    torch.save({"format": checkpoint.FORMAT, "payload": _Evil()}, step / "values-rank-0.pt")
    with pytest.raises(CheckpointError, match=r"needs torch.load\(weights_only=False\)"):
        checkpoint.load_whole(step)


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
    real = Llama.forward
    calls = {"n": 0}

    def poisoned(self, input_ids, labels=None, return_hidden=False):
        value = real(self, input_ids, labels=labels, return_hidden=return_hidden)
        if labels is None or not self.training:  # evaluation: left alone
            return value
        calls["n"] += 1
        return value * float("nan") if calls["n"] == 6 else value  # the loss of training step 6

    monkeypatch.setattr(Llama, "forward", poisoned)
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
    monkeypatch.setattr(rundir, "RUNS_ROOT", str(tmp_path / "runs"))
    name = rundir.default_run_dir(load_config())
    assert name.startswith(str(tmp_path / "runs" / "cpu-tiny-adamw-"))
    for i, sub in enumerate(["a", "b"]):
        (tmp_path / "runs" / sub).mkdir(parents=True)
        (tmp_path / "runs" / sub / "config.yaml").write_text("model: cpu-tiny\n")
        os.utime(tmp_path / "runs" / sub / "config.yaml", (1000 + i, 1000 + i))
    assert rundir.latest_run_dir().name == "b"
