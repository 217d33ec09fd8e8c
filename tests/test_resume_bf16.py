"""Exact resume in bf16-pure, for every registered optimizer and every structure: a run saves at step
RESUME_AT, a fresh Trainer resumes from that checkpoint, and its losses equal the uninterrupted run's
bit for bit (tests/test_checkpoint.py's in-process harness, with bf16 weights and state).

bf16 is where a resume can lose what fp32 keeps: torch's load casts state to the parameter's dtype, so
a float32 counter or EMA and an int32 count would come back bf16 (LowmemOptimizer.load_state_dict
keeps them as saved; tests/test_state_dtype.py checks the rule tensor by tensor).
"""

from __future__ import annotations

import pytest
from test_checkpoint import STEPS, TEST_HPARAMS, _losses, assert_resumes_bitwise
from test_optimizer_contract import NAMES
from test_precision_matrix import STRUCTURE_CONFIGS

import lowmem.optim
from lowmem.assembly import build_model
from lowmem.testing import TINY
from lowmem.train import checkpoint

# The optimizer each structure runs with: the first of these that trains its kinds (SMET for sparse).
STRUCTURE_OPTIMIZERS = ("smet", "adamw")


def _optimizer_for(structure: dict) -> str:
    model = build_model(TINY, structure=structure, device="meta")
    kinds = {group.get("kind", "dense") for group in lowmem.optim.param_groups(model)}
    return next(name for name in STRUCTURE_OPTIMIZERS if kinds <= set(lowmem.optim.method(name).kinds))


STRUCTURED = {label: (structure, _optimizer_for(structure)) for label, structure in STRUCTURE_CONFIGS.items()
              if structure is not None}


def _resumes_bitwise(tmp_path, tiny_corpus, token_cache, name: str, **extra) -> None:
    assert_resumes_bitwise(tmp_path / "run", tiny_corpus, token_cache, **{
        "train.steps": STEPS, "train.precision": "bf16-pure", "optim.name": name,
        "optim.hparams": TEST_HPARAMS.get(name, {}), "optim.lr": None}, **extra)


@pytest.mark.parametrize("name", NAMES)
def test_every_optimizer_resumes_bitwise_in_bf16_pure(name, tiny_corpus, token_cache, tmp_path):
    _resumes_bitwise(tmp_path, tiny_corpus, token_cache, name)


@pytest.mark.parametrize("label", sorted(STRUCTURED))
def test_every_structure_resumes_bitwise_in_bf16_pure(label, tiny_corpus, token_cache, tmp_path):
    structure, name = STRUCTURED[label]
    _resumes_bitwise(tmp_path, tiny_corpus, token_cache, name, **{"model.structure": structure})


@pytest.mark.distributed
def test_an_fsdp2_run_resumes_bitwise_in_bf16_pure(tiny_corpus, token_cache, tmp_path):
    """Two gloo processes: the state saved as local shards is loaded for DTensor parameters, where the
    dtype rule meets FSDP2 (the shaped tensors become DTensors again; the counters stay float32)."""
    from test_distributed_train import _config, _run

    common = {"train.distributed": "fsdp2", "train.precision": "bf16-pure", "optim.name": "stable-spam",
              "optim.hparams": {"update_gap": 2}, "optim.lr": None}
    whole = _config(tmp_path, "whole", tiny_corpus, token_cache, **common)
    split = _config(tmp_path, "split", tiny_corpus, token_cache, **common,
                    **{"train.checkpoint_every": 3, "train.keep_checkpoints": 5})
    _run(whole, 2)
    _run(split, 2)
    _run(split, 2, "--resume", str(checkpoint.step_dir(tmp_path / "split", 3)))
    assert _losses(tmp_path / "split") == _losses(tmp_path / "whole")
