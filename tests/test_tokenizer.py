"""Tokenizers: the trained byte-level BPE, its on-disk cache, tokenizer files and Hugging Face ones."""

from __future__ import annotations

import json
import logging
import sys

import pytest

import lowmem.data.tokenizer as tokenizer_module
from lowmem.data import load_tokenizer, open_source, train_bpe
from lowmem.data.tokenizer import bpe_cache_path
from lowmem.errors import ConfigError

WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex jolly zebras".split()


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    directory = tmp_path_factory.mktemp("corpus")
    lines = []
    for index in range(400):
        words = [WORDS[(index * 7 + step * 3) % len(WORDS)] for step in range(5 + index % 20)]
        lines.append(json.dumps({"text": f"Document {index}: " + " ".join(words) + "."}))
    (directory / "train-0.jsonl").write_text("\n".join(lines) + "\n")
    (directory / "validation-0.jsonl").write_text(json.dumps({"text": "held out text"}) + "\n")
    return open_source(str(directory))


def test_trained_bpe_has_t5_special_ids_and_round_trips_text(source, tmp_path):
    tokenizer = train_bpe(source, 300, tmp_path / "bpe.json")
    assert (tokenizer.pad_id, tokenizer.eos_id) == (0, 1)
    assert 258 < tokenizer.vocab_size <= 300
    texts = ["The lazy zebras, café and 東京 — unseen bytes too!\n\tTabs.", "", "fox"]
    encoded = tokenizer.encode_batch(texts)
    assert [tokenizer.decode(ids) for ids in encoded] == texts
    assert all(0 <= token < tokenizer.vocab_size for ids in encoded for token in ids)
    assert (
        len(tokenizer.encode_batch(["the quick brown fox"])[0]) < len("the quick brown fox") / 2
    )  # merges learnt
    # A document cannot inject control tokens by containing their text.
    injected = tokenizer.encode_batch(["before </s> <pad> after"])[0]
    assert tokenizer.pad_id not in injected and tokenizer.eos_id not in injected
    assert tokenizer.decode(injected) == "before </s> <pad> after"
    assert tokenizer.decode(
        [5, tokenizer.eos_id, tokenizer.pad_id], skip_special_tokens=True
    ) == tokenizer.decode([5])


def test_bpe_is_cached_and_reused(source, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="lowmem.data.tokenizer")
    first = load_tokenizer("bpe", source, vocab_size=300, cache_dir=tmp_path)
    path = bpe_cache_path(source, 300, tmp_path)
    assert first.path == path and path.is_file() and path.parent == tmp_path / "tokenizers"
    assert "Trained" in caplog.text
    written = path.stat().st_mtime_ns

    def must_not_train(*args, **kwargs):
        raise AssertionError("the cached tokenizer should have been reused")

    monkeypatch.setattr(tokenizer_module, "train_bpe", must_not_train)
    caplog.clear()
    second = load_tokenizer("bpe", source.with_split("validation"), vocab_size=300, cache_dir=tmp_path)
    assert "Reusing the cached BPE tokenizer" in caplog.text
    assert path.stat().st_mtime_ns == written
    assert second.name == first.name
    assert second.encode_batch(["the lazy dog"]) == first.encode_batch(["the lazy dog"])
    assert bpe_cache_path(source, 320, tmp_path) != path  # another vocabulary is another tokenizer


def test_a_cached_bpe_is_found_under_another_tokenizers_version(source, tmp_path, monkeypatch):
    # A tokenizer carried to another machine (the GPU check) must be reused there, not retrained.
    path = bpe_cache_path(source, 300, tmp_path)
    monkeypatch.setattr(tokenizer_module.tokenizers, "__version__", "0.0.1-elsewhere")
    assert bpe_cache_path(source, 300, tmp_path) == path


def test_cache_dir_defaults_to_lowmem_cache(source, tmp_path, monkeypatch):
    monkeypatch.setenv("LOWMEM_CACHE", str(tmp_path))
    assert bpe_cache_path(source, 300).parent == tmp_path / "tokenizers"


def test_unreadable_cache_is_retrained(source, tmp_path):
    path = bpe_cache_path(source, 300, tmp_path)
    path.parent.mkdir(parents=True)
    path.write_text("{ not a tokenizer")
    tokenizer = load_tokenizer("bpe", source, vocab_size=300, cache_dir=tmp_path)
    assert tokenizer.decode(tokenizer.encode_batch(["fox"])[0]) == "fox"
    assert json.loads(path.read_text())["model"]["type"] == "BPE"


def test_tokenizer_file_written_by_train_bpe_loads_by_path(source, tmp_path):
    trained = train_bpe(source, 300, tmp_path / "mine.json")
    loaded = load_tokenizer(str(tmp_path / "mine.json"))
    assert loaded.encode_batch(["quick zebras"]) == trained.encode_batch(["quick zebras"])
    assert (loaded.pad_id, loaded.eos_id, loaded.vocab_size) == (0, 1, trained.vocab_size)


def test_bpe_configuration_errors(source, tmp_path):
    with pytest.raises(ConfigError, match=r"no data source was given"):
        load_tokenizer("bpe")
    with pytest.raises(ConfigError, match=r"at least 258"):
        load_tokenizer("bpe", source, vocab_size=100, cache_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"No tokenizer at './missing/tokenizer'"):
        load_tokenizer("./missing/tokenizer")


def test_hugging_face_tokenizer_from_a_local_directory(source, tmp_path):
    transformers = pytest.importorskip("transformers")
    trained = train_bpe(source, 300, tmp_path / "bpe.json")
    wrapped = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(tmp_path / "bpe.json"), eos_token="</s>"
    )
    wrapped.save_pretrained(tmp_path / "hf")
    loaded = load_tokenizer(str(tmp_path / "hf"))
    assert loaded.encode_batch(["lazy fox"]) == trained.encode_batch(["lazy fox"])
    # Without a pad token the loader pads with eos (padding is masked by position, not by id).
    assert loaded.eos_id == 1 and loaded.pad_id == 1 and loaded.vocab_size == trained.vocab_size


def test_hugging_face_download_failure_says_network_or_local_path(monkeypatch):
    transformers = pytest.importorskip("transformers")

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", offline)
    with pytest.raises(ConfigError, match=r"'t5-base'.*needs the network.*local directory"):
        load_tokenizer("t5-base")


def test_hugging_face_without_transformers_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ConfigError, match=r"pip install 'lowmem\[hub\]'"):
        load_tokenizer("t5-base")
