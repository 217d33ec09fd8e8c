"""The trainer end to end: a run directory, falling perplexity, schedule, config and CLI errors."""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import tiny_run_overrides

from lowmem.cli import main as cli_main
from lowmem.config import RunConfig, load_config, results_affecting_differences
from lowmem.errors import ConfigError
from lowmem.models import build_model
from lowmem.train.schedule import lr_factor
from lowmem.train.trainer import train


def test_schedule_warms_up_linearly_then_decays_to_the_floor():
    total = 100
    assert lr_factor(0, total) == pytest.approx(0.1)
    assert lr_factor(9, total) == pytest.approx(1.0)
    assert lr_factor(10, total) == pytest.approx(1.0)
    assert lr_factor(55, total) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(99, total) == pytest.approx(0.1, abs=2e-3)
    factors = [lr_factor(s, total) for s in range(10, 100)]
    assert all(a >= b for a, b in zip(factors, factors[1:]))


def test_short_run_writes_its_run_directory_and_lowers_perplexity(tiny_corpus, token_cache, tmp_path):
    out = tmp_path / "run"
    config = load_config(overrides=tiny_run_overrides(tiny_corpus, token_cache, out, **{"train.steps": 30, "train.eval_every": 15}))
    summary = train(config)
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "loss.png"):
        assert (out / name).exists(), name
    assert summary["val_perplexity"] < 0.5 * summary["initial_val_perplexity"]
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["val_perplexity"] == pytest.approx(summary["val_perplexity"])
    assert on_disk["tokens"] > 0 and on_disk["tokens_per_second"] > 0
    memory = on_disk["memory"]
    n_tensors = len(list(build_model("cpu-tiny", vocab_size=summary["vocab_size"], device="meta").parameters()))
    # AdamW: two moments per weight plus one float32 step counter per tensor.
    assert memory["optimizer_state_bytes"] == 2 * memory["parameter_bytes"] + 4 * n_tensors
    assert memory["gradient_bytes"] == memory["parameter_bytes"]
    assert memory["peak_bytes"] > 0 and memory["peak_measure"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_records] == list(range(1, 31))
    assert {"loss", "lr", "tokens", "tokens_per_second", "optimizer_state_bytes"} <= set(train_records[0])
    # tokens/s leaves out the first steps (CUDA set-up, allocator growth, first SVDs) and says so
    assert [r["tokens_per_second"] for r in train_records[:3]] == [None] * 3
    assert all(r["tokens_per_second"] > 0 for r in train_records[3:])
    assert on_disk["tokens_per_second_steps"] == [4, 30] and on_disk["warmup_steps_excluded"] == 3
    assert on_disk["wall_seconds"] > 0
    assert [r["step"] for r in records if "val_perplexity" in r] == [0, 15, 30]
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["steps"] == 30


def test_pad_tokens_are_excluded_and_pack_mode_counts_every_position(tiny_corpus, token_cache, tmp_path):
    pad = train(load_config(overrides=tiny_run_overrides(tiny_corpus, token_cache, tmp_path / "pad", **{"train.steps": 3, "data.seq_len": 128})))
    pack = train(load_config(overrides=tiny_run_overrides(
        tiny_corpus, token_cache, tmp_path / "pack", **{"train.steps": 3, "data.seq_len": 128, "data.seq_mode": "pack"})))
    assert pack["tokens"] == 3 * 4 * 128  # packed: every position is a target
    assert pad["tokens"] < pack["tokens"]  # padded documents are shorter than 128 tokens


