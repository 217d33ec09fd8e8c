"""Issue 16: a run fails safely at its edges. The end of training, shared directories, full disks,
truncated files, numbers in every spelling, bad values (exit 2, one line, no traceback), failed
grids, huge documents and the distributed tests' teardown."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_run_overrides

from lowmem.bench.run import load_grid
from lowmem.cli import main as cli_main
from lowmem.config import load_config, parse_key_values, parse_spec, parse_value
from lowmem.errors import CheckpointError
from lowmem.train import checkpoint, rundir, trainer
from lowmem.train.trainer import TrainingStopped, train

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _micro(corpus: Path, cache: Path, output: Path, **extra) -> dict:
    """Overrides of the fastest run: cpu-micro, a few steps."""
    return tiny_run_overrides(corpus, cache, output, **{
        "model": "cpu-micro", "data.seq_len": 16, "train.steps": 4, "train.batch_size": 2,
        "train.micro_batch_size": 2, "train.eval_tokens": 200, **extra})


def _micro_args(corpus: Path, output: Path) -> list[str]:
    return ["train", "--model", "cpu-micro", "--data", str(corpus), "--vocab-size", "320", "--seq-len", "16",
            "--steps", "2", "--batch-size", "2", "--micro-batch-size", "2", "--eval-tokens", "100",
            "--no-progress", "--output-dir", str(output)]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}


def _write_config(path: Path, overrides: dict) -> Path:
    path.write_text(yaml.safe_dump(load_config(overrides=overrides).to_dict()))
    return path


# ---------------------------------------------------------------------------------------------
# Numbers in every spelling, through every entry point


@pytest.mark.parametrize("text,value", [("1e-3", 1e-3), ("1e-8", 1e-8), ("1E+4", 1e4), ("-2e-5", -2e-5),
                                        ("3", 3), ("1.0e-3", 1e-3), ("(0.9, 0.95)", (0.9, 0.95)), ("adam", "adam")])
def test_command_line_values_read_numbers_in_every_spelling(text, value):
    assert parse_value(text) == value and type(parse_value(text)) is type(value)
    assert parse_key_values([f"eps={text}"], "--opt") == {"eps": value}
    assert parse_spec(f"momentum-reset:every=3,x={text}", "intervention")["x"] == value
    # In a run's config a tuple is a list, as YAML and the checkpoint store it.
    config = load_config(overrides={"optim.hparams": parse_key_values([f"eps={text}"], "--opt")})
    assert config.optim.hparams["eps"] == (list(value) if isinstance(value, tuple) else value)


def test_scientific_notation_in_yaml_configs_grids_and_memory_hparams(tmp_path, tiny_corpus, token_cache):
    config = tmp_path / "c.yaml"
    config.write_text("optim: {lr: 1e-3, hparams: {eps: 1e-8}}\ntrain: {steps: 3}\n")
    loaded = load_config(config)
    assert loaded.optim.lr == 1e-3 and loaded.optim.hparams == {"eps": 1e-8}
    grid = tmp_path / "grid.yaml"
    grid.write_text(textwrap.dedent(f"""\
        base: {{model: cpu-micro, data: {{source: {tiny_corpus}, vocab_size: 320, seq_len: 16}}}}
        methods:
          adamw: {{lr: [1e-3, 3e-3], hparams: {{eps: 1e-8}}}}
        """))
    runs = load_grid(grid, tmp_path / "out")
    assert [r.name for r in runs] == ["adamw/lr0.001", "adamw/lr0.003"]
    assert runs[0].config["optim"]["hparams"] == {"eps": 1e-8}
    import argparse

    from lowmem.memory.cli import add_parser, parse_hparams

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    args = parser.parse_args(["memory", "--model", "cpu-micro", "--hparam", "eps=1e-8", "--hparam", "betas=[0.9, 0.95]"])
    assert parse_hparams(args) == {"eps": 1e-8, "betas": [0.9, 0.95]}


def test_opt_eps_in_scientific_notation_trains(capsys, tiny_corpus, tmp_path):
    assert cli_main([*_micro_args(tiny_corpus, tmp_path / "run"), "--opt", "eps=1e-8", "--opt", "weight_decay=1e-2"]) == 0
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 2


# ---------------------------------------------------------------------------------------------
# Bad values: exit 2, one line naming the field, the value and what is accepted; no traceback


@pytest.mark.parametrize("extra,fragment", [
    (["--optimizer", "galore", "--opt", "rank=-3"], "invalid rank: -3"),
    (["--opt", "betas=hello"], "betas"),
    (["--lr", "nan"], "optim.lr must be a finite number"),
    (["--lr", "inf"], "optim.lr must be a finite number"),
    (["--intervention", "bogus:every=3"], "unknown intervention 'bogus'"),
    (["--intervention", "momentum-reset:every=-3"], "momentum-reset"),
    (["--checkpoint-every", "-1"], "train.checkpoint_every must be an integer >= 0"),
    (["--eval-every", "-5"], "train.eval_every must be an integer >= 0"),
    (["--skip-nonfinite", "-1"], "train.skip_nonfinite must be an integer >= 0"),
])
def test_bad_values_exit_2_with_one_line_and_no_traceback(extra, fragment, capsys, tiny_corpus, tmp_path):
    code = cli_main([*_micro_args(tiny_corpus, tmp_path / "run"), *extra])
    err = capsys.readouterr().err
    assert code == 2, err
    assert fragment in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if line.startswith("lowmem: error:")]) == 1


@pytest.mark.parametrize("text,fragment", [
    ("data: {seq_len: '64'}\n", "data.seq_len must be an integer, got '64'"),
    ("optim: {hparams: [1, 2]}\n", "optim.hparams must be a mapping"),
    ("train: 5\n", "section 'train' must be a mapping"),
    ("optim: {interventions: [3]}\n", "optim.interventions[0] must be a mapping"),
    ("", "is empty"),
])
def test_bad_config_files_exit_2_naming_the_field(text, fragment, capsys, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    code = cli_main(["train", "--config", str(path), "--output-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and fragment in err and "Traceback" not in err, err


@pytest.mark.parametrize("methods,fragment", [
    ({5: {"lr": [1e-3]}}, "method 5"),
    ({"adamw": {"optimizer": 7}}, "optimizer must be a name"),
    ({"adamw": {"lr": ["fast"]}}, "lr 'fast' is not a number"),
    ({"adamw": {"hparams": [1, 2]}}, "optim.hparams must be a mapping"),
    ({"adamw": [1e-3]}, "must map to its settings"),
])
def test_bad_grids_exit_2_before_anything_runs(methods, fragment, capsys, tmp_path):
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({"base": {"model": "cpu-micro"}, "methods": methods}))
    code = cli_main(["bench", str(grid), "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and fragment in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


def test_memory_names_an_unknown_model_before_a_missing_optimizer(capsys):
    code = cli_main(["memory", "--model", "nope"])
    err = capsys.readouterr().err
    assert code == 2 and "unknown --model preset 'nope'; choose one of" in err


def test_memory_refuses_a_bad_hyperparameter_with_a_message(capsys):
    code = cli_main(["memory", "--model", "llama-60m", "--optimizer", "galore", "--hparam", "rank=-3"])
    err = capsys.readouterr().err
    assert code == 2 and "invalid rank: -3" in err and "Traceback" not in err


def test_a_grid_whose_runs_all_fail_exits_nonzero_listing_each_with_its_error(capsys, tiny_corpus, token_cache, tmp_path):
    grid = tmp_path / "grid.yaml"
    # Valid as a config, but every run fails at assembly: galore refuses a rank of 0.
    grid.write_text(yaml.safe_dump({
        "base": {"model": "cpu-micro", "data": {"source": str(tiny_corpus), "vocab_size": 320, "seq_len": 16,
                                                "cache_dir": str(token_cache)},
                 "train": {"steps": 2, "batch_size": 2, "micro_batch_size": 2, "eval_tokens": 100}},
        "methods": {"galore": {"lr": [1e-3, 2e-3], "hparams": {"rank": 0}}}}))
    code = cli_main(["bench", str(grid), "--output", str(tmp_path / "out"), "--workers", "2"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "2 of 2 run(s) failed" in err
    assert "galore/lr0.001: exit 2: optimizer 'galore' refused its settings" in err
    assert "galore/lr0.002: exit 2:" in err


# ---------------------------------------------------------------------------------------------
# Work lost at the end of a run

# The child runs the real CLI and sends itself SIGTERM on the `nth` call of the trainer's `evaluate`
# (call 1 is the initial evaluation, call 2 the final one with eval_every 0) or of checkpoint.save
# (the final checkpoint with checkpoint_every 0).
_SIGNAL_IN_FINAL_PHASE = """
import os, signal, sys
from lowmem import cli
from lowmem.train import checkpoint, trainer
target, nth, calls = sys.argv[1], int(sys.argv[2]), [0]
owner = trainer if target == "evaluate" else checkpoint
real = getattr(owner, target)
def signalling(*args, **kwargs):
    calls[0] += 1
    if calls[0] == nth:
        os.kill(os.getpid(), signal.SIGTERM)
    return real(*args, **kwargs)
