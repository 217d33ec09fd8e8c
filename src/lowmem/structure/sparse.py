"""Sparse hidden layers and their topology updates: dynamic sparse training (DST).

References: SMET, "Sparse Memory-Efficient Training" (arXiv 2606.00888, ICML 2026); SET, Mocanu et
al., "Scalable training of artificial neural networks with adaptive sparse connectivity" (Nature
Communications 9:2383, 2018); RigL and ERK, Evci et al., "Rigging the Lottery" (ICML 2020, arXiv
1911.11134).

Structure `sparse` (density d, block B, storage, distribution):
  every hidden W (out x in) is viewed flat as n = out*in/B contiguous blocks of B entries; k_l =
  round(d_l n) of them are active, drawn uniformly at random (seeded), keeping the dense init's
  values; the rest are 0. d_l = d in every layer, or ERK (d_l proportional to (in+out)/(in*out),
  scaled so the hidden matrices hold d of their weights, capped at 1).
  storage `dense`: W is a dense Parameter holding zeros outside the active blocks (kind `masked`)
  with a dense gradient that backward masks to them: 16 B per dense element at d = 0.5, B = 1, fp32
  with SMET (weight, gradient, compact m and v, int32 block index and step). Not the released
  code's layout, which keeps a dense weight without a gradient (requires_grad=False) and gathers the
  active entries' gradient into a compact vector in a hook: ~13 B per element there (15 counting the
  hook's own int32 element index, rebuilt at each topology update).
  storage `compact`: only the k*B active values are a Parameter (kind `sparse-values`) beside the
  int32 block index; the dense W of a layer is built while that layer computes (forward, and again
  in backward) and freed after, so its gradient is compact too (accumulated over micro-batches).
  Under bf16 autocast both compute the layer's matmuls in bf16 (as an nn.Linear would) and return
  gradients in the parameter's dtype.
  From trained dense weights (`apply(model, pretrained=True)`, --init-from): the k_l blocks of largest
  L1 norm (the pruning score) are the active ones, keeping their values.
Intervention `topology` (every ΔT, drop p0 -> p_end, grow random | gradient), as SMET's released code
(QiaoXiao7282/SMET, sparselearning/core_dst.py) prunes and grows:
  at steps t = ΔT, 2ΔT, ... < T (SET: right after update t, so a grown block's first step has a
  gradient; RigL: before update t, with that step's gradient, which the grown blocks then use): p(t) = p_end + (p0 - p_end)(1 + cos(pi t/T))/2;
  per layer of n active blocks keep the max(1, floor(n (1 - p))) of largest L1 norm (sum of |w| over
  the block), drop the rest, and grow as many inactive ones (never the ones just dropped: they were
  active), uniformly at random (SET; the release's only growth) or by the largest L2 norm of the dense
  gradient (RigL, a lowmem option; that gradient is kept, summed over micro-batches and ranks, only in
  the backward of that one step); grown weights start at 0. A checkpoint written before this form
  (squared-L2 scores, round(p n) dropped) resumes with it. A grown block takes a dropped block's slot
  in the index, so compact tensors keep their length (and the optimizer its parameters). Rank 0
  decides; the decision is broadcast; then the optimizer is told with
  `lowmem.optim.state.reset_state(masks=...)` (AdamW zeroes those moments and keeps its tensor step:
  the cold start; SMET restarts the blocks' local steps).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from lowmem.distributed import all_reduce_sum, broadcast, current_info
from lowmem.errors import ConfigError, check_choice
from lowmem.interventions import BaseIntervention, RunContext
from lowmem.optim.state import reset_state
from lowmem.registry import INTERVENTIONS, STRUCTURES
from lowmem.structure import Structure, hidden_linears

STORAGES = ("dense", "compact")
DISTRIBUTIONS = ("uniform", "erk")
GROWTH = ("random", "gradient")
# How an update picks the blocks to drop: as SMET's release does (L1 scores, n - max(1, floor(n (1 - p)))
# dropped), or as lowmem did before (squared L2, round(p n)), which only a checkpoint written then selects.
SELECTIONS = ("released", "lowmem-v1")
INDEX_DTYPE = torch.int32


class _SparseMatmul(torch.autograd.Function):
    """y = x W^T for a sparse layer; the gradient of its parameter is masked (dense) or compact.

    Under autocast the forward's matmul runs in the autocast dtype; backward runs outside autocast, so
    it casts to that dtype itself (an nn.Linear's backward computes in it too) and returns each
    gradient in its input's dtype."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, param: torch.Tensor, layer: "SparseLinear") -> torch.Tensor:
        device = x.device.type
        compute = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        ctx.layer, ctx.compute, ctx.x_dtype = layer, compute, x.dtype
        # Saved in the dtype backward computes in (what autocast saves for an nn.Linear).
        ctx.save_for_backward(x.to(compute) if compute is not None else x, param)
        return nn.functional.linear(x, layer.dense_from(param))

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, param = ctx.saved_tensors
        layer: SparseLinear = ctx.layer
        compute = ctx.compute if ctx.compute is not None else param.dtype
        grad_out = grad_out.to(compute)
        grad_x = None
        if ctx.needs_input_grad[0]:
            weight = layer.dense_from(param).to(compute)
            grad_x = (grad_out @ weight).to(ctx.x_dtype)
            del weight
        grad_w = grad_out.reshape(-1, layer.out_features).t() @ x.to(compute).reshape(-1, layer.in_features)
        grad_w = grad_w.to(param.dtype)
        if layer.capture:
            layer.dense_grad = grad_w.clone() if layer.dense_grad is None else layer.dense_grad.add_(grad_w)
        index = layer.block_index.long()
        if layer.storage == "compact":
            grad_param = grad_w.view(-1, layer.block_size).index_select(0, index).reshape(-1)
        else:
            grad_param = grad_w.view(-1, layer.block_size).mul_(layer.block_mask().unsqueeze(1).to(grad_w.dtype))
            grad_param = grad_param.view_as(grad_w)
        return grad_x, grad_param, None


class SparseLinear(nn.Module):
    """A hidden Linear with k of its n blocks of B flat entries active (see the module docstring).

    Parameters: `weight` (out x in, kind masked) for storage dense, `values` (k*B, kind
    sparse-values) for compact; buffer `block_index` (k int32: slot -> block id, in no particular
    order). `dense_grad` holds the dense gradient only while `capture` is set (a RigL update step).
    The trainable parameter carries `_lowmem_sparse = self` so an optimizer (SMET) finds its layout.
    """

    def __init__(self, linear: nn.Linear, density: float, block_size: int, storage: str,
                 generator: torch.Generator, from_dense: bool = False) -> None:
        super().__init__()
        if linear.bias is not None:
            raise ConfigError("structure 'sparse' converts bias-free Linear layers only (lowmem's LLaMA has none)")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        numel = self.in_features * self.out_features
        if numel % block_size:
            raise ConfigError(
                f"structure 'sparse': block={block_size} does not divide the {self.out_features}x{self.in_features} "
                "weight; choose a block size that divides in_features*out_features (e.g. a power of two)"
            )
        self.block_size, self.storage = block_size, storage
        self.n_blocks = numel // block_size
        n_active = min(self.n_blocks, max(1, round(density * self.n_blocks)))
        source = linear.weight.detach()
        if from_dense:  # the trained weight's largest blocks (L1, the pruning score)
            chosen = source.reshape(self.n_blocks, block_size).abs().sum(1).topk(n_active).indices.sort().values.cpu()
        else:
            chosen = torch.randperm(self.n_blocks, generator=generator)[:n_active].sort().values
        device = linear.weight.device
        self.register_buffer("block_index", chosen.to(INDEX_DTYPE).to(device))
        self.capture = False
        self.dense_grad: torch.Tensor | None = None
        if storage == "dense":
            weight = source.clone().view(self.n_blocks, block_size).mul_(self.block_mask().unsqueeze(1).to(source.dtype))
            self.weight = nn.Parameter(weight.view(self.out_features, self.in_features))
            self.param_kinds = {"weight": "masked"}
        else:
            values = source.reshape(self.n_blocks, block_size).index_select(0, self.block_index.long())
            self.values = nn.Parameter(values.reshape(-1).clone())
            self.param_kinds = {"values": "sparse-values"}
        self.sparse_param._lowmem_sparse = self

    @property
    def sparse_param(self) -> nn.Parameter:
        return self.weight if self.storage == "dense" else self.values

    @property
    def n_active(self) -> int:
        return self.block_index.numel()

    @property
    def density(self) -> float:
        return self.n_active / self.n_blocks

    def block_mask(self) -> torch.Tensor:
        """(n_blocks,) bool: which blocks are active."""
        mask = torch.zeros(self.n_blocks, dtype=torch.bool, device=self.block_index.device)
        return mask.index_fill_(0, self.block_index.long(), True)

    def dense_from(self, param: torch.Tensor) -> torch.Tensor:
        """The dense out x in weight from this layer's parameter (a new tensor for compact storage)."""
        if self.storage == "dense":
            return param
        weight = param.new_zeros(self.n_blocks, self.block_size)
        weight.index_copy_(0, self.block_index.long(), param.view(-1, self.block_size))
        return weight.view(self.out_features, self.in_features)

    def dense_weight(self) -> torch.Tensor:
        return self.dense_from(self.sparse_param).detach().clone()

    def active_blocks(self) -> torch.Tensor:
        """(k, B): the values of the active blocks, in slot order."""
        param = self.sparse_param.detach()
        if self.storage == "compact":
            return param.view(-1, self.block_size)
        return param.view(-1, self.block_size).index_select(0, self.block_index.long())

    @torch.no_grad()
    def regrow(self, slots: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
        """Put inactive `blocks` into index `slots` (their blocks are dropped), values 0; return the
        mask of optimizer-state entries to reset, shaped like the parameter.

        The gradient of this step (computed for the old topology) is made the new topology's: 0 at
        dropped blocks, and at grown ones the kept dense gradient (RigL) or 0 (SET, which kept none),
        in both storages alike."""
        slots, blocks = slots.long().to(self.block_index.device), blocks.long().to(self.block_index.device)
        param, grad = self.sparse_param, self.sparse_param.grad
        grown_grad = None
        if grad is not None and self.dense_grad is not None:
            grown_grad = self.dense_grad.view(-1, self.block_size).index_select(0, blocks).to(grad.dtype)
        if self.storage == "compact":
            param.view(-1, self.block_size).index_fill_(0, slots, 0)
            if grad is not None:
                grad.view(-1, self.block_size).index_fill_(0, slots, 0)
                if grown_grad is not None:
                    grad.view(-1, self.block_size).index_copy_(0, slots, grown_grad)
            self.block_index.index_copy_(0, slots, blocks.to(INDEX_DTYPE))
            mask = torch.zeros(self.n_active, self.block_size, dtype=torch.bool, device=param.device)
            mask.index_fill_(0, slots, True)
            return mask.view(-1)
        dropped = self.block_index.long().index_select(0, slots)
        touched = torch.cat([dropped, blocks])
        param.view(-1, self.block_size).index_fill_(0, touched, 0)
        if grad is not None:
            grad.view(-1, self.block_size).index_fill_(0, touched, 0)
            if grown_grad is not None:
                grad.view(-1, self.block_size).index_copy_(0, blocks, grown_grad)
        self.block_index.index_copy_(0, slots, blocks.to(INDEX_DTYPE))
        mask = torch.zeros(self.n_blocks, self.block_size, dtype=torch.bool, device=param.device)
        mask.index_fill_(0, touched, True)
        return mask.view_as(param)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _SparseMatmul.apply(x, self.sparse_param, self)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, density={self.density:.4f}, "
                f"block={self.block_size}, storage={self.storage}")


def erk_densities(shapes: list[tuple[int, int]], density: float) -> list[float]:
    """Erdős–Rényi-kernel densities: d_l = eps (in+out)/(in*out), eps chosen so the layers hold
    `density` of their weights overall; layers that would exceed 1 are made dense and eps re-solved."""
    sizes = [o * i for o, i in shapes]
    raw = [(o + i) / (o * i) for o, i in shapes]
    dense: set[int] = set()
    while True:
        budget = density * sum(sizes) - sum(sizes[j] for j in dense)
        weight = sum(raw[j] * sizes[j] for j in range(len(shapes)) if j not in dense)
        eps = budget / weight if weight else 0.0
        over = {j for j in range(len(shapes)) if j not in dense and eps * raw[j] > 1}
        if not over:
            return [1.0 if j in dense else eps * raw[j] for j in range(len(shapes))]
        dense |= over


class SparseStructure(Structure):
    """`sparse`: density, block, storage (dense | compact), distribution (uniform | erk), seed."""

    name = "sparse"
    starts_from_dense = True

    def __init__(self, density: float = 0.5, block: int = 1, storage: str = "dense", distribution: str = "uniform",
                 seed: int = 0) -> None:
        if not isinstance(density, (int, float)) or not 0 < density <= 1:
            raise ConfigError(f"structure 'sparse': density={density!r} must be in (0, 1], e.g. density=0.5")
        if not isinstance(block, int) or isinstance(block, bool) or block < 1:
            raise ConfigError(f"structure 'sparse': block={block!r} must be an integer >= 1 (1: element masks)")
        check_choice("structure 'sparse' storage", storage, STORAGES, ConfigError)
        check_choice("structure 'sparse' distribution", distribution, DISTRIBUTIONS, ConfigError)
        self.density, self.block, self.storage = float(density), block, storage
        self.distribution, self.seed = distribution, int(seed)
        self.layers: list[SparseLinear] = []
        self.kept: list[float] = []  # the share of each matrix's L1 mass a start from dense weights kept

    def _layer(self, linear: nn.Linear, density: float) -> SparseLinear:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + len(self.layers))
        layer = SparseLinear(linear, density, self.block, self.storage, generator, from_dense=self.from_dense)
        self.layers.append(layer)
        return layer

    def convert(self, linear: nn.Linear, path: str) -> nn.Module:
        return self._layer(linear, self.density)

    def apply(self, model: nn.Module, pretrained: bool = False) -> nn.Module:
        targets = list(hidden_linears(model))
        if not targets:
            raise ConfigError(f"structure 'sparse' found no hidden nn.Linear in {type(model).__name__} to replace")
        self.begin(model, pretrained)
        self.kept = []
        shapes = [(lin.out_features, lin.in_features) for *_, lin in targets]
        densities = erk_densities(shapes, self.density) if self.distribution == "erk" else [self.density] * len(shapes)
        for (parent, attribute, _, linear), density in zip(targets, densities):
            layer = self._layer(linear, density)
            if self.from_dense:
                total = linear.weight.detach().float().abs().sum().item()
                self.kept.append(layer.dense_weight().float().abs().sum().item() / total if total else 1.0)
            setattr(parent, attribute, layer)
        self.end()
        return model

    def dense_start(self) -> str:
        mean = sum(self.kept) / max(1, len(self.kept))
        return (f"each hidden matrix keeps its largest blocks by L1 norm at the structure's density; they hold "
                f"{mean:.1%} of its L1 mass on average over {len(self.kept)} matrices")

    def state_dict(self) -> dict[str, Any]:
        # Masks and indices are buffers (in the model's state dict); what else a resume needs is
        # which layers keep their dense gradient in the coming step (armed for a RigL update).
        return {"capture": torch.tensor([layer.capture for layer in self.layers], dtype=torch.bool),
                "densities": torch.tensor([layer.density for layer in self.layers], dtype=torch.float64)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        capture = state.get("capture")
        if capture is None:
            return
        if len(capture) != len(self.layers):
            raise ConfigError(f"the checkpoint's sparse structure has {len(capture)} layers, this model {len(self.layers)}")
        for layer, armed in zip(self.layers, capture.tolist()):
            layer.capture = bool(armed)


def sparse_layers(model: nn.Module) -> list[SparseLinear]:
    return [m for m in model.modules() if isinstance(m, SparseLinear)]


def drop_fraction(step: int, total_steps: int, start: float, end: float) -> float:
    """p(t): cosine from `start` at t = 0 to `end` at t = total_steps."""
    progress = min(max(step / max(total_steps, 1), 0.0), 1.0)
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * progress))


