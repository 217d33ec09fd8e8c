"""Edges of the newer features (issue 30): refused at start-up with a message that names the fix,
and output that says what happened. Each test failed before its fix."""

from __future__ import annotations

import pytest

from lowmem.cli import main as cli_main


def test_a_plugin_that_raises_on_import_exits_2_naming_its_file_and_line(tmp_path, capsys):
    plugin = tmp_path / "broken_plugin.py"
    plugin.write_text("import math\n\nraise RuntimeError('half-written plugin')\n")
    code = cli_main(["train", "--plugin", str(plugin), "--list-optimizers"])
    err = capsys.readouterr().err
    assert code == 2
    assert f"{plugin}, line 3" in err and "RuntimeError: half-written plugin" in err
    assert "Traceback" not in err


def test_a_plugin_with_a_syntax_error_names_the_line(tmp_path, capsys):
    plugin = tmp_path / "typo_plugin.py"
    plugin.write_text("x = 1\ndef f(:\n    pass\n")
    code = cli_main(["train", "--plugin", str(plugin), "--list-optimizers"])
    err = capsys.readouterr().err
    assert code == 2 and f"{plugin}, line 2" in err and "SyntaxError" in err


def _first_document_error(path):
    from lowmem.data import open_source
    from lowmem.errors import DataError

    try:
        for _ in open_source(str(path), "train", require_documents=False).iter_documents():
            pass
    except DataError as err:
        return str(err)
    raise AssertionError("no DataError")


def test_a_non_utf8_byte_is_reported_by_line_and_column_in_gzipped_json(tmp_path):
    import gzip
    import json

    lines = [json.dumps({"text": f"document {i}"}) for i in range(5)]
    data = "\n".join(lines).encode() + b"\n" + b'{"text": "caf\xe9"}\n'
    (tmp_path / "corpus").mkdir()
    path = tmp_path / "corpus" / "c4-train.00000-of-00001.json.gz"
    path.write_bytes(gzip.compress(data))
    message = _first_document_error(path)
    assert "line 6, column 14" in message and "0xe9" in message and "UTF-8" in message


