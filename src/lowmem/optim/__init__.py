"""lowmem's optimizers, registered in `lowmem.registry.OPTIMIZERS`.

    opt = lowmem.optim.build("scale", model, lr=1e-3)            # roles from the model
    opt = lowmem.optim.build("galore", model, preset="llama-60m")  # the paper's defaults for a size

Every optimizer is a torch.optim.Optimizer over param groups carrying a `role` and, for parameters a
structure made (low-rank factors, sparse values), a `kind` (see lowmem.optim.roles). Each method
module registers its names (`register(name, Method(...))`); `Method` names its class lazily, so
importing lowmem.optim does not import every method.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Mapping

from torch import nn
from torch.optim import Optimizer

from lowmem.errors import ConfigError
from lowmem.optim.kinds import refusal
from lowmem.optim.roles import KINDS, ROLES, assign_roles, group_kind, named_roles, param_groups
from lowmem.registry import OPTIMIZERS, resolve_target


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
    # Hyperparameters that follow from the run rather than from the method, as
    # {hyperparameter: run quantity}; e.g. Stable-SPAM's {"total_T": "steps"} (its beta1 decay spans
    # the run). The run assembly fills them unless the user set them.
    from_run: dict[str, str] = field(default_factory=dict)
    # Parameter kinds (lowmem.optim.roles.KINDS) the method trains, each with a documented treatment
    # in the class docstring; build() refuses a model with any other kind.
    kinds: tuple[str, ...] = ("dense",)

    def load(self) -> type[Optimizer]:
        return resolve_target(self.target)

    def hyperparameters(self) -> set[str]:
        """The names the optimizer's constructor takes besides `params`: each method declares its
        hyperparameters once, as the explicit keyword arguments of its `__init__` (torch.optim's way)."""
        cls = self.load()
        parameters = inspect.signature(cls.__init__).parameters
        catch_all = [("**" if p.kind is p.VAR_KEYWORD else "*") + p.name for p in parameters.values()
                     if p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
        if catch_all:  # it would hide the method's names from build(), `lowmem memory` and the error messages
            raise TypeError(f"{cls.__module__}.{cls.__qualname__}.__init__ takes {catch_all[0]}: declare every "
                            "hyperparameter as a keyword argument (lowmem.optim.Method reads them from the signature)")
        return set(parameters) - {"self", "params"}

    def settings(self, preset: str | None = None, hparams: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The hyperparameters this method is built with: its defaults, then the preset's, then `hparams`."""
        settings = dict(self.defaults)
        if preset is not None and preset in self.presets:
            settings.update(self.presets[preset])
        settings.update(hparams or {})
        return settings

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        return resolve_target(self.groups)(model) if self.groups else param_groups(model)


def register(name: str, method: Method) -> None:
    OPTIMIZERS.register(name, method)


# AdamW is elementwise, so every kind is an ordinary tensor to it: factors, sparse values, masked weights.
register("adamw", Method("lowmem.optim.adamw:AdamW", "AdamW, the baseline (every tensor gets Adam)",
                         kinds=("dense", "factor-a", "factor-b", "sparse-values", "masked")))


def available() -> list[str]:
    return OPTIMIZERS.names()


def method(name: str) -> Method:
    """The registry entry of optimizer `name` (every built-in method module loaded first)."""
    return OPTIMIZERS.get(name)


def _why(reason: str) -> str:
    return f"{reason[0].upper()}{reason[1:]}. " if reason else ""


def build(name: str, model: nn.Module, preset: str | None = None, **hparams: Any) -> Optimizer:
    """Build optimizer `name` over `model`'s role groups.

    `preset` picks the method's published defaults for a model size (e.g. "llama-60m"); explicit
    `hparams` override them. Unknown names and unknown hyperparameters raise ConfigError naming the
    valid choices; a parameter kind the method cannot train (a low-rank factor for a projection
    method, say) is refused with the kinds it accepts.
    """
    entry = method(name)
    settings = entry.settings(preset, hparams)
    accepted = entry.hyperparameters()
    unknown = set(settings) - accepted
    if unknown:
        raise ConfigError(
            f"optimizer {name!r} has no hyperparameter(s) {sorted(unknown)}; it accepts: {', '.join(sorted(accepted))}"
        )
    groups = entry.param_groups(model)
    supported = entry.kinds
    for group in groups:
        kind = group_kind(group)
        if kind not in supported:
            raise ConfigError(
                f"optimizer {name!r} cannot train {kind!r} parameters (made by the model's structure); it "
                f"handles: {', '.join(sorted(supported))}. {_why(refusal(name, kind))}Choose another optimizer "
                "(adamw handles every kind) or another structure"
            )
    try:
        return entry.load()(groups, **settings)
    except ConfigError:
        raise
    except (ValueError, TypeError) as err:  # a method's own checks: one message naming the method and value
        given = ", ".join(f"{k}={v!r}" for k, v in sorted(settings.items()))
        raise ConfigError(f"optimizer {name!r} refused its settings ({given}): {err}") from None


__all__ = ["KINDS", "ROLES", "Method", "assign_roles", "available", "build", "method", "named_roles",
           "param_groups", "register"]
