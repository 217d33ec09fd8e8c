"""Text sources: builtin corpus, local files and their splits, the C4 hub source, and every error."""

from __future__ import annotations

import gzip
import json
import shutil
import sys
import sysconfig
import types
from pathlib import Path

import pytest

from lowmem.data import HELD_OUT_FRACTION, open_source
from lowmem.data.builtin import _source_files, builtin_documents, pydoc_topics, stdlib_docstrings
from lowmem.errors import ConfigError, DataError

REVIEWS = Path(__file__).parents[2] / "shared" / "data" / "reviews"


def write_json_lines(path: Path, texts: list[str], field: str = "text") -> Path:
    lines = "".join(json.dumps({field: text, "url": f"u{index}"}) + "\n" for index, text in enumerate(texts))
    if path.name.endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8") as handle:
            handle.write(lines)
    else:
        path.write_text(lines, encoding="utf-8")
    return path


def documents(source) -> list[str]:
    return list(source.iter_documents())


# --- builtin -----------------------------------------------------------------------------------


def test_builtin_corpus_is_one_to_two_megabytes_of_text_and_deterministic():
    train = documents(open_source("builtin"))
    validation = documents(open_source("builtin", split="validation"))
    total_bytes = sum(len(text.encode()) for text in train + validation)
    assert 1_000_000 < total_bytes < 2_000_000
    assert len(train) > 2000 and all(text.strip() for text in train)
    # Files are read in sorted path order, tests and installed packages left out; a package's
    # docstrings, rebuilt from scratch, come out the same and in the corpus's order. (A rebuild
    # of the whole corpus would double this test's time.)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = _source_files(str(stdlib))
    assert files == sorted(files) and stdlib / "json" / "__init__.py" in map(Path, files)
    assert not any({"site-packages", "test"} & set(Path(file).relative_to(stdlib).parts) for file in files)
    json_docstrings = stdlib_docstrings(stdlib / "json")
    assert json_docstrings == stdlib_docstrings(stdlib / "json") and len(json_docstrings) > 5
    corpus = builtin_documents()
    positions = [corpus.index(text) for text in json_docstrings if text in corpus]
    assert len(positions) > 5 and positions == sorted(positions)
    assert corpus[-len(pydoc_topics()) :] == tuple(pydoc_topics())


def test_builtin_validation_is_a_small_disjoint_held_out_part():
    train = documents(open_source("builtin"))
    validation = documents(open_source("builtin", split="validation"))
    assert not set(train) & set(validation)
    assert sorted(train + validation) == sorted(builtin_documents())
    assert 0.01 < len(validation) / (len(train) + len(validation)) < 0.06


# --- local files -------------------------------------------------------------------------------


def test_directory_maps_train_and_validation_files_to_splits(tmp_path):
    write_json_lines(tmp_path / "train-00000-of-00002.jsonl.gz", ["a1", "a2"])
    write_json_lines(tmp_path / "train-00001-of-00002.jsonl", ["b1"])
    write_json_lines(tmp_path / "validation-00000-of-00001.jsonl.gz", ["v1", "v2", "v3"])
    (tmp_path / "README.md").write_text("not data")
    train = open_source(str(tmp_path))
    validation = open_source(str(tmp_path), split="validation")
    assert [shard.name for shard in train.shards] == [
        "train-00000-of-00002.jsonl.gz",
        "train-00001-of-00002.jsonl",
    ]
    assert documents(train) == ["a1", "a2", "b1"]
    assert documents(validation) == ["v1", "v2", "v3"]
    assert train.identity != validation.identity
    assert train.with_split("validation").identity == validation.identity


def test_c4_prefix_reads_a_local_copy_of_c4(tmp_path):
    write_json_lines(tmp_path / "c4-train.00000-of-01024.json.gz", ["t1", "t2"])
    write_json_lines(tmp_path / "c4-validation.00000-of-00008.json.gz", ["v1"])
    assert documents(open_source(f"c4:{tmp_path}")) == ["t1", "t2"]
    assert documents(open_source(f"c4:{tmp_path}", split="val")) == ["v1"]


def test_single_file_holds_out_a_disjoint_hash_chosen_fraction(tmp_path):
    texts = [f"document number {index} with some words" for index in range(2000)]
    path = write_json_lines(tmp_path / "corpus.jsonl", texts)
    train = documents(open_source(str(path)))
    validation = documents(open_source(str(path), split="validation"))
    assert not set(train) & set(validation)
    assert sorted(train + validation) == sorted(texts)
    assert abs(len(validation) / len(texts) - HELD_OUT_FRACTION) < 0.015
    assert documents(open_source(str(path), split="validation")) == validation  # same on every run


def test_glob_text_and_parquet_files(tmp_path):
    write_json_lines(tmp_path / "one.jsonl", ["j1"])
    write_json_lines(tmp_path / "two.json", ["j2"])
    (tmp_path / "book.txt").write_text("First paragraph\nstill first.\n\n  \nSecond paragraph.\n\n\n")
    source = open_source(str(tmp_path / "*.json*"))
    assert [shard.name for shard in source.shards] == ["one.jsonl", "two.json"]
    paragraphs = open_source(str(tmp_path / "book.txt")).shards[0].documents()
    assert paragraphs == ["First paragraph\nstill first.", "Second paragraph."]
    pyarrow = pytest.importorskip("pyarrow")
    import pyarrow.parquet as parquet

    parquet.write_table(pyarrow.table({"content": ["p1", "p2"], "id": [1, 2]}), tmp_path / "data.parquet")
    assert open_source(str(tmp_path / "data.parquet"), text_field="content").shards[0].documents() == [
        "p1",
        "p2",
    ]
    with pytest.raises(DataError, match=r"no column 'text'.*content, id.*--text-field"):
        open_source(str(tmp_path / "data.parquet"))