def test_a_non_utf8_byte_in_text_is_reported_by_line_and_column(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_bytes(b"first paragraph\n\nsecond\nthird \xff line\n")
    message = _first_document_error(path)
    assert "line 4, column 7" in message and "0xff" in message


def test_bench_progress_in_a_log_file_is_plain_lines_not_carriage_return_frames(tiny_corpus, token_cache, tmp_path, capsys):
    from test_bench import _grid

    from lowmem.bench.run import load_grid, run_grid

    grid = load_grid(_grid(tmp_path, tiny_corpus, token_cache, {"adamw": {"lr": [1.0e-3, 3.0e-3]}}), tmp_path / "out")
    run_grid(grid, workers=1, progress=True)
    captured = capsys.readouterr()
    assert "\r" not in captured.out + captured.err
    lines = [line for line in captured.out.splitlines() if line.startswith("grid run")]
    assert [line.split()[2] for line in lines] == ["1/2", "2/2"], captured.out


def test_a_budget_nothing_fits_in_is_an_error_that_names_the_least_needed(capsys):
    code = cli_main(["memory", "--model", "llama-60m", "--optimizer", "adamw", "--budget", "1KB"])
    captured = capsys.readouterr()
    assert code == 2
    assert "nothing fits in --budget 1KB" in captured.err and "GB at the least" in captured.err
    assert "none fits" in captured.out  # the table still shows what each setting would need
    assert cli_main(["memory", "--model", "llama-60m", "--optimizer", "adamw", "--budget", "24GB"]) == 0


def _one_line_corpus(path, characters: int, seed: int = 0):
    import json
    import random

    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "review", "great", "product", "service", "price", "the", "and"]
    text = " ".join(rng.choice(words) + str(rng.randint(0, 999)) for _ in range(characters // 7))[:characters]
    path.write_text(json.dumps({"text": text}) + "\n")
    return text


# Slow-marked (make bench-tests): alone it measures 311-313 MiB (964 before the fix), but inside one
# loaded full-suite run on 2026-12-03 its child peaked at 940 MiB, unexplained yet; kept out of CI
# until that is understood rather than loosened until it passes.
@pytest.mark.slow
def test_bpe_training_on_one_huge_line_stays_within_a_memory_bound(tmp_path):
    import subprocess
    import sys

    _one_line_corpus(tmp_path / "huge.jsonl", 8_000_000)
    script = (
        "import resource, sys\n"
        "from lowmem.data import open_source, train_bpe\n"
        "train_bpe(open_source(sys.argv[1], 'train', require_documents=False), 512, sys.argv[2])\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "huge.jsonl"), str(tmp_path / "bpe.json")],
                          capture_output=True, text=True, timeout=300, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    # Measured: 964 MiB when the 8 MB line went to the trainer whole, 313 MiB in pieces on a quiet
    # machine; the bound leaves room for the Rust trainer's threads holding more under load.
    peak = int(proc.stdout.split()[-1])
    assert peak < 800, f"{peak} MiB"


def test_bpe_pieces_learn_the_vocabulary_of_the_whole_text(tmp_path):
    from tokenizers import Tokenizer as Backend
    from tokenizers import models, pre_tokenizers, trainers

    from lowmem.data import open_source, train_bpe
    from lowmem.data.loader import PIECE_CHARS

    text = _one_line_corpus(tmp_path / "long.jsonl", 5 * PIECE_CHARS)
    ours = train_bpe(open_source(str(tmp_path / "long.jsonl"), "train", require_documents=False), 400, tmp_path / "b.json")
    whole = Backend(models.BPE())
    whole.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    whole.train_from_iterator([text], trainer=trainers.BpeTrainer(
        vocab_size=400, min_frequency=2, special_tokens=["<pad>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    assert ours._backend.get_vocab() == whole.get_vocab()


def test_a_bpe_smaller_than_asked_says_so(tmp_path, caplog):
    import logging

    from lowmem.data import load_tokenizer, open_source

    (tmp_path / "tiny.txt").write_text("a few words only\n\nand a few more words\n")
    caplog.set_level(logging.WARNING, logger="lowmem.data.tokenizer")
    tokenizer = load_tokenizer("bpe", open_source(str(tmp_path / "tiny.txt"), "train", require_documents=False),
                               vocab_size=512, cache_dir=tmp_path / "cache")
    assert tokenizer.vocab_size < 512
    assert f"The BPE has {tokenizer.vocab_size} tokens, not the 512 asked" in caplog.text


def test_memory_takes_opt_like_train_not_as_an_abbreviation_of_optimizer(capsys):
    # `--opt` once parsed as argparse's abbreviation of --optimizer: "unknown optimizer 'rank=64'".
    assert cli_main(["memory", "--model", "llama-60m", "--optimizer", "galore", "--opt", "rank=64"]) == 0
    with_opt = capsys.readouterr().out
    assert cli_main(["memory", "--model", "llama-60m", "--optimizer", "galore", "--hparam", "rank=64"]) == 0
    assert capsys.readouterr().out == with_opt
    assert cli_main(["memory", "--model", "llama-60m", "--optimizer", "galore", "--opt", "rank"]) == 2
    assert "--opt 'rank' is not KEY=VALUE" in capsys.readouterr().err


def _tiny_train_args(corpus, cache, output, *extra: str) -> list[str]:
    output.mkdir(parents=True, exist_ok=True)
    config = output.parent / f"{output.name}-config.yaml"
    config.write_text(f"data: {{cache_dir: '{cache}'}}\n")
    return ["train", "--config", str(config), "--model", "cpu-tiny", "--data", str(corpus), "--vocab-size", "320",
            "--seq-len", "32", "--batch-size", "4", "--micro-batch-size", "4", "--eval-tokens", "500",
            "--output-dir", str(output), "--no-progress", *extra]


def test_an_intervention_without_its_structure_is_refused_before_any_step(tiny_corpus, token_cache, tmp_path, capsys):
    # Was: 19 steps trained, then a ValueError traceback at the first merge, exit 1, no checkpoint; with
    # every below 10 the error blamed a ramp default the user never set.
    cases = [("lora-merge:every=20,ramp_steps=1", "lora structure", "--structure lora"),
             ("lora-merge:every=5", "lora structure", "--structure lora"),
             ("restarts:every=5", "factored layers", "--structure lowrank"),
             ("refactor:every=20", "factored layers", "--structure lowrank")]
    for index, (spec, needs, fix) in enumerate(cases):
        output = tmp_path / f"run{index}"
        code = cli_main(_tiny_train_args(tiny_corpus, token_cache, output, "--steps", "30", "--intervention", spec))
        err = capsys.readouterr().err
        assert code == 2, (spec, err)
        assert needs in err and fix in err and "ramp" not in err and "Traceback" not in err, (spec, err)
        assert not list(output.rglob("metrics.jsonl")) or not any(
            '"step"' in line for path in output.rglob("metrics.jsonl") for line in path.read_text().splitlines())


def test_a_resumed_runs_summary_sums_its_segments_and_a_finished_run_resumed_changes_nothing(
        tiny_corpus, token_cache, tmp_path, capsys):
    import json
    import shutil

    from conftest import tiny_run_overrides

    from lowmem.config import load_config
    from lowmem.train import checkpoint
    from lowmem.train.trainer import train

    run = tmp_path / "run"
    overrides = tiny_run_overrides(tiny_corpus, token_cache, run, **{"train.checkpoint_every": 6,
                                                                     "train.keep_checkpoints": 2})
    train(load_config(overrides=overrides))
    first, last = checkpoint.list_checkpoints(run)
    segment_one = checkpoint.load(first)  # the progress component is kept at the top level
    # Back to step 6, as a run stopped there: the second segment trains steps 7-12.
    shutil.rmtree(last)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("".join(line + "\n" for line in lines if json.loads(line)["step"] <= 6))
    train(load_config(overrides=overrides), resume=run)
    summary = json.loads((run / "summary.json").read_text())
    final = checkpoint.load(checkpoint.list_checkpoints(run)[-1])
    # Was: all tokens over the last segment's wall time.
    assert summary["segments"] == 2 and final["segments"] == 2
    assert summary["wall_seconds"] == final["seconds"] > segment_one["seconds"] > 0
    assert summary["tokens_per_second"] == final["steady_tokens"] / final["steady_seconds"]
    assert final["timed_tokens"] == summary["tokens"]

    # Was: a second final val_loss in metrics.jsonl and a summary at 2.56e12 tok/s over 0.0 s.
    files = {path: path.read_bytes() for path in run.rglob("*") if path.is_file() and path.name != ".lock"}
    capsys.readouterr()
    again = train(load_config(overrides=overrides), resume=run)
    assert "is finished" in capsys.readouterr().out
    assert again == summary
    assert {path: path.read_bytes() for path in run.rglob("*") if path.is_file() and path.name != ".lock"} == files


def test_eval_takes_eval_tokens_as_train_does_and_tokens_as_its_alias(tiny_corpus, token_cache, tmp_path, capsys):
    import json

    run = tmp_path / "run"
    assert cli_main(_tiny_train_args(tiny_corpus, token_cache, run, "--steps", "2")) == 0
    results = []
    for flag in ("--eval-tokens", "--tokens"):
        out = tmp_path / f"eval{flag}.json"
        assert cli_main(["eval", str(run), "--data", str(tiny_corpus), flag, "300", "--output", str(out),
                         "--no-progress"]) == 0
        results.append(json.loads(out.read_text()))
    assert results[0] == results[1] and results[0]["tokens"] >= 300
    capsys.readouterr()
    try:
        cli_main(["eval", "--help"])
    except SystemExit:
        pass
    assert "--eval-tokens" in capsys.readouterr().out


def test_the_exported_weights_have_the_mode_of_the_other_files(tiny_corpus, token_cache, tmp_path):
    import os
    import stat

    run = tmp_path / "run"
    assert cli_main(_tiny_train_args(tiny_corpus, token_cache, run, "--steps", "2")) == 0
    previous = os.umask(0o022)
    try:
        assert cli_main(["export", str(run), "--to", "hf", str(tmp_path / "hf")]) == 0
    finally:
        os.umask(previous)
    modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in (tmp_path / "hf").iterdir() if path.is_file()}
    assert modes["model.safetensors"] == 0o644, modes  # was 0600 (safetensors' own mode)
    assert set(modes.values()) == {0o644}, modes


def test_an_unsafe_checkpoint_is_refused_by_lowmems_message_alone(tmp_path, recwarn):
    import os
    import pickle

    import pytest

    from lowmem.errors import CheckpointError
    from lowmem.train import checkpoint

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo unsafe",))

    step = tmp_path / "step-00000001"
    step.mkdir()
    (step / "rank-0.pt").write_bytes(pickle.dumps({"format": Payload()}, protocol=4))
    with pytest.raises(CheckpointError, match="lowmem refuses"):
        checkpoint.load(step)
    # Was: torch's "Detected pickle protocol 4" UserWarning printed before lowmem's refusal.
    assert not [w for w in recwarn if "pickle protocol" in str(w.message)]


def test_a_disk_that_holds_one_checkpoint_but_not_two_says_it_must_hold_two(tmp_path, monkeypatch):
    import pytest
    import torch

    from lowmem.errors import CheckpointError
    from lowmem.train import checkpoint

    payload = {"weights": torch.zeros(1000)}
    checkpoint.save(tmp_path, 1, payload, keep=1)
    real = torch.save

    def full_disk(obj, f, *args, **kwargs):
        raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")

    monkeypatch.setattr(checkpoint.torch, "save", full_disk)
    with pytest.raises(CheckpointError) as raised:
        checkpoint.save(tmp_path, 2, payload, keep=1)
    monkeypatch.setattr(checkpoint.torch, "save", real)
    message = str(raised.value)
    assert "must hold two checkpoints" in message and "before the old one is removed" in message
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step-00000001"]  # the order kept


def test_betas_given_as_a_word_are_shown_whole_in_the_error():
    import pytest
    import torch

    from lowmem.assembly import build_optimizer
    from lowmem.errors import ConfigError

    model = torch.nn.Linear(4, 4)
    for name, key in (("adamw", "betas"), ("stable-spam", "betas"), ("adam-mini", "betas"), ("muon", "adam_betas"),
                      ("scale", "adam_betas")):
        with pytest.raises((ConfigError, ValueError)) as raised:
            build_optimizer(name, model, hparams={key: "hello"})
        # Was: "invalid betas[0]: 'h'" (the string split into characters).
        assert "'hello'" in str(raised.value) and "'h'" not in str(raised.value), (name, str(raised.value))


def test_init_from_uses_the_directorys_tokenizer_and_refuses_another(tiny_corpus, token_cache, tmp_path, capsys):
    import json

    import yaml
    from conftest import write_corpus

    run = tmp_path / "run"
    assert cli_main(_tiny_train_args(tiny_corpus, token_cache, run, "--steps", "4")) == 0
    exported = tmp_path / "hf"
    assert cli_main(["export", str(run), "--to", "hf", str(exported)]) == 0
    other = write_corpus(tmp_path / "other-corpus", train_docs=150, validation_docs=30, seed=7)
    # Was: a new BPE trained on the other corpus, its ids reading the exported embeddings without a word.
    follow = tmp_path / "follow"
    args = _tiny_train_args(other, token_cache, follow, "--steps", "2", "--init-from", str(exported))
    args[args.index("--vocab-size") + 1] = "300"
    assert cli_main(args) == 0
    config = yaml.safe_load((follow / "config.yaml").read_text())
    assert config["data"]["tokenizer"] == str(exported / "tokenizer.json")
    assert json.loads((follow / "summary.json").read_text())["vocab_size"] == json.loads(
        (run / "summary.json").read_text())["vocab_size"]
    capsys.readouterr()
    refused = tmp_path / "refused"
    assert cli_main(_tiny_train_args(other, token_cache, refused, "--steps", "2", "--init-from", str(exported),
                                     "--tokenizer", "t5-base")) == 2
    err = capsys.readouterr().err
    assert "holds the tokenizer its embeddings were trained with" in err and "drop --tokenizer" in err


def test_the_wsd_schedule_warms_up_stays_then_decays_linearly_over_its_last_fraction(tiny_corpus, token_cache, tmp_path):
    import json

    import pytest

    from lowmem.interventions import RunContext
    from lowmem.train.schedule import lr_factor

    total = 100  # warmup 10, stable to step 79, decay over the last 20 steps to 0.1
    curve = [lr_factor(s, total, 0.1, 0.1, "wsd", 0.2) for s in range(total)]
    assert curve[:10] == [(s + 1) / 10 for s in range(10)]
    assert curve[10:80] == [1.0] * 70
    assert curve[80:] == pytest.approx([1 - 0.9 * (k + 1) / 20 for k in range(20)])
    assert curve[-1] == pytest.approx(0.1)
    # A longer run's stable phase leaves its decay-free past as it was (same warmup steps).
    longer = [lr_factor(s, 200, 0.05, 0.1, "wsd", 0.2) for s in range(80)]
    assert longer == curve[:80]
    # cosine stays the default, bit for bit; interventions see the same schedule.
    assert lr_factor(37, total, 0.1, 0.1) == lr_factor(37, total, 0.1, 0.1, "cosine", 0.2)
    assert RunContext(total, schedule="wsd").base_lr_factor(90) == curve[89]
    # Through lowmem train --schedule wsd: the logged lr is the curve's.
    run = tmp_path / "run"
    assert cli_main(_tiny_train_args(tiny_corpus, token_cache, run, "--steps", "10", "--schedule", "wsd",
                                     "--decay-ratio", "0.5", "--lr", "0.001", "--log-every", "1")) == 0
    lrs = [json.loads(line)["lr"] for line in (run / "metrics.jsonl").read_text().splitlines() if "loss" in json.loads(line)]
    assert lrs == pytest.approx([0.001 * lr_factor(s, 10, 0.1, 0.1, "wsd", 0.5) for s in range(10)])
    assert cli_main(_tiny_train_args(tiny_corpus, token_cache, tmp_path / "bad", "--steps", "2", "--schedule", "linear")) == 2


def test_topology_without_a_sparse_structure_is_refused_before_it_is_built():
    import pytest

    from lowmem.errors import ConfigError
    from lowmem.interventions import RunContext, build_interventions
    from lowmem.models.llama import build_model

    model = build_model("cpu-micro", vocab_size=64)
    # every=1 with RigL is also a bad setting: the missing structure is what the user hears first.
    with pytest.raises(ConfigError, match="needs a sparse model"):
        build_interventions([{"name": "topology", "every": 1, "grow": "gradient"}], RunContext(total_steps=10, model=model))


def test_a_yaml_syntax_error_is_lowmems_error_naming_the_file_and_line(tmp_path, capsys):
    config = tmp_path / "broken.yaml"
    config.write_text("model: cpu-tiny\ntrain: {steps: 10\n")
    code = cli_main(["train", "--config", str(config)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("lowmem: error:")
    assert f"config file {config} is not valid YAML" in err and "line 3" in err and "Traceback" not in err
