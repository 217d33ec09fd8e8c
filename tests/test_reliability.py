"""Issue 16: a run fails safely at its edges. The end of training, shared directories, full disks,
truncated files, numbers in every spelling, bad values (exit 2, one line, no traceback), failed
grids, huge documents and the distributed tests' teardown."""

from __future__ import annotations

import json
import math
import os
import resource
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from lowmem.bench.run import load_grid
from lowmem.cli import main as cli_main
from lowmem.config import load_config, parse_key_values, parse_spec, parse_value
from lowmem.errors import CheckpointError, ConfigError, LowmemError
from lowmem.train import checkpoint, loop, step
from lowmem.train.loop import TrainingStopped, train

from conftest import tiny_run_overrides

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
                                        ("3", 3), ("1.0e-3", 1e-3), ("(0.9, 0.95)", [0.9, 0.95]), ("adam", "adam")])
def test_command_line_values_read_numbers_in_every_spelling(text, value):
    assert parse_value(text) == value and type(parse_value(text)) is type(value)
    assert parse_key_values([f"eps={text}"], "--opt") == {"eps": value}
    assert parse_spec(f"momentum-reset:every=3,x={text}", "intervention")["x"] == value


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
    from lowmem.memory.cli import add_parser, parse_hparams
    import argparse

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
    assert code == 2 and "--model 'nope' is not a model preset" in err


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
