"""lowmem bench: a grid YAML becomes runs, then one table and plots; finished runs are not rerun."""

from __future__ import annotations

import pytest
import yaml

from lowmem.bench.report import report
from lowmem.bench.run import load_grid, run_grid
from lowmem.errors import ConfigError


def _grid(tmp_path, corpus, cache, methods) -> str:
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump({
        "base": {"model": "cpu-tiny",
                 "data": {"source": str(corpus), "vocab_size": 320, "seq_len": 32, "seq_mode": "pad", "cache_dir": str(cache)},
                 "train": {"steps": 3, "batch_size": 4, "micro_batch_size": 4, "eval_tokens": 500, "log_every": 1}},
        "methods": methods,
    }))
    return str(path)


def test_grid_runs_every_lr_and_reports_the_best_per_method(tiny_corpus, token_cache, tmp_path):
    grid = _grid(tmp_path, tiny_corpus, token_cache, {"adamw": {"lr": [1.0e-3, 3.0e-3]}, "scale": {"lr": [1.0e-3]}})
    runs = load_grid(grid, tmp_path / "out")
    assert [r.name for r in runs] == ["adamw/lr0.001", "adamw/lr0.003", "scale/lr0.001"]
    dirs = run_grid(runs, workers=2, progress=False)
    assert all((d / "summary.json").exists() for d in dirs)
    table = report(tmp_path / "out")
    rows = [line for line in table.splitlines() if line.startswith("| adamw") or line.startswith("| scale")]
    assert len(rows) == 2
    assert "0.001: " in rows[0] or "0.001: " in rows[1]
    assert (tmp_path / "out" / "report.md").read_text().strip() == table
    assert (tmp_path / "out" / "perplexity_vs_memory.png").exists() and (tmp_path / "out" / "loss_curves.png").exists()
    stamp = (dirs[0] / "summary.json").stat().st_mtime
    run_grid(runs, workers=1, progress=False)  # finished runs are kept, not rerun
    assert (dirs[0] / "summary.json").stat().st_mtime == stamp


@pytest.mark.parametrize("methods,message", [
    ({}, "needs a 'methods' mapping"),
    ({"adamw": {"learning_rate": [1e-3]}}, "unknown settings"),
])
def test_bad_grid_files_are_refused_before_anything_runs(methods, message, tiny_corpus, token_cache, tmp_path):
    with pytest.raises(ConfigError, match=message):
        load_grid(_grid(tmp_path, tiny_corpus, token_cache, methods), tmp_path / "out")


def test_missing_grid_file_names_the_path(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_grid(tmp_path / "nope.yaml", tmp_path / "out")


def test_a_grid_method_can_name_a_structure_and_interventions(tiny_corpus, token_cache, tmp_path):
    grid = _grid(tmp_path, tiny_corpus, token_cache, {
        "lowrank-restarts": {"optimizer": "adamw", "lr": [1.0e-3], "structure": {"name": "lowrank", "rank": 8},
                             "interventions": [{"name": "momentum-reset", "every": 2}]}})
    (run,) = load_grid(grid, tmp_path / "out")
    assert run.optimizer == "adamw" and run.name == "lowrank-restarts/lr0.001"
    assert run.config["model"] == {"preset": "cpu-tiny", "structure": {"name": "lowrank", "rank": 8}}
    assert run.config["optim"]["interventions"] == [{"name": "momentum-reset", "every": 2}]