class TopologyUpdate(BaseIntervention):
    """`topology`: every (ΔT, default 100), drop (p0, 0.2), drop_end (0.005), grow (random | gradient),
    seed (the random growth's seed). See the module docstring."""

    name = "topology"

    @classmethod
    def check_model(cls, model: nn.Module) -> None:
        if not sparse_layers(model):
            raise ConfigError("intervention 'topology' needs a sparse model; add --structure sparse:density=0.5")

    def __init__(self, every: int = 100, drop: float = 0.2, drop_end: float = 0.005, grow: str = "random",
                 seed: int = 0) -> None:
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ConfigError(f"intervention 'topology': every={every!r} must be an integer >= 1 (steps between updates)")
        for key, value in (("drop", drop), ("drop_end", drop_end)):
            if not isinstance(value, (int, float)) or not 0 <= value < 1:
                raise ConfigError(f"intervention 'topology': {key}={value!r} must be a fraction in [0, 1)")
        if grow not in GROWTH:
            raise ConfigError(f"intervention 'topology': grow={grow!r}; choose random (SET) or gradient (RigL)")
        if grow == "gradient" and every < 2:
            raise ConfigError("intervention 'topology': grow=gradient needs every >= 2 (the dense gradient is "
                              "kept from the step before an update on); use every=2 or more")
        self.every, self.drop, self.drop_end, self.grow, self.seed = every, float(drop), float(drop_end), grow, int(seed)
        self.selection = "released"
        self.total_steps = 0
        self.rank, self.world_size = 0, 1
        self.updates = 0
        self.last_update = 0
        self.history: list[tuple[int, float, int]] = []  # (step, p, blocks moved over all layers)

    def setup(self, context: RunContext) -> None:
        self.total_steps, self.rank, self.world_size = context.total_steps, context.rank, context.world_size

    def is_update(self, step: int) -> bool:
        return step % self.every == 0 and step < self.total_steps

    def after_step(self, step: int, model: nn.Module, optimizer: Optimizer) -> None:
        if self.grow == "random" and self.is_update(step):
            self.update(step, model, optimizer)
        if self.grow == "gradient" and self.is_update(step + 1):
            for layer in sparse_layers(model):
                layer.capture, layer.dense_grad = True, None

    def reads_gradients(self) -> bool:
        """Only RigL reads the step's gradients before the update; SET acts after it."""
        return self.grow == "gradient"

    def before_step(self, step: int, model: nn.Module, optimizer: Optimizer) -> None:
        if self.grow == "gradient" and self.is_update(step):
            self.update(step, model, optimizer)

    @torch.no_grad()
    def decide(self, step: int, index: int, layer: SparseLinear, n_move: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(slots to drop, blocks to grow) for one layer: computed here, by rank 0."""
        values = layer.active_blocks()
        if self.selection == "released":
            scores = (values if values.dtype == torch.float64 else values.float()).abs().sum(1)
        else:
            scores = values.float().pow(2).sum(1)
        slots = torch.topk(scores, n_move, largest=False, sorted=True).indices
        active = layer.block_mask()
        if self.grow == "random":
            candidates = (~active).nonzero().squeeze(1).cpu()
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step * 1009 + index)
            blocks = candidates[torch.randperm(candidates.numel(), generator=generator)[:n_move]]
        else:
            if layer.dense_grad is None:
                raise ConfigError("intervention 'topology' (grow=gradient) found no dense gradient kept for the update "
                                  f"at step {step}; the layers were not armed in the step before (resume from a "
                                  "checkpoint written by this version)")
            gscores = layer.dense_grad.float().view(-1, layer.block_size).pow(2).sum(1)
            gscores.masked_fill_(active, -1.0)
            blocks = torch.topk(gscores, n_move, largest=True, sorted=True).indices
        return slots.to(layer.block_index.device), blocks.to(layer.block_index.device)

    def n_dropped(self, n_active: int, p: float) -> int:
        """How many of a layer's `n_active` blocks an update at drop fraction `p` replaces."""
        if self.selection == "released":
            return n_active - max(1, math.floor(n_active * (1 - p)))
        return round(p * n_active)

    @torch.no_grad()
    def update(self, step: int, model: nn.Module, optimizer: Optimizer) -> int:
        """One topology update of every sparse layer; returns the number of blocks moved."""
        layers = sparse_layers(model)
        if not layers:
            raise ConfigError("intervention 'topology' needs a sparse model; add --structure sparse:density=0.5")
        p = drop_fraction(step, self.total_steps, self.drop, self.drop_end)
        info = current_info()
        masks: dict[torch.Tensor, torch.Tensor] = {}
        moved = 0
        for index, layer in enumerate(layers):
            n_move = min(self.n_dropped(layer.n_active, p), layer.n_blocks - layer.n_active)
            if self.grow == "gradient" and info.enabled and layer.dense_grad is not None:
                # Each rank kept its own part; the gradient the update ranks by is their mean (as DDP's).
                all_reduce_sum(layer.dense_grad, info)
                layer.dense_grad.div_(info.world_size)
            if n_move > 0:
                if info.is_main:
                    slots, blocks = self.decide(step, index, layer, n_move)
                else:
                    slots = torch.empty(n_move, dtype=torch.int64, device=layer.block_index.device)
                    blocks = torch.empty_like(slots)
                if info.enabled:
                    decision = broadcast(torch.cat([slots.long(), blocks.long()]), src=0, info=info)
                    slots, blocks = decision[:n_move], decision[n_move:]
                masks[layer.sparse_param] = layer.regrow(slots, blocks)
                moved += n_move
            layer.capture, layer.dense_grad = False, None
        if masks:
            reset_state(optimizer, masks=masks)
        self.updates += 1
        self.last_update = step
        self.history.append((step, p, moved))
        return moved

    def state_dict(self) -> dict[str, Any]:
        return {"every": self.every, "drop": self.drop, "drop_end": self.drop_end, "grow": self.grow,
                "seed": self.seed, "selection": self.selection, "total_steps": self.total_steps, "updates": self.updates,
                "last_update": self.last_update,
                "history": torch.tensor(self.history, dtype=torch.float64).reshape(-1, 3)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # A run goes on selecting blocks as it started (a checkpoint without the key predates the release's form).
        self.selection = state.get("selection", "lowmem-v1")
        check_choice("the checkpoint's topology selection", self.selection, SELECTIONS, ConfigError)
        self.updates, self.last_update = int(state["updates"]), int(state["last_update"])
        self.history = [(int(s), float(p), int(n)) for s, p, n in state["history"].tolist()]


STRUCTURES.register("sparse", SparseStructure)
INTERVENTIONS.register("topology", TopologyUpdate)