def test_identity_follows_content_not_location(tmp_path):
    first = tmp_path / "first"
    first.mkdir()
    write_json_lines(first / "train-0.jsonl", ["x", "y"])
    second = tmp_path / "second"
    shutil.copytree(first, second)
    assert open_source(str(first)).identity == open_source(str(second)).identity
    write_json_lines(second / "train-0.jsonl", ["x", "y", "z"])
    assert open_source(str(first)).identity != open_source(str(second)).identity
    assert open_source(str(first)).identity != open_source(str(first), text_field="url").identity


# --- errors ------------------------------------------------------------------------------------


def test_unknown_source_lists_what_is_accepted():
    with pytest.raises(ConfigError, match=r"Unknown data source 'no-such-thing'.*'builtin'.*'c4'.*\.jsonl"):
        open_source("no-such-thing")


def test_glob_without_match_and_directory_without_files(tmp_path):
    with pytest.raises(DataError, match=r"No file matches .*nothing-\*\.jsonl"):
        open_source(str(tmp_path / "nothing-*.jsonl"))
    (tmp_path / "notes.md").write_text("x")
    with pytest.raises(DataError, match=r"holds no supported text files"):
        open_source(str(tmp_path))
    with pytest.raises(DataError, match=r"not a supported text file"):
        open_source(str(tmp_path / "notes.md"))


def test_empty_corpus(tmp_path):
    (tmp_path / "train-0.jsonl").write_text("\n  \n")
    with pytest.raises(DataError, match=r"train split .* holds no documents"):
        open_source(str(tmp_path))


def test_malformed_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl.gz"
    with gzip.open(path, "wt") as handle:
        handle.write('{"text": "fine"}\n{"text": "fine too"}\n{"text": broken\n')
    source = open_source(str(path))  # the first document is fine, so opening works
    with pytest.raises(DataError, match=r"bad\.jsonl\.gz, line 3: not valid JSON.*fix or delete"):
        source.shards[0].documents()


def test_missing_text_field_names_file_line_field_and_keys(tmp_path):
    path = write_json_lines(tmp_path / "corpus.jsonl", ["a"], field="content")
    with pytest.raises(DataError) as raised:
        open_source(str(path))
    message = str(raised.value)
    for expected in ("corpus.jsonl", "line 1", "'text'", "content, url", "--text-field"):
        assert expected in message
    assert documents(open_source(str(path), text_field="content"))  # the fix works


def test_non_object_lines_and_non_string_text(tmp_path):
    (tmp_path / "list.jsonl").write_text('["a"]\n')
    with pytest.raises(DataError, match=r"list\.jsonl, line 1: a JSON list, not an object"):
        open_source(str(tmp_path / "list.jsonl"))
    (tmp_path / "number.jsonl").write_text('{"text": 3}\n')
    with pytest.raises(DataError, match=r"number\.jsonl, line 1: field 'text' holds a int"):
        open_source(str(tmp_path / "number.jsonl"))


def test_truncated_gzip_is_a_data_error(tmp_path):
    path = write_json_lines(tmp_path / "train-0.jsonl.gz", ["x" * 10_000])
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(DataError, match=r"train-0\.jsonl\.gz: cannot be read"):
        open_source(str(tmp_path))


def test_unknown_split_and_tiny_held_out_validation(tmp_path):
    path = write_json_lines(tmp_path / "corpus.jsonl", ["only one document"])
    with pytest.raises(ConfigError, match=r"Unknown split 'test'"):
        open_source(str(path), split="test")
    with pytest.raises(DataError, match=r"validation split .* is empty.*validation-\*"):
        open_source(str(path), split="validation")


# --- the Hugging Face hub source -----------------------------------------------------------------


def test_c4_without_datasets_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ConfigError, match=r"pip install 'lowmem\[hub\]'"):
        open_source("c4")


def test_c4_streams_one_dataset_file_per_shard(monkeypatch):
    requested = []

    def load_dataset(repository, data_files, split, streaming):
        requested.append((repository, data_files["train"], streaming))
        if "validation.00001" in data_files["train"]:
            raise ConnectionError("no network")
        return iter([{"text": "hello", "url": "u"}, {"text": "world", "url": "u"}])

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    train = open_source("c4")
    assert len(train.shards) == 1024 and train.shards[0].name == "en/c4-train.00000-of-01024.json.gz"
    assert train.shards[0].documents() == ["hello", "world"]
    assert requested == [("allenai/c4", "en/c4-train.00000-of-01024.json.gz", True)]
    validation = open_source("c4", split="validation")
    assert len(validation.shards) == 8
    with pytest.raises(DataError, match=r"needs network access.*c4:/path/to/c4/en"):
        validation.shards[1].documents()


# --- the shared reviews corpus ------------------------------------------------------------------


@pytest.mark.skipif(not REVIEWS.is_dir(), reason=f"the reviews corpus is not at {REVIEWS}")
def test_reviews_corpus_has_50000_train_and_2000_validation_documents():
    train = open_source(str(REVIEWS))
    validation = open_source(str(REVIEWS), split="validation")
    assert len(train.shards) == 4 and len(validation.shards) == 1
    assert sum(1 for _ in train.iter_documents()) == 50_000
    assert sum(1 for _ in validation.iter_documents()) == 2_000