setattr(owner, target, signalling)
sys.exit(cli.main(sys.argv[3:]))
"""


@pytest.mark.parametrize("target,nth", [("evaluate", 2), ("save", 1)])
def test_sigterm_during_the_final_evaluation_or_checkpoint_exits_0_with_checkpoint_and_summary(
        target, nth, tiny_corpus, token_cache, tmp_path):
    run_dir = tmp_path / "run"
    config = _write_config(tmp_path / "c.yaml", _micro(tiny_corpus, token_cache, run_dir, **{"train.eval_every": 0}))
    proc = subprocess.run([sys.executable, "-c", _SIGNAL_IN_FINAL_PHASE, target, str(nth), "train", "--config", str(config)],
                          capture_output=True, text=True, timeout=300, env=_env())
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    assert "SIGTERM received after the last step" in proc.stdout
    assert [p.name for p in checkpoint.list_checkpoints(run_dir)] == ["step-00000004"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 4 and math.isfinite(summary["val_loss"])


# The first run waits inside step 2 until the test lets it go, so a second run starts while it runs.
_WAIT_AT_STEP = """
import os, sys, time
from lowmem import cli
from lowmem.train import trainer
ready, go, real, calls = sys.argv[1], sys.argv[2], trainer.train_step, [0]
def waiting(*args, **kwargs):
    calls[0] += 1
    if calls[0] == 2:
        open(ready, "w").close()
        while not os.path.exists(go):
            time.sleep(0.05)
    return real(*args, **kwargs)
