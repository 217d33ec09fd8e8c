"""Grids of runs: one YAML file names a base config and, per method, the values to sweep.

    base:                       # any RunConfig sections, shared by every run
      model: cpu-tiny
      data: {source: ../shared/data/reviews, seq_len: 128}
      train: {steps: 250, batch_size: 32, micro_batch_size: 32}
    methods:
      adamw: {lr: [1.0e-3, 3.0e-3, 1.0e-2]}
      scale: {lr: [1.0e-3, 3.0e-3, 1.0e-2], hparams: {adam_lr: 2.0e-2}}
      galore: {optimizer: galore, lr: [1.0e-2], hparams: {rank: 32}}
      lowrank-restarts: {optimizer: adamw, lr: [1.0e-3], structure: {name: lowrank, rank: 32},
                         interventions: [{name: restarts, every: 50}]}
      lowrank: {optimizer: adamw, lr: [3.0e-3], structure: {name: lowrank, rank: 32}}

Each (method, lr) pair is one run in `<output>/<method>/lr<lr>`, started as its own
`lowmem train` process with one torch thread, `workers` at a time. A run whose summary.json exists
is not run again, so an interrupted grid continues where it stopped.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from lowmem.config import RunConfig, load_yaml
from lowmem.errors import ConfigError, LowmemError


class GridFailed(LowmemError):
    """Some runs of a grid failed; the message lists each with the first line of its error."""


@dataclass(frozen=True)
class GridRun:
    method: str
    optimizer: str
    lr: float | None
    config: dict[str, Any]

    @property
    def name(self) -> str:
        return f"{self.method}/lr{self.lr:g}" if self.lr is not None else f"{self.method}/default"


def load_grid(path: str | Path, output: str | Path) -> list[GridRun]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"grid file {path} does not exist; see configs/ for examples")
    try:
        spec = load_yaml(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"grid file {path} is not valid YAML: {err}") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("methods"), dict) or not spec["methods"]:
        raise ConfigError(f"grid file {path} needs a 'methods' mapping of method name to settings")
    base = spec.get("base") or {}
    if not isinstance(base, dict):
        raise ConfigError(f"'base' in grid file {path} must be a mapping of config sections, got {base!r}")
    runs = []
    for method, settings in spec["methods"].items():
        if not isinstance(method, str):
            raise ConfigError(f"method {method!r} in {path} must be a name (a string), e.g. adamw")
        if settings is not None and not isinstance(settings, dict):
            raise ConfigError(f"method {method!r} in {path} must map to its settings "
                              f"(optimizer, lr, hparams, interventions), got {settings!r}")
        settings = dict(settings or {})
        optimizer = settings.pop("optimizer", method)
        if not isinstance(optimizer, str):
            raise ConfigError(f"method {method!r} in {path}: optimizer must be a name (a string), got {optimizer!r}")
        lrs = settings.pop("lr", [None])
        lrs = lrs if isinstance(lrs, list) else [lrs]
        for lr in lrs:
            if lr is not None and (isinstance(lr, bool) or not isinstance(lr, (int, float))):
                raise ConfigError(f"method {method!r} in {path}: lr {lr!r} is not a number; write e.g. lr: [1e-3, 3e-3]")
        hparams = settings.pop("hparams", {})
        interventions = settings.pop("interventions", [])
        structure = settings.pop("structure", None)
        if settings:
            raise ConfigError(f"method {method!r} in {path} has unknown settings {sorted(settings)}; "
                              "use optimizer, lr, hparams, interventions, structure")
        for lr in lrs:
            raw = _merge(base, {"optim": {"name": optimizer, "lr": lr, "hparams": hparams,
                                          "interventions": interventions}})
            if structure is not None:  # this method's weight structure, on the base's model preset
                preset = raw.get("model")
                preset = preset.get("preset") if isinstance(preset, dict) else preset
                raw["model"] = {"preset": preset, "structure": dict(structure)}
            run = GridRun(method, optimizer, lr, raw)
            raw.setdefault("train", {})["output_dir"] = str(Path(output) / run.name)
            RunConfig.from_dict(raw)  # refuse a bad grid before anything runs
            runs.append(run)
    return runs


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in a.items()}
    for key, value in b.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def run_grid(runs: list[GridRun], workers: int = 2, threads_per_run: int = 1, progress: bool = True) -> list[Path]:
    """Run every grid run not yet finished; return their run directories."""
    pending = [r for r in runs if not (Path(r.config["train"]["output_dir"]) / "summary.json").exists()]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(runs), initial=len(runs) - len(pending), desc="grid", unit="run")
    failures: list[tuple[str, str]] = []

    def launch(run: GridRun) -> None:
        out = Path(run.config["train"]["output_dir"])
        out.mkdir(parents=True, exist_ok=True)
        config_path = out / "grid-config.yaml"
        config_path.write_text(yaml.safe_dump(_merge(run.config, {"train": {"progress": False}})))
        env = {**os.environ, "OMP_NUM_THREADS": str(threads_per_run), "MKL_NUM_THREADS": str(threads_per_run)}
        start = time.perf_counter()
        with (out / "train.log").open("w") as log:
            code = subprocess.call([sys.executable, "-m", "lowmem.cli", "train", "--config", str(config_path)],
                                   stdout=log, stderr=subprocess.STDOUT, env=env)
        if code != 0:
            failures.append((run.name, f"exit {code}: {_first_error_line(out / 'train.log')} (see {out / 'train.log'})"))
        if bar:
            bar.set_postfix_str(f"{run.name} {time.perf_counter() - start:.0f}s")
            bar.update(1)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(launch, pending))
    if bar:
        bar.close()
    if failures:
        raise GridFailed(
            f"{len(failures)} of {len(pending)} run(s) failed:\n  "
            + "\n  ".join(f"{name}: {why}" for name, why in sorted(failures))
        )
    return [Path(r.config["train"]["output_dir"]) for r in runs]


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
