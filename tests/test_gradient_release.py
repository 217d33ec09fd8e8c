"""The update inside backward (`--gradient-release`, issue 25): each parameter's update runs in its
post-accumulate-grad hook through the optimizer's own `_step()` and frees its gradient
(lowmem.train.step.InBackward).

- Every registered optimizer (tests/plugins' included) that declares `updates_per_parameter` gives,
  after 20 steps of `train_step` on CPU in fp32, bit for bit the weights of the update after backward;
  one that does not is refused. The same with structures (Low-Rank, LoRA, SLTrain, sparse + SMET),
  with block and selective activation checkpointing and the chunked loss.
- What cannot combine is refused before anything trains, naming the fix: accumulation, clipping,
  several processes, an intervention that reads gradients (RigL), a method that is not per parameter.
- A non-finite loss skips backward and the step; a non-finite gradient, whose update inside backward
  ran before it could be known, stops the run naming it; the hooks never wait for the host.
- A trainer run with gradient release: the same validation loss as without, gradients held one at a
  time (its summary's high-water mark is the largest gradient, as the estimate says).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import tiny_run_overrides
from test_optimizer_contract import NAMES, contract

from lowmem.assembly import build_model, build_optimizer, configure_memory
from lowmem.config import load_config, results_affecting_differences
from lowmem.distributed import DistInfo
from lowmem.errors import ConfigError
from lowmem.testing import TINY
from lowmem.train.step import AfterBackward, InBackward, NonFiniteGradient, train_step
from lowmem.train.trainer import check_gradient_release, train

STEPS = 20


def _batch(step: int, batch: int = 8, seq: int = 16) -> list[dict[str, torch.Tensor]]:
    tokens = torch.randint(0, TINY.vocab_size, (batch, seq + 1), generator=torch.Generator().manual_seed(1000 + step))
    return [{"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}]


def _built(name: str, structure: dict[str, Any] | None = None, checkpointing: str = "none",
           chunked_loss: str = "off") -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    case = contract(name)
    torch.manual_seed(0)
    model = build_model(TINY, structure=structure or case.structure)
    configure_memory(model, checkpointing, chunked_loss, loss_chunk=24, tokens=8 * 16)
    return model, build_optimizer(name, model, hparams=case.hparams)


def _trained(name: str, release: bool, **setting: Any) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(weights before, weights after) STEPS steps of train_step with the update after or inside backward,
    the learning rate changed every step (as the trainer's schedule does, before the step)."""
    model, optimizer = _built(name, **setting)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    update = InBackward(optimizer, model) if release else AfterBackward(optimizer)
    peaks = [group["lr"] for group in optimizer.param_groups]
    for step in range(STEPS):
        for group, peak in zip(optimizer.param_groups, peaks):
            group["lr"] = peak * (0.5 + 0.5 * (step + 1) / STEPS)
        assert train_step(model, update, _batch(step), info=DistInfo()).updated
        if release:  # every gradient was freed by its own update
            assert all(p.grad is None for p in model.parameters())
        optimizer.zero_grad(set_to_none=True)
    return before, {n: p.detach().clone() for n, p in model.named_parameters()}


def _assert_same_training(name: str, **setting: Any) -> None:
    before, after = _trained(name, release=False, **setting)
    _, released = _trained(name, release=True, **setting)
    moved = [n for n in after if not torch.equal(after[n], before[n])]
    assert moved, f"{name}: {STEPS} steps moved no weight"
    different = [n for n in after if not torch.equal(after[n], released[n])]
    assert not different, f"{name} {setting}: inside backward differs in {different}"


def lowmem_method(name: str) -> type:
    import lowmem.optim

    return lowmem.optim.method(name).load()


# ---------------------------------------------------------------------------------------------- equality

@pytest.mark.parametrize("name", NAMES)
def test_the_update_inside_backward_gives_bitwise_the_weights_of_the_update_after_it(name):
    if not getattr(lowmem_method(name), "updates_per_parameter", False):
        model, optimizer = _built(name)
        with pytest.raises(ConfigError, match="cannot update inside backward.*without --gradient-release"):
            InBackward(optimizer, model)
        return
    _assert_same_training(name)


LOWRANK = {"name": "lowrank", "rank": 8, "alpha": 4}


@pytest.mark.parametrize("name,structure", [
    ("adamw", LOWRANK), ("scale", LOWRANK), ("sgd-singular", LOWRANK), ("adam-mini", LOWRANK),
    ("stable-spam", LOWRANK), ("adamw", {"name": "lora", "rank": 8, "alpha": 4}),
    ("adamw", {"name": "sltrain", "rank": 8, "alpha": 4, "density": 0.05}),
    ("smet", {"name": "sparse", "density": 0.5, "block": 4, "storage": "compact"}),
    ("smet", {"name": "sparse", "density": 0.5, "block": 4, "storage": "dense"}),
    ("adamw", {"name": "sparse", "density": 0.5, "block": 4, "storage": "compact"}),
], ids=lambda value: value["name"] if isinstance(value, dict) else value)
def test_structures_train_the_same_inside_backward(name, structure):
    _assert_same_training(name, structure=structure)


