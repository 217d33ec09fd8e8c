"""The update inside backward (`--gradient-release`, issue 25): peak memory with and without it beside
the estimate, and step time side by side.

    # peak memory, each (model, optimizer, release) in its own process; fp32 (or --precision bf16-pure) on CPU
    OMP_NUM_THREADS=1 python benchmarks/bench_gradient_release.py memory --models llama-60m,cpu-base
    # step time, llama-60m, SCALE and AdamW with and without release, interleaved
    OMP_NUM_THREADS=1 python benchmarks/bench_gradient_release.py time --rounds 5
    # one run on a device: llama-7b built there in bf16, SCALE with release, 5 steps, max_memory_allocated
    python benchmarks/bench_gradient_release.py device-peak --model llama-7b --device cuda --precision bf16-pure \
        --batch-size 1 --activation-checkpointing block --chunked-loss on --steps 5 --output peak.json

Memory. A child process builds the model and optimizer, takes one training step (the optimizer's state
comes to exist), then measures a second step under lowmem.memory's TensorMemory (weights, buffers and
state excluded, so views of them are not new): every tensor storage an op creates during the step (gradients, activations, the update's temporaries), live and at its
peak. Weights and optimizer state existed before and are counted directly, so the measured peak is
weights + states + the step's tensor peak, the quantity `estimate_memory(...).peak` predicts
(weights + gradients + states + the activations' high-water mark). Beside it the process's peak RSS
over the same step (lowmem.bench.peak: a fresh process, glibc told to mmap blocks of 1 MiB and more, so
freed tensors leave the RSS). The step is the trainer's: lowmem.train.step.train_step with the update
after backward (AfterBackward) or inside it (InBackward), on random tokens, every position scored.

Per model and optimizer it prints each configuration's measured peak against the estimate (and the
moment of the step the estimate puts its peak at), then the saving (measured peak without release -
with it) against the bytes the estimate says release frees (its peak without release - with it:
lowmem.memory.estimate.step_phases places gradients and activations in time, so this is what release
removes from the worst moment, not every gradient but the largest).

Device peak (the GPU protocol's gradient-release item). One process: the model initialized directly
on the device in the precision's dtype (no host copy: a 7B model in fp32 on the host takes a minute),
then per `--release` setting (on, off, or on,off in turn) a fresh optimizer and `--steps` steps of the
trainer's step with the update inside backward or after it, and the peak: torch.cuda.max_memory_allocated over the steps on CUDA; on CPU (the protocol's dry
mode) weights + TensorMemory's peak over the steps (the optimizer state is created inside them).
Written as JSON beside the estimate of the same configuration.

Time. lowmem.bench.timing.interleaved: the four contenders (SCALE and AdamW, release off and on) each
warmed up, then `--rounds` rounds that time `--steps` steps of each, the order rotated per round;
the medians and the per-round ratio release / no release.
"""

from __future__ import annotations

import argparse
import statistics
import sys

from lowmem.bench.peak import baseline_bytes, mmap_threshold_env, report_to_parent, rss_bytes, run_child

MiB = 2**20
MMAP_THRESHOLD = 2**20


def preset_vocab(model_name: str, vocab: int) -> int | None:
    """`vocab` for a preset that takes its vocabulary from the tokenizer (cpu-*), else the preset's (None)."""
    from lowmem.models import resolve_config

    return vocab if resolve_config(model_name).vocab_size is None else None


