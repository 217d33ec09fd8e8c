"""Grids of runs: one YAML file names a base config and, per method, the values to sweep.

    base:                       # any RunConfig sections, shared by every run
      model: cpu-tiny
      data: {source: ../shared/data/reviews, seq_len: 128}
      train: {steps: 250, batch_size: 32, micro_batch_size: 32}
    bracket: true               # extend each sweep until its best lr has run neighbours on both sides
    methods:
      adamw: {lr: [1.0e-3, 3.0e-3, 1.0e-2], seeds: 3}
      scale: {lr: [1.0e-3, 3.0e-3, 1.0e-2], hparams: {adam_lr: 2.0e-2}}
      galore: {optimizer: galore, lr: [1.0e-2], hparams: {rank: 32}}
      lowrank-restarts: {optimizer: adamw, lr: [1.0e-3], structure: {name: lowrank, rank: 32},
                         interventions: [{name: restarts, every: 50}]}
      adamw-compiled: {optimizer: adamw, lr: [1.0e-3], train: {compile: true}}   # train settings per method

Each (method, lr) pair is one run in `<output>/<method>/lr<lr>`, started as its own `lowmem train`
process with one torch thread, `workers` at a time. The grid then plans follow-ups from the finished
runs: while a bracketed sweep's best lr is its smallest or largest, the next point on the same log
grid (the ratio of its two nearest points) runs, up to `max_extend` points per side; once bracketed,
`seeds: N` runs N - 1 more seeds (the base seed + 1, + 2, ...) at the best lr, in
`<method>/lr<lr>-seed<s>`. A run whose summary.json exists is not run again, and the plan is a
function of the finished runs, so an interrupted grid continues where it stopped.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import yaml

from lowmem.bench.report import run_dirs
from lowmem.config import RunConfig, load_yaml
from lowmem.errors import ConfigError, LowmemError
from lowmem.train.checkpoint import list_checkpoints
from lowmem.train.log import progress_bar

MAX_EXTEND = 3  # bracketing points added per side before a sweep is reported as unbracketed


class GridFailed(LowmemError):
    """Some runs of a grid failed; the message lists each with the first line of its error."""


def run_name(method: str, lr: float | None, seed: int | None = None) -> str:
    """`<method>/lr<lr>` for the sweep, `<method>/lr<lr>-seed<s>` for an extra seed (the run directory)."""
    name = f"{method}/lr{lr:g}" if lr is not None else f"{method}/default"
    return name if seed is None else f"{name}-seed{seed}"


@dataclass(frozen=True)
class GridRun:
    method: str
    optimizer: str
    lr: float | None
    config: dict[str, Any]
    seed: int | None = None  # None: the base config's seed (the sweep); else an extra seed

    @property
    def name(self) -> str:
        return run_name(self.method, self.lr, self.seed)

    @property
    def output_dir(self) -> Path:
        return Path(self.config["train"]["output_dir"])


@dataclass(frozen=True)
class MethodSpec:
    """One method of a grid: how to build its runs, and what to plan once its sweep has finished."""

    method: str
    optimizer: str
    lrs: tuple[float | None, ...]
    overrides: dict[str, Any]  # the optim (and model) sections this method sets on the base
    seeds: int = 1
    bracket: bool = False


@dataclass
class Grid:
    """The runs a grid file names now (`runs`, iterable) and the follow-ups its results call for."""

    base: dict[str, Any]
    methods: list[MethodSpec]
    output: Path
    runs: list[GridRun] = field(default_factory=list)
    base_seed: int = RunConfig().train.seed

    def __iter__(self) -> Iterator[GridRun]:
        return iter(self.runs)

    def __len__(self) -> int:
        return len(self.runs)

    def __getitem__(self, index: int) -> GridRun:
        return self.runs[index]

    def make_run(self, spec: MethodSpec, lr: float | None, seed: int | None = None) -> GridRun:
        raw = _merge(self.base, spec.overrides)
        raw["optim"] = {**raw.get("optim", {}), "name": spec.optimizer, "lr": lr}
        run = GridRun(spec.method, spec.optimizer, lr, raw, seed)
        train = raw.setdefault("train", {})
        train["output_dir"] = str(self.output / run.name)
        if seed is not None:
            train["seed"] = seed
        return run

    def plan(self, spec: MethodSpec, results: dict[str, float]) -> list[GridRun]:
        """This method's runs still to do, given the validation perplexity of each finished run by
        name (nan: diverged or failed): its sweep, then bracketing points, then extra seeds."""
        lrs = list(spec.lrs)
        added_low = added_high = 0
        while True:
            missing = [lr for lr in lrs if run_name(spec.method, lr) not in results]
            if missing:
                return [self.make_run(spec, lr) for lr in missing]
            best = _best_lr(lrs, {lr: results[run_name(spec.method, lr)] for lr in lrs})
            if not spec.bracket or None in lrs or len(lrs) < 2 or best is None:
                break
            ordered = sorted(lrs)
            if best == ordered[0] and added_low < MAX_EXTEND:
                added_low += 1
                lrs.append(_on_grid(ordered[0] ** 2 / ordered[1]))
            elif best == ordered[-1] and added_high < MAX_EXTEND:
                added_high += 1
                lrs.append(_on_grid(ordered[-1] ** 2 / ordered[-2]))
            else:
                break
        if best is None:  # every lr diverged: no point to seed
            return []
        seeds = [self.base_seed + k for k in range(1, spec.seeds)]
        return [self.make_run(spec, best, seed) for seed in seeds if run_name(spec.method, best, seed) not in results]

    def pending(self, results: dict[str, float]) -> list[GridRun]:
        return [run for spec in self.methods for run in self.plan(spec, results)]


def _best_lr(lrs: list[float | None], ppl: dict[float | None, float]) -> float | None:
    finite = [lr for lr in lrs if math.isfinite(ppl[lr])]
    return min(finite, key=lambda lr: ppl[lr]) if finite else None


def _on_grid(lr: float) -> float:
    """Three significant digits, so 1e-3**2 / 2e-3 is 0.0005 and its directory name stays short."""
    return float(f"{lr:.3g}")


def finished_results(output: str | Path) -> dict[str, float]:
    """Validation perplexity of every finished run under a grid's output directory, by run name."""
    results = {}
    for run_dir in run_dirs(output):
        try:
            ppl = json.loads((run_dir / "summary.json").read_text())["val_perplexity"]
        except (OSError, ValueError, KeyError):
            continue
        results[f"{run_dir.parent.name}/{run_dir.name}"] = float("nan") if ppl is None else float(ppl)
    return results


