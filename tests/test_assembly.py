"""The run assembly and its seams: old runs still resume, a structure and an intervention defined
outside lowmem run end to end, the step is its own function, and no module imports upward."""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import write_corpus
from torch import nn

from lowmem.assembly import assemble, build_model, build_optimizer
from lowmem.config import load_config
from lowmem.distributed import DistInfo
from lowmem.errors import ConfigError
from lowmem.optim.roles import param_groups
from lowmem.optim.state import replace_parameter, reset_state
from lowmem.train import checkpoint
from lowmem.train.step import AfterBackward, train_step

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = Path(__file__).parent / "fixtures" / "pre_assembly_run"
TOY_PLUGIN = Path(__file__).parent / "toy_plugin.py"


def _losses(path: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, path.read_text().splitlines()) if "loss" in r}


def _lowmem(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run([sys.executable, "-m", "lowmem.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300, env=env)


def test_a_checkpoint_written_before_the_assembly_resumes_bitwise(tmp_path):
    # The fixture's config names relative paths: the corpus and tokenizer cache are rebuilt beside it.
    shutil.copytree(FIXTURE, tmp_path / "run")
    write_corpus(tmp_path / "corpus")
    proc = _lowmem("train", "--resume", "run", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    expected = _losses(FIXTURE / "metrics.jsonl")
    got = _losses(tmp_path / "run" / "metrics.jsonl")
    assert sorted(got) == list(range(1, 13))
    assert got == expected  # bitwise: the old code's uninterrupted run, steps 7-12 resumed by today's


def test_an_old_string_form_config_loads_and_round_trips():
    config = load_config(FIXTURE / "config.yaml")
    assert config.model == "cpu-micro" and config.structure is None
    assert config.to_dict()["model"] == "cpu-micro"  # a dense model keeps the string form


def test_the_model_section_names_its_structure(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: {preset: cpu-tiny, structure: {name: toy-scaled, gain: 2.0}}\n")
    config = load_config(path)
    assert config.model == "cpu-tiny" and config.structure == {"name": "toy-scaled", "gain": 2.0}
    assert config.to_dict()["model"] == {"preset": "cpu-tiny", "structure": {"name": "toy-scaled", "gain": 2.0}}
    flagged = load_config(overrides={"model.structure": {"name": "toy-scaled"}, "model.preset": "cpu-small"})
    assert flagged.model == "cpu-small" and flagged.structure == {"name": "toy-scaled"}
    with pytest.raises(ConfigError, match="model section"):
        load_config(overrides={"model": {"structure": {"name": "x"}}})


def test_unknown_names_list_the_choices():
    with pytest.raises(ConfigError, match="unknown structure 'nope'; choose one of"):
        build_model("cpu-micro", vocab_size=64, structure={"name": "nope"})
    with pytest.raises(ConfigError, match="unknown optimizer 'nope'; choose one of: .*adamw"):
        build_optimizer("nope", build_model("cpu-micro", vocab_size=64))
    from lowmem.interventions import build_intervention

    with pytest.raises(ConfigError, match="unknown intervention 'nope'; choose one of: .*momentum-reset"):
        build_intervention("nope")


def test_toy_structure_and_intervention_from_outside_lowmem_run_end_to_end_and_resume_exactly(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    common = ["--plugin", str(TOY_PLUGIN), "--model", "cpu-micro", "--data", str(corpus), "--vocab-size", "300",
              "--seq-len", "32", "--seq-mode", "pad", "--batch-size", "4", "--micro-batch-size", "4",
              "--eval-tokens", "500", "--log-every", "1", "--no-progress", "--lr", "3e-3",
              "--structure", "toy-scaled:gain=0.5", "--intervention", "toy-gradient-probe:every=3"]
    env_cache = ["--output-dir"]
    whole = _lowmem("train", *common, "--steps", "8", *env_cache, "whole", cwd=tmp_path)
    assert whole.returncode == 0, whole.stderr
    first = _lowmem("train", *common, "--steps", "8", "--checkpoint-every", "4", *env_cache, "split", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    # Resume the split run from its step-4 checkpoint: steps 5..8 again, from the saved state.
    step4 = tmp_path / "split" / "checkpoints" / "step-00000004"
    (tmp_path / "split" / "metrics.jsonl").write_text(
        "\n".join(l for l in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()
                  if json.loads(l)["step"] <= 4) + "\n")
    resumed = _lowmem("train", "--plugin", str(TOY_PLUGIN), "--resume", str(step4), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert _losses(tmp_path / "split" / "metrics.jsonl") == _losses(tmp_path / "whole" / "metrics.jsonl")

    body = checkpoint.load_whole(tmp_path / "whole" / "checkpoints" / "step-00000008")
    probe = body["interventions"]["toy-gradient-probe"]
    # The probe ran before every optimizer step and saw a live, nonzero gradient each time.
    assert probe["calls"] == 8 and probe["grad_norms_seen"] == 8 and probe["after_calls"] == 2
    assert body["structure"] == {"converted": 7, "gain": 0.5}  # q k v o gate up down of one block
    assert any(k.endswith("toy_scale") for k in body["model"])  # the structure's buffer rides in the model state
    summary = json.loads((tmp_path / "whole" / "summary.json").read_text())
    assert summary["structure"] == {"name": "toy-scaled", "gain": 0.5}


def test_kinds_reach_the_param_groups_and_unsupported_kinds_are_refused():
    sys.path.insert(0, str(TOY_PLUGIN.parent))
    import toy_plugin  # noqa: F401  (registers toy-factored)

    model = build_model("cpu-micro", vocab_size=64, structure={"name": "toy-factored", "rank": 2})
    kinds = {(g["role"], g.get("kind", "dense")) for g in param_groups(model)}
    assert ("hidden", "factor-a") in kinds and ("hidden", "factor-b") in kinds
    assert build_optimizer("adamw", model)  # elementwise: every kind is fine
    with pytest.raises(ConfigError, match="optimizer 'muon' cannot train 'factor-a' parameters"):
        build_optimizer("muon", model)


def _adam_model():
    torch.manual_seed(0)
    model = build_model("cpu-micro", vocab_size=64)
    optimizer = build_optimizer("adamw", model, lr=1e-2)
    for _ in range(2):
        model(torch.randint(0, 64, (2, 8))).float().pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    return model, optimizer


def test_reset_state_of_selected_parameters_and_entries():
    model, optimizer = _adam_model()
    q = model.layers[0].self_attn.q_proj.weight
    k = model.layers[0].self_attn.k_proj.weight
    mask = torch.zeros_like(k, dtype=torch.bool)
    mask[0, :3] = True
    k_avg_before = optimizer.state[k]["exp_avg"].clone()
    head_before = optimizer.state[model.lm_head.weight]["exp_avg"].clone()
    assert reset_state(optimizer, params=[q]) == 1
    assert torch.count_nonzero(optimizer.state[q]["exp_avg"]) == 0 and float(optimizer.state[q]["step"]) == 0
    assert reset_state(optimizer, masks={k: mask}) == 1
    assert torch.count_nonzero(optimizer.state[k]["exp_avg"][mask]) == 0
    assert torch.equal(optimizer.state[k]["exp_avg"][~mask], k_avg_before[~mask])
    assert float(optimizer.state[k]["step"]) == 2  # a per-tensor counter is left (Adam's cold start)
    assert torch.equal(optimizer.state[model.lm_head.weight]["exp_avg"], head_before)


def test_replace_parameter_moves_or_rebuilds_state():
    model, optimizer = _adam_model()
    old = model.layers[0].mlp.up_proj.weight
    new = nn.Parameter(old.detach().clone())
    replace_parameter(optimizer, old, new, remap=lambda s: {**s, "exp_avg": -s["exp_avg"]})
    assert old not in optimizer.state and new in optimizer.state
    assert any(p is new for g in optimizer.param_groups for p in g["params"])
    fresh = nn.Parameter(new.detach().clone())
    replace_parameter(optimizer, new, fresh)
    assert fresh not in optimizer.state  # rebuilt on the next step


def test_train_step_matches_a_hand_written_step_and_calls_the_hook_with_live_gradients():
    torch.manual_seed(0)
    model = build_model("cpu-micro", vocab_size=64)
    reference = build_model("cpu-micro", vocab_size=64)
    reference.load_state_dict(model.state_dict())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (4, 9), generator=gen)
    labels = ids[:, 1:].clone()
    labels[0, 5:] = -100  # padding
    micro = [{"input_ids": ids[i:i + 2, :-1], "labels": labels[i:i + 2]} for i in (0, 2)]
    seen = []
    result = train_step(model, optimizer, micro, info=DistInfo(),
                        before_update=lambda: seen.append(model.lm_head.weight.grad.norm().item()))
    logits = reference(ids[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 64), labels.reshape(-1), ignore_index=-100)
    loss.backward()
    ref_opt.step()
    assert result.updated and result.targets == int((labels != -100).sum())
    assert result.loss == pytest.approx(loss.item(), rel=1e-6)
    assert len(seen) == 1 and seen[0] > 0
    for a, b in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_where_the_update_happens_is_the_update_object_the_step_is_given():
    # The seam an update applied inside backward (gradient release) plugs into: every micro-batch's
    # backward goes through it, told which one completes the gradients, and the update follows once.
    class Recording(AfterBackward):
        def __init__(self, optimizer):
            super().__init__(optimizer)
            self.calls = []

        def backward(self, loss, last):
            self.calls.append(("backward", last))
            super().backward(loss, last)

        def apply(self, model, before_update):
            self.calls.append(("apply", model.lm_head.weight.grad is not None))
            super().apply(model, before_update)

    torch.manual_seed(0)
    model = build_model("cpu-micro", vocab_size=64)
    update = Recording(torch.optim.SGD(model.parameters(), lr=0.1))
    ids = torch.randint(0, 64, (6, 9), generator=torch.Generator().manual_seed(1))
    micro = [{"input_ids": ids[i:i + 2, :-1], "labels": ids[i:i + 2, 1:]} for i in (0, 2, 4)]
    before = model.lm_head.weight.detach().clone()
    assert train_step(model, update, micro, info=DistInfo()).updated
    assert update.calls == [("backward", False), ("backward", False), ("backward", True), ("apply", True)]
    assert not torch.equal(model.lm_head.weight, before)


def test_train_step_skips_the_update_on_a_non_finite_loss():
    model = build_model("cpu-micro", vocab_size=64)
    with torch.no_grad():
        model.lm_head.weight.fill_(float("nan"))
    before = model.layers[0].mlp.up_proj.weight.detach().clone()
    called = []
    result = train_step(model, torch.optim.SGD(model.parameters(), lr=0.1),
                        [{"input_ids": torch.zeros(1, 4, dtype=torch.long), "labels": torch.ones(1, 4, dtype=torch.long)}],
                        info=DistInfo(), before_update=lambda: called.append(1))
    assert not result.updated and not called
    assert torch.equal(model.layers[0].mlp.up_proj.weight, before)


def test_assemble_builds_every_part_from_a_config(tmp_path):
    config = load_config(overrides={"model": "cpu-micro", "optim.name": "stable-spam", "train.steps": 77, "data.seq_len": 32,
                                    "optim.interventions": [{"name": "momentum-reset", "every": 5}]})
    run = assemble(config, vocab_size=64)
    assert run.core is run.model and run.structure is None
    assert run.hparams["total_T"] == 77  # what the method takes from the run, filled by the assembly
    assert all("initial_lr" in g for g in run.optimizer.param_groups)
    assert [i.name for i in run.interventions] == ["momentum-reset"]


# ---- the import graph ----------------------------------------------------------------------------

def _layers_from_architecture() -> list[list[str]]:
    """The layer order written in docs/architecture.md: lines '  N. lowmem.a, lowmem.b' (bottom first)."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    block = text.split("## Layers", 1)[1].split("\n## ", 1)[0]
    layers = []
    for line in block.splitlines():
        match = re.match(r"\s*\d+\.\s+(lowmem[\w.]*(?:,\s*lowmem[\w.]*)*)", line)
        if match:
            layers.append([name.strip() for name in match.group(1).split(",")])
    return layers


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT / "src").with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every lowmem module `path` imports, at any depth of the file (lazy imports count too)."""
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names if a.name.startswith("lowmem"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lowmem") and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def test_no_module_imports_from_a_higher_layer():
    layers = _layers_from_architecture()
    assert len(layers) >= 8, "docs/architecture.md lost its '## Layers' list"

    def layer_of(module: str) -> int | None:
        best, best_len = None, -1
        for index, names in enumerate(layers):
            for name in names:
                if name == "lowmem" and module != "lowmem":
                    continue  # the root package is placed by itself, not as everyone's prefix
                if (module == name or module.startswith(name + ".")) and len(name) > best_len:
                    best, best_len = index, len(name)
        return best

    files = sorted((ROOT / "src" / "lowmem").rglob("*.py"))
    unplaced = [_module_name(f) for f in files if layer_of(_module_name(f)) is None]
    assert not unplaced, f"modules missing from docs/architecture.md's layer list: {unplaced}"
    violations = []
    for path in files:
        module = _module_name(path)
        own = layer_of(module)
        for imported in _imports(path):
            target = layer_of(imported)
            if target is not None and target > own:
                violations.append(f"{module} (layer {own}) imports {imported} (layer {target})")
    assert not violations, "imports from a higher layer:\n" + "\n".join(sorted(violations))


def test_the_layer_check_catches_an_upward_import(tmp_path):
    fake = tmp_path / "x.py"
    fake.write_text("def f():\n    from lowmem.train.loop import train\n")
    assert "lowmem.train.loop" in _imports(fake)


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_the_model_reaches_its_device_and_dtype_in_one_move(dtype, monkeypatch):
    """No fp32 model is moved and then cast (on a GPU that spike can exceed the training peak): one
    `to(device, dtype)` of the model built on the CPU, whose weights are the CPU run's, bit for bit."""
    torch.manual_seed(0)
    reference = build_model("cpu-tiny", vocab_size=64, structure={"name": "lowrank", "rank": 4})
    if dtype is not None:
        reference = reference.to(dtype)
    moves = []
    real_to = nn.Module.to

    def recorded_to(module, *args, **kwargs):
        moves.append((type(module).__name__, args, kwargs))
        return real_to(module, *args, **kwargs)

    monkeypatch.setattr(nn.Module, "to", recorded_to)
    torch.manual_seed(0)
    model = build_model("cpu-tiny", vocab_size=64, structure={"name": "lowrank", "rank": 4}, device="cpu", dtype=dtype)
    assert moves == [("Llama", (), {"device": "cpu", "dtype": dtype})]
    for (name, ours), theirs in zip(model.state_dict().items(), reference.state_dict().values(), strict=True):
        assert ours.dtype == theirs.dtype and torch.equal(ours, theirs), name
