"""lowmem bench: a grid YAML becomes runs, then one table and plots; finished runs are not rerun."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from lowmem.bench.report import report
from lowmem.bench.run import finished_results, load_grid, run_grid
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
    # one seed each and no seeded method: no measure of seed noise, so no verdict either way
    scale_row = next(row for row in rows if row.startswith("| scale"))
    assert scale_row.split(" | ")[3] == "n/a" and "no seed noise measured" in table
    assert (tmp_path / "out" / "report.md").read_text().strip() == table
    assert (tmp_path / "out" / "perplexity_vs_memory.png").exists() and (tmp_path / "out" / "loss_curves.png").exists()
    stamp = (dirs[0] / "summary.json").stat().st_mtime
    run_grid(runs, workers=1, progress=False)  # finished runs are kept, not rerun
    assert (dirs[0] / "summary.json").stat().st_mtime == stamp


@pytest.mark.parametrize("methods,message", [
    ({}, "needs a 'methods' mapping"),
    ({"adamw": {"learning_rate": [1e-3]}}, "unknown settings"),
    ({"adamw": {"lr": [1e-3], "train": "compile"}}, "train must map"),
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


def test_a_grid_method_can_set_its_own_train_settings_over_the_base(tiny_corpus, token_cache, tmp_path):
    grid = _grid(tmp_path, tiny_corpus, token_cache, {
        "adamw": {"lr": [1.0e-3]}, "adamw-compiled": {"optimizer": "adamw", "lr": [1.0e-3], "train": {"compile": True}}})
    eager, compiled = load_grid(grid, tmp_path / "out")
    assert "compile" not in eager.config["train"] and compiled.config["train"]["compile"] is True
    # The base's train settings stay under the method's own.
    assert compiled.config["train"]["steps"] == eager.config["train"]["steps"] == 3


def _planned(grid, results):
    return [run.name for run in grid.pending(results)]


def test_a_sweep_is_extended_until_its_best_lr_is_bracketed_then_seeded(tiny_corpus, token_cache, tmp_path):
    grid = load_grid(_grid(tmp_path, tiny_corpus, token_cache, {
        "adamw": {"lr": [1.0e-3, 2.0e-3], "seeds": 3, "bracket": True}}), tmp_path / "out")
    assert _planned(grid, {}) == ["adamw/lr0.001", "adamw/lr0.002"]
    # best at the low edge: the next point down on the same factor-2 grid
    results = {"adamw/lr0.001": 10.0, "adamw/lr0.002": 12.0}
    assert _planned(grid, results) == ["adamw/lr0.0005"]
    # still at the low edge: one more; then bracketed at 5e-4 and seeded there
    results["adamw/lr0.0005"] = 9.0
    assert _planned(grid, results) == ["adamw/lr0.00025"]
    results["adamw/lr0.00025"] = 11.0
    assert _planned(grid, results) == ["adamw/lr0.0005-seed43", "adamw/lr0.0005-seed44"]
    results.update({"adamw/lr0.0005-seed43": 9.5, "adamw/lr0.0005-seed44": 8.5})
    assert _planned(grid, results) == []
    seeded = grid.pending({k: v for k, v in results.items() if "seed44" not in k})
    assert [r.config["train"]["seed"] for r in seeded] == [44]


def test_bracketing_stops_after_three_points_per_side_and_skips_diverged_runs(tiny_corpus, token_cache, tmp_path):
    grid = load_grid(_grid(tmp_path, tiny_corpus, token_cache, {
        "sgd": {"lr": [1.0, 3.0], "bracket": True}, "adamw": {"lr": [1.0e-3, 2.0e-3], "seeds": 2}}), tmp_path / "out")
    results = {"sgd/lr1": 5.0, "sgd/lr3": 9.0, "adamw/lr0.001": float("nan"), "adamw/lr0.002": 30.0}
    extended = []
    while (todo := [n for n in _planned(grid, results) if n.startswith("sgd")]):
        assert len(todo) == 1
        extended.append(todo[0])
        results[todo[0]] = 5.0 - len(extended)  # always better further down
    assert extended == ["sgd/lr0.333", "sgd/lr0.111", "sgd/lr0.037"]
    # not bracketed (adamw: no bracket) and a nan is never the best: the seed goes to 2e-3
    assert _planned(grid, results) == ["adamw/lr0.002-seed43"]


def test_grid_bracket_and_seeds_end_to_end_and_the_report_pools_seeds(tiny_corpus, token_cache, tmp_path):
    grid = load_grid(_grid(tmp_path, tiny_corpus, token_cache, {
        "adamw": {"lr": [1.0e-3, 4.0e-3], "seeds": 2}, "sgd": {"lr": [1.0e-1]}}), tmp_path / "out")
    dirs = run_grid(grid, workers=1, progress=False)
    names = sorted(f"{d.parent.name}/{d.name}" for d in dirs)
    assert len(names) == 4 and sum("-seed43" in n for n in names) == 1
    # re-planned after each run: adamw's seed starts as soon as its sweep ends, before sgd listed after it
    order = [f"{d.parent.name}/{d.name}" for d in sorted(dirs, key=lambda d: (d / "grid-run.json").stat().st_mtime)]
    assert order[2].startswith("adamw/") and "-seed43" in order[2] and order[3] == "sgd/lr0.1"
    report(tmp_path / "out")
    best = json.loads((tmp_path / "out" / "report.json").read_text())
    assert len(best["adamw"]["seeds"]) == 2 and best["adamw"]["low"] <= best["adamw"]["mean"] <= best["adamw"]["high"]
    assert best["sgd"]["bracketed"] is None and best["adamw"]["bracketed"] is False  # best is an edge of two points
    cost = [json.loads((d / "grid-run.json").read_text()) for d in dirs]
    assert all(c["exit_code"] == 0 and 0 < c["cpu_seconds"] and 0 < c["wall_seconds"] for c in cost)
    assert "4 runs; recorded CPU time" in (tmp_path / "out" / "report.md").read_text()
    assert _planned(grid, finished_results(tmp_path / "out")) == []


def test_verdicts_are_ties_when_ranges_overlap_and_the_pareto_front_keeps_undominated_points():
    from lowmem.bench.report import pareto_front, seed_noise, verdict

    def seeded(*ppl):
        return {"seeds": list(ppl), "mean": sum(ppl) / len(ppl), "low": min(ppl), "high": max(ppl)}

    a = seeded(10.0, 12.0, 11.0)
    assert verdict(seeded(12.5, 13.0), a) == "worse"
    assert verdict(seeded(8.0, 9.9), a) == "better"
    assert verdict(seeded(11.9), a) == "tie"
    # one seed: its value +- the grid's noise (median relative half-range of the seeded methods)
    noise = seed_noise({"a": a, "b": seeded(20.0, 22.0), "c": seeded(30.0)})
    assert noise == pytest.approx((1 / 11 + 1 / 21) / 2)
    assert verdict(seeded(12.2), a, noise) == "tie" and verdict(seeded(12.2), a) == "worse"
    assert verdict(seeded(14.0), a, noise) == "worse"
    assert pareto_front([(1.0, 50.0), (2.0, 60.0), (3.0, 40.0), (0.5, 70.0)]) == [(0.5, 70.0), (1.0, 50.0), (3.0, 40.0)]


@pytest.mark.parametrize("methods,message", [
    ({"adamw": {"lr": [1e-3], "seeds": 0}}, "seeds must be an integer >= 1"),
    ({"adamw": {"lr": [1e-3], "bracket": "yes"}}, "bracket must be true or false"),
    ({"adamw": {"lr": [-1e-3]}}, "is not a number > 0"),
])
def test_bad_seeds_and_bracket_settings_are_refused(methods, message, tiny_corpus, token_cache, tmp_path):
    with pytest.raises(ConfigError, match=message):
        load_grid(_grid(tmp_path, tiny_corpus, token_cache, methods), tmp_path / "out")


def test_close_points_get_labels_pushed_apart_in_height_order_and_far_ones_stay():
    from lowmem.bench.report import spread_labels

    points = [(0.0, 229.8), (0.0, 228.4), (0.0, 252.0), (9.0, 128.7), (9.0, 128.8), (5.0, 129.0)]
    heights = spread_labels(points, min_gap=10.0, x_tolerance=1.5)
    assert heights[1] == 228.4 and heights[0] == pytest.approx(238.4)  # the lower point keeps its place
    assert heights[2] == 252.0  # 13.6 above the pushed label: not moved
    assert heights[3] == 128.7 and heights[4] == pytest.approx(138.7)
    assert heights[5] == 129.0  # 4 away in x from the (9, ...) pair: not their neighbour
    # Grid-sized values whose sum rounds: a label pushed to h + gap must not be pushed again forever.
    gap = 0.032 * (420.0 - 110.0)
    many = [(9.0 + 0.01 * k, 128.7 + 1e-13 * k) for k in range(12)]
    pushed = spread_labels(many, min_gap=gap, x_tolerance=1.4)
    assert sorted(pushed) == pytest.approx([128.7 + k * gap for k in range(12)])


def test_a_run_interrupted_after_a_checkpoint_is_resumed_not_restarted(tiny_corpus, token_cache, tmp_path):
    grid = load_grid(_grid(tmp_path, tiny_corpus, token_cache, {"adamw": {"lr": [1.0e-3]}}), tmp_path / "out")
    (run_dir,) = run_grid(grid, workers=1, progress=False)
    first = json.loads((run_dir / "summary.json").read_text())
    (run_dir / "summary.json").unlink()  # as if stopped after its last checkpoint (SIGTERM saves one)
    run_grid(grid, workers=1, progress=False)  # a fresh `lowmem train` would refuse the directory
    again = json.loads((run_dir / "summary.json").read_text())
    assert again["val_perplexity"] == first["val_perplexity"] and again["steps"] == first["steps"]


def test_interleaved_timing_warms_up_each_contender_then_rotates_the_order_every_round():
    from lowmem.bench.timing import interleaved, seconds_per_step, step_seconds

    calls = []
    contenders = {name: (lambda name=name: calls.append(name)) for name in ("a", "b", "c")}
    measured = interleaved(contenders, 3, lambda step: (step(), calls[-1])[1], warmup=2)
    assert calls[:6] == ["a", "a", "b", "b", "c", "c"]
    assert calls[6:] == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert measured == {"a": ["a"] * 3, "b": ["b"] * 3, "c": ["c"] * 3}
    calls.clear()
    interleaved(contenders, 2, lambda step: step(), warmup=0, rotate=False)
    assert calls == ["a", "b", "c", "a", "b", "c"]
    # a block is timed as one and averaged; single steps are timed one by one
    calls.clear()
    assert seconds_per_step(contenders["a"], 4) >= 0 and calls == ["a"] * 4
    times = step_seconds(contenders["b"], 3)
    assert len(times) == 3 and all(t >= 0 for t in times) and calls[4:] == ["b"] * 3


def test_the_peak_runner_returns_the_childs_record_with_its_own_peak(tmp_path):
    from lowmem.bench.peak import mmap_threshold_env, run_child

    child = tmp_path / "child.py"
    child.write_text(
        "import os, sys\n"
        "from lowmem.bench.peak import baseline_bytes, report_to_parent, rss_bytes\n"
        "from lowmem.memory import peak_memory\n"
        "if sys.argv[1] == 'fail':\n"
        "    sys.exit('the child failed on purpose')\n"
        "baseline, before = baseline_bytes('cpu'), rss_bytes()\n"
        "held = b'x' * (int(sys.argv[1]) << 20)  # written, so resident\n"
        "print('progress lines before the record are ignored')\n"
        "report_to_parent({**peak_memory(), 'baseline_bytes': baseline, 'rss_before': before,\n"
        "                  'threshold': os.environ.get('MALLOC_MMAP_THRESHOLD_')})\n")
    env = {"PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src"), **mmap_threshold_env(131072)}
    record = run_child([str(child), "64"], env)
    assert record["peak_measure"] == "cpu_peak_rss" and record["threshold"] == "131072"
    # The child's own peak: its RSS before the 64 MiB plus them (the baseline, a peak so far, may hold
    # an import's transient above the RSS the allocation starts from).
    assert record["peak_bytes"] >= record["baseline_bytes"] > 0
    assert record["peak_bytes"] >= record["rss_before"] + (48 << 20)
    assert mmap_threshold_env(0) == {}
    with pytest.raises(RuntimeError, match="the child failed on purpose"):
        run_child([str(child), "fail"], env)


def _finished_run(directory: Path, lr: float, summary: dict | None) -> None:
    """A run directory as `lowmem train` leaves it: config.yaml, metrics.jsonl, summary.json once finished."""
    directory.mkdir(parents=True)
    (directory / "config.yaml").write_text(yaml.safe_dump({"optim": {"lr": lr}, "train": {"seed": 42}}))
    (directory / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 5.0}) + "\n")
    if summary is not None:
        (directory / "summary.json").write_text(json.dumps(summary))


def test_collect_reads_finished_runs_or_also_running_ones_and_budget_points_skip_diverged_runs(tmp_path):
    from lowmem.bench.budget import ranking, ranking_table
    from lowmem.bench.report import collect

    for steps, tokens in ((250, 1000), (125, 500)):
        grid = tmp_path / f"steps{steps}"
        _finished_run(grid / "adamw" / "lr0.001", 1e-3, {"val_perplexity": 200.0 * 125 / steps, "tokens": tokens})
        _finished_run(grid / "galore" / "lr0.01", 1e-2, {"val_perplexity": float("nan"), "tokens": tokens})
        _finished_run(grid / "galore" / "lr0.04", 4e-2, {"val_perplexity": 100.0, "tokens": tokens})
        _finished_run(grid / "galore" / "lr0.08", 8e-2, None)  # still running
    grid = tmp_path / "steps250"
    assert [(r["method"], r["lr"]) for r in collect(grid)] == [("adamw", 1e-3), ("galore", 1e-2), ("galore", 4e-2)]
    running = collect(grid, unfinished=True)
    assert len(running) == 4 and "val_perplexity" not in running[-1] and running[-1]["config"]["optim"]["lr"] == 8e-2
    _finished_run(tmp_path / "steps500" / "adamw" / "lr0.001", 1e-3, None)  # a budget whose one run still runs
    points = ranking([tmp_path / "steps250", tmp_path / "steps125", tmp_path / "steps500"])
    assert [(p.tokens, p.perplexity()) for p in points] == [(500, {"adamw": 200.0, "galore": 100.0}),
                                                            (1000, {"adamw": 100.0, "galore": 100.0})]
    table = ranking_table(points)
    assert "| 500 | 200.0 (1.000) | 100.0 (0.500) | galore < adamw |" in table


def test_tuned_budget_table_gives_best_lr_bracketing_seeds_and_ratio_range(tmp_path):
    # Issue 29's table: per budget and method the best lr, whether both neighbours ran, the seeds' mean
    # and s.d., and the ratio to AdamW's with the range of the seeds' extremes; a committed report.json
    # is a budget point as the grid directory it came from.
    from lowmem.bench.budget import plot_ranking, ranking, ratio_range, tuned_table
    from lowmem.bench.report import report

    def _summary(ppl: float) -> dict:
        return {"val_perplexity": ppl, "tokens": 4000, "tokens_per_second": 1000.0, "steps": 10, "wall_seconds": 4.0,
                "memory": {"optimizer_state_bytes": 8, "estimate_paper_gb": 1e-9, "peak_bytes": 1 << 20}}

    grid = tmp_path / "steps1000"
    for lr, ppl in ((1e-3, 110.0), (2e-3, 100.0), (4e-3, 105.0)):
        _finished_run(grid / "adamw" / f"lr{lr:g}", lr, _summary(ppl))
    for seed, ppl in ((43, 104.0), (44, 96.0)):
        _finished_run(grid / "adamw" / f"lr0.002-seed{seed}", 2e-3, _summary(ppl))
    for lr, ppl in ((1e-3, 99.0), (2e-3, 95.0)):  # best at the sweep's edge: not bracketed
        _finished_run(grid / "scale" / f"lr{lr:g}", lr, _summary(ppl))
    for seed, ppl in ((43, 97.0), (44, 93.0)):
        _finished_run(grid / "scale" / f"lr0.002-seed{seed}", 2e-3, _summary(ppl))
    (point,) = ranking([grid])
    adamw, scale = point.best["adamw"], point.best["scale"]
    assert adamw["lr"] == scale["lr"] == 2e-3 and adamw["bracketed"] and scale["bracketed"] is False
    assert ratio_range(scale, adamw) == (95.0 / 100.0, 93.0 / 104.0, 97.0 / 96.0)
    table = tuned_table([point])
    assert "| 4,000 | scale | 0.002 | **no** | 0.001: 99.0, 0.002: 95.0 | 95.00 ± 2.00 (3) | 0.950 [0.894, 1.010] | tie |" \
        in table
    assert "| 4,000 | adamw | 0.002 | yes | 0.001: 110.0, 0.002: 100.0, 0.004: 105.0 | 100.00 ± 4.00 (3) | – | – |" \
        in table
    report(grid)
    (from_json,) = ranking([grid / "report.json"])
    assert tuned_table([from_json]) == table
    assert plot_ranking([point], tmp_path / "plot.png").stat().st_size > 0
    # A budget without seeds borrows the seeded budgets' noise (one seed's value is never exact) ...
    unseeded = tmp_path / "steps500"
    _finished_run(unseeded / "adamw" / "lr0.002", 2e-3, {**_summary(120.0), "tokens": 2000})
    _finished_run(unseeded / "scale" / "lr0.002", 2e-3, {**_summary(110.0), "tokens": 2000})
    points = ranking([grid, unseeded])
    assert point.noise > 0 and all(p.noise == point.noise for p in points)
    (one_seed,) = [p for p in points if len(p.best["adamw"]["seeds"]) == 1]
    assert ratio_range(one_seed.best["scale"], one_seed.best["adamw"], one_seed.noise)[1] < 110.0 / 120.0
    # ... and --methods keeps only the named ones.
    assert [sorted(p.best) for p in ranking([grid, unseeded], ["scale"])] == [["scale"], ["scale"]]
    # A budget finished in pieces (its report.json, then a directory with more methods or a method's
    # sweep again) is one point: the later source's methods replace the earlier's.
    more = tmp_path / "steps1000-rest"
    for lr, ppl in ((1e-3, 90.0), (2e-3, 91.0), (5e-4, 92.0)):
        _finished_run(more / "sgd-column" / f"lr{lr:g}", lr, _summary(ppl))
    _finished_run(more / "scale" / "lr0.002", 2e-3, {**_summary(80.0), "tokens": 4010})
    (pieces,) = ranking([grid / "report.json", more])
    assert pieces.tokens == 4010 and sorted(pieces.best) == ["adamw", "scale", "sgd-column"]
    assert pieces.best["scale"]["mean"] == 80.0 and pieces.best["adamw"] == from_json.best["adamw"]
    assert pieces.best["sgd-column"]["lr"] == 1e-3 and pieces.best["sgd-column"]["bracketed"]


PLUGINS = sorted((Path(__file__).parent / "plugins").glob("*.py"))


@pytest.mark.parametrize("plugin", PLUGINS, ids=lambda p: p.stem)
def test_a_plugin_optimizer_runs_in_a_bench_grid(plugin, tiny_corpus, token_cache, tmp_path):
    # An optimizer written by the recipe, outside the package, is benchmarked like a built-in one:
    # the grid is planned against the registry here and each run's process loads the plugin itself.
    from lowmem.registry import OPTIMIZERS, load_plugins

    load_plugins([plugin])
    names = [name for name, entry in OPTIMIZERS.items() if entry.target.startswith(f"lowmem_plugin_{plugin.stem}:")]
    assert names, f"{plugin} registers no optimizer"
    grid = load_grid(_grid(tmp_path, tiny_corpus, token_cache, {names[0]: {"lr": [1.0e-3]}}), tmp_path / "out")
    (run_dir,) = run_grid(grid, workers=1, progress=False, plugins=[str(plugin)])
    assert json.loads((run_dir / "summary.json").read_text())["optimizer"] == names[0]
