"""Weight structures: rewrite a model's hidden matrices before it is built into a run.

A structure replaces each hidden `nn.Linear` (the role `hidden` of lowmem.optim.roles: q, k, v, o,
gate, up, down in lowmem's LLaMA; embedding, head and norms stay dense) by a module of its own — a
low-rank product, a LoRA adapter, a sparse matrix — that declares what each of its parameters is in
a `param_kinds` attribute ({local name: kind}, kinds in lowmem.optim.roles.KINDS), so optimizers
treat factors and sparse values for what they are.

    structure = build_structure({"name": "lowrank", "rank": 128})
    structure.apply(model)          # in place, before DDP/FSDP2 wrapping and before the optimizer
    structure.apply(model, pretrained=True)  # the same, starting from the model's trained weights
    structure.merge(model)          # back to dense nn.Linear weights (export), where it can

With `pretrained=True` (a run's `--init-from`: the dense weights were loaded before the structure is
applied) each structure starts from the dense matrix it converts where that is defined, and says what
it did in the log: LoRA's W0 is the weight (the model computes what the dense one did), Low-Rank the
best rank-r approximation (truncated SVD), sparse the largest-magnitude blocks, SLTrain the SVD plus
the residual's largest entries. A structure that does not declare `starts_from_dense` is refused then,
rather than dropping the weights.

Registered in lowmem.registry.STRUCTURES by the module that defines each (a test or a user's file
may register its own); a config names one as `model: {preset: llama-60m, structure: {name: lowrank,
rank: 128}}`, the command line as `--structure lowrank:rank=128`. A structure's own state beyond
parameters and buffers (which the model's state dict already carries) goes into checkpoints through
`state_dict()` / `load_state_dict()` under the key `structure`.
"""

from __future__ import annotations

import logging
from typing import Any, Iterator

from torch import nn

from lowmem.errors import ConfigError
from lowmem.optim.roles import assign_roles
from lowmem.registry import STRUCTURES

logger = logging.getLogger(__name__)


class Structure:
    """Base of every structure: `convert` one hidden Linear; the rest is shared."""

    name = "structure"
    # Whether `convert` can start its module from the trained dense weight it is given (`from_dense`).
    starts_from_dense = False
    from_dense = False

    def convert(self, linear: nn.Linear, path: str) -> nn.Module:
        """The module that replaces the hidden Linear at `path` (e.g. "layers.0.self_attn.q_proj"); with
        `self.from_dense` set, one that starts from `linear.weight` (see the module docstring)."""
        raise NotImplementedError

    def apply(self, model: nn.Module, pretrained: bool = False) -> nn.Module:
        """Replace every hidden Linear of `model` in place; return the model. `pretrained`: the model holds
        trained weights (--init-from) that each converted module starts from."""
        self.begin(model, pretrained)
        replaced = 0
        for parent, attribute, path, linear in list(hidden_linears(model)):
            setattr(parent, attribute, self.convert(linear, path))
            replaced += 1
        if not replaced:
            raise ConfigError(f"structure {self.name!r} found no hidden nn.Linear in {type(model).__name__} to replace")
        self.end()
        return model

    def begin(self, model: nn.Module, pretrained: bool) -> None:
        """Before the first convert: refuse trained weights the structure cannot start from."""
        if pretrained and not self.starts_from_dense:
            raise ConfigError(
                f"structure {self.name!r} cannot start from trained dense weights (--init-from): it would drop "
                "them; train it from scratch, or start the structure from a fresh model"
            )
        self.from_dense = pretrained

    def end(self) -> None:
        """After the last convert: say in the log how a structure started from trained weights."""
        if self.from_dense:
            logger.info("structure %s: started from the trained dense weights: %s", self.name, self.dense_start())

    def dense_start(self) -> str:
        """What starting from the dense weights did (the log line of `apply(pretrained=True)`)."""
        return "converted from them"

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
