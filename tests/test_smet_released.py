"""SMET and its topology updates against the released code's formulas (QiaoXiao7282/SMET,
sparselearning/optimizer_dst.py and core_dst.py, issue 27), written out here with no lowmem code:

  per block (sparse layers) or per tensor (dense ones) a local step s, incremented before use;
  m = b1 m + (1 - b1) g, v = b2 v + (1 - b2) g^2, then m *= min(s / W, 1) in place (it compounds);
  w -= lr (m / (1 - b1^s)) / (sqrt(v / (1 - b2^s)) + eps); no density factor in the lr;
  a topology update after step t keeps the max(1, floor(n (1 - p(t)))) active blocks of largest L1 norm,
  drops the rest, and the grown blocks start at w = 0, m = v = 0, s = 1 (their first update uses s = 2).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lowmem.interventions import RunContext
from lowmem.optim.smet import SMET
from lowmem.structure.sparse import SparseLinear, TopologyUpdate

BETA1, BETA2, EPS, LR = 0.9, 0.999, 1e-8, 1e-2
BLOCK, STEPS, EVERY = 4, 30, 10


def drop_fraction(step: int) -> float:
    """The release's CosineDecay(0.2, T, eta_min 0.005) after `step` optimizer steps."""
    return 0.005 + (0.2 - 0.005) * (1 + math.cos(math.pi * step / STEPS)) / 2


class Reference:
    """The released update on dense tensors; sparse layers as masked dense matrices with a step per block."""

    def __init__(self, dense: dict[str, torch.Tensor], sparse: dict[str, tuple[torch.Tensor, torch.Tensor]], warmup: int):
        self.w = {k: v.clone() for k, v in dense.items()} | {k: w.clone() for k, (w, _) in sparse.items()}
        self.mask = {k: mask.clone() for k, (_, mask) in sparse.items()}  # (n_blocks,) bool
        self.m = {k: torch.zeros_like(v) for k, v in self.w.items()}
        self.v = {k: torch.zeros_like(v) for k, v in self.w.items()}
        self.s = {k: torch.zeros(1, dtype=torch.float64) for k in dense}
        self.s |= {k: torch.zeros(mask.numel(), dtype=torch.float64) for k, mask in self.mask.items()}
        self.warmup = warmup

    def step(self, grads: dict[str, torch.Tensor]) -> None:
        for key, w in self.w.items():
            g, m, v = grads[key].view(-1), self.m[key].view(-1), self.v[key].view(-1)
            if key in self.mask:
                active = self.mask[key].repeat_interleave(BLOCK)
                self.s[key][self.mask[key]] += 1
                s = self.s[key].repeat_interleave(BLOCK)
            else:
                active = torch.ones_like(g, dtype=torch.bool)
                self.s[key] += 1
                s = self.s[key].expand_as(g)
            m[active] = BETA1 * m[active] + (1 - BETA1) * g[active]
            v[active] = BETA2 * v[active] + (1 - BETA2) * g[active] ** 2
            m[active] *= (s[active] / self.warmup).clamp(max=1.0)
            update = (m / (1 - BETA1 ** s)) / ((v / (1 - BETA2 ** s)).sqrt() + EPS)
            w.view(-1)[active] -= LR * update[active]

    def pruned(self, key: str, p: float, score: str = "l1") -> set[int]:
        """The blocks the release drops from layer `key` at drop fraction p."""
        blocks = self.w[key].view(-1, BLOCK)
        active = self.mask[key].nonzero().squeeze(1)
        values = blocks[active]
        scores = values.abs().sum(1) if score == "l1" else values.pow(2).sum(1)
        keep = max(1, math.floor(active.numel() * (1 - p)))
        kept = set(active[scores.topk(keep).indices].tolist())
        return set(active.tolist()) - kept

    def regrow(self, key: str, pruned: set[int], grown: set[int]) -> None:
        for block in pruned:
            self.w[key].view(-1, BLOCK)[block] = 0
            self.mask[key][block] = False
        for block in grown:
            self.mask[key][block] = True
            self.m[key].view(-1, BLOCK)[block] = 0
            self.v[key].view(-1, BLOCK)[block] = 0
            self.s[key][block] = 1


def model_and_reference(storage: str, warmup: int, seed: int) -> tuple[nn.ModuleDict, SMET, Reference]:
    torch.manual_seed(seed)
    embed = nn.Parameter(torch.randn(16, 16, dtype=torch.float64) * 0.3)
    head = nn.Parameter(torch.randn(8, 16, dtype=torch.float64) * 0.3)
    layers = nn.ModuleList([
        SparseLinear(nn.Linear(inp, out, bias=False, dtype=torch.float64), 0.5, BLOCK, storage,
                     torch.Generator().manual_seed(seed + i))
        for i, (inp, out) in enumerate(((16, 24), (24, 16)))])
    model = nn.ModuleDict({"layers": layers})
    model.embed, model.head = embed, head
    groups = [{"params": [embed, head]}] + [
        {"params": [layer.sparse_param], "role": "hidden", "kind": next(iter(layer.param_kinds.values()))}
        for layer in layers]
    optimizer = SMET(groups, lr=LR, warmup=warmup)  # every other setting at its default: the release's
    reference = Reference({"embed": embed.detach(), "head": head.detach()},
                          {f"w{i}": (layer.dense_weight(), layer.block_mask()) for i, layer in enumerate(layers)},
                          warmup)
    return model, optimizer, reference


def forward(embed, w0, w1, head, x) -> torch.Tensor:
    return torch.tanh(torch.tanh(x @ embed.t() @ w0.t()) @ w1.t()) @ head.t()


