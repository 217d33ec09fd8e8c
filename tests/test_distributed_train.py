"""The trainer under torchrun with two gloo processes: DDP and FSDP2 follow the one-process run,
and an FSDP2 run checkpoints and resumes exactly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import tiny_run_overrides

from lowmem.config import load_config

pytestmark = pytest.mark.distributed


def _losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r}


def _run(config: Path, nproc: int, *extra: str) -> None:
    command = [sys.executable, "-m", "lowmem.cli", "train", "--config", str(config), *extra]
    if nproc > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
                   "--standalone", "-m", "lowmem.cli", "train", "--config", str(config), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]


def _config(tmp_path: Path, name: str, corpus: Path, cache: Path, **extra) -> Path:
    overrides = tiny_run_overrides(corpus, cache, tmp_path / name, **{
        "train.steps": 6, "train.batch_size": 4, "train.micro_batch_size": 2, "optim.name": "scale", **extra})
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(load_config(overrides=overrides).to_dict()))
    return path


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_two_processes_follow_one(mode, tiny_corpus, token_cache, tmp_path):
    single = _config(tmp_path, "single", tiny_corpus, token_cache)
    double = _config(tmp_path, mode, tiny_corpus, token_cache, **{"train.distributed": mode})
    _run(single, 1)
    _run(double, 2)
    one, two = _losses(tmp_path / "single"), _losses(tmp_path / mode)
    assert sorted(one) == sorted(two) == list(range(1, 7))
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-4), step
    # DCP's files (one per rank) and each rank's values (its loader position differs).
    assert sorted(p.name for p in (tmp_path / mode / "checkpoints" / "step-00000006").iterdir()) == [
        ".metadata", "__0_0.distcp", "__1_0.distcp", "values-rank-0.pt", "values-rank-1.pt"]
    # eval / export read the two-process checkpoint as one model (FSDP2: the ranks' dim-0 shards joined)
    from lowmem.train.trained import load_trained

    alone, joined = load_trained(tmp_path / "single").model.state_dict(), load_trained(tmp_path / mode).model.state_dict()
    assert alone.keys() == joined.keys()
    for name in alone:
        assert joined[name].shape == alone[name].shape, name
        # Norm-wise: SCALE divides by column norms, so a reduction-order difference in a column of
        # small norm moves a few entries by ~1e-6 while the tensor as a whole agrees to ~1e-7.
        error = (joined[name].double() - alone[name].double()).norm() / alone[name].double().norm().clamp_min(1e-12)
        assert error < 1e-5, (name, float(error))


def test_fsdp2_under_bf16_autocast_gathers_bf16_and_follows_one_process(tiny_corpus, token_cache, tmp_path):
    """FSDP2 with a MixedPrecisionPolicy (weights gathered in bf16, gradients reduced in fp32) under
    bf16 autocast: the losses follow the one-process autocast run to bf16's precision."""
    single = _config(tmp_path, "single", tiny_corpus, token_cache, **{"train.precision": "bf16-autocast"})
    double = _config(tmp_path, "fsdp2", tiny_corpus, token_cache,
                     **{"train.precision": "bf16-autocast", "train.distributed": "fsdp2"})
    _run(single, 1)
    _run(double, 2)
    one, two = _losses(tmp_path / "single"), _losses(tmp_path / "fsdp2")
    assert sorted(one) == sorted(two) == list(range(1, 7))
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=2e-2), step


def test_fsdp2_weights_are_gathered_in_bf16_only_under_autocast():
    """wrap_model's policy, seen by a layer's forward in a one-process gloo group: the weight it
    computes with is bf16 under bf16 autocast (the all-gather moved bf16), fp32 otherwise."""
    code = (
        "import tempfile, torch, torch.distributed as dist\n"
        "from lowmem.assembly import autocast\n"
        "from lowmem.distributed import DistInfo, wrap_model\n"
        "from lowmem.models import build_model\n"
        "from lowmem.testing import TINY\n"
        "dist.init_process_group('gloo', init_method='file://' + tempfile.mktemp(), rank=0, world_size=1)\n"
        "for precision in ('fp32', 'bf16-autocast'):\n"
        "    model = wrap_model(build_model(TINY), DistInfo(launched=True), 'fsdp2', precision)\n"
        "    seen = []\n"
        "    model.layers[0].mlp.up_proj.register_forward_pre_hook(lambda m, args: seen.append(m.weight.dtype))\n"
        "    with autocast(precision, 'cpu'):\n"
        "        model(torch.zeros(1, 4, dtype=torch.long))\n"
        "    print(precision, seen[0])\n"
        "dist.destroy_process_group()\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines() == ["fp32 torch.float32", "bf16-autocast torch.bfloat16"]


def test_fsdp2_run_resumes_exactly(tiny_corpus, token_cache, tmp_path):
    whole = _config(tmp_path, "whole", tiny_corpus, token_cache, **{"train.distributed": "fsdp2", "optim.name": "adamw"})
    split = _config(tmp_path, "split", tiny_corpus, token_cache, **{
        "train.distributed": "fsdp2", "optim.name": "adamw", "train.checkpoint_every": 3, "train.keep_checkpoints": 5})
    _run(whole, 2)
    _run(split, 2)
    _run(split, 2, "--resume", str(tmp_path / "split" / "checkpoints" / "step-00000003"))
    assert _losses(tmp_path / "split") == _losses(tmp_path / "whole")


_FAIL_ON_RANK_1 = """
import os, sys
from torch.distributed.checkpoint import FileSystemWriter

from lowmem import cli

real, calls = FileSystemWriter.write_data, [0]

def write_data(self, *args, **kwargs):  # rank 1's disk fills while DCP writes its second checkpoint
    calls[0] += 1
    if os.environ.get("RANK") == "1" and calls[0] == 2:
        raise OSError(28, "No space left on device")
    return real(self, *args, **kwargs)

FileSystemWriter.write_data = write_data
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_a_checkpoint_that_fails_on_one_rank_stops_every_rank_and_keeps_the_last_good_one(mode, tiny_corpus, token_cache, tmp_path):
    config = _config(tmp_path, "run", tiny_corpus, token_cache, **{
        "train.distributed": mode, "optim.name": "adamw", "train.checkpoint_every": 2, "train.keep_checkpoints": 5})
    script = tmp_path / "fail_on_rank_1.py"
    script.write_text(_FAIL_ON_RANK_1)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
               str(script), "train", "--config", str(config)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # Before, rank 0 waited in the checkpoint's barrier for gloo's 30-minute timeout.
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)
    assert result.returncode != 0
    step_4 = tmp_path / "run" / "checkpoints" / "step-00000004"
    assert result.stderr.count("could not write the checkpoint of step 4") == 2, result.stderr[-3000:]
    assert "another process could not write its part" in result.stderr and "No space left on device" in result.stderr
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step-00000002"]
    assert not step_4.exists() and not list((tmp_path / "run").rglob("*.partial"))