def load_grid(path: str | Path, output: str | Path) -> Grid:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"grid file {path} does not exist; see configs/ for examples")
    try:
        spec = load_yaml(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"grid file {path} is not valid YAML: {err}") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("methods"), dict) or not spec["methods"]:
        raise ConfigError(f"grid file {path} needs a 'methods' mapping of method name to settings")
    unknown = sorted(set(spec) - {"base", "methods", "bracket"})
    if unknown:
        raise ConfigError(f"grid file {path} has unknown top-level keys {unknown}; use base, methods, bracket")
    base = spec.get("base") or {}
    if not isinstance(base, dict):
        raise ConfigError(f"'base' in grid file {path} must be a mapping of config sections, got {base!r}")
    bracket_all = spec.get("bracket", False)
    if not isinstance(bracket_all, bool):
        raise ConfigError(f"'bracket' in grid file {path} must be true or false, got {bracket_all!r}")
    base_seed = RunConfig.from_dict(_merge(base, {"train": {"output_dir": str(output)}})).train.seed
    grid = Grid(base=base, methods=[], output=Path(output), base_seed=base_seed)
    for method, settings in spec["methods"].items():
        grid.methods.append(_method_spec(path, method, settings, base, bracket_all))
    for method in grid.methods:
        for run in grid.plan(method, {}):
            RunConfig.from_dict(run.config)  # refuse a bad grid before anything runs
            grid.runs.append(run)
    return grid