@pytest.mark.parametrize("name,checkpointing,chunked_loss", [
    ("scale", "block", "on"), ("adamw", "selective", "off"), ("muon", "block", "off"), ("galore", "none", "on"),
])
def test_recomputed_blocks_and_the_chunked_loss_train_the_same_inside_backward(name, checkpointing, chunked_loss):
    """Backward recomputes a checkpointed block, and the chunked loss computes the head's gradient in
    its own backward, before any weight they use is updated."""
    _assert_same_training(name, checkpointing=checkpointing, chunked_loss=chunked_loss)


# ---------------------------------------------------------------------------------------------- refusals

def _config(**overrides: Any):
    return load_config(overrides={"optim.name": "scale", "train.gradient_release": True, **overrides})


@pytest.mark.parametrize("overrides,info,fragment", [
    ({"train.batch_size": 32}, DistInfo(), "accumulated over micro-batches of 16; set --micro-batch-size 32"),
    ({"train.clip_grad_norm": 1.0}, DistInfo(), "cannot clip the global gradient norm.*--clip-grad-norm 0"),
    ({}, DistInfo(rank=0, world_size=2), "runs in one process.*DDP.*FSDP2"),
    ({}, DistInfo(launched=True), "runs in one process"),
    ({"optim.interventions": [{"name": "topology", "every": 4, "grow": "gradient"}]}, DistInfo(),
     "intervention 'topology' reads the step's gradients.*drop it"),
    ({"optim.name": "toy-signum"}, DistInfo(), "optimizer 'toy-signum' does not declare.*choose one of adam-mini"),
])
def test_what_cannot_update_inside_backward_is_refused_naming_the_fix(overrides, info, fragment):
    config = _config(**overrides)
    with pytest.raises(ConfigError, match=fragment) as refused:
        check_gradient_release(config, info)
    assert "or train without --gradient-release" in str(refused.value)
    check_gradient_release(load_config(overrides={**overrides, "optim.name": config.optim.name}), info)  # off: fine


def test_interventions_that_read_no_gradients_run_with_the_update_inside_backward():
    for spec in ({"name": "topology", "every": 4, "grow": "random"}, {"name": "momentum-reset", "every": 4},
                 {"name": "restarts", "every": 200}, {"name": "lora-merge", "every": 200}):
        check_gradient_release(_config(**{"optim.interventions": [spec]}), DistInfo())


def test_the_cli_refuses_before_a_run_directory_exists(tiny_corpus, token_cache, tmp_path, capsys):
    from lowmem.cli import main

    code = main(["train", "--model", "cpu-micro", "--data", str(tiny_corpus), "--vocab-size", "320", "--seq-len", "16",
                 "--steps", "2", "--batch-size", "4", "--micro-batch-size", "2", "--gradient-release",
                 "--no-progress", "--output-dir", str(tmp_path / "run")])
    assert code == 2
    assert "set --micro-batch-size 4" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_resume_may_turn_release_on_or_off():
    """It changes where the update runs, not what it computes (bitwise: the tests above)."""
    assert results_affecting_differences(_config().to_dict(), load_config(overrides={"optim.name": "scale"}).to_dict()) == []


# ---------------------------------------------------------------------------------------------- non-finite

def test_a_non_finite_loss_skips_backward_and_the_step():
    model, optimizer = _built("adamw")
    update = InBackward(optimizer, model)
    with torch.no_grad():
        model.norm.weight[0] = float("nan")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = train_step(model, update, _batch(0), info=DistInfo())
    assert not result.updated
    assert all(p.grad is None for p in model.parameters())  # backward never ran
    assert not optimizer.state
    after = dict(model.named_parameters())
    assert all(torch.equal(before[n], after[n]) or n == "norm.weight" for n in before)


def test_a_non_finite_gradient_stops_the_run_naming_it_and_hides_no_update():
    """The hooks do not wait for the host, so the non-finite gradient's update has been applied when
    the step learns of it (once, after backward): the step raises, naming the parameter; every other
    parameter got its normal update (bitwise a step without the bad hook, as far as they go), every
    gradient is freed."""
    bad_name = "layers.0.mlp.down_proj.weight"
    reference, reference_optimizer = _built("adamw")
    assert train_step(reference, InBackward(reference_optimizer, reference), _batch(0), info=DistInfo()).updated
    model, optimizer = _built("adamw")
    update = InBackward(optimizer, model)
    dict(model.named_parameters())[bad_name].register_hook(lambda grad: grad * float("inf"))
    with pytest.raises(NonFiniteGradient, match=f"non-finite gradient of {bad_name}.*cannot be skipped"):
        train_step(model, update, _batch(0), info=DistInfo())
    assert update.nonfinite == bad_name
    assert all(p.grad is None for p in model.parameters())
    expected = dict(reference.named_parameters())
    for name, param in model.named_parameters():
        if name == bad_name:
            assert not torch.isfinite(param).all()  # applied, and said so
        else:
            assert torch.equal(param, expected[name]), name