trainer.train_step = waiting
sys.exit(cli.main(sys.argv[3:]))
"""


def test_a_second_run_on_a_locked_directory_is_refused_and_the_first_completes_intact(tiny_corpus, token_cache, tmp_path):
    run_dir = tmp_path / "run"
    first_cfg = _write_config(tmp_path / "a.yaml", _micro(tiny_corpus, token_cache, run_dir, **{"train.steps": 6}))
    second_cfg = _write_config(tmp_path / "b.yaml", _micro(tiny_corpus, token_cache, run_dir, **{"train.steps": 3, "train.seed": 7}))
    ready, go = tmp_path / "ready", tmp_path / "go"
    first = subprocess.Popen([sys.executable, "-c", _WAIT_AT_STEP, str(ready), str(go), "train", "--config", str(first_cfg)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    try:
        for _ in range(3000):
            if ready.exists() or first.poll() is not None:
                break
            import time
            time.sleep(0.1)
        assert ready.exists(), first.communicate()[1][-2000:]
        second = subprocess.run([sys.executable, "-m", "lowmem.cli", "train", "--config", str(second_cfg)],
                                capture_output=True, text=True, timeout=300, env=_env())
        assert second.returncode == 2, second.stderr[-2000:]
        assert f"is in use by another lowmem run (pid {first.pid})" in second.stderr
        assert "Traceback" not in second.stderr
    finally:
        go.touch()
        out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-2000:]
    steps = [r["step"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["steps"] == 6
    assert [p.name for p in checkpoint.list_checkpoints(run_dir)] == ["step-00000006"]


def test_default_run_names_made_in_the_same_instant_are_distinct(tiny_corpus, token_cache, tmp_path, monkeypatch):
    import time

    monkeypatch.setattr(rundir, "RUNS_ROOT", str(tmp_path / "runs"))
    # Both runs start in the same second, at the same microsecond, in the same process.
    monkeypatch.setattr(time, "time", lambda: 1_800_000_000.25)
    monkeypatch.setattr(time, "strftime", lambda fmt, *args: "20270115-080000")
    overrides = {k: v for k, v in _micro(tiny_corpus, token_cache, tmp_path / "unused", **{"train.steps": 1}).items()
                 if k != "train.output_dir"}
    first = train(load_config(overrides=overrides))
    second = train(load_config(overrides={**overrides, "train.seed": 7}))
    dirs = sorted((tmp_path / "runs").iterdir())
    assert len(dirs) == 2 and first["checkpoint"] != second["checkpoint"]
    seeds = sorted(yaml.safe_load((d / "config.yaml").read_text())["train"]["seed"] for d in dirs)
    assert seeds == [7, 42]


def _losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r}


def _full_disk_save(monkeypatch, fail_at_call: int) -> None:
    """A stand-in for a full disk: the `fail_at_call`-th checkpoint's values file (the torch.save of a
    `.pt.partial`; DCP's own writes are not counted) gets part of its bytes, then fails as a full
    filesystem does."""
    real, calls = torch.save, [0]

    def save(obj, f, *args, **kwargs):
        calls[0] += str(f).endswith(".pt.partial")
        if str(f).endswith(".pt.partial") and calls[0] == fail_at_call:
            Path(f).write_bytes(b"PK\x03\x04 partial")
            raise RuntimeError("[enforce fail at inline_container.cc:603] . PytorchStreamWriter failed writing file "
                               "data/3: file write failed")
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", save)


def test_a_checkpoint_into_a_full_disk_exits_2_removes_the_partial_and_the_previous_resumes_bitwise(
        capsys, tiny_corpus, token_cache, tmp_path, monkeypatch):
    whole = train(load_config(overrides=_micro(tiny_corpus, token_cache, tmp_path / "whole", **{"train.steps": 8})))
    run_dir = tmp_path / "run"
    config = _write_config(tmp_path / "c.yaml", _micro(tiny_corpus, token_cache, run_dir, **{
        "train.steps": 8, "train.checkpoint_every": 2, "train.keep_checkpoints": 5}))
    with monkeypatch.context() as patch:
        _full_disk_save(patch, fail_at_call=3)  # the checkpoint of step 6
        code = cli_main(["train", "--config", str(config)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    assert f"could not write the checkpoint of step 6 in {run_dir / 'checkpoints'}" in err
    assert "bytes per process" in err and f"the last good checkpoint is {run_dir / 'checkpoints' / 'step-00000004'}" in err
    assert not list((run_dir / "checkpoints").glob("*.tmp")) and not list(run_dir.rglob("*.partial"))
    assert [p.name for p in checkpoint.list_checkpoints(run_dir)] == ["step-00000002", "step-00000004"]
    assert cli_main(["train", "--resume", str(run_dir)]) == 0
    assert _losses(run_dir) == _losses(tmp_path / "whole")
    assert json.loads((run_dir / "summary.json").read_text())["val_perplexity"] == whole["val_perplexity"]


def _mount_tmpfs(directory: Path, options: str) -> bool:
    directory.mkdir(parents=True, exist_ok=True)
    try:
        return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(directory)],
                              capture_output=True).returncode == 0
    except OSError:
        return False


def test_a_real_full_tmpfs_stops_the_run_with_exit_2_and_keeps_the_last_good_checkpoint(tiny_corpus, token_cache, tmp_path):
    mount = tmp_path / "small"
    if not _mount_tmpfs(mount, "size=1m"):
        pytest.skip("cannot mount a tmpfs here (needs root); the stand-in test above covers the same path")
    try:
        run_dir = mount / "run"
        config = _write_config(tmp_path / "c.yaml", _micro(tiny_corpus, token_cache, run_dir, **{
            "train.steps": 40, "train.checkpoint_every": 1, "train.keep_checkpoints": 100, "train.log_every": 40}))
        proc = subprocess.run([sys.executable, "-m", "lowmem.cli", "train", "--config", str(config)],
                              capture_output=True, text=True, timeout=300, env=_env())
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr and "could not write the checkpoint of step" in proc.stderr
        assert not list((run_dir / "checkpoints").glob("*.tmp"))
        last = checkpoint.list_checkpoints(run_dir)[-1]
        assert str(last) in proc.stderr
        assert checkpoint.load(last)["step"] == int(last.name.split("-")[1])
    finally:
        subprocess.run(["umount", str(mount)])


def test_an_unwritable_checkpoints_directory_is_refused_before_training(tiny_corpus, token_cache, tmp_path):
    run_dir = tmp_path / "run"
    if not _mount_tmpfs(run_dir / "checkpoints", "ro,size=1m"):
        pytest.skip("cannot mount a read-only tmpfs here (needs root)")
    try:
        config = _write_config(tmp_path / "c.yaml", _micro(tiny_corpus, token_cache, run_dir))
        proc = subprocess.run([sys.executable, "-m", "lowmem.cli", "train", "--config", str(config)],
                              capture_output=True, text=True, timeout=300, env=_env())
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert f"cannot write to {run_dir / 'checkpoints'}" in proc.stderr and "Traceback" not in proc.stderr
        assert not (run_dir / "metrics.jsonl").exists()  # refused before the first step
    finally:
        subprocess.run(["umount", str(run_dir / "checkpoints")])


@pytest.mark.parametrize("damage", ["truncate", "empty"])
def test_a_damaged_newest_checkpoint_names_the_older_intact_one(damage, tiny_corpus, token_cache, tmp_path):
    run_dir = tmp_path / "run"
    config = load_config(overrides=_micro(tiny_corpus, token_cache, run_dir, **{"train.checkpoint_every": 2}))
    train(config)
    older, newest = checkpoint.list_checkpoints(run_dir)
    part = newest / "__0_0.distcp"
    part.write_bytes(part.read_bytes()[: part.stat().st_size // 2] if damage == "truncate" else b"")
    with pytest.raises(CheckpointError) as err:
        train(config, resume=run_dir)
    assert f"the older checkpoint {older} is intact: resume with --resume {older}" in str(err.value)
    assert train(config, resume=older)["steps"] == 4


def test_non_finite_weights_are_never_checkpointed_or_named_good(tiny_corpus, token_cache, tmp_path, monkeypatch):
    real = trainer.train_step
    calls = [0]

    def poisoning(model, *args, **kwargs):
        result = real(model, *args, **kwargs)
        calls[0] += 1
        if calls[0] == 4:  # the update of step 4 went wrong, its loss (computed before it) is finite
            with torch.no_grad():
                next(model.parameters()).fill_(float("nan"))
        return result

    monkeypatch.setattr(trainer, "train_step", poisoning)
    run_dir = tmp_path / "run"
    config = load_config(overrides=_micro(tiny_corpus, token_cache, run_dir, **{
        "train.steps": 8, "train.checkpoint_every": 2, "train.keep_checkpoints": 5}))
    with pytest.raises(TrainingStopped) as err:
        train(config)
    message = str(err.value)
    assert "after step 4" in message and "step-00000002" in message and "step-00000004" not in message
    assert [p.name for p in checkpoint.list_checkpoints(run_dir)] == ["step-00000002"]


def test_resume_survives_a_partial_last_line_in_metrics(tiny_corpus, token_cache, tmp_path):
    run_dir = tmp_path / "run"
    config = load_config(overrides=_micro(tiny_corpus, token_cache, run_dir, **{
        "train.steps": 6, "train.checkpoint_every": 3, "train.keep_checkpoints": 5}))
    whole = _micro(tiny_corpus, token_cache, tmp_path / "whole", **{"train.steps": 6})
    train(load_config(overrides=whole))
    train(config)
    with (run_dir / "metrics.jsonl").open("a") as f:
        f.write('{"step": 7, "tokens": 12, "lo')  # killed during a write
    train(config, resume=checkpoint.step_dir(run_dir, 3))
    assert _losses(run_dir) == _losses(tmp_path / "whole")


def test_a_bare_resume_picks_the_newest_run_with_a_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setattr(rundir, "RUNS_ROOT", str(tmp_path / "runs"))
    interrupted, failed = tmp_path / "runs" / "interrupted", tmp_path / "runs" / "failed-at-start"
    (interrupted / "checkpoints" / "step-00000003").mkdir(parents=True)
    (interrupted / "config.yaml").write_text("model: cpu-tiny\n")
    failed.mkdir(parents=True)
    (failed / "config.yaml").write_text("model: cpu-tiny\n")  # written later, nothing to resume
    os.utime(interrupted / "config.yaml", (1000, 1000))
    assert rundir.latest_run_dir() == interrupted


# ---------------------------------------------------------------------------------------------
# One huge document: tokenized in bounded pieces


def _long_text(chars: int, seed: int = 0) -> str:
    import random

    from conftest import WORDS

    rng, parts, size = random.Random(seed), [], 0
    separators = [" "] * 12 + ["\n", "  ", "\t", " \n"]
    while size < chars:
        word = rng.choice(WORDS) + rng.choice(["", "", ".", ",", "'s"])
        parts.append(word + rng.choice(separators))
        size += len(parts[-1])
    return "".join(parts)


def _corpus_with(directory: Path, train_texts: list[str]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in train_texts))
    (directory / "validation.jsonl").write_text(json.dumps({"text": "a short validation document"}) + "\n")
    return directory


@pytest.fixture(scope="module")
def small_bpe(tmp_path_factory, tiny_corpus):
    from lowmem.data import open_source, train_bpe

    return train_bpe(open_source(str(tiny_corpus)), 320, tmp_path_factory.mktemp("bpe") / "bpe.json")


def test_a_long_document_in_pieces_gives_the_tokens_of_the_whole_and_resumes_inside_it(small_bpe, tmp_path):
    from lowmem.data import TokenLoader, open_source
    from lowmem.data.loader import PIECE_CHARS

    text = _long_text(5 * PIECE_CHARS + 123)
    whole = small_bpe.encode_batch([text])[0] + [small_bpe.eos_id]
    source = open_source(str(_corpus_with(tmp_path / "c", [text])))
    seq_len, rows = 64, 8
    loader = TokenLoader(source, small_bpe, seq_len, rows, mode="pack", prefetch=0)
    stream: list[int] = []
    states = []
    for _ in range(len(whole) // (seq_len * rows)):
        states.append(loader.state_dict())
        batch = next(loader)
        for row_in, row_lab in zip(batch["input_ids"].tolist(), batch["labels"].tolist()):
            stream.extend(row_in[:1] if stream else row_in[:1])
            stream.extend(row_lab)
            stream.pop()  # rows overlap by one token
    assert len(stream) > 4 * PIECE_CHARS // 8
    windows = [whole[k * seq_len: k * seq_len + seq_len + 1] for k in range(len(whole) // seq_len)]
    got = []
    fresh = TokenLoader(source, small_bpe, seq_len, rows, mode="pack", prefetch=0)
    for _ in range(len(states)):
        batch = next(fresh)
        got += [i + l[-1:] for i, l in zip(batch["input_ids"].tolist(), batch["labels"].tolist())]
    assert got == windows[: len(got)]  # exactly the windows of the whole document's tokens
    middle = states[len(states) // 2]
    assert middle["document"] == 0 and middle["token_offset"] > 2 * PIECE_CHARS // 8  # inside the long document
    resumed = TokenLoader(source, small_bpe, seq_len, rows, mode="pack", prefetch=0)
    resumed.load_state_dict(middle)
    batch = next(resumed)
    start = (len(states) // 2) * rows
    assert [i + l[-1:] for i, l in zip(batch["input_ids"].tolist(), batch["labels"].tolist())] == windows[start: start + rows]
    pad = TokenLoader(source, small_bpe, seq_len, 1, mode="pad", prefetch=0)
    assert next(pad)["input_ids"][0].tolist() == whole[:seq_len]


_PEAK_RSS = """
import json, sys, time
from lowmem.data import TokenLoader, load_tokenizer, open_source
def status(key):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key + ":")) / 1024
tokenizer = load_tokenizer(sys.argv[2])
source = open_source(sys.argv[1])
base = status("VmRSS")
with open("/proc/self/clear_refs", "w") as f:  # reset the peak (VmHWM) to the current size
    f.write("5")
