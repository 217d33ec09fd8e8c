"""Every YAML shipped under configs/ assembles: each run a grid plans, and each run config, builds its
model, structure, optimizer and interventions (on the meta device, so llama-60m costs nothing). A
misspelt optimizer, hyperparameter or structure in a config that a results section tells users to
run fails here, not hours into a grid."""

from pathlib import Path

import pytest

from lowmem.assembly import assemble
from lowmem.bench.run import load_grid
from lowmem.config import RunConfig, load_yaml
from lowmem.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
CONFIGS = sorted(CONFIG_DIR.rglob("*.yaml"))


def test_configs_exist():
    assert len(CONFIGS) >= 10


def _assemble(config: RunConfig) -> None:
    vocab = config.data.vocab_size if config.data.tokenizer == "bpe" else None
    assemble(config, vocab_size=vocab, device="meta")


# Assembling the 1B SMET paper config (sparse structure over llama-1b's matrices) took 237 s of a full
# run on 2026-12-03: it is checked by make bench-tests, the rest here.
HEAVY = {"smet-paper-1b.yaml"}


@pytest.mark.parametrize("path", [pytest.param(p, marks=pytest.mark.slow) if p.name in HEAVY else p for p in CONFIGS],
                         ids=lambda p: str(p.relative_to(CONFIG_DIR)))
def test_shipped_config_assembles(path, tmp_path):
    raw = load_yaml(path.read_text())
    if "methods" in raw:
        grid = load_grid(path, tmp_path / "grid")
        assert len(grid) > 0
        for run in grid:
            _assemble(RunConfig.from_dict(run.config))
    else:
        _assemble(RunConfig.from_dict(raw))


def test_a_misspelt_optimizer_fails_here(tmp_path):
    grid = tmp_path / "grid.yaml"
    grid.write_text("base: {model: cpu-tiny}\nmethods:\n  adamx: {lr: [1.0e-3]}\n")
    with pytest.raises(ConfigError, match="unknown optimizer 'adamx'"):
        for run in load_grid(grid, tmp_path / "out"):
            _assemble(RunConfig.from_dict(run.config))