def test_the_update_inside_backward_reads_the_host_a_fixed_number_of_times_whatever_the_parameters(monkeypatch):
    """A host sync per parameter stalls a GPU's backward: the step reads the host three times (the loss
    before backward, the step's loss, the finiteness flags), however many parameters it updates. The
    optimizer's own reads (inside step_parameter) are not the step's."""
    syncs: list[str] = []
    inside_update = [False]
    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__"):
        real = getattr(torch.Tensor, name)

        def counted(self, *args, _real=real, _name=name, **kwargs):
            if not inside_update[0]:
                syncs.append(_name)
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    model, optimizer = _built("adamw")
    real_step_parameter = optimizer.step_parameter

    def step_parameter(param):
        inside_update[0] = True
        try:
            real_step_parameter(param)
        finally:
            inside_update[0] = False

    optimizer.step_parameter = step_parameter
    update = InBackward(optimizer, model)
    for step in range(2):
        syncs.clear()
        assert train_step(model, update, _batch(step), info=DistInfo()).updated
        assert syncs == ["__bool__", "tolist", "tolist"], syncs
    assert len(list(model.parameters())) > 10


# ---------------------------------------------------------------------------------------------- the trainer

def test_a_run_with_gradient_release_trains_the_same_and_holds_one_gradient_at_a_time(tiny_corpus, token_cache, tmp_path):
    common = {"optim.name": "scale", "train.steps": 4, "optim.lr": 1e-3}
    plain = train(load_config(overrides=tiny_run_overrides(tiny_corpus, token_cache, tmp_path / "plain", **common)))
    released = train(load_config(overrides=tiny_run_overrides(tiny_corpus, token_cache, tmp_path / "released",
                                                              **common, **{"train.gradient_release": True})))
    assert released["val_loss"] == plain["val_loss"]
    memory = released["memory"]
    assert memory["gradient_release"] and not plain["memory"]["gradient_release"]
    assert memory["gradient_bytes"] == 0  # measured at a log step: every gradient already freed
    largest = max(p.numel() * 4 for p in build_model("cpu-tiny", vocab_size=released["vocab_size"]).parameters())
    assert memory["gradient_high_water_bytes"] == largest == memory["estimate_gradient_bytes"]
    assert plain["memory"]["estimate_gradient_bytes"] == plain["memory"]["gradient_bytes"] > 4 * largest


def test_the_main_job_is_scale_with_the_update_inside_backward():
    from lowmem.cli import build_parser, is_main_job, train_config_from_args

    config = train_config_from_args(build_parser().parse_args(["train"]))
    assert config.optim.name == "scale" and config.train.gradient_release
    assert config.train.batch_size == config.train.micro_batch_size  # so release applies
    check_gradient_release(config, DistInfo())
    assert is_main_job(config)
    watched = train_config_from_args(build_parser().parse_args(["train", "--no-progress", "--output-dir", "x"]))
    assert watched.optim.name == "scale" and watched.train.gradient_release and not watched.train.progress
    off = train_config_from_args(build_parser().parse_args(["train", "--no-gradient-release"]))
    assert off.optim.name == "scale" and not off.train.gradient_release and is_main_job(off)
    other = train_config_from_args(build_parser().parse_args(["train", "--steps", "5"]))
    assert other.optim.name == "adamw" and not other.train.gradient_release and not is_main_job(other)


def test_a_run_whose_gradient_turns_non_finite_stops_naming_the_last_checkpoint(tiny_corpus, token_cache, tmp_path, monkeypatch):
    from lowmem.train.trainer import TrainingStopped

    real_backward = InBackward.backward
    calls = {"n": 0}

    def backward_with_a_bad_gradient_at_step_3(self, loss, last):
        calls["n"] += 1
        if calls["n"] == 3:
            self.optimizer.param_groups[0]["params"][0].register_hook(lambda grad: grad * float("inf"))
        return real_backward(self, loss, last)

    monkeypatch.setattr(InBackward, "backward", backward_with_a_bad_gradient_at_step_3)
    config = load_config(overrides=tiny_run_overrides(tiny_corpus, token_cache, tmp_path / "run", **{
        "train.gradient_release": True, "optim.name": "scale", "train.steps": 6, "train.checkpoint_every": 2}))
    with pytest.raises(TrainingStopped, match="step 3: non-finite gradient of .* the last good checkpoint is .*step-00000002"):
        train(config)


def test_the_summarys_estimate_counts_the_runs_accumulation(tiny_corpus, token_cache, tmp_path, monkeypatch):
    import lowmem.memory.estimate as estimate

    asked = []
    real = estimate.estimate_memory
    monkeypatch.setattr(estimate, "estimate_memory", lambda *args, **kwargs: asked.append(kwargs) or real(*args, **kwargs))
    config = load_config(overrides=tiny_run_overrides(tiny_corpus, token_cache, tmp_path / "run", **{
        "train.steps": 2, "train.batch_size": 8, "train.micro_batch_size": 4}))
    train(config)
    # Two micro-batches per step: the estimate holds every gradient through the second one's backward.
    assert asked and asked[-1]["accumulation"] == 2 and asked[-1]["batch_size"] == 4