def test_gradient_accumulation_gives_the_same_first_step_as_one_big_batch(tiny_corpus, token_cache, tmp_path):
    one = train(load_config(overrides=tiny_run_overrides(tiny_corpus, token_cache, tmp_path / "a", **{"train.steps": 2})))
    accumulated = train(load_config(overrides=tiny_run_overrides(
        tiny_corpus, token_cache, tmp_path / "b", **{"train.steps": 2, "train.micro_batch_size": 2})))
    losses = lambda d: [json.loads(x)["loss"] for x in (d / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert losses(tmp_path / "a") == pytest.approx(losses(tmp_path / "b"), rel=1e-5)
    assert one["tokens"] == accumulated["tokens"]


def test_config_rejects_unknown_keys_and_bad_values():
    with pytest.raises(ConfigError, match="valid keys"):
        RunConfig.from_dict({"train": {"stepz": 3}})
    with pytest.raises(ConfigError, match="precision"):
        load_config(overrides={"train.precision": "fp8"})
    with pytest.raises(ConfigError, match="seq_mode|sequence mode"):
        load_config(overrides={"data.seq_mode": "chunk"})


def test_results_affecting_differences_ignore_harmless_settings():
    a = RunConfig().to_dict()
    b = load_config(overrides={"train.eval_every": 7, "train.log_every": 3}).to_dict()
    assert results_affecting_differences(a, b) == []
    c = load_config(overrides={"optim.lr": 0.5, "optim.hparams": {"rank": 4}}).to_dict()
    assert results_affecting_differences(a, c) == ["optim.hparams: {} -> {'rank': 4}", "optim.lr: None -> 0.5"]


def _cli(capsys, *args: str) -> tuple[int, str]:
    code = cli_main(["train", *args])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("args,fragment", [
    (["--model", "llama-3b"], "unknown model preset 'llama-3b'; choose one of"),
    (["--optimizer", "adamz"], "unknown optimizer 'adamz'; choose one of"),
    (["--data", "/nonexistent/corpus/*.jsonl"], "/nonexistent/corpus"),
    (["--batch-size", "6", "--micro-batch-size", "4"], "not divisible by micro-batch 4"),
    (["--seq-len", "600"], "above the maximum sequence length 512"),
    (["--precision", "fp8"], "unknown precision"),
    (["--opt", "rankk=3"], "has no hyperparameter"),
])
def test_bad_input_is_a_named_error_with_a_fix_and_no_traceback(args, fragment, capsys, tiny_corpus, token_cache, tmp_path):
    base = ["--model", "cpu-tiny", "--data", str(tiny_corpus), "--steps", "2", "--batch-size", "4",
            "--micro-batch-size", "4", "--seq-len", "32", "--vocab-size", "320", "--no-progress",
            "--output-dir", str(tmp_path / "run")]
    code, err = _cli(capsys, *base, *args)
    assert code == 2
    assert fragment in err
    assert "Traceback" not in err


def test_list_optimizers_shows_the_registry(capsys):
    assert cli_main(["train", "--list-optimizers"]) == 0
    out = capsys.readouterr().out
    assert "adamw" in out


@pytest.mark.parametrize("precision", ["bf16-autocast", "bf16-pure"])
def test_bf16_precisions_train_and_keep_their_dtypes(precision, tiny_corpus, token_cache, tmp_path):
    summary = train(load_config(overrides=tiny_run_overrides(
        tiny_corpus, token_cache, tmp_path / precision, **{"train.steps": 6, "train.precision": precision})))
    assert summary["val_perplexity"] < summary["initial_val_perplexity"]
    memory = summary["memory"]
    n_params = summary["parameters"]
    # bf16-pure: weights and Adam states are bf16 (2 bytes); autocast keeps fp32 weights and states.
    bytes_per_weight = 2 if precision == "bf16-pure" else 4
    assert memory["parameter_bytes"] == bytes_per_weight * n_params
    assert memory["optimizer_state_bytes"] // n_params == 2 * bytes_per_weight


def test_momentum_reset_from_the_command_line_dips_the_lr_after_each_reset(capsys, tiny_corpus, token_cache, tmp_path):
    out = tmp_path / "run"
    code = cli_main(["train", "--model", "cpu-tiny", "--data", str(tiny_corpus), "--vocab-size", "320",
                     "--seq-len", "32", "--seq-mode", "pad", "--steps", "9", "--batch-size", "4",
                     "--micro-batch-size", "4", "--eval-tokens", "500", "--log-every", "1", "--lr", "1e-3",
                     "--warmup-ratio", "0", "--min-lr-ratio", "1", "--no-progress", "--output-dir", str(out),
                     "--intervention", "momentum-reset:every=3,lr_ramp_steps=2"])
    assert code == 0, capsys.readouterr().err
    lrs = {r["step"]: r["lr"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "lr" in r}
    # Resets after steps 3, 6 and 9: as in the reference, the reset step itself runs at the floor (0.1%)
    # and, with a 2-step ramp, the first step on fresh moments is back at the target.
    assert lrs[3] == pytest.approx(1e-6) and lrs[6] == pytest.approx(1e-6) and lrs[9] == pytest.approx(1e-6)
    assert lrs[1] == lrs[2] == lrs[4] == lrs[5] == lrs[7] == lrs[8] == pytest.approx(1e-3)


def test_stable_spam_beta1_decay_spans_the_run():
    import subprocess
    import sys

    # A fresh process: its registry holds only adamw until a method is looked up, and the trainer
    # must still find that stable-spam takes total_T (it once did not, silently).
    code = ("from lowmem.assembly import optimizer_hparams; "
            "print(optimizer_hparams('stable-spam', {}, None, steps=123))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "{'total_T': 123}"


def test_tokens_per_second_is_the_steady_rate_and_the_table_says_which_steps():
    from lowmem.train.log import summary_table
    from lowmem.train.trainer import Throughput

    rate = Throughput(warmup=2)
    for step, seconds in zip(range(11, 16), [5.0, 3.0, 1.0, 1.0, 2.0]):  # a resumed process: steps 11-15
        rate.add(step, seconds, 100)
    assert rate.summary() == {"tokens_per_second": 300 / 4.0, "tokens_per_second_steps": [13, 15],
                              "warmup_steps_excluded": 2, "wall_seconds": 12.0,
                              "first_step_seconds": 5.0}  # this process's first step (with --compile: the compilation)
    few = Throughput(warmup=3)
    few.add(1, 2.0, 100)
    few.add(2, 2.0, 100)
    assert few.take_window_rate() is None  # nothing but warm-up yet
    assert few.summary() == {"tokens_per_second": 50.0, "tokens_per_second_steps": [1, 2],
                             "warmup_steps_excluded": 0, "wall_seconds": 4.0, "first_step_seconds": 2.0}
    summary = {"model": "m", "optimizer": "o", "data": "d", "val_perplexity": 2.0, "initial_val_perplexity": 9.0,
               "tokens": 500, "wall_seconds": 12.0, **rate.summary()}
    assert "tokens/s (steady, steps 13-15)" in summary_table(summary)
    assert "tokens/s (steps 1-2) " in summary_table({**summary, **few.summary()})


def test_a_step_waits_for_the_host_once_whatever_its_micro_batches(monkeypatch):
    """The loss and the target count stay on the device until one sync at the step's end (a sync
    per micro-batch stalls a GPU)."""
    import torch

    from lowmem.distributed import DistInfo
    from lowmem.testing import TINY
    from lowmem.train.step import train_step

    syncs = []
    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__"):
        real = getattr(torch.Tensor, name)

        def counted(self, *args, _real=real, _name=name, **kwargs):
            syncs.append(_name)
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)

    class BackwardOnly:  # the update's own syncs (an optimizer's) are not the step's
        def backward(self, loss, last):
            loss.backward()

        def apply(self, model, before_update):
            pass

    torch.manual_seed(0)
    model = build_model(TINY)
    tokens = torch.randint(0, TINY.vocab_size, (4, 3, 17))
    micro = [{"input_ids": t[:, :-1], "labels": t[:, 1:]} for t in tokens]
    syncs.clear()
    result = train_step(model, BackwardOnly(), micro, info=DistInfo())
    assert result.updated and result.targets == 4 * 3 * 16
    assert syncs == ["tolist"]


def test_the_memory_peak_restarts_once_the_run_is_assembled(tiny_corpus, token_cache, tmp_path, monkeypatch):
    """So the reported peak is the training's, not the model loading's or the resume's."""
    import lowmem.train.trainer as trainer_module

    events = []
    real_step = trainer_module.train_step
    monkeypatch.setattr(trainer_module, "reset_peak_memory", lambda: events.append("reset"))
    monkeypatch.setattr(trainer_module, "train_step", lambda *a, **k: events.append("step") or real_step(*a, **k))
    train(load_config(overrides=tiny_run_overrides(tiny_corpus, token_cache, tmp_path / "run", **{"train.steps": 2})))
    assert events == ["reset", "step", "step"]