def _method_spec(path: Path, method: Any, settings: Any, base: dict[str, Any], bracket_all: bool) -> MethodSpec:
    if not isinstance(method, str) or "/" in method:
        raise ConfigError(f"method {method!r} in {path} must be a name (a string without '/'), e.g. adamw")
    if settings is not None and not isinstance(settings, dict):
        raise ConfigError(f"method {method!r} in {path} must map to its settings "
                          f"(optimizer, lr, hparams, interventions, structure, train, seeds, bracket), got {settings!r}")
    settings = dict(settings or {})
    optimizer = settings.pop("optimizer", method)
    if not isinstance(optimizer, str):
        raise ConfigError(f"method {method!r} in {path}: optimizer must be a name (a string), got {optimizer!r}")
    lrs = settings.pop("lr", [None])
    lrs = lrs if isinstance(lrs, list) else [lrs]
    for lr in lrs:
        if lr is not None and (isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0):
            raise ConfigError(f"method {method!r} in {path}: lr {lr!r} is not a number > 0; write e.g. lr: [1e-3, 3e-3]")
    seeds = settings.pop("seeds", 1)
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ConfigError(f"method {method!r} in {path}: seeds must be an integer >= 1 (runs at the best lr), got {seeds!r}")
    bracket = settings.pop("bracket", bracket_all)
    if not isinstance(bracket, bool):
        raise ConfigError(f"method {method!r} in {path}: bracket must be true or false, got {bracket!r}")
    optim = {"hparams": settings.pop("hparams", {}), "interventions": settings.pop("interventions", [])}
    structure = settings.pop("structure", None)
    train = settings.pop("train", {})
    if not isinstance(train, dict):
        raise ConfigError(f"method {method!r} in {path}: train must map train settings to values, e.g. "
                          f"train: {{compile: true}}; got {train!r}")
    if settings:
        raise ConfigError(f"method {method!r} in {path} has unknown settings {sorted(settings)}; "
                          "use optimizer, lr, hparams, interventions, structure, train, seeds, bracket")
    overrides: dict[str, Any] = {"optim": optim}
    if train:  # this method's own train settings over the base's (e.g. compile: true)
        overrides["train"] = dict(train)
    if structure is not None:  # this method's weight structure, on the base's model preset
        preset = base.get("model")
        preset = preset.get("preset") if isinstance(preset, dict) else preset
        overrides["model"] = {"preset": preset, "structure": dict(structure)}
    return MethodSpec(method, optimizer, tuple(lrs), overrides, seeds, bracket)


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in a.items()}
    for key, value in b.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def run_grid(grid: Grid, workers: int = 2, threads_per_run: int = 1, progress: bool = True,
             plugins: list[str] = ()) -> list[Path]:
    """Run every grid run not yet finished, then the follow-ups their results call for (a Grid's
    bracketing points and seeds), until none is left; return the run directories of the whole grid.
    Each run's process imports `plugins` (files or modules registering the grid's own entries)."""
    failures: dict[str, str] = {}
    # A bar redrawn in place on a terminal; in a log file one plain line per finished run, not
    # tqdm's carriage-return frames.
    bar = progress_bar(total=len(grid), desc="grid", unit="run", enabled=progress)

    def results() -> dict[str, float]:
        return {**finished_results(grid.output), **{name: float("nan") for name in failures}}

    def launch(run: GridRun) -> None:
        out = run.output_dir
        out.mkdir(parents=True, exist_ok=True)
        config_path = out / "grid-config.yaml"
        config_path.write_text(yaml.safe_dump(_merge(run.config, {"train": {"progress": False}})))
        env = {**os.environ, "OMP_NUM_THREADS": str(threads_per_run), "MKL_NUM_THREADS": str(threads_per_run)}
        start = time.perf_counter()
        command = [sys.executable, "-m", "lowmem.cli", "train", "--config", str(config_path)]
        for plugin in plugins:
            command += ["--plugin", plugin]
        resume = bool(list_checkpoints(out))  # interrupted (SIGTERM saves one): continue it, do not start over
        if resume:
            command += ["--resume", str(out)]
        with (out / "train.log").open("a" if resume else "w") as log:
            child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
            _, status, usage = os.wait4(child.pid, 0)
            child.returncode = code = os.waitstatus_to_exitcode(status)
        # The grid's cost, for sizing the next one: this run's wall time and CPU time (user + system).
        (out / "grid-run.json").write_text(json.dumps({
            "exit_code": code, "wall_seconds": time.perf_counter() - start,
            "cpu_seconds": usage.ru_utime + usage.ru_stime, "threads": threads_per_run}) + "\n")
        if code != 0:
            failures[run.name] = f"exit {code}: {_first_error_line(out / 'train.log')} (see {out / 'train.log'})"
        elif not (out / "summary.json").exists():  # never planned again: it would loop
            failures[run.name] = f"exit 0 without a summary.json (see {out / 'train.log'})"
        if bar:
            bar.set_postfix(last=f"{run.name} {time.perf_counter() - start:.0f}s")

    # Re-planned whenever a run ends, so a follow-up (a bracketing point, a seed) starts as soon as its
    # method's sweep allows, ahead of the runs of methods listed after it in the grid file.
    launched: list[GridRun] = []
    running: dict[Future, str] = {}
    with ThreadPoolExecutor(max_workers=workers) as pool:
        while True:
            done = results()
            todo = grid.pending(done)
            todo = [run for run in todo if run.name not in failures and run.name not in running.values()]
            if bar:
                bar.total = len(done) + len(running) + len(todo)
                bar.update(len(done) - bar.n)
            for run in todo[:workers - len(running)]:
                running[pool.submit(launch, run)] = run.name
                launched.append(run)
            if not running:
                break
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                running.pop(future)
                future.result()
    if bar:
        bar.close()
    if failures:
        raise GridFailed(
            f"{len(failures)} of {len(launched)} run(s) failed:\n  "
            + "\n  ".join(f"{name}: {why}" for name, why in sorted(failures.items()))
        )
    initial = {run.name for run in grid}
    return [run.output_dir for run in [*grid, *(r for r in launched if r.name not in initial)]]


def _first_error_line(log: Path) -> str:
    """The line of a failed run's log that says why: lowmem's own error, else a traceback's last line."""
    try:
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "(no log)"
    for line in lines:
        if line.startswith("lowmem: error:"):
            return line.removeprefix("lowmem: error:").strip()
    return lines[-1] if lines else "(empty log)"
