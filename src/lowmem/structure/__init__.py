"""Weight structures: rewrite a model's hidden matrices before it is built into a run.

A structure replaces each hidden `nn.Linear` (the role `hidden` of lowmem.optim.roles: q, k, v, o,
gate, up, down in lowmem's LLaMA; embedding, head and norms stay dense) by a module of its own — a
low-rank product, a LoRA adapter, a sparse matrix — that declares what each of its parameters is in
a `param_kinds` attribute ({local name: kind}, kinds in lowmem.optim.roles.KINDS), so optimizers
treat factors and sparse values for what they are.

    structure = build_structure({"name": "lowrank", "rank": 128})
    structure.apply(model)          # in place, before DDP/FSDP2 wrapping and before the optimizer
    structure.merge(model)          # back to dense nn.Linear weights (export), where it can

Registered in lowmem.registry.STRUCTURES by the module that defines each (a test or a user's file
may register its own); a config names one as `model: {preset: llama-60m, structure: {name: lowrank,
rank: 128}}`, the command line as `--structure lowrank:rank=128`. A structure's own state beyond
parameters and buffers (which the model's state dict already carries) goes into checkpoints through
`state_dict()` / `load_state_dict()` under the key `structure`.
"""

from __future__ import annotations

from typing import Any, Iterator

from torch import nn

from lowmem.errors import ConfigError
from lowmem.optim.roles import assign_roles
from lowmem.registry import STRUCTURES


class Structure:
    """Base of every structure: `convert` one hidden Linear; the rest is shared."""

    name = "structure"

    def convert(self, linear: nn.Linear, path: str) -> nn.Module:
        """The module that replaces the hidden Linear at `path` (e.g. "layers.0.self_attn.q_proj")."""
        raise NotImplementedError

    def apply(self, model: nn.Module) -> nn.Module:
        """Replace every hidden Linear of `model` in place; return the model."""
        replaced = 0
        for parent, attribute, path, linear in list(hidden_linears(model)):
            setattr(parent, attribute, self.convert(linear, path))
            replaced += 1
        if not replaced:
            raise ConfigError(f"structure {self.name!r} found no hidden nn.Linear in {type(model).__name__} to replace")
        return model

    def merge(self, model: nn.Module) -> nn.Module:
        """Replace each structured module by an nn.Linear holding its dense weight (`dense_weight()`)."""
        for path, module in list(model.named_modules()):
            dense = getattr(module, "dense_weight", None)
            if path and callable(dense):
                weight = dense().detach()
                linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device, dtype=weight.dtype)
                linear.weight.data.copy_(weight)
                parent_path, _, attribute = path.rpartition(".")
                setattr(model.get_submodule(parent_path) if parent_path else model, attribute, linear)
        return model

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def hidden_linears(model: nn.Module) -> Iterator[tuple[nn.Module, str, str, nn.Linear]]:
    """(parent module, attribute, dotted path, Linear) of every nn.Linear whose weight has the hidden role."""
    roles = assign_roles(model)
    for path, module in model.named_modules():
        for attribute, child in module.named_children():
            if isinstance(child, nn.Linear) and roles.get(child.weight) == "hidden":
                yield module, attribute, f"{path}.{attribute}" if path else attribute, child


def build_structure(spec: dict[str, Any] | None) -> Structure | None:
    """The structure a config names ({"name": ..., settings...}); None for a dense model."""
    if not spec:
        return None
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise ConfigError(f"a structure must be a mapping with a 'name', e.g. {{name: lowrank, rank: 128}}; got {spec!r}")
    return STRUCTURES.build(spec["name"], **{k: v for k, v in spec.items() if k != "name"})


__all__ = ["STRUCTURES", "Structure", "build_structure", "hidden_linears"]
