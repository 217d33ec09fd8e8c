"""Checks that need several processes, shared by the tests of every optimizer.

`fsdp_matches_single(name, hparams, steps)` trains a small LLaMA for `steps` optimizer steps on a
fixed stream of random tokens twice: once in this process, once in `world_size` gloo processes with
the model sharded by FSDP2 (`fully_shard` per block and at the root, so every weight is a DTensor
sharded on dim 0). It returns both final state dicts so a test can compare them.
`fsdp_matches_single_many(cases)` does the same for several cases with one set of processes (starting
them takes seconds; the cases then run one after another in them).

Teardown (`end_workers`) is where a loaded machine made these tests flaky: a rank that finished
first destroyed its gloo group and exited while its peer was still tearing down, and a worker's
exit ran the C++ static destructors while gloo's own threads were alive, either of which can end a
worker in SIGABRT ("terminate called without an active exception"). Now every rank waits for every
other one at each stage (through files beside the rendezvous file, so no stage needs the group it
is taking down), and a worker that succeeded leaves with os._exit(0) once its output is written.
"""

from __future__ import annotations

import gc
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from lowmem.assembly import build_model, build_optimizer
from lowmem.distributed import barrier
from lowmem.interventions import RunContext, build_interventions
from lowmem.models import LlamaConfig
from lowmem.optim.base import is_dtensor
from lowmem.registry import load_plugins

TINY = LlamaConfig(hidden_size=64, intermediate_size=160, num_heads=4, num_layers=2, vocab_size=96, max_seq_len=32)


def _batch(step: int, batch: int, seq: int, vocab: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, vocab, (batch, seq + 1), generator=gen)


