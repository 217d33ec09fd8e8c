"""Optimizer step time of lowmem's Muon and Adam-mini against their reference implementations, and of
Muon's batched Newton–Schulz against its per-matrix path.

  muon       lowmem Muon (bf16 Newton–Schulz, AdamW core on embedding/head/vectors)
             vs torch.optim.Muon on the hidden matrices + torch.optim.AdamW(foreach=True) on the rest
  adam-mini  lowmem AdamMini(adam_mini_param_groups(model)) vs the official adam_mini.Adam_mini
  muon-batched  lowmem Muon with one batched Newton–Schulz call per shape (the default off the CPU)
             vs one call per matrix (the CPU's default), both forced whatever the device, NS in --ns-dtype; also how far apart two copies of the
             model end after --check-steps steps with the same gradients, relative to how far they moved.
             float32 by default: this CPU has no bf16 matrix units, where a bf16 NS of one 512 x 512
             matrix takes seconds (torch's `muon` pair above is bf16, torch.optim.Muon's only choice)
  galore-batched, apollo-mini-batched  the projection methods' r-side Adam over batches of matrices
             (one foreach call per operation, lowmem.optim.projection.PROJECTED_BATCH_ELEMENTS; the
             default) vs one matrix at a time; also how far apart two copies end after --check-steps steps
             (0 on the CPU, where foreach runs the same per-tensor kernels)
  adamw-compiled  lowmem AdamW(compiled=True), each bucket's update one torch.compile'd graph (inductor),
             vs the eager AdamW (foreach), the baseline of every comparison; galore-compiled,
             apollo-mini-compiled, muon-compiled: the method with compiled=True (its AdamW part compiled:
             embedding, head, vectors; muon's NS in float32) vs the same method eager; scale-compiled:
             SCALE's rows and vectors compiled (benchmarks/bench_scale_step.py --compiled adds the floor); also the first compiled
             step's seconds (the compilation: run with TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) for a cold
             cache) and how far apart two copies of the model end after --check-steps steps (a new lr
             each step) with the same gradients, relative to how far they moved

The real model of the chosen preset (default llama-60m, fp32, CPU) with fixed random gradients; all
contenders step the same parameters, each with its own state. Within each round the contenders of
a pair take turns (order alternated per round) so drift on a shared machine hits both alike; each
round gives the ratio lowmem / reference, and the median ratio over rounds is reported.

    python benchmarks/bench_baselines_step.py [--model llama-60m] [--pairs muon adam-mini muon-batched adamw-compiled galore-compiled ...]
        [--rounds 7] [--steps 2] [--threads 1] [--ns-dtype float32] [--check-steps 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import lowmem.optim
from lowmem.bench.timing import interleaved, model_with_gradients, seconds_per_step, synchronize
from lowmem.optim.adam_mini import AdamMini, adam_mini_param_groups
from lowmem.optim.muon import Muon
from lowmem.optim.newton_schulz import BATCH_ELEMENTS
from lowmem.optim.projection import PROJECTED_BATCH_ELEMENTS
from lowmem.testing import max_relative_difference


def _muon_pair(model):
    groups = {g["role"]: g["params"] for g in lowmem.optim.param_groups(model)}
    ours = Muon(lowmem.optim.param_groups(model), lr=0.02, adam_lr=1e-3)
    torch_muon = torch.optim.Muon(groups["hidden"], lr=0.02, weight_decay=0.0)
    torch_adamw = torch.optim.AdamW([p for r in ("embedding", "head", "vector") for p in groups[r]], lr=1e-3,
                                    weight_decay=0.0, foreach=True)

    def reference() -> None:
        torch_muon.step()
        torch_adamw.step()

    return ours.step, reference


def _adam_mini_pair(model):
    import adam_mini

    config = model.config
    ours = AdamMini(adam_mini_param_groups(model), lr=1e-3)
    official = adam_mini.Adam_mini(model.named_parameters(), lr=1e-3, dim=config.hidden_size,
                                   n_heads=config.num_heads, verbose=False)
    return ours.step, official.step


def _muon_batched_pair(model, ns_dtype: str = "float32"):
    batched = Muon(lowmem.optim.param_groups(model), lr=0.02, ns_dtype=ns_dtype)
    per_matrix = Muon(lowmem.optim.param_groups(model), lr=0.02, ns_dtype=ns_dtype)
    batched.ns_batch_elements, per_matrix.ns_batch_elements = BATCH_ELEMENTS, 0  # both whatever the device
    return batched.step, per_matrix.step


# The projection methods whose batched r-side Adam (issue 28) has a pair.
BATCHED_PROJECTED = ("galore", "apollo-mini")


def _projected_batched_pair(method: str):
    def pair(model):
        batched, per_matrix = (lowmem.optim.build(method, model, lr=1e-3, batch_elements=limit)
                               for limit in (PROJECTED_BATCH_ELEMENTS, 0))  # both whatever the device
        return batched.step, per_matrix.step
    return pair


def _batched_optimizer(method: str, model, batched: bool, ns_dtype: str):
    """Muon with or without its batched Newton–Schulz, or a projection method with or without its batched
    r-side Adam."""
    if method == "muon":
        optimizer = Muon(lowmem.optim.param_groups(model), lr=0.02, ns_dtype=ns_dtype)
        optimizer.ns_batch_elements = BATCH_ELEMENTS if batched else 0
    else:
        optimizer = lowmem.optim.build(method, model, lr=1e-3, batch_elements=PROJECTED_BATCH_ELEMENTS if batched else 0)
    return optimizer


def batched_difference(method: str, model_name: str, steps: int, ns_dtype: str = "float32", device: str = "cpu",
                       vocab_size: int | None = None) -> tuple[float, float]:
    """(max over tensors of ||batched - per-matrix|| / ||W||, max of ||W_end - W_0|| / ||W_0||) after
    `steps` steps of `method` (muon or a projection method) of two copies of the model with the same fixed
    random gradients."""
    models = []
    for batched in (True, False):
        model, _ = model_with_gradients(model_name, device=device, vocab_size=vocab_size)
        initial = {name: p.detach().clone() for name, p in model.named_parameters()}
        optimizer = _batched_optimizer(method, model, batched, ns_dtype)
        for _ in range(steps):
            optimizer.step()
        models.append(dict(model.named_parameters()))
    return max_relative_difference(*models), max_relative_difference(initial, models[0])


# The methods whose opt-in `compiled=True` (issue 28) has a pair: AdamW compiles its whole update; the
# others compile the update of the tensors they leave to AdamW (embedding, head, vectors); SCALE its
# row-normalized matrices and its vectors.
COMPILED_METHODS = ("adamw", "galore", "apollo-mini", "muon", "scale")
_COMPILED_HPARAMS = {"muon": {"ns_dtype": "float32"}}  # bf16 matrix products have no hardware on this CPU


def _compiled_pair(method: str):
    def pair(model):
        hparams = {"lr": 1e-3, **_COMPILED_HPARAMS.get(method, {})}
        compiled = lowmem.optim.build(method, model, compiled=True, **hparams)
        eager = lowmem.optim.build(method, model, **hparams)
        return compiled.step, eager.step
    return pair


def compiled_difference(method: str, model_name: str, steps: int, device: str = "cpu",
                        vocab_size: int | None = None) -> tuple[float, float, float]:
    """(max over tensors of ||compiled - eager|| / ||eager - W_0||, max of ||W_end - W_0|| / ||W_0||,
    seconds of the first compiled step: the compilation) after `steps` steps of `method`, lr 1e-3 ramped
    from 1e-4 (a new lr each step), of two copies of the model with the same fixed random gradients."""
    ends, first_step = [], 0.0
    for compiled in (False, True):
        model, _ = model_with_gradients(model_name, device=device, vocab_size=vocab_size)
        initial = {name: p.detach().clone() for name, p in model.named_parameters()}
        optimizer = lowmem.optim.build(method, model, lr=1e-3, compiled=compiled, **_COMPILED_HPARAMS.get(method, {}))
        for step in range(steps):
            for group in optimizer.param_groups:
                group["lr"] = 1e-3 * (step + 1) / steps
            synchronize(device)
            start = time.perf_counter()
            optimizer.step()
            synchronize(device)
            if compiled and step == 0:
                first_step = time.perf_counter() - start
        ends.append({name: p.detach().clone() for name, p in model.named_parameters()})
        del model, optimizer
    eager, compiled = ends
    moved = {name: eager[name] - initial[name] for name in eager}
    apart = max(((compiled[name] - eager[name]).double().norm() / moved[name].double().norm()).item()
                for name in eager)
    return apart, max_relative_difference(initial, eager), first_step


PAIRS = {"muon": _muon_pair, "adam-mini": _adam_mini_pair, "muon-batched": _muon_batched_pair,
         **{f"{method}-batched": _projected_batched_pair(method) for method in BATCHED_PROJECTED},
         **{f"{method}-compiled": _compiled_pair(method) for method in COMPILED_METHODS}}
# How a pair's two contenders are printed (the ratio is first / second); lowmem vs reference unless named.
LABELS = {**{f"{method}-batched": ("batched", "per-matrix") for method in ("muon", *BATCHED_PROJECTED)},
          **{f"{method}-compiled": ("compiled", "eager") for method in COMPILED_METHODS}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama-60m")
    parser.add_argument("--pairs", nargs="+", default=list(PAIRS), choices=list(PAIRS))
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=2, help="steps per contender per round")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (the GPU protocol's optimizer-steps item)")
    parser.add_argument("--vocab-size", type=int, help="for a model preset without its own (cpu-micro)")
    parser.add_argument("--ns-dtype", default="float32", help="muon-batched: Newton–Schulz dtype")
    parser.add_argument("--check-steps", type=int, default=3,
                        help="the -batched and -compiled pairs: steps of the difference check")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, n = model_with_gradients(args.model, device=args.device, vocab_size=args.vocab_size)
    print(f"{args.model}: {n / 1e6:.2f}M parameters, fp32, {args.device}, {args.threads} thread(s), "
          f"{args.rounds} rounds x {args.steps} steps per contender")

    for name in args.pairs:
        if name.endswith("-batched"):
            method = name.removesuffix("-batched")
            difference, moved = batched_difference(method, args.model, args.check_steps, args.ns_dtype, args.device,
                                                   args.vocab_size)
            what = f" (NS in {args.ns_dtype})" if method == "muon" else ""
            print(f"{name}{what} after {args.check_steps} steps: batched vs per-matrix max "
                  f"relative difference {difference:.3g}, weights moved up to {moved:.3g} relative")
            ours, reference = _muon_batched_pair(model, args.ns_dtype) if method == "muon" else PAIRS[name](model)
        elif name.endswith("-compiled"):
            apart, moved, compilation = compiled_difference(name.removesuffix("-compiled"), args.model,
                                                            args.check_steps, args.device, args.vocab_size)
            print(f"{name}: first compiled step (the compilation) {compilation:.1f} s; after "
                  f"{args.check_steps} steps compiled vs eager max difference {apart:.3g} of how far each "
                  f"tensor moved, weights moved up to {moved:.3g} relative")
            ours, reference = PAIRS[name](model)
        else:
            ours, reference = PAIRS[name](model)
        # One warm-up step each (allocate state, fault in pages), then the two alternate round by round.
        times = interleaved({"lowmem": ours, "reference": reference}, args.rounds,
                            lambda step: seconds_per_step(step, args.steps, args.device))
        ratios = [a / b for a, b in zip(times["lowmem"], times["reference"])]
        first, second = LABELS.get(name, ("lowmem", "reference"))
        print(f"{name:10s} {first} {statistics.median(times['lowmem']) * 1e3:8.1f} ms/step   "
              f"{second} {statistics.median(times['reference']) * 1e3:8.1f} ms/step   "
              f"ratio {first}/{second}: median {statistics.median(ratios):.3f} "
              f"(min {min(ratios):.3f}, max {max(ratios):.3f})")


if __name__ == "__main__":
    main()
