"""SLTrain: a low-rank plus a fixed-support sparse matrix per hidden layer.

Han et al., "SLTrain: a sparse plus low-rank approach for parameter and memory efficient pretraining"
(arXiv 2406.02214; code andyjm3/SLTrain); methods.md section 8.

  W = (alpha / r) B A + S,   y = W x
  A: r x in, Kaiming-uniform (kind factor-a);  B: out x r, zero (kind factor-b)
  S: out x in sparse with a fixed, uniformly random support of int(delta * in * out) entries
     (delta = density, 0.03 in the scripts), values U(+-1/sqrt(in)) (kind sparse-values)
Only S's nonzero values (a 1-D parameter) and their flat row-major positions (a sorted buffer,
int32 when in * out < 2^31, else int64) are stored and trained; the support never changes.
From trained dense weights (`apply(model, pretrained=True)`, --init-from): the low-rank part is W's
truncated SVD (lowmem.structure.lowrank), and S takes the int(delta * in * out) largest-magnitude
entries of the residual W - scale B A, at their positions (the support, fixed from then on) and
values: the best approximation of that form given the SVD.

Memory: `SparseLowRankFunction` materializes W for one layer in forward (y = x W^T), frees it, and in
backward rebuilds it for the input gradient, frees it, then forms the dense weight gradient G = gy^T x
only long enough to gather S's gradient at the support. So a layer never holds more than one dense
out x in matrix, and nothing dense outlives its layer's forward or backward (the released code does
the same in a C++ extension). Gradients of the factors use the thin products:
  dB = scale * gy^T (x A^T),  dA = scale * (gy B)^T x,  dS = G[support],  dx = gy W.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lowmem.errors import ConfigError
from lowmem.registry import STRUCTURES
from lowmem.structure.lowrank import LowRankLinear, RankedStructure

DEFAULT_DENSITY = 0.03
INT32_MAX = 2**31 - 1


def _dense(lora_B: torch.Tensor, lora_A: torch.Tensor, values: torch.Tensor, index: torch.Tensor,
           scale: float) -> torch.Tensor:
    weight = torch.mm(lora_B, lora_A).mul_(scale)
    weight.view(-1).index_add_(0, index, values.to(weight.dtype))
    return weight


class SparseLowRankFunction(torch.autograd.Function):
    """y = x ((scale) B A + S)^T without keeping the dense W between forward and backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, values: torch.Tensor,
                index: torch.Tensor, scale: float) -> torch.Tensor:
        weight = _dense(lora_B, lora_A, values, index, scale)
        y = F.linear(x, weight.to(x.dtype) if weight.dtype != x.dtype else weight)
        del weight
        ctx.save_for_backward(x, lora_A, lora_B, values, index)
        ctx.scale = scale
        return y

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        x, lora_A, lora_B, values, index = ctx.saved_tensors
        scale = ctx.scale
        need_x, need_a, need_b, need_s = ctx.needs_input_grad[:4]
        dtype = lora_A.dtype
        gy = grad_y.reshape(-1, grad_y.shape[-1]).to(dtype)
        xs = x.reshape(-1, x.shape[-1]).to(dtype)
        grad_x = grad_a = grad_b = grad_s = None
        if need_x:
            weight = _dense(lora_B, lora_A, values, index, scale)
            grad_x = torch.mm(gy, weight).view(x.shape).to(x.dtype)
            del weight
        if need_b:
            grad_b = torch.mm(gy.t(), torch.mm(xs, lora_A.t())).mul_(scale)
        if need_a:
            grad_a = torch.mm(torch.mm(gy, lora_B).t(), xs).mul_(scale)
        if need_s:
            dense_grad = torch.mm(gy.t(), xs)
            grad_s = torch.index_select(dense_grad.view(-1), 0, index).to(values.dtype)
            del dense_grad
        return grad_x, grad_a, grad_b, grad_s, None, None