def _loss(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


def comparison_batch(world_size: int) -> int:
    """The batch both sides of a `world_size`-process comparison train on: 8 rows, or the least multiple
    of 8 that `world_size` divides (at 3 processes a batch of 8 would leave 2 rows untrained there)."""
    return 8 * world_size // math.gcd(8, world_size)


def train_steps(model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: int, batch: int = 8,
                seq: int = 16, rank: int = 0, world_size: int = 1, lr_schedule: bool = True,
                interventions: list[Any] = ()) -> None:
    """The training loop both sides of the comparison run (each rank takes its slice of the batch);
    each intervention's `after_step(step, model, optimizer)` runs after every step (steps from 1)."""
    if batch % world_size:
        raise ValueError(f"a batch of {batch} rows does not split over {world_size} processes; use "
                         f"comparison_batch({world_size}) = {comparison_batch(world_size)}")
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    for step in range(steps):
        if lr_schedule:  # vary the LR so methods that scale by lr_t / lr_max are exercised
            for g, lr in zip(optimizer.param_groups, base_lrs):
                g["lr"] = lr * (0.5 + 0.5 * (step + 1) / steps)
        tokens = _batch(step, batch, seq, model.config.vocab_size if hasattr(model, "config") else TINY.vocab_size)
        share = batch // world_size
        _loss(model, tokens[rank * share:(rank + 1) * share]).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        for intervention in interventions:
            intervention.after_step(step + 1, model, optimizer)


def _full_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        t = p.detach()
        if is_dtensor(t):
            t = t.full_tensor()
        out[name] = t.clone()
    return out


def _worker(rank: int, world_size: int, init_file: str, out_file: str, cases: list[dict[str, Any]],
            dtype: torch.dtype, plugins: list[str]) -> None:
    from torch.distributed.fsdp import fully_shard

    load_plugins(plugins)  # what registered a case's optimizer in the parent: a spawned process starts bare
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        states = []
        for case in cases:
            try:
                torch.manual_seed(0)
                model = build_model(case["config"], structure=case["structure"]).to(dtype)
                for block in model.layers:
                    fully_shard(block)
                fully_shard(model)
                optimizer = build_optimizer(case["name"], model, hparams=case["hparams"])
                steps = case["steps"]
                train_steps(model, optimizer, steps, batch=comparison_batch(world_size), rank=rank, world_size=world_size,
                            interventions=build_interventions(case["interventions"], RunContext(steps, rank, world_size)))
                states.append(_full_state(model))
                del model, optimizer
            except Exception as err:
                raise RuntimeError(f"the sharded run of optimizer {case['name']!r} failed: {err}") from err
        if rank == 0:
            torch.save(states, out_file)
        del states
    except BaseException:
        dist.destroy_process_group()  # a peer may be gone: no waiting for it
        raise
    end_workers(rank, world_size, os.path.dirname(init_file))


def _wait_for_all(directory: str, stage: str, rank: int, world_size: int, timeout: float) -> None:
    """A barrier through files: rank `rank` has reached `stage`; wait until every rank has."""
    Path(directory, f"{stage}-{rank}").touch()
    deadline = time.monotonic() + timeout
    while not all(Path(directory, f"{stage}-{r}").exists() for r in range(world_size)):
        if time.monotonic() > deadline:
            missing = [r for r in range(world_size) if not Path(directory, f"{stage}-{r}").exists()]
            raise TimeoutError(f"rank(s) {missing} did not reach {stage!r} within {timeout:.0f} s")
        time.sleep(0.02)


def end_workers(rank: int, world_size: int, directory: str, timeout: float = 600.0, exit_process: bool = True) -> None:
    """End a spawned gloo worker without aborting a peer: all collectives done on every rank, then
    every group destroyed, then every rank out, then (`exit_process`) leave without running the
    static destructors that race gloo's threads. `directory` is shared by the ranks (the rendezvous
    file's)."""
    barrier()
    _wait_for_all(directory, "collectives-done", rank, world_size, timeout)
    dist.destroy_process_group()
    gc.collect()
    _wait_for_all(directory, "group-destroyed", rank, world_size, timeout)
    if exit_process:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def fsdp_matches_single(name: str, hparams: dict[str, Any], steps: int = 20, world_size: int = 2,
                        dtype: torch.dtype = torch.float64, structure: dict[str, Any] | None = None,
                        interventions: list[dict[str, Any]] = (), plugins: Sequence[str] = (),
                        config: LlamaConfig = TINY) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Return (single-process params, FSDP2 params) after `steps` steps of optimizer `name` on a LLaMA
    of `config` (TINY: two blocks of width 64).

    `structure` (e.g. {"name": "lowrank", "rank": 8}) is applied to both models' hidden matrices
    before sharding, from the same seed, so both sides start from the same factors and supports;
    `interventions` (config entries, e.g. {"name": "lora-merge", "every": 5}) act after each step on both;
    `plugins` (files or modules, as `lowmem train --plugin`) are loaded by each worker first, for an
    optimizer registered outside lowmem.

    float64 by default: summation order differs between one process and a reduce-scatter, and in
    fp32 adaptive methods amplify that to ~1e-5; in fp64 a correct sharded method agrees to ~1e-12,
    so any real sharding error stands out.
    """
    case = dict(name=name, hparams=hparams, steps=steps, structure=structure, interventions=list(interventions),
                config=config)
    return fsdp_matches_single_many([case], world_size, dtype, plugins)[0]


def fsdp_matches_single_many(cases: Sequence[dict[str, Any]], world_size: int = 2, dtype: torch.dtype = torch.float64,
                             plugins: Sequence[str] = ()) -> list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]]:
    """`fsdp_matches_single` for each case (a dict of its name, hparams, steps and optional structure,
    interventions and config), the sharded runs all in one set of `world_size` processes; one failing
    case fails them all."""
    cases = [dict(case, structure=case.get("structure"), interventions=list(case.get("interventions", ())),
                  config=case.get("config", TINY)) for case in cases]
    singles = []
    for case in cases:
        torch.manual_seed(0)
        model = build_model(case["config"], structure=case["structure"]).to(dtype)
        optimizer = build_optimizer(case["name"], model, hparams=case["hparams"])
        train_steps(model, optimizer, case["steps"], batch=comparison_batch(world_size),
                    interventions=build_interventions(case["interventions"], RunContext(case["steps"])))
        singles.append(_full_state(model))

    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        out_file = os.path.join(tmp, "params.pt")
        mp.start_processes(_worker, args=(world_size, init_file, out_file, cases, dtype, [str(p) for p in plugins]),
                           nprocs=world_size, join=True, start_method="spawn")
        sharded = torch.load(out_file, weights_only=True)
    return list(zip(singles, sharded))


def max_relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    worst = 0.0
    for key in a:
        # In float64: the fp64 harness agrees to ~1e-12, which an fp32 cast would round to 0.
        x, y = a[key].double(), b[key].double()
        diff = (x - y).norm() / x.norm().clamp_min(1e-300)
        worst = max(worst, diff.item())
    return worst


def same_gradients_every_parameter(ours_model: torch.nn.Module, theirs_model: torch.nn.Module,
                                   ours_opt: torch.optim.Optimizer, theirs_opt: torch.optim.Optimizer,
                                   steps: int, seed: int = 0) -> dict[str, float]:
    """Feed two optimizers (lowmem's and an oracle's, on twin models) the same gradients for every
    parameter — a persistent part plus noise, so subspaces move — for `steps` steps; return
    {name: ||ours - theirs|| / ||theirs - initial||}, each parameter's error relative to how far it moved."""
    initial = {n: p.detach().clone() for n, p in theirs_model.named_parameters()}
    gen = torch.Generator().manual_seed(seed)
    persistent = {n: torch.randn(p.shape, generator=gen) for n, p in ours_model.named_parameters()}
    for _ in range(steps):
        for (name, a), (_, b) in zip(ours_model.named_parameters(), theirs_model.named_parameters()):
            grad = persistent[name] + 0.5 * torch.randn(a.shape, generator=gen)
            a.grad, b.grad = grad.clone(), grad.clone()
        ours_opt.step()
        theirs_opt.step()
    theirs = dict(theirs_model.named_parameters())
    out = {}
    for name, a in ours_model.named_parameters():
        moved = (theirs[name] - initial[name]).norm()
        assert moved > 1e-2 * initial[name].norm(), f"{name}: the oracle run did not move it"
        out[name] = ((a - theirs[name]).norm() / moved).item()
    return out


def twin_models(config: LlamaConfig = TINY) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Two models with the same initial weights (seed 0): lowmem's optimizer on one, an oracle's on the other."""
    torch.manual_seed(0)
    ours, theirs = build_model(config), build_model(config)
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs
