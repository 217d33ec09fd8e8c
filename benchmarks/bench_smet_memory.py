"""Bytes per sparse-layer parameter, measured, for SMET (and naive AdamW) on both sparse storages.

    PYTHONPATH=src python benchmarks/bench_smet_memory.py [--model cpu-tiny] [--precision fp32|bf16]

For each density d, block B and storage, a real model (the preset, its hidden matrices sparse) takes
two optimizer steps with a topology update between; then the tensors themselves are counted, for the
sparse layers only, and divided by the dense element count of those matrices: weights (the
parameter), gradients (`.grad` as backward left it), moments (exp_avg, exp_avg_sq), steps (SMET's
int32 per-block local steps + the per-tensor step), indices (the int32 block index). Dense AdamW is
16 B/param in fp32 (4 weight + 4 gradient + 8 moments), 8 in bf16. The last column checks that
`lowmem memory` (lowmem.memory.estimate on the meta device) equals the measured whole-model bytes
(weights + gradients + optimizer states + structure buffers) to the byte.
"""

from __future__ import annotations

import argparse

import torch

from lowmem.assembly import build_model, build_optimizer
from lowmem.interventions import RunContext
from lowmem.memory.estimate import estimate_memory
from lowmem.memory.measure import optimizer_state_bytes
from lowmem.structure.sparse import TopologyUpdate, sparse_layers


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def measure(model_name: str, optimizer: str, structure: dict, precision: str, vocab: int) -> dict[str, float]:
    torch.manual_seed(0)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    model = build_model(model_name, vocab_size=vocab, structure=structure, dtype=dtype)
    opt = build_optimizer(optimizer, model, lr=1e-3)
    update = TopologyUpdate(every=1)
    update.setup(RunContext(total_steps=10))
    for step in (1, 2):
        opt.zero_grad(set_to_none=True)
        model(torch.randint(0, vocab, (1, 32))).float().pow(2).mean().backward()
        opt.step()
        if step == 1:
            update.after_step(step, model, opt)
    layers = sparse_layers(model)
    dense_numel = sum(layer.in_features * layer.out_features for layer in layers)
    row = {"weights": 0, "gradients": 0, "moments": 0, "steps": 0, "indices": 0}
    for layer in layers:
        p = layer.sparse_param
        row["weights"] += nbytes(p)
        row["gradients"] += nbytes(p.grad)
        state = opt.state[p]
        row["moments"] += nbytes(state["exp_avg"]) + nbytes(state["exp_avg_sq"])
        row["steps"] += nbytes(state["step"]) + (nbytes(state["block_step"]) if "block_step" in state else 0)
        row["indices"] += sum(nbytes(b) for b in layer.buffers())
    per = {k: v / dense_numel for k, v in row.items()}
    per["total"] = sum(row.values()) / dense_numel
    measured = (sum(nbytes(p) for p in model.parameters()) + sum(nbytes(p.grad) for p in model.parameters() if p.grad is not None)
                + optimizer_state_bytes(opt) + sum(nbytes(b) for layer in layers for b in layer.buffers()))
    est = estimate_memory(model_name, optimizer, {"lr": 1e-3}, vocab_size=vocab, seq_len=32, structure=structure,
                          precision="bf16-pure" if precision == "bf16" else "fp32")
    estimated = est.weights + est.gradients + est.optimizer_states + est.index_bytes
    per["estimate_equal"] = estimated == measured
    return per


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="cpu-tiny")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--optimizers", default="smet,adamw")
    args = parser.parse_args()
    dense = 16 if args.precision == "fp32" else 8
    print(f"{args.model}, {args.precision}: bytes per sparse-layer parameter (dense AdamW: {dense})")
    print("| optimizer | storage | d | B | weights | gradients | moments | steps | indices | total | vs dense AdamW | lowmem memory = measured |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for optimizer in args.optimizers.split(","):
        for storage in ("dense", "compact"):
            for density in (0.5, 0.25):
                for block in (1, 16, 64):
                    structure = {"name": "sparse", "density": density, "block": block, "storage": storage}
                    r = measure(args.model, optimizer, structure, args.precision, args.vocab_size)
                    print(f"| {optimizer} | {storage} | {density} | {block} | {r['weights']:.3f} | {r['gradients']:.3f} | "
                          f"{r['moments']:.3f} | {r['steps']:.4f} | {r['indices']:.4f} | {r['total']:.3f} | "
                          f"{r['total'] / dense:.3f} | {'yes' if r['estimate_equal'] else 'NO'} |")


if __name__ == "__main__":
    main()