started = time.perf_counter()
loader = TokenLoader(source, tokenizer, 128, 8, mode=sys.argv[3])
tokens = 0
for _ in range(int(sys.argv[4])):
    tokens += int((next(loader)["labels"] != -100).sum())
seconds = time.perf_counter() - started
loader.close()
peak = status("VmHWM")
print(json.dumps({"base_mib": round(base, 1), "peak_mib": round(peak, 1), "increase_mib": round(peak - base, 1),
                  "tokens_per_second": round(tokens / seconds)}))
"""


def peak_rss_of_huge_document(corpus: Path, tokenizer_path: Path, mode: str, batches: int) -> dict:
    proc = subprocess.run([sys.executable, "-c", _PEAK_RSS, str(corpus), str(tokenizer_path), mode, str(batches)],
                          capture_output=True, text=True, timeout=600, env=_env())
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# Old code: tokenizing the 5 MB document whole took well over a gigabyte (12.8 GiB at 50 MB).
HUGE_DOCUMENT_MIB_BOUND = 200


@pytest.mark.parametrize("mode", ["pack", "pad"])
def test_a_huge_document_stays_under_a_fixed_memory_bound(mode, small_bpe, tmp_path):
    text = _long_text(5_000_000)
    corpus = _corpus_with(tmp_path / "huge", [text, "a short document after it"])
    measured = peak_rss_of_huge_document(corpus, small_bpe.path, mode, batches=40)
    print(f"huge document (5 MB, {mode}): {measured}")
    assert measured["increase_mib"] < HUGE_DOCUMENT_MIB_BOUND, measured
