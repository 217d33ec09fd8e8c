"""lowmem's optimizers and the one registry of methods.

    opt = lowmem.optim.build("scale", model, lr=1e-3)            # roles from the model
    opt = lowmem.optim.build("galore", model, preset="llama-60m")  # the paper's defaults for a size

Every optimizer is a torch.optim.Optimizer over param groups carrying a `role`
(see lowmem.optim.roles). Each registry entry names its class lazily, so importing lowmem.optim
does not import every method.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass, field
from typing import Any

from torch import nn
from torch.optim import Optimizer

from lowmem.errors import ConfigError
from lowmem.optim.roles import ROLES, assign_roles, named_roles, param_groups


@dataclass(frozen=True)
class Method:
    target: str  # "module:Class"
    summary: str
    # Per-model-size defaults from the papers' released scripts, keyed by model preset name.
    presets: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Defaults that differ from the class's own (for example a variant of one class).
    defaults: dict[str, Any] = field(default_factory=dict)
    # "module:function" building this method's groups from the model, where roles alone are not
    # enough (Adam-mini's per-head blocks); None: lowmem.optim.param_groups.
    groups: str | None = None

    def load(self) -> type[Optimizer]:
        return _resolve(self.target)

    def hyperparameters(self) -> set[str]:
        """The names the optimizer's constructor takes besides `params`."""
        return set(inspect.signature(self.load().__init__).parameters) - {"self", "params"}

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        return _resolve(self.groups)(model) if self.groups else param_groups(model)


def _resolve(target: str) -> Any:
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


REGISTRY: dict[str, Method] = {
    "adamw": Method("lowmem.optim.adamw:AdamW", "AdamW, the baseline (every tensor gets Adam)"),
}


def register(name: str, method: Method) -> None:
    REGISTRY[name] = method


def _load_builtin_methods() -> None:
    # Each method module registers its names on import; listed here so the registry is complete.
    for module in _METHOD_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name != module:
                raise


_METHOD_MODULES = (
    "lowmem.optim.scale",
    "lowmem.optim.galore",
    "lowmem.optim.apollo",
    "lowmem.optim.muon",
    "lowmem.optim.adam_mini",
    "lowmem.optim.stable_spam",
)


def available() -> list[str]:
    _load_builtin_methods()
    return sorted(REGISTRY)


def method(name: str) -> Method:
    """The registry entry of optimizer `name` (every built-in method module loaded first)."""
    _load_builtin_methods()
    if name not in REGISTRY:
        raise ConfigError(f"unknown optimizer {name!r}; choose one of: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]


def build(name: str, model: nn.Module, preset: str | None = None, **hparams: Any) -> Optimizer:
    """Build optimizer `name` over `model`'s role groups.

    `preset` picks the method's published defaults for a model size (e.g. "llama-60m"); explicit
    `hparams` override them. Unknown names and unknown hyperparameters raise ValueError naming the
    valid choices.
    """
    entry = method(name)
    settings = dict(entry.defaults)
    if preset is not None and preset in entry.presets:
        settings.update(entry.presets[preset])
    settings.update(hparams)
    accepted = entry.hyperparameters()
    unknown = set(settings) - accepted
    if unknown:
        raise ConfigError(
            f"optimizer {name!r} has no hyperparameter(s) {sorted(unknown)}; it accepts: {', '.join(sorted(accepted))}"
        )
    return entry.load()(entry.param_groups(model), **settings)


__all__ = ["REGISTRY", "ROLES", "Method", "assign_roles", "available", "build", "method", "named_roles", "param_groups", "register"]
