"""Which part each parameter plays, so every optimizer treats the same tensors the same way.

Roles:
  hidden     2-D weights of the attention and MLP projections (every nn.Linear but the head)
  embedding  the model's input embedding (maps one-hot tokens to hidden vectors)
  head       the model's output head (hidden to vocabulary logits)
  vector     1-D parameters: norm gains and biases

Roles come from module types and from the model's declared embeddings — the Hugging Face methods
`get_input_embeddings()` / `get_output_embeddings()` — never from parameter-name substrings. Every
nn.Embedding is an embedding (GPT-2's position table `wpe` too, not a hidden matrix).

Tied embeddings (GPT-2, a tied LLaMA): the one weight is both, and gets the role `head`, with a
warning that says so. Its gradient is the head's dense gradient (every vocabulary row, every step)
plus the embedding's sparse one (the batch's tokens), so it behaves as a head; SCALE's momentum,
which the paper finds is what the last layer needs, stays on it instead of being dropped, and SCALE
normalizes it as the head (each vocabulary row). Muon and Adam-mini treat the two roles alike.

Orientation. nn.Linear stores [out, in]; Hugging Face's GPT-2 `Conv1D` stores [in, out]. A group
whose weights run the other way carries `input_dim: 0` (`group_input_dim` reads it), and the methods
that depend on orientation follow it: SCALE's column normalization (over the input dim), Muon's
shape factor, Adam-mini's per-output-neuron blocks. A module may declare its own with an integer
attribute `weight_input_dim`. A module type lowmem does not know (not Linear, Embedding, Conv1D, no
declaration) that owns a matrix gets the role below with a warning naming the type and the role.
Roles for 1-D tensors never depend on the module type (norm gains and biases are vectors).

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

import sys
import warnings
from typing import Any

import torch
from torch import nn

from lowmem.errors import ConfigError

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


def _conv1d_type() -> type | None:
    """transformers' Conv1D, if transformers is loaded (a model built from it has loaded it)."""
    module = sys.modules.get("transformers.pytorch_utils")
    return getattr(module, "Conv1D", None) if module is not None else None


def weight_input_dim(module: nn.Module) -> int | None:
    """The dim of `module.weight` that runs over the module's inputs: 1 for nn.Linear ([out, in]),
    0 for Conv1D ([in, out]) or what the module declares in `weight_input_dim`; None: unknown type."""
    declared = getattr(module, "weight_input_dim", None)
    if isinstance(declared, int) and not isinstance(declared, bool):
        return declared
    conv1d = _conv1d_type()
    if conv1d is not None and isinstance(module, conv1d):
        return 0
    if isinstance(module, nn.Linear) or getattr(module, "param_kinds", None) or callable(getattr(module, "dense_weight", None)):
        return 1
    return None


def input_dims(model: nn.Module) -> dict[nn.Parameter, int]:
    """Every trainable weight whose input dim is not 1 (Conv1D's [in, out]) mapped to it."""
    out: dict[nn.Parameter, int] = {}
    for module in model.modules():
        weight = module._parameters.get("weight")
        if weight is None or weight.dim() < 2 or not weight.requires_grad:
            continue
        dim = weight_input_dim(module)
        if dim not in (None, 1) and weight not in out:
            out[weight] = dim
    return out


def group_input_dim(group: dict[str, Any], param: torch.Tensor) -> int:
    """The input dim of matrix `param` in `group`: 1 ([out, in]) unless the group says otherwise
    (1 for a 1-D tensor too, where it means nothing)."""
    return int(group.get("input_dim", 1)) if param.dim() >= 2 else 1


def _head_not_found(model: nn.Module) -> ConfigError:
    return ConfigError(
        f"found no output head in {type(model).__name__}: it has an input embedding but get_output_embeddings() "
        "gives nothing and no nn.Linear maps onto the vocabulary. Define get_output_embeddings() returning the "
        "head (the layer that produces the logits), or pass param groups with role 'head' to the optimizer"
    )


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
        if embeddings and head is None:
            raise _head_not_found(model)
        warnings.warn(
            f"{type(model).__name__} declares no get_input_embeddings()/get_output_embeddings(); "
            f"using the fallback: {len(embeddings)} nn.Embedding module(s) as embedding and "
            + ("the last nn.Linear onto the vocabulary as head" if head is not None else "no head")
            + ". Define those two methods on the model to make the roles explicit.",
            stacklevel=3,
        )
    elif head is None:
        warnings.warn(
            f"{type(model).__name__}.get_output_embeddings() gives no head: no parameter gets the role 'head' "
            "(SCALE then keeps no momentum). Fine for a decoder without a language-model head; otherwise make "
            "get_output_embeddings() return the layer that produces the logits",
            stacklevel=3,
        )
    roles: dict[nn.Parameter, str] = {}
    head_params = {id(p) for p in head.parameters()} if head is not None else set()
    embedding_params = {id(p) for p in embedding.parameters()} if embedding is not None else set()
    if head_params & embedding_params:
        warnings.warn(
            f"{type(model).__name__}'s output head is tied to its input embedding; the shared weight gets the head "
            "role (SCALE keeps its momentum there and normalizes it per vocabulary row; see lowmem.optim.roles)",
            stacklevel=3,
        )
    unknown: dict[str, list[str]] = {}
    for path, module in model.named_modules():
        declared = getattr(module, "param_kinds", None) or {}
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or param in roles:
                continue
            if declared.get(name) == "sparse-values":  # 1-D, but the values of a hidden matrix
                roles[param] = "hidden"
            elif id(param) in head_params:
                roles[param] = "head" if param.dim() >= 2 else "vector"
            elif id(param) in embedding_params or isinstance(module, nn.Embedding):
                roles[param] = "embedding"
            else:
                roles[param] = default_role(param)
                if param.dim() >= 2 and weight_input_dim(module) is None and not declared:
                    unknown.setdefault(type(module).__name__, []).append(path or "<root>")
    for type_name, paths in unknown.items():
        warnings.warn(
            f"module type {type_name} (at {', '.join(paths[:3])}{', ...' if len(paths) > 3 else ''}) is not one lowmem "
            "knows (nn.Linear, nn.Embedding, Conv1D); its matrix parameters get the role 'hidden', read as [out, in] "
            "like nn.Linear. Declare `weight_input_dim` on the module (0 for [in, out]) if that is wrong",
            stacklevel=3,
        )
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
    """Parameter groups with a `role` key (and `kind` when not dense, `input_dim` when a weight is
    stored [in, out]), in the model's parameter order, empty groups omitted; one group per (role,
    kind, input dim).

    `per_role` adds hyperparameters to one role's groups, e.g. `param_groups(m, vector={"lr": 1e-2})`.
    """
    unknown = set(per_role) - set(ROLES)
    if unknown:
        raise ValueError(f"unknown role(s) {sorted(unknown)}; roles are {', '.join(ROLES)}")
    roles = assign_roles(model)
    kinds = assign_kinds(model)
    dims = input_dims(model)
    groups = []
    for role in ROLES:
        for kind in KINDS:
            for input_dim in sorted({dims.get(p, 1) for p, r in roles.items() if r == role}, reverse=True):
                params = [p for p, r in roles.items()
                          if r == role and kinds.get(p, "dense") == kind and dims.get(p, 1) == input_dim]
                if params:
                    extra = {} if kind == "dense" else {"kind": kind}
                    if input_dim != 1:
                        extra["input_dim"] = input_dim
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
