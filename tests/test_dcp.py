"""Checkpoints on torch.distributed.checkpoint resume at another number of processes (issue 24).

A run of 2 gloo processes saves at step RESUME_AT; the same checkpoint resumed at 1 and at 3
processes must give the uninterrupted 2-process run's losses for the steps after it, within
RELATIVE (fp32: the sums over ranks and micro-batches only change order). The global batch is the
same documents at any number of processes (pad mode), so only the reduction order differs. Where a
method turns that rounding into more (GaLore's and Fira's SVD signs, Muon's bf16 Newton-Schulz), its
case removes the cause first (see METHODS).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_run_overrides
from test_loader import corpus  # noqa: F401 - the fixture: the loader tests' 47 documents and their BPE

from lowmem.config import load_config
from lowmem.errors import CheckpointError
from lowmem.train import checkpoint

pytestmark = pytest.mark.distributed

STEPS, RESUME_AT = 8, 4
RELATIVE = 1e-6


def _losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r}


def _train(nproc: int, *args: str) -> None:
    command = [sys.executable, "-m", "lowmem.cli", "train", *args]
    if nproc > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
                   "--standalone", "-m", "lowmem.cli", "train", *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]


def _config(tmp_path: Path, texts: Path, cache: Path, mode: str, optimizer: str, hparams: dict, **extra) -> Path:
    # A global batch of 6 single-row micro-batches divides over 1, 2 and 3 processes.
    overrides = tiny_run_overrides(texts, cache, tmp_path / "whole", **{
        "train.steps": STEPS, "train.batch_size": 6, "train.micro_batch_size": 1, "train.distributed": mode,
        "train.checkpoint_every": RESUME_AT, "train.keep_checkpoints": 5, "optim.name": optimizer,
        "optim.hparams": hparams, "optim.lr": None, **extra})
    path = tmp_path / "whole.yaml"
    path.write_text(yaml.safe_dump(load_config(overrides=overrides).to_dict()))
    return path


def _saved_names(step_dir: Path) -> set[str]:
    """The checkpoint's tensor names, rank-prefixed ones (each rank's own RNG) left out."""
    return {name for name in checkpoint.read_metadata(step_dir).state_dict_metadata if not name.startswith("rank-")}


def assert_resumes_at(tmp_path: Path, texts: Path, cache: Path, mode: str, optimizer: str, hparams: dict,
                      sizes: tuple[int, ...], relative: float = RELATIVE, plugins: tuple[Path, ...] = (),
                      saved_at: int = 2, **extra) -> None:
    config = _config(tmp_path, texts, cache, mode, optimizer, hparams, **extra)
    loaded = [arg for plugin in plugins for arg in ("--plugin", str(plugin))]  # every run loads them, resumes too
    _train(saved_at, "--config", str(config), *loaded)
    whole = tmp_path / "whole"
    uninterrupted = _losses(whole)
    assert sorted(uninterrupted) == list(range(1, STEPS + 1))
    for size in sizes:
        run = tmp_path / f"at-{size}"
        shutil.copytree(whole, run)
        _train(size, "--resume", str(run / "checkpoints" / f"step-{RESUME_AT:08d}"), *loaded)
        resumed = _losses(run)
        assert sorted(resumed) == list(range(1, STEPS + 1)), size
        for step in range(RESUME_AT + 1, STEPS + 1):
            assert resumed[step] == pytest.approx(uninterrupted[step], rel=relative), (size, step)
        # The resumed run's checkpoint holds the same state names as the saving run's: nothing lost.
        final = run / "checkpoints" / f"step-{STEPS:08d}"
        assert _saved_names(final) == _saved_names(whole / "checkpoints" / f"step-{STEPS:08d}"), size
        assert len(list(final.glob("values-rank-*.pt"))) == size


def test_fsdp2_adamw_saved_at_2_resumes_at_1_and_3(tiny_corpus, token_cache, tmp_path):
    assert_resumes_at(tmp_path, tiny_corpus, token_cache, "fsdp2", "adamw", {}, (1, 3))


# Small ranks and gaps so projection refreshes happen on both sides of the resume.
METHODS = {
    "scale": {}, "muon": {"ns_dtype": "float32"}, "stable-spam": {"update_gap": 3}, "adam-mini": {},
    "galore": {"rank": 8, "update_proj_gap": 3}, "fira": {"rank": 8, "update_proj_gap": 3},
    "apollo": {"rank": 8, "update_proj_gap": 3},
}

# Two things turn the fp32 reduction-order difference of the gradient (a few 1e-7 relative, 2
# processes vs 1 or 3) into far more in two methods; neither is a sharding error (in float64, at 3
# processes, lowmem.testing's FSDP2 harness agrees with one process within 1.4e-14 for Fira, GaLore
# and Muon, given a batch that 3 divides; Fira and GaLore at batch 6 only with the SVD signs fixed as
# below: without, they differ by 0.07, a sign flip met in fp64 too), so their cases here remove them
# (measured 2026-12-03):
#
# - GaLore and Fira: the signs of an fp32 SVD's singular vectors. On the gradients of Fira's step-4
#   refresh at 2 and at 3 processes (3e-6 apart), torch.linalg.svd gives vectors 7 and 8 of layers.1's
#   q_proj, and 4 and 5 of its gate_proj, opposite signs, while all others agree within 1e-5 (singular
#   values 1e-3 apart, not degenerate; in fp64 the signs agree); along the line between the two
#   gradients the signs flip back and forth at rounding level. The moments are not rotated at a
#   refresh (as released), so a flipped vector's momentum enters with the opposite sign: those
#   matrices' updates differ by 26%, and the uninterrupted 3-process run's loss by 2.4e-5 at step 5
#   and 2.2e-4 at step 8. With each vector's sign fixed by its largest entry (_CANONICAL_SVD_SIGNS,
#   loaded as a plugin by every run of the case) the uninterrupted runs agree within 9.2e-8 over 8
#   steps. GaLore's runs agree without it (4.6e-7 at step 8), but it is exposed alike.
# - Muon: Newton-Schulz in bf16 (its default) rounds the gathered update to 8 bits, and a 1e-7
#   difference flips roundings: the uninterrupted 3-process run differs by 1.5e-5 at step 4. With
#   ns_dtype float32 (above) the runs agree within 6.6e-8; bf16 has its own case, at BF16_MUON.
#
# Then every case resumes within RELATIVE at 1 and 3, and the bound is tight: the largest differences
# over steps 5-8 were Fira 3.4e-8 / 4.9e-8 (resumed at 1 / 3), GaLore 0 / 3.5e-8, Muon 0 / 1.8e-8,
# 20x below it, while the flipped basis vectors above moved it by 2.4e-5 at the first step after.
CANONICAL_SVD_SIGNS = {"galore", "fira"}
_CANONICAL_SVD_SIGNS = """
import torch
from lowmem.optim import projection

