"""lowmem eval, lowmem export --to hf, lowmem train --init-from, and the logs tools read."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import tiny_run_overrides

from lowmem.assembly import build_model
from lowmem.cli import main
from lowmem.config import RunConfig, load_config
from lowmem.errors import CheckpointError, ConfigError
from lowmem.models.generate import greedy_generate
from lowmem.train import checkpoint
from lowmem.train.trained import load_trained
from lowmem.train.trainer import train

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

TEXTS = ["the model learns language from text", "Gradient moment, rank: projection matrix!",
         "  spaces\tand\nnewlines 123 ünïcödé"]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_corpus, token_cache) -> Path:
    """A finished cpu-tiny run (SCALE, a few steps) with its legacy figure recorded."""
    out = tmp_path_factory.mktemp("run") / "run"
    config = load_config(None, tiny_run_overrides(tiny_corpus, token_cache, out, **{
        "train.steps": 6, "optim.name": "scale", "train.legacy_perplexity": True}))
    train(config)
    return out


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "hf"
    assert main(["export", str(trained_run), "--to", "hf", str(out)]) == 0
    return out


def _summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def test_eval_gives_the_runs_own_perplexity(trained_run, tiny_corpus, tmp_path):
    summary, config = _summary(trained_run), RunConfig.from_dict(yaml_config(trained_run))
    out = tmp_path / "eval.json"
    assert main(["eval", str(trained_run), "--data", str(tiny_corpus), "--tokens", str(config.train.eval_tokens),
                 "--legacy-perplexity", "--output", str(out), "--no-progress"]) == 0
    result = json.loads(out.read_text())
    assert result["tokens"] == summary["val_tokens"]
    assert abs(result["perplexity"] / summary["val_perplexity"] - 1) <= 1e-6
    assert abs(result["legacy_perplexity"] / summary["val_legacy_perplexity"] - 1) <= 1e-6
    # A step directory evaluates the same as its run directory.
    step_dir = checkpoint.list_checkpoints(trained_run)[-1]
    assert main(["eval", str(step_dir), "--data", str(tiny_corpus), "--tokens", str(config.train.eval_tokens),
                 "--output", str(out), "--no-progress", "--device", "cpu"]) == 0
    assert abs(json.loads(out.read_text())["perplexity"] / summary["val_perplexity"] - 1) <= 1e-6


def test_eval_runs_on_the_device_asked_for(trained_run, tiny_corpus, capsys, monkeypatch):
    import torch

    if not torch.cuda.is_available():
        _fails(capsys, ["eval", str(trained_run), "--data", str(tiny_corpus), "--device", "cuda"],
               "no CUDA device is available", "--device cpu")
    trained = load_trained(trained_run, device="cpu")
    assert {p.device.type for p in trained.model.parameters()} == {"cpu"}
    # The device reaches the model and every batch ("meta" stands for a device that is not the CPU;
    # its losses hold no values to report, which is where this evaluation stops).
    on_meta = load_trained(trained_run, device=torch.device("meta"))
    assert {p.device.type for p in on_meta.model.parameters()} == {"meta"}
    from lowmem.train.trained import evaluate_source

    seen = []
    on_meta.model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append((args[0].device.type, kwargs["labels"].device.type)), with_kwargs=True)
    with pytest.raises((RuntimeError, NotImplementedError), match="meta"):
        evaluate_source(on_meta, str(tiny_corpus), tokens=100)
    assert seen and set(seen) == {("meta", "meta")}


def yaml_config(run: Path) -> dict:
    import yaml

    return yaml.safe_load((run / "config.yaml").read_text())


def test_eval_reads_all_of_a_txt_file_the_run_never_saw(trained_run, tmp_path, capsys):
    paragraphs = ["An unseen note about film music and the long night.", "Second paragraph: " + "token " * 60,
                  "Third one, short.", "Vierter Absatz mit anderen Wörtern."]
    notes = tmp_path / "notes.txt"
    notes.write_text("\n\n".join(paragraphs) + "\n")
    out = tmp_path / "notes.json"
    assert main(["eval", str(trained_run), "--data", str(notes), "--output", str(out), "--no-progress"]) == 0
    result = json.loads(out.read_text())
    assert "perplexity (token-weighted)" in capsys.readouterr().out
    # Reference: each paragraph as one padded row (the run's pad mode), scored directly.
    trained = load_trained(trained_run)
    seq_len, eos = trained.config.data.seq_len, trained.tokenizer.eos_id
    loss_sum, count = 0.0, 0
    with torch.no_grad():
        for ids in trained.tokenizer.encode_batch(paragraphs):
            row = (ids + [eos])[: seq_len + 1]
            logits = trained.model(torch.tensor([row[:-1]]))
            loss_sum += torch.nn.functional.cross_entropy(logits[0], torch.tensor(row[1:]), reduction="sum").item()
            count += len(row) - 1
    assert result["tokens"] == count  # every paragraph, not a held-out 3%
    assert math.isclose(result["perplexity"], math.exp(loss_sum / count), rel_tol=1e-6)


def test_export_loads_in_transformers_with_equal_logits_tokenizer_and_generation(trained_run, exported):
    names = {p.name for p in exported.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "README.md"} <= names
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in names)
    trained = load_trained(trained_run)
    hf = transformers.LlamaForCausalLM.from_pretrained(str(exported)).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(exported))
    assert hf.config.tie_word_embeddings is False and hf.config.eos_token_id == trained.tokenizer.eos_id
    assert hf.config.pad_token_id == trained.tokenizer.pad_id and hf.config.rms_norm_eps == trained.model.config.rms_norm_eps
    for text, ours in zip(TEXTS, trained.tokenizer.encode_batch(TEXTS)):
        assert tok(text)["input_ids"] == ours
    assert tok.decode(trained.tokenizer.encode_batch(TEXTS[:1])[0]) == TEXTS[0]
    tokens = torch.randint(0, trained.model.config.vocab_size, (3, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (hf(tokens).logits - trained.model(tokens)).abs().max().item() <= 1e-5
    prompt = tok(TEXTS[0], return_tensors="pt")["input_ids"]
    theirs = hf.generate(prompt, max_new_tokens=12, do_sample=False)[0].tolist()
    ours = greedy_generate(trained.model, prompt[0], 12, eos_id=trained.tokenizer.eos_id)
    assert theirs == ours and len(ours) > prompt.shape[1]
    assert tok.decode(theirs) == trained.tokenizer.decode(ours)
    readme = (exported / "README.md").read_text()
    summary = _summary(trained_run)
    assert "cpu-tiny" in readme and "scale" in readme and f"{summary['val_perplexity']:.3f}" in readme
    assert f"{summary['tokens']:,}" in readme and str(trained_run) in readme


def test_init_from_the_export_reproduces_the_weights_bitwise(trained_run, exported, tiny_corpus, token_cache, tmp_path):
    trained = load_trained(trained_run)
    loaded = build_model("cpu-tiny", vocab_size=trained.model.config.vocab_size, init_from=str(exported))
    ours, theirs = trained.model.state_dict(), loaded.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    # Through `lowmem train --init-from`: the new run's first evaluation is the old run's last.
    config = _config_file(tmp_path, tiny_corpus, token_cache, tmp_path / "continued", **{"train.steps": 2})
    assert main(["train", "--config", str(config), "--init-from", str(exported)]) == 0
    continued = _summary(tmp_path / "continued")
    assert continued["initial_val_perplexity"] == _summary(trained_run)["val_perplexity"]
    assert yaml_config(tmp_path / "continued")["train"]["init_from"] == str(exported)


def test_init_from_with_a_structure_starts_from_the_exported_weights(trained_run, exported):
    # The case: --init-from DIR --structure lowrank started at random-level perplexity because the
    # structure dropped the pretrained matrices. Now each factored matrix is the best rank-r approximation.
    from lowmem.structure.lowrank import factor_modules

    dense = load_trained(trained_run).model
    structured = build_model("cpu-tiny", vocab_size=dense.config.vocab_size, init_from=str(exported),
                             structure={"name": "lowrank", "rank": 32, "alpha": 32})
    weights = dict(dense.named_parameters())
    paths = {id(module): path for path, module in structured.named_modules()}
    checked = 0
    for module in factor_modules(structured):
        trained_weight = weights[f"{paths[id(module)]}.weight"].detach().double()
        u, s, vh = torch.linalg.svd(trained_weight, full_matrices=False)
        best = (u[:, :32] * s[:32]) @ vh[:32]
        assert torch.allclose(module.dense_weight().detach().double(), best, atol=1e-5), paths[id(module)]
        checked += 1
    assert checked == 2 * 7  # every hidden matrix of both blocks


def _config_file(directory: Path, corpus: Path, cache: Path, out: Path, **extra) -> Path:
    from lowmem.config import save_config

    path = directory / f"{out.name}.yaml"
    save_config(load_config(None, tiny_run_overrides(corpus, cache, out, **extra)), path)
    return path


def _fake_run(run_dir: Path, preset: str, tokenizer_file: Path, seed: int = 0) -> None:
    """A checkpoint of a randomly initialized `preset` written the way the trainer writes one."""
    config = RunConfig.from_dict({"model": preset, "data": {"tokenizer": str(tokenizer_file)}})
    vocab = 32000 if preset.startswith("llama") else 320
    torch.manual_seed(seed)
    model = build_model(preset, vocab_size=vocab)
    payload = {"step": 0, "tokens": 0, "skipped": 0, "initial_eval": None,
               "model": checkpoint.model_state(model), "config": config.to_dict()}
    checkpoint.save(run_dir, 0, payload)


def _tokenizer_file(trained_run: Path) -> Path:
    return load_trained(trained_run).tokenizer.path


@pytest.mark.parametrize("preset", ["cpu-small", pytest.param("llama-60m", marks=pytest.mark.slow)])
def test_export_of_random_weights_gives_equal_logits(preset, trained_run, tmp_path):
    _fake_run(tmp_path / "run", preset, _tokenizer_file(trained_run))
    out = tmp_path / "hf"
    assert main(["export", str(tmp_path / "run"), "--to", "hf", str(out)]) == 0
    trained = load_trained(tmp_path / "run")
    hf = transformers.LlamaForCausalLM.from_pretrained(str(out)).eval()
    tokens = torch.randint(0, 320, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (hf(tokens).logits - trained.model(tokens)).abs().max().item() <= 1e-5
    assert "not recorded" in (out / "README.md").read_text()  # no summary.json: said so, not invented


def test_a_structured_checkpoint_evaluates_and_exports_merged(tiny_corpus, token_cache, tmp_path):
    toy = Path(__file__).parent / "toy_plugin.py"
    run = tmp_path / "run"
    overrides = tiny_run_overrides(tiny_corpus, token_cache, run, **{"train.steps": 2, "model": "cpu-micro",
                                                                    "model.structure": {"name": "toy-scaled", "gain": 0.5}})
    from lowmem.registry import load_plugins

    load_plugins([str(toy)])
    summary = train(load_config(None, overrides))
    out = tmp_path / "eval.json"
    assert main(["eval", str(run), "--data", str(tiny_corpus), "--tokens", "2000", "--output", str(out), "--no-progress"]) == 0
    assert abs(json.loads(out.read_text())["perplexity"] / summary["val_perplexity"] - 1) <= 1e-6
    trained = load_trained(run)
    tokens = torch.randint(0, trained.model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = trained.model(tokens)
    assert main(["export", str(run), "--to", "hf", str(tmp_path / "hf")]) == 0
    hf = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    with torch.no_grad():
        assert (hf(tokens).logits - expected).abs().max().item() <= 1e-5


# ----------------------------------------------------------------------------------------------------
# Bad input: a named error and the fix, exit status 2, no traceback.

def _fails(capsys, argv: list[str], *needles: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err
    return err


def test_a_run_directory_without_a_checkpoint_is_named(tmp_path, capsys, tiny_corpus):
    run = tmp_path / "unfinished"
    run.mkdir()
    (run / "config.yaml").write_text("model: cpu-tiny\n")
    _fails(capsys, ["eval", str(run), "--data", str(tiny_corpus)], "holds no complete checkpoint", "lowmem train --resume")
    _fails(capsys, ["export", str(run), "--to", "hf", str(tmp_path / "out")], "holds no complete checkpoint")
    assert not (tmp_path / "out").exists()
    _fails(capsys, ["eval", str(tmp_path / "nowhere"), "--data", str(tiny_corpus)], "does not exist")


def test_a_checkpoint_whose_tokenizer_is_gone_is_named(tiny_corpus, tmp_path, capsys):
    cache = tmp_path / "own-cache"
    run = tmp_path / "run"
    train(load_config(None, tiny_run_overrides(tiny_corpus, cache, run, **{"train.steps": 1, "model": "cpu-micro"})))
    shutil.rmtree(cache)
    _fails(capsys, ["eval", str(run), "--data", str(tiny_corpus)], "tokenizer", "is gone", "--tokenizer")
    _fails(capsys, ["export", str(run), "--to", "hf", str(tmp_path / "out")], "is gone")


def test_an_existing_export_directory_is_refused(trained_run, tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    _fails(capsys, ["export", str(trained_run), "--to", "hf", str(out)], "exists and is not empty", "new directory")
    assert [p.name for p in out.iterdir()] == ["mine.txt"] and (out / "mine.txt").read_text() == "keep me"
    _fails(capsys, ["export", str(trained_run), "--to", "onnx", str(tmp_path / "x")], "unknown export format", "hf")


def test_init_from_shapes_that_do_not_fit_name_the_first_mismatch(exported, tiny_corpus, token_cache, tmp_path, capsys):
    config = _config_file(tmp_path, tiny_corpus, token_cache, tmp_path / "r", **{"model": "cpu-micro", "train.steps": 1})
    err = _fails(capsys, ["train", "--config", str(config), "--init-from", str(exported)],
                 "model.embed_tokens.weight", "(320, 128)", "(320, 16)", "--model")
    assert "lm_head" not in err  # the first misfit, not a list
    config = _config_file(tmp_path, tiny_corpus, token_cache, tmp_path / "r2", **{"model": "cpu-micro", "train.steps": 1})
    _fails(capsys, ["train", "--config", str(config), "--init-from", str(tmp_path / "missing")],
           "no such directory", "lowmem export")


# ----------------------------------------------------------------------------------------------------
# Logs that tools read.

def _run_with_logs(tiny_corpus, token_cache, out: Path, sinks: list[str], steps: int = 4) -> list[dict]:
    train(load_config(None, tiny_run_overrides(tiny_corpus, token_cache, out, **{
        "train.steps": steps, "model": "cpu-micro", "train.log_to": sinks, "train.eval_every": 2})))
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_tensorboard_gets_the_metrics_of_metrics_jsonl(tiny_corpus, token_cache, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    records = _run_with_logs(tiny_corpus, token_cache, tmp_path / "run", ["tensorboard"])
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    expected: dict[str, dict[int, float]] = {}
    for record in records:
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                expected.setdefault(key, {})[record["step"]] = float(value)
    assert {"loss", "lr", "val_perplexity", "val_loss", "tokens_per_second"} <= set(expected)
    assert set(events.Tags()["scalars"]) == set(expected)
    for key, by_step in expected.items():
        got = {e.step: e.value for e in events.Scalars(key)}
        assert got.keys() == by_step.keys(), key
        for step, value in by_step.items():
            assert math.isclose(got[step], value, rel_tol=1e-6), (key, step)


def test_wandb_offline_gets_the_metrics(tiny_corpus, token_cache, tmp_path, monkeypatch):
    try:
        import wandb  # noqa: F401
    except ImportError:
        pytest.skip("wandb is not installed (pip install wandb); it is an optional dependency")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    records = _run_with_logs(tiny_corpus, token_cache, tmp_path / "run", ["wandb"])
    history = list((tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert history, "wandb wrote no offline run file"
    from wandb.proto import wandb_internal_pb2

    logged: dict[int, dict[str, float]] = {}
    for data in _wandb_records(history[0].read_bytes()):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        if record.WhichOneof("record_type") == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            step = int(items.pop("_step"))
            logged.setdefault(step, {}).update({k: v for k, v in items.items() if not k.startswith("_")})
    assert logged
    for record in records:
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                assert math.isclose(logged[record["step"]][key], value, rel_tol=1e-9), (key, record["step"])


def _wandb_records(raw: bytes) -> list[bytes]:
    """The protobuf records of a .wandb file: a 7-byte header (":W&B", magic, version), then LevelDB's
    log format (32 KiB blocks of [crc32 4][length 2][type 1][data] chunks: full, first, middle, last)."""
    assert raw[:4] == b":W&B"
    records, pending, offset, block = [], b"", 7, 32768
    while offset + 7 <= len(raw):
        if block - offset % block < 7:  # a block's tail too short for a chunk header is padding
            offset += block - offset % block
            continue
        length, kind = int.from_bytes(raw[offset + 4:offset + 6], "little"), raw[offset + 6]
        data, offset = raw[offset + 7:offset + 7 + length], offset + 7 + length
        if kind == 0 and length == 0:
            break
        pending = data if kind in (1, 2) else pending + data
        if kind in (1, 4):
            records.append(pending)
    return records


def test_an_unknown_log_sink_is_refused(tiny_corpus, token_cache, tmp_path, capsys):
    _fails(capsys, ["train", "--log-to", "tensorboard,mlflow", "--steps", "1", "--output-dir", str(tmp_path / "r")],
           "unknown --log-to mlflow", "tensorboard, wandb")


def test_plain_lines_instead_of_a_bar_when_stdout_is_not_a_terminal(tiny_corpus, token_cache, tmp_path, capsys):
    train(load_config(None, tiny_run_overrides(tiny_corpus, token_cache, tmp_path / "run", **{
        "train.steps": 4, "model": "cpu-micro", "train.log_every": 2, "train.progress": True, "optim.name": "adamw"})))
    captured = capsys.readouterr()
    lines = [line for line in captured.out.splitlines() if line.startswith("adamw step")]
    assert [line.split()[2] for line in lines] == ["2/4", "4/4"], captured.out
    assert all("loss=" in line and "lr=" in line for line in lines)
    assert "\r" not in captured.out + captured.err


def _hf_micro(tmp_path: Path, **config) -> tuple[Path, object]:
    """A transformers-made LlamaForCausalLM shaped like cpu-micro (vocab 320), saved with save_pretrained."""
    fields = dict(vocab_size=320, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6, rope_theta=10000.0)
    fields.update(config)
    torch.manual_seed(3)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**fields)).eval()
    out = tmp_path / f"hf-{len(list(tmp_path.iterdir()))}"
    model.save_pretrained(str(out))
    return out, model


def test_init_from_a_transformers_checkpoint_tied_or_not(tmp_path, capsys):
    for tied in (False, True):
        directory, hf = _hf_micro(tmp_path, tie_word_embeddings=tied)
        ours = build_model("cpu-micro", vocab_size=320, init_from=str(directory))
        tokens = torch.randint(0, 320, (2, 20), generator=torch.Generator().manual_seed(4))
        with torch.no_grad():
            assert (hf(tokens).logits - ours(tokens)).abs().max().item() <= 1e-5
        if tied:  # the head starts as the embedding and trains apart from it (lowmem's head is untied)
            assert torch.equal(ours.lm_head.weight, ours.embed_tokens.weight)
            assert ours.lm_head.weight.data_ptr() != ours.embed_tokens.weight.data_ptr()
    directory, _ = _hf_micro(tmp_path, rope_theta=500000.0)
    with pytest.raises(ConfigError, match="rope_theta=500000.0, the run's model has 10000.0"):
        build_model("cpu-micro", vocab_size=320, init_from=str(directory))
    (directory / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="holds no model.safetensors"):
        build_model("cpu-micro", vocab_size=320, init_from=str(directory))


def test_init_from_is_results_affecting_and_log_sinks_are_not():
    from lowmem.config import results_affecting_differences

    base = RunConfig().to_dict()
    changed = RunConfig.from_dict({**base, "train": {**base["train"], "init_from": "exported/"}}).to_dict()
    assert results_affecting_differences(base, changed) == ["train.init_from: None -> 'exported/'"]
    logged = RunConfig.from_dict({**base, "train": {**base["train"], "log_to": ["tensorboard"]}}).to_dict()
    assert results_affecting_differences(base, logged) == []
    # A checkpoint written before these keys existed compares equal to today's defaults.
    old = {**base, "train": {k: v for k, v in base["train"].items() if k not in ("init_from", "log_to")}}
    assert results_affecting_differences(old, base) == []


def test_a_run_with_a_named_hugging_face_tokenizer_exports_it(trained_run, tiny_corpus, token_cache, tmp_path):
    from lowmem.data import load_tokenizer

    named = tmp_path / "hf-tokenizer"
    transformers.PreTrainedTokenizerFast(tokenizer_file=str(_tokenizer_file(trained_run)), eos_token="</s>",
                                         pad_token="<pad>").save_pretrained(str(named))
    run = tmp_path / "run"
    train(load_config(None, tiny_run_overrides(tiny_corpus, token_cache, run, **{
        "train.steps": 1, "model": "cpu-micro", "data.tokenizer": str(named)})))
    assert main(["export", str(run), "--to", "hf", str(tmp_path / "hf")]) == 0
    ours = load_tokenizer(str(named))
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert [theirs(t)["input_ids"] for t in TEXTS] == ours.encode_batch(TEXTS)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["eos_token_id"], config["pad_token_id"], config["vocab_size"]) == (ours.eos_id, ours.pad_id, ours.vocab_size)


@pytest.mark.parametrize("mode", ["pack", "pad"])
def test_eval_says_how_many_tokens_it_left_out_and_why(mode, trained_run, tmp_path):
    # The case: 128 of 159 tokens scored and no word about the other 31.
    from lowmem.train.trained import evaluate_source, result_table

    trained = load_trained(trained_run, device="cpu")
    text = tmp_path / "notes.txt"
    text.write_text("\n\n".join(f"paragraph {i}: " + "words and more words " * (9 + i) for i in range(5)) + "\n")
    whole = evaluate_source(trained, str(text), seq_len=256, batch_size=2, seq_mode="pad", split="all")
    assert whole["unscored_tokens"] == 0  # every document fits a row: every target is scored
    result = evaluate_source(trained, str(text), seq_len=16, batch_size=2, seq_mode=mode, split="all")
    assert result["unscored_tokens"] > 0
    # Packed, the five documents form one stream: four more targets (each EOS predicts the next document).
    assert result["tokens"] + result["unscored_tokens"] == whole["tokens"] + (4 if mode == "pack" else 0)
    table = result_table(result)
    assert f"{result['unscored_tokens']:,}" in table
    assert ("last partial sequence" if mode == "pack" else "longer than a sequence") in table
