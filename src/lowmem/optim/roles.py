"""Which part each parameter plays, so every optimizer treats the same tensors the same way.

Roles:
  hidden     2-D weights of the attention and MLP projections (every nn.Linear but the head)
  embedding  the model's input embedding (maps one-hot tokens to hidden vectors)
  head       the model's output head (hidden to vocabulary logits)
  vector     1-D parameters: norm gains and biases

Roles come from module types and from the model's declared embeddings — the Hugging Face methods
`get_input_embeddings()` / `get_output_embeddings()` — never from parameter-name substrings.

Fallback for a model that declares neither (documented in docs/architecture.md): every nn.Embedding
is an embedding; the head is the last nn.Linear whose out_features equals the single embedding's
vocabulary size; if none matches, no head is assigned and a warning says so. Tensors of more than two
dimensions that belong to no Linear (convolutions, say) are treated as hidden and viewed 2-D by the
methods that need a matrix. A parameter passed to an optimizer in a group without a role gets
`default_role(param)`: vector for 1-D, hidden otherwise.

Kinds, beside roles: what a parameter *is*, when a structure (lowmem.structure) made it. A module
declares them in a `param_kinds` attribute, {local parameter name: kind}; undeclared parameters are
`dense`. Groups are split by (role, kind) and carry `kind` when it is not dense, so an optimizer
knows a low-rank factor from a whole weight:
  dense          an ordinary weight
  factor-a       the input-side factor A (r x in) of a product B A; its partner is the module's factor-b
  factor-b       the output-side factor B (out x r) of B A
  sparse-values  the 1-D nonzero values of a sparse matrix whose positions the module keeps as an index
  masked         a dense-stored weight of which only the entries of a mask are active
  frozen         a fixed base weight (requires_grad False: in no optimizer group)
Each registry entry lists the kinds its method trains (`Method.kinds`); `build` refuses the rest.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

ROLES = ("hidden", "embedding", "head", "vector")
KINDS = ("dense", "factor-a", "factor-b", "sparse-values", "masked", "frozen")


def default_role(param: torch.Tensor) -> str:
    return "vector" if param.dim() < 2 else "hidden"


def _declared(model: nn.Module, method: str) -> nn.Module | None:
    fn = getattr(model, method, None)
    if fn is None:
        return None
    try:
        return fn()
    except NotImplementedError:
        return None


def assign_roles(model: nn.Module) -> dict[nn.Parameter, str]:
    """Map every trainable parameter of `model` to its role."""
    embedding = _declared(model, "get_input_embeddings")
    head = _declared(model, "get_output_embeddings")
    if embedding is None and head is None:
        embeddings = [m for m in model.modules() if isinstance(m, nn.Embedding)]
        if len(embeddings) == 1:
            vocab = embeddings[0].num_embeddings
            candidates = [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == vocab]
            head = candidates[-1] if candidates else None
        warnings.warn(
            f"{type(model).__name__} declares no get_input_embeddings()/get_output_embeddings(); "
            f"using the fallback: {len(embeddings)} nn.Embedding module(s) as embedding and "
            + ("the last nn.Linear onto the vocabulary as head" if head is not None else "no head")
            + ". Define those two methods on the model to make the roles explicit.",
            stacklevel=3,
        )
    roles: dict[nn.Parameter, str] = {}
    head_params = {id(p) for p in head.parameters()} if head is not None else set()
    embedding_params = {id(p) for p in embedding.parameters()} if embedding is not None else set()
    if head_params & embedding_params:
        warnings.warn("the head is tied to the embedding; the shared weight gets the embedding role", stacklevel=3)
    for module in model.modules():
        declared = getattr(module, "param_kinds", None) or {}
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or param in roles:
                continue
            if declared.get(name) == "sparse-values":  # 1-D, but the values of a hidden matrix
                roles[param] = "hidden"
            elif id(param) in embedding_params or (embedding is None and isinstance(module, nn.Embedding)):
                roles[param] = "embedding"
            elif id(param) in head_params:
                roles[param] = "head" if param.dim() >= 2 else "vector"
            else:
                roles[param] = default_role(param)
    return roles


def assign_kinds(model: nn.Module) -> dict[nn.Parameter, str]:
    """Map every parameter a module declares in its `param_kinds` to that kind (others are dense)."""
    kinds: dict[nn.Parameter, str] = {}
    for module in model.modules():
        declared = getattr(module, "param_kinds", None)
        if not declared:
            continue
        for name, kind in declared.items():
            if kind not in KINDS:
                raise ValueError(f"{type(module).__name__} declares parameter {name!r} of unknown kind {kind!r}; kinds are {', '.join(KINDS)}")
            param = module._parameters.get(name)
            if param is not None:
                kinds[param] = kind
    return kinds


def param_groups(model: nn.Module, **per_role: dict[str, Any]) -> list[dict[str, Any]]:
    """Parameter groups with a `role` key (and `kind` when not dense), in the model's parameter
    order, empty groups omitted; one group per (role, kind).

    `per_role` adds hyperparameters to one role's groups, e.g. `param_groups(m, vector={"lr": 1e-2})`.
    """
    unknown = set(per_role) - set(ROLES)
    if unknown:
        raise ValueError(f"unknown role(s) {sorted(unknown)}; roles are {', '.join(ROLES)}")
    roles = assign_roles(model)
    kinds = assign_kinds(model)
    groups = []
    for role in ROLES:
        for kind in KINDS:
            params = [p for p, r in roles.items() if r == role and kinds.get(p, "dense") == kind]
            if params:
                extra = {} if kind == "dense" else {"kind": kind}
                groups.append({"params": params, "role": role, **extra, **per_role.get(role, {})})
    return groups


def group_kind(group: dict[str, Any]) -> str:
    kind = group.get("kind", "dense")
    if kind not in KINDS:
        raise ValueError(f"param group has kind {kind!r}; kinds are {', '.join(KINDS)}")
    return kind


def group_role(group: dict[str, Any], param: torch.Tensor) -> str:
    role = group.get("role")
    if role is None:
        return default_role(param)
    if role not in ROLES:
        raise ValueError(f"param group has role {role!r}; roles are {', '.join(ROLES)}")
    return role


def named_roles(model: nn.Module) -> dict[str, str]:
    """Parameter name to role, for reports and tests."""
    roles = assign_roles(model)
    return {name: roles[p] for name, p in model.named_parameters() if p in roles}