_svd = projection.svd_projection


def _canonical(matrix, rank, side):  # each basis vector's largest-magnitude entry made positive
    basis = _svd(matrix, rank, side)
    if basis.device.type != "meta":
        vectors = basis if side == "right" else basis.T
        pivot = vectors.gather(1, vectors.abs().argmax(dim=1, keepdim=True))
        vectors.mul_(torch.where(pivot < 0, -1.0, 1.0).to(vectors.dtype))
    return basis


projection.svd_projection = _canonical
"""


def _plugins(tmp_path: Path, optimizer: str) -> tuple[Path, ...]:
    if optimizer not in CANONICAL_SVD_SIGNS:
        return ()
    plugin = tmp_path / "canonical_svd_signs.py"
    plugin.write_text(_CANONICAL_SVD_SIGNS)
    return (plugin,)


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", sorted(METHODS))
def test_fsdp2_method_saved_at_2_resumes_at_1_and_3(optimizer, tiny_corpus, token_cache, tmp_path):
    assert_resumes_at(tmp_path, tiny_corpus, token_cache, "fsdp2", optimizer, METHODS[optimizer], (1, 3),
                      plugins=_plugins(tmp_path, optimizer))


# A checkpoint of one process holds every state whole; under FSDP2 the projection methods keep some as
# row-split DTensors (their right-side moments, left-side bases): LowmemOptimizer.whole_state_layout
# says which, so each rank reads its rows. Before it, the 2-process resume of a 1-process GaLore run
# stopped at its first step on a [128, 8] moment beside a [64, 8] gradient projection.
@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["galore", "apollo"])
def test_fsdp2_projection_method_saved_at_1_resumes_at_2_and_3(optimizer, tiny_corpus, token_cache, tmp_path):
    assert_resumes_at(tmp_path, tiny_corpus, token_cache, "fsdp2", optimizer, METHODS[optimizer], (2, 3),
                      plugins=_plugins(tmp_path, optimizer), saved_at=1)


# Muon as it runs by default, Newton-Schulz in bf16: resumed at 1 and 3 its losses differ from the
# uninterrupted run's by at most 1.8e-6 and 6.1e-6 (measured 2026-12-03, steps 5-8), as its own
# uninterrupted 3-process run differs from the 2-process one by 1.5e-5 at step 4. The bound is twice
# that: bf16 rounding, not resume correctness, which the fp32 case above checks within RELATIVE.
BF16_MUON = 3e-5


@pytest.mark.slow
def test_fsdp2_muon_with_bf16_newton_schulz_saved_at_2_resumes_at_1_and_3(tiny_corpus, token_cache, tmp_path):
    assert_resumes_at(tmp_path, tiny_corpus, token_cache, "fsdp2", "muon", {}, (1, 3), relative=BF16_MUON)


# The rest of the registry's per-parameter methods and the other structures, at 1 and 3 as above.
MORE_METHODS = {"sgd-sign": {}, "sgd-column": {}, "muon-all": {"ns_dtype": "float32"},
                "apollo-mini": {"update_proj_gap": 3}}


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", sorted(MORE_METHODS))
def test_fsdp2_more_methods_saved_at_2_resume_at_1_and_3(optimizer, tiny_corpus, token_cache, tmp_path):
    assert_resumes_at(tmp_path, tiny_corpus, token_cache, "fsdp2", optimizer, MORE_METHODS[optimizer], (1, 3))


@pytest.mark.slow
@pytest.mark.parametrize("structure", [{"name": "lora", "rank": 8, "dropout": 0.0},
                                       {"name": "sltrain", "rank": 8, "alpha": 8, "density": 0.05}],
                         ids=["lora", "sltrain"])
def test_fsdp2_structure_saved_at_2_resumes_at_1_and_3(structure, tiny_corpus, token_cache, tmp_path):
    # LoRA without dropout: its masks are drawn per rank, so 1 and 3 processes would drop other entries.
    assert_resumes_at(tmp_path, tiny_corpus, token_cache, "fsdp2", "adamw", {}, (1, 3), **{"model.structure": structure})


@pytest.mark.slow
def test_fsdp2_lowrank_with_restarts_saved_at_2_resumes_at_1_and_3(tiny_corpus, token_cache, tmp_path):
    # Restarts every 3 steps: one before the checkpoint at 4, two after it.
    assert_resumes_at(tmp_path, tiny_corpus, token_cache, "fsdp2", "adamw", {}, (1, 3), **{
        "model.structure": {"name": "lowrank", "rank": 8, "alpha": 8},
        "optim.interventions": [{"name": "restarts", "every": 3, "lr_ramp_steps": 2}]})


@pytest.mark.slow
def test_ddp_smet_with_a_sparse_structure_saved_at_2_resumes_at_1(tiny_corpus, token_cache, tmp_path):
    # SMET's sparse layers train under DDP only (FSDP2 is refused: their block index is per layer).
    assert_resumes_at(tmp_path, tiny_corpus, token_cache, "ddp", "smet", {"warmup": 3}, (1,), **{
        "model": {"preset": "cpu-tiny", "structure": {"name": "sparse", "density": 0.5, "block": 4, "storage": "compact"}},
        "optim.interventions": [{"name": "topology", "every": 3, "drop": 0.3}]})


def test_ddp_saved_at_2_resumes_at_1(tiny_corpus, token_cache, tmp_path):
    assert_resumes_at(tmp_path, tiny_corpus, token_cache, "ddp", "adamw", {}, (1,))


def test_eval_reads_a_two_process_fsdp2_checkpoint_as_one_model(tiny_corpus, token_cache, tmp_path):
    config = _config(tmp_path, tiny_corpus, token_cache, "fsdp2", "adamw", {})
    _train(2, "--config", str(config))
    from lowmem.train.trained import load_trained

    whole = checkpoint.load_whole(tmp_path / "whole" / "checkpoints" / f"step-{STEPS:08d}")
    model = load_trained(tmp_path / "whole").model.state_dict()
    for name, tensor in model.items():
        assert torch.equal(tensor, whole["model"][name]), name


_FAIL_FIRST_ATTEMPT = """
import os
from lowmem.train import trainer