def _run(model_name: str, optimizer_name: str, release: bool, batch: int, seq: int, vocab: int,
         checkpointing: str = "none", chunked_loss: str = "auto", loss_chunk: int = 1024, precision: str = "fp32"):
    """(model, optimizer, update, step): the trainer's step on random tokens (`precision` fp32 or
    bf16-pure: the weights' dtype)."""
    import torch

    from lowmem.assembly import build_model, build_optimizer, configure_memory, weight_dtype
    from lowmem.distributed import DistInfo
    from lowmem.train.step import AfterBackward, InBackward, train_step

    vocab = preset_vocab(model_name, vocab)
    torch.manual_seed(0)
    model = build_model(model_name, vocab_size=vocab, dtype=weight_dtype(precision))
    configure_memory(model, checkpointing, chunked_loss, loss_chunk, tokens=batch * seq)
    optimizer = build_optimizer(optimizer_name, model, preset=model_name)
    update = InBackward(optimizer, model) if release else AfterBackward(optimizer)
    vocab_size = model.config.vocab_size
    generator = torch.Generator().manual_seed(0)

    def step() -> None:
        tokens = torch.randint(0, vocab_size, (batch, seq + 1), generator=generator)
        train_step(model, update, [{"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}], info=DistInfo())
        optimizer.zero_grad(set_to_none=True)

    return model, optimizer, update, step


def memory_child(args: argparse.Namespace) -> dict:
    import torch

    from lowmem.memory import TensorMemory, estimate_memory, peak_memory
    from lowmem.memory.measure import iter_state_tensors, optimizer_state_bytes, parameter_bytes, reset_peak_memory

    torch.set_num_threads(1)
    baseline = baseline_bytes("cpu")
    release = args.release == "on"
    model, optimizer, update, step = _run(args.model, args.optimizer, release, args.batch_size, args.seq_len,
                                          args.vocab_size, *_memory_settings(args), precision=args.precision)
    step()  # the optimizer's state comes to exist
    weights, states = parameter_bytes(model), optimizer_state_bytes(optimizer)
    rss_before = rss_bytes()
    reset_peak_memory()
    # What existed before the step is counted directly, so a view of it (a weight's transpose) is not new.
    existing = [*model.parameters(), *model.buffers(), *(t for _, _, t in iter_state_tensors(optimizer))]
    with TensorMemory(exclude=existing) as mem:
        step()
    rss_peak = peak_memory()["peak_bytes"]
    est = estimate_memory(args.model, args.optimizer, vocab_size=preset_vocab(args.model, args.vocab_size),
                          batch_size=args.batch_size, seq_len=args.seq_len, precision=args.precision,
                          activation_checkpointing=args.activation_checkpointing, chunked_loss=args.chunked_loss,
                          loss_chunk=args.loss_chunk, gradient_release=release)
    return {
        "model": args.model, "optimizer": args.optimizer, "release": release, "batch_size": args.batch_size,
        "seq_len": args.seq_len, "torch": torch.__version__, "baseline_bytes": baseline,
        "weight_bytes": weights, "state_bytes": states, "step_tensor_peak_bytes": mem.peak,
        "measured_peak_bytes": weights + states + mem.peak,
        "rss_step_peak_bytes": rss_peak - rss_before,  # above the resident size the step started from
        "gradient_high_water_bytes": getattr(update, "gradient_peak", None),
        "estimate_peak_bytes": est.peak, "estimate_gradient_bytes": est.gradients,
        "estimate_activation_peak_bytes": est.activation_peak, "estimate_state_bytes": est.optimizer_states,
        "estimate_peak_phase": est.peak_phase, "loss_chunk": est.loss_chunk,
    }


def _memory_settings(args: argparse.Namespace) -> tuple[str, str, int]:
    return args.activation_checkpointing, args.chunked_loss, args.loss_chunk


def memory(args: argparse.Namespace) -> None:
    records = []
    for model in args.models.split(","):
        for optimizer in args.optimizers.split(","):
            for release in ("off", "on"):
                argv = [__file__, "memory", "--child", "--model", model, "--optimizer", optimizer, "--release", release,
                        "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
                        "--vocab-size", str(args.vocab_size), "--activation-checkpointing",
                        args.activation_checkpointing, "--chunked-loss", args.chunked_loss,
                        "--loss-chunk", str(args.loss_chunk), "--precision", args.precision]
                records.append(run_child(argv, env=mmap_threshold_env(MMAP_THRESHOLD)))
    first = records[0]
    print(f"micro-batch {first['batch_size']} x {first['seq_len']}, {args.precision}, activation checkpointing "
          f"{args.activation_checkpointing}, loss chunk {first['loss_chunk'] or 'none (full logits)'}, CPU, one thread, "
          f"torch {first['torch']}; MiB = 2^20 bytes; measured = weights + states + the step's tensor peak (TensorMemory)")
    print(f"{'model':<11}{'optimizer':<10}{'release':<8}{'measured':>10}{'estimate':>10}{'est/meas':>9}"
          f"{'step RSS':>10}{'grad high-water':>16}{'est. grads':>11}  estimate's peak at")
    for r in records:
        high = r["gradient_high_water_bytes"]
        print(f"{r['model']:<11}{r['optimizer']:<10}{'on' if r['release'] else 'off':<8}"
              f"{r['measured_peak_bytes'] / MiB:>10.1f}{r['estimate_peak_bytes'] / MiB:>10.1f}"
              f"{r['estimate_peak_bytes'] / r['measured_peak_bytes']:>9.3f}{r['rss_step_peak_bytes'] / MiB:>10.1f}"
              f"{'-' if high is None else f'{high / MiB:.1f}':>16}{r['estimate_gradient_bytes'] / MiB:>11.1f}"
              f"  {r['estimate_peak_phase']}")
    print("saving = measured peak without release - with it; freed = the estimated peak without release - with it "
          "(what the estimate says release frees); released = every gradient - the largest")
    for off, on in zip(records[::2], records[1::2]):
        saving = off["measured_peak_bytes"] - on["measured_peak_bytes"]
        freed = off["estimate_peak_bytes"] - on["estimate_peak_bytes"]
        released = off["estimate_gradient_bytes"] - on["estimate_gradient_bytes"]
        rss_saving = off["rss_step_peak_bytes"] - on["rss_step_peak_bytes"]
        share = f"{saving / freed:6.1%}" if freed else "  (none freed)"
        print(f"  {off['model']:<11}{off['optimizer']:<9} saving {saving / MiB:8.1f} MiB, freed {freed / MiB:8.1f} MiB: "
              f"{share}   (released {released / MiB:.1f} MiB; step RSS saving {rss_saving / MiB:.1f} MiB)")


def device_peak(args: argparse.Namespace) -> dict:
    """The device-peak records (module docstring), one per `--release` setting, also written to
    `args.output` when given: {"lowmem_file": ..., "records": [...]}."""
    import json

    import torch

    import lowmem
    from lowmem.models.llama import build_model as build_on

    torch.manual_seed(0)
    device = torch.device(args.device)
    vocab = preset_vocab(args.model, args.vocab_size)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16 if args.precision == "bf16-pure" else torch.float32)
    try:
        model = build_on(args.model, vocab_size=vocab, device=device)  # initialized where it trains, in its dtype
    finally:
        torch.set_default_dtype(previous)
    records = [_device_peak_of(model, args, release == "on") for release in args.release.split(",")]
    result = {"lowmem_file": lowmem.__file__, "records": records}
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=1)
    print(json.dumps(result))
    return result


def _device_peak_of(model, args: argparse.Namespace, release: bool) -> dict:
    import contextlib
    import gc

    import torch

    from lowmem.assembly import autocast, build_optimizer, configure_memory
    from lowmem.distributed import DistInfo
    from lowmem.memory import TensorMemory, estimate_memory
    from lowmem.memory.measure import parameter_bytes
    from lowmem.train.step import AfterBackward, InBackward, train_step

    device, optimizer_name = next(model.parameters()).device, args.optimizer or "scale"
    configure_memory(model, args.activation_checkpointing, args.chunked_loss, args.loss_chunk,
                     tokens=args.batch_size * args.seq_len)
    optimizer = build_optimizer(optimizer_name, model, preset=args.model)
    update = InBackward(optimizer, model) if release else AfterBackward(optimizer)
    generator = torch.Generator().manual_seed(0)
    on_cuda = device.type == "cuda"
    if on_cuda:
        torch.cuda.reset_peak_memory_stats(device)
    # CUDA counts on its own; on CPU every storage the steps create (the optimizer state included).
    measured = contextlib.nullcontext() if on_cuda else TensorMemory(exclude=[*model.parameters(), *model.buffers()])
    with measured as mem:
        for _ in range(args.steps):
            ids = torch.randint(0, model.config.vocab_size, (args.batch_size, args.seq_len + 1), generator=generator)
            result = train_step(model, update, [{"input_ids": ids[:, :-1], "labels": ids[:, 1:]}],
                                info=DistInfo(device=device), autocast=autocast(args.precision, device))
            optimizer.zero_grad(set_to_none=True)
    peak = torch.cuda.max_memory_allocated(device) if on_cuda else parameter_bytes(model) + mem.peak
    gradient_high_water = getattr(update, "gradient_peak", None)
    del update, optimizer  # the next setting starts from the weights alone
    gc.collect()
    est = estimate_memory(args.model, optimizer_name, vocab_size=preset_vocab(args.model, args.vocab_size),
                          batch_size=args.batch_size, seq_len=args.seq_len, precision=args.precision,
                          activation_checkpointing=args.activation_checkpointing, chunked_loss=args.chunked_loss,
                          loss_chunk=args.loss_chunk, gradient_release=release)
    return {"model": args.model, "optimizer": optimizer_name, "release": release, "device": str(device),
            "precision": args.precision, "batch_size": args.batch_size, "seq_len": args.seq_len,
            "steps": args.steps, "last_loss": result.loss, "torch": torch.__version__,
            "peak_bytes": peak, "peak_measure": "cuda_max_allocated" if on_cuda else "weights + TensorMemory peak",
            "estimate_peak_bytes": est.peak, "estimate_peak_phase": est.peak_phase,
            "gradient_high_water_bytes": gradient_high_water}


def timing(args: argparse.Namespace) -> None:
    import torch

    from lowmem.bench.timing import interleaved, seconds_per_step

    torch.set_num_threads(1)
    contenders = {}
    for optimizer in args.optimizers.split(","):
        for release in (False, True):
            _, _, _, step = _run(args.model, optimizer, release, args.batch_size, args.seq_len, args.vocab_size,
                                 *_memory_settings(args))
            contenders[f"{optimizer} {'release' if release else 'after backward'}"] = step
    results = interleaved(contenders, args.rounds, lambda step: seconds_per_step(step, args.steps))
    print(f"{args.model}, micro-batch {args.batch_size} x {args.seq_len}, fp32, CPU, one thread; {args.rounds} rounds "
          f"of {args.steps} steps per contender, order rotated; seconds per step (median over rounds)")
    for optimizer in args.optimizers.split(","):
        plain, released = results[f"{optimizer} after backward"], results[f"{optimizer} release"]
        ratios = [r / p for r, p in zip(released, plain)]
        print(f"  {optimizer:<8} after backward {statistics.median(plain):7.3f} s   inside backward "
              f"{statistics.median(released):7.3f} s   ratio per round: median {statistics.median(ratios):.3f} "
              f"(min {min(ratios):.3f}, max {max(ratios):.3f})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("memory", "time", "device-peak"))
    parser.add_argument("--models", default="llama-60m,cpu-base", help="memory: the models")
    parser.add_argument("--model", default="llama-60m", help="time: the model (memory's child: its model)")
    parser.add_argument("--optimizers", default="scale,adamw")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--vocab-size", type=int, default=8192,
                        help="the vocabulary of presets that take it from the tokenizer (cpu-*; the main job's BPE: "
                             "8192); llama-* keep their 32000")
    parser.add_argument("--activation-checkpointing", default="none", choices=("none", "block", "selective"))
    parser.add_argument("--chunked-loss", default="auto", choices=("auto", "on", "off"))
    parser.add_argument("--loss-chunk", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=2, help="time: steps per contender per round")
    parser.add_argument("--device", default="cpu", help="device-peak: where the model is built and trained")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16-autocast", "bf16-pure"),
                        help="the trainer's --precision (memory: fp32 or bf16-pure)")
    parser.add_argument("--output", help="device-peak: write the record here as JSON")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--optimizer", help="device-peak: the optimizer (default scale); memory's child: its optimizer")
    parser.add_argument("--release", default="on",
                        help="device-peak: on, off or both in turn (on,off) on the same weights; memory's child: on or off")
    args = parser.parse_args()
    if args.child:
        report_to_parent(memory_child(args))
    elif args.what == "memory":
        memory(args)
    elif args.what == "device-peak":
        device_peak(args)
    else:
        timing(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