class SLTrainLinear(LowRankLinear):
    """y = (scale * B A + S) x, S stored as values at a fixed sorted support."""

    param_kinds = {"lora_A": "factor-a", "lora_B": "factor-b", "sparse_values": "sparse-values"}

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float, density: float, *,
                 device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__(in_features, out_features, rank, alpha, device=device, dtype=dtype, zero_b=True)
        self.density = density
        total = in_features * out_features
        nnz = int(density * total)
        index_dtype = torch.int32 if total - 1 <= INT32_MAX else torch.int64
        # The support is drawn on the CPU (the same support whatever the device, from the global seed).
        if device is not None and torch.device(device).type == "meta":
            index = torch.empty(nnz, dtype=index_dtype, device="meta")
        else:
            index = torch.randperm(total)[:nnz].sort().values.to(index_dtype)
        self.register_buffer("sparse_index", index.to(device) if device is not None else index)
        self.sparse_values = nn.Parameter(torch.empty(nnz, device=device, dtype=dtype))
        bound = 1.0 / in_features**0.5
        nn.init.uniform_(self.sparse_values, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return SparseLowRankFunction.apply(x, self.lora_A, self.lora_B, self.sparse_values, self.sparse_index,
                                           self.scale)

    def sparse_dense(self) -> torch.Tensor:
        """S as a dense matrix (tests and export)."""
        out = torch.zeros(self.out_features, self.in_features, device=self.sparse_values.device,
                          dtype=self.sparse_values.dtype)
        out.view(-1).index_add_(0, self.sparse_index, self.sparse_values)
        return out

    def dense_weight(self) -> torch.Tensor:
        return self.product() + self.sparse_dense()

    def extra_repr(self) -> str:
        return super().extra_repr() + f", density={self.density:g}, nonzeros={self.sparse_values.numel()}"


class SLTrain(RankedStructure):
    """`--structure sltrain:rank=128,alpha=32,density=0.03`."""

    name = "sltrain"

    def __init__(self, rank: int | None = None, alpha: float | None = None, density: float = DEFAULT_DENSITY) -> None:
        super().__init__(rank, alpha)
        if not isinstance(density, (int, float)) or isinstance(density, bool) or not 0.0 < density < 1.0:
            raise ConfigError(f"structure 'sltrain': density must be in (0, 1), got {density!r}; e.g. density=0.03")
        self.density = float(density)

    def convert(self, linear: nn.Linear, path: str) -> nn.Module:
        self.check_linear(linear, path)
        module = SLTrainLinear(linear.in_features, linear.out_features, self.rank, self.alpha, self.density,
                               device=linear.weight.device, dtype=linear.weight.dtype)
        if self.from_dense:
            residual = self.start_factors(module, linear.weight.detach()).reshape(-1)
            support = residual.abs().topk(module.sparse_values.numel()).indices.sort().values
            with torch.no_grad():
                module.sparse_index.copy_(support.to(module.sparse_index.dtype))
                module.sparse_values.copy_(residual[support])
        return module

    def dense_start(self) -> str:
        return (super().dense_start() + f"; the sparse part holds the residual's {self.density:g} largest-magnitude "
                "entries (its fixed support)")

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "density": self.density}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if state.get("density") != self.density:
            raise ConfigError(f"the checkpoint's sltrain density is {state.get('density')}, this run's {self.density}; "
                              "resume with the checkpoint's density")


def index_bytes(model: nn.Module) -> int:
    """Bytes of every SLTrain layer's support index (not in the papers' memory convention)."""
    return sum(m.sparse_index.numel() * m.sparse_index.element_size() for m in model.modules()
               if isinstance(m, SLTrainLinear))


STRUCTURES.register("sltrain", SLTrain)

__all__ = ["DEFAULT_DENSITY", "SLTrain", "SLTrainLinear", "SparseLowRankFunction", "index_bytes"]