@pytest.mark.parametrize("warmup", [100, 8])
@pytest.mark.parametrize("storage", ["dense", "compact"])
def test_smet_equals_the_released_update_through_two_topology_updates(storage, warmup):
    model, optimizer, ref = model_and_reference(storage, warmup, seed=3)
    layers = list(model["layers"])
    update = TopologyUpdate(every=EVERY, drop=0.2, drop_end=0.005, grow="random")
    update.setup(RunContext(total_steps=STEPS))
    data = torch.Generator().manual_seed(0)
    scores_differ = counts_differ = False
    for step in range(1, STEPS + 1):
        x = torch.randn(6, 16, dtype=torch.float64, generator=data)
        y = torch.randn(6, 8, dtype=torch.float64, generator=data)
        out = torch.tanh(layers[1](torch.tanh(layers[0](x @ model.embed.t())))) @ model.head.t()
        (out - y).pow(2).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        masks_before = [layer.block_mask().clone() for layer in layers]
        update.after_step(step, model, optimizer)
        weights = {k: w.clone().requires_grad_(True) for k, w in ref.w.items()}
        loss = (forward(weights["embed"], weights["w0"], weights["w1"], weights["head"], x) - y).pow(2).sum()
        ref.step(dict(zip(weights, torch.autograd.grad(loss, list(weights.values())))))
        if update.is_update(step):
            p = drop_fraction(step)
            for i, (layer, before) in enumerate(zip(layers, masks_before)):
                after = layer.block_mask()
                pruned = ref.pruned(f"w{i}", p)
                assert set((before & ~after).nonzero().squeeze(1).tolist()) == pruned, (step, i)
                scores_differ |= pruned != ref.pruned(f"w{i}", p, score="squared-l2")
                n = int(before.sum())
                counts_differ |= len(pruned) != round(p * n)
                ref.regrow(f"w{i}", pruned, set((after & ~before).nonzero().squeeze(1).tolist()))
        ours = {"embed": model.embed.detach(), "head": model.head.detach(),
                "w0": layers[0].dense_weight(), "w1": layers[1].dense_weight()}
        for key, value in ours.items():
            relative = ((value - ref.w[key]).norm() / ref.w[key].norm()).item()
            assert relative <= 1e-6, (step, key, relative)
    assert update.updates == 2 and [h[0] for h in update.history] == [10, 20]
    # The run tells the release's choices from lowmem's earlier ones: L1 and squared-L2 scores pick
    # different blocks, and floor-based and rounded counts differ (p n = 7.26 at step 10).
    assert scores_differ and counts_differ


def constant_gradient_moves(regrow_after: int | None, steps: int) -> list[float]:
    """|w_t - w_(t-1)| / lr of one entry of a block under the gradient 1, at each step; the block is
    regrown after step `regrow_after` (then its moves are counted from its first update after that)."""
    layer = SparseLinear(nn.Linear(2, 2, bias=False, dtype=torch.float64), 0.5, 1, "compact",
                         torch.Generator().manual_seed(0))
    optimizer = SMET([{"params": [layer.values], "kind": "sparse-values"}], lr=1.0, eps=0.0)
    moves = []
    for step in range(1, steps + 1):
        before = layer.values.detach().clone()
        layer.values.grad = torch.ones_like(layer.values)
        optimizer.step()
        moves.append((before - layer.values.detach())[0].item())
        if step == regrow_after:
            mask = torch.zeros_like(layer.values, dtype=torch.bool)
            mask[0] = True
            optimizer.reset_param_state(layer.values, mask)
            moves = []
    return moves


def test_released_step_sizes_at_the_specifications_anchor_points():
    """The released form's moves under a constant gradient (issue 27's specification, section A1):
    a regrown block's 1st/2nd/5th/20th/50th/99th/100th/110th update, and a tensor's from the start."""
    regrown = constant_gradient_moves(regrow_after=300, steps=300 + 110)
    expected = {1: 0.01488, 2: 0.01380, 5: 0.01468, 20: 0.02939, 50: 0.09289, 99: 0.6694, 100: 0.7029, 110: 0.8991}
    for k, value in expected.items():
        assert regrown[k - 1] == pytest.approx(value, rel=1e-3), k
    fresh = constant_gradient_moves(regrow_after=None, steps=110)
    expected = {1: 0.01, 2: 0.01062, 5: 0.01266, 20: 0.0274, 50: 0.08884, 99: 0.6291, 100: 0.6662, 110: 0.8836}
    for k, value in expected.items():
        assert fresh[k - 1] == pytest.approx(value, rel=1e-3), k


def test_a_checkpoint_from_before_the_released_form_resumes_with_its_own():
    """An optimizer state written before warmup_form existed (density_lr inverse_sqrt, the old
    default) comes back with the step ramp and its density rule; a topology state without its
    selection keeps squared-L2 scores and rounded counts."""
    layer = SparseLinear(nn.Linear(8, 8, bias=False), 0.5, 1, "compact", torch.Generator().manual_seed(0))
    old = SMET([{"params": [layer.values], "kind": "sparse-values"}], density_lr="inverse_sqrt")
    saved = old.state_dict()
    for group in saved["param_groups"]:
        del group["warmup_form"]
    new = SMET([{"params": [layer.values], "kind": "sparse-values"}])
    new.load_state_dict(saved)
    assert new.param_groups[0]["warmup_form"] == "step_ramp" and new.param_groups[0]["density_lr"] == "inverse_sqrt"
    update = TopologyUpdate()
    state = update.state_dict()
    assert state["selection"] == "released" and update.n_dropped(48, 0.15125) == 8
    del state["selection"]
    update.load_state_dict(state)
    assert update.selection == "lowmem-v1" and update.n_dropped(48, 0.15125) == 7