if os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0":  # the first attempt fails in step 5
    real, calls = trainer.train_step, [0]

    def failing(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 5:
            raise RuntimeError("injected failure in step 5")
        return real(*args, **kwargs)

    trainer.train_step = failing
"""


# Slow-marked: in both full runs of 2026-12-03 (load 3-9) the restarted workers' gloo rendezvous timed out
# ("connectFullMesh ... Connection refused"), while the test passed alone each time (59 s): a launcher
# flake under load to look into, not a resume error.
@pytest.mark.slow
def test_nproc_launches_torchrun_and_a_restart_resumes_from_the_newest_checkpoint(tiny_corpus, token_cache, tmp_path):
    config = _config(tmp_path, tiny_corpus, token_cache, "fsdp2", "adamw", {})
    _train(2, "--config", str(config))  # the uninterrupted run, under torchrun as the test's helper starts it
    plugin = tmp_path / "fail_first_attempt.py"
    plugin.write_text(_FAIL_FIRST_ATTEMPT)
    run = tmp_path / "restarted"
    _train(1, "--config", str(config), "--output-dir", str(run), "--plugin", str(plugin), "--nproc", "2", "--max-restarts", "1")
    assert _losses(run) == _losses(tmp_path / "whole")  # steps 5-8 again after the restart, from step 4
    assert len(list((run / "checkpoints" / f"step-{STEPS:08d}").glob("values-rank-*.pt"))) == 2


def _documents(loader, batches: int) -> list[int]:
    from test_loader import document_id

    return [document_id(loader.tokenizer, row) for _ in range(batches) for row in next(loader)["input_ids"]]


@pytest.mark.parametrize("new_size", [1, 3])
def test_the_loader_continues_the_global_order_at_another_number_of_processes(corpus, new_size):  # noqa: F811
    from lowmem.data import TokenLoader

    source, tokenizer = corpus
    order = _documents(TokenLoader(source, tokenizer, 24, 2, seed=7), 30)  # one process: the global order
    saved = []
    for rank in range(2):
        loader = TokenLoader(source, tokenizer, 24, 2, seed=7, rank=rank, world_size=2)
        assert _documents(loader, 2) == order[rank:8:2]
        saved.append(loader.state_dict())
    for rank in range(new_size):
        loader = TokenLoader(source, tokenizer, 24, 2, seed=7, rank=rank, world_size=new_size)
        loader.load_resharded(saved)
        # From document 8 (not a multiple of 3: the split must count from there) past the first shard's end.
        assert _documents(loader, 18 // (2 * new_size)) == order[8 + rank:26:new_size]
        # ... and the position saved after that resumes at the same size as before.
        again = TokenLoader(source, tokenizer, 24, 2, seed=7, rank=rank, world_size=new_size)
        again.load_state_dict(loader.state_dict())
        assert _documents(again, 1) == _documents(loader, 1)
    uneven = TokenLoader(source, tokenizer, 24, 2, seed=7, rank=1, world_size=2)
    _documents(uneven, 1)  # one batch fewer than rank 0: together not a prefix of the order
    with pytest.raises(CheckpointError, match="do not end a common prefix"):
        TokenLoader(source, tokenizer, 24, 2, seed=7).load_resharded([saved[0], uneven.state_dict()])
    packed = [TokenLoader(source, tokenizer, 16, 2, mode="pack", rank=r, world_size=2) for r in range(2)]
    with pytest.raises(CheckpointError, match="in pack mode each rank stands inside its own document"):
        TokenLoader(source, tokenizer, 16, 2, mode="pack").load_resharded([p.state_dict() for p in packed])


def test_state_that_is_a_ranks_own_refuses_another_world_size_and_names_it(tmp_path):
    """Optimizer state of layout "rank" (LowmemOptimizer.state_layout) cannot be split over another
    number of processes: the load says which state and how many processes to use."""
    payload = {"step": 1, "optimizer": {"state": {}, "param_groups": [],
                                        checkpoint.RANK_LOCAL: {0: {"blocks": torch.arange(3.0)}}}}
    step = checkpoint.save(tmp_path, 1, payload)
    assert "rank-0/optimizer/rank-local/0/blocks" in checkpoint.read_metadata(step).state_dict_metadata
    same = checkpoint.with_tensors({}, checkpoint.load(step))
    assert torch.equal(same["optimizer"][checkpoint.RANK_LOCAL][0]["blocks"], torch.arange(3.0))
    # The same files as a second rank would have written them: now a checkpoint of 2 processes.
    (step / "values-rank-1.pt").write_bytes((step / "values-rank-0.pt").read_bytes())
    with pytest.raises(CheckpointError, match=r"written by 2 process\(es\) and its optimizer state 'rank-local/0/blocks' "
                                              r"is each process's own .* resume with 2 processes"):
        checkpoint.with_tensors({}, checkpoint.load(step))
