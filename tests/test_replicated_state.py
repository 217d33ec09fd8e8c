"""A 'replicated' optimizer state (saved once) that differs between FSDP2 processes is refused at save,
by name, instead of coming back as one process's copy on every process."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml
from conftest import tiny_run_overrides

from lowmem.config import load_config

pytestmark = pytest.mark.distributed

# AdamW plus a 0-dim state (layout 'replicated' by default) that holds each process's rank.
_RANK_STATE = """
import torch
import torch.distributed as dist
from lowmem.optim import adamw

_real_step = adamw.AdamW._step

def _step_with_rank_state(self):
    _real_step(self)
    for group in self.param_groups:
        for param in group["params"]:
            self.state[param]["seen_by"] = torch.tensor(float(dist.get_rank()))

adamw.AdamW._step = _step_with_rank_state
"""


def test_a_replicated_state_that_differs_between_processes_stops_the_save_naming_it(tiny_corpus, token_cache, tmp_path):
    overrides = tiny_run_overrides(tiny_corpus, token_cache, tmp_path / "run", **{
        "train.steps": 4, "train.batch_size": 2, "train.micro_batch_size": 1, "train.distributed": "fsdp2",
        "train.checkpoint_every": 2, "optim.name": "adamw"})
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(load_config(overrides=overrides).to_dict()))
    plugin = tmp_path / "rank_state.py"
    plugin.write_text(_RANK_STATE)
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone", "-m", "lowmem.cli",
         "train", "--config", str(config), "--plugin", str(plugin)],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode != 0
    assert "'seen_by' differs between the processes, but its layout is 'replicated'" in result.stderr
    assert "declare it 'rank' in its state_layout" in result.stderr
    # lowmem's own message, not a Python traceback from the worker (torchrun adds its own report after it)
    assert "lowmem: error: optimizer state" in result.stderr
    assert not list((tmp_path / "run" / "checkpoints").glob("step-*"))  # nothing written for the refused save
