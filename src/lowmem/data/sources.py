"""Text sources: where documents come from, split into train/validation and cut into shards.

`open_source(spec, split)` accepts:

- ``"builtin"``: English prose from this Python installation's documentation (see `builtin.py`).
- ``"c4"``: `allenai/c4`, config ``en``, streamed from the Hugging Face Hub with `datasets`
  (``pip install 'lowmem[hub]'``); one shard per file of the dataset (1024 train, 8 validation).
- ``"c4:DIR"`` or any directory, file or glob of local files:
  ``.jsonl``, ``.json``, ``.jsonl.gz``, ``.json.gz`` (JSON lines: one object per line, the text in
  `text_field`; blank lines are skipped), ``.txt`` (one document per paragraph, paragraphs being
  separated by blank lines — a plain text file is usually a book or an article, far longer than
  one training sequence) and ``.parquet`` (column `text_field`; needs pyarrow).
  A directory is searched recursively. Files whose path has a part named ``train``/``training``
  form the train split and those named ``validation``/``valid``/``val`` the validation split
  (C4's ``c4-train.*``/``c4-validation.*``, the reviews corpus's ``train-*``/``validation-*``).
  When there are no validation files, a fixed fraction (`HELD_OUT_FRACTION`) of the training
  documents is held out for validation, chosen by a hash of each document's text, so the two
  splits are disjoint even where a text occurs twice, and the choice is the same on every run and
  every machine.

A `TextSource` is an ordered tuple of `Shard`s (one per file). A shard reads its documents only
when asked, so a corpus of any size costs the memory of the one shard being read.
"""

from __future__ import annotations

import functools
import glob
import gzip
import hashlib
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from lowmem.data.builtin import builtin_documents, builtin_identity
from lowmem.errors import ConfigError, DataError, LowmemError

SPLITS = ("train", "validation")
HELD_OUT_FRACTION = 0.03
SUPPORTED_EXTENSIONS = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".txt", ".parquet")

C4_REPOSITORY = "allenai/c4"
C4_FILES_PER_SPLIT = {"train": 1024, "validation": 8}

_SPLIT_NAMES = {
    "train": "train",
    "training": "train",
    "validation": "validation",
    "valid": "validation",
    "val": "validation",
}
# Bumped whenever reading changes the documents a file yields, so that caches keyed on a
# source's identity (trained tokenizers) are not reused across the change.
_READER_VERSION = 1
_ACCEPTED_SPECS = (
    "'builtin' (Python's own documentation, no files needed), 'c4' (allenai/c4 from the Hugging "
    "Face Hub), 'c4:DIR' or DIR (a local copy holding c4-train.*.json.gz / c4-validation.*), or a "
    "file, directory or glob of " + ", ".join(SUPPORTED_EXTENSIONS) + " files"
)


@dataclass(frozen=True)
class Shard:
    """One file (or the builtin corpus): the unit that is read into memory at once.

    `name` is stable across machines (the file's path relative to the corpus root). `held_out`
    keeps only the training part (``"train"``) or the held-out part (``"validation"``) of the
    file's documents; None keeps all of them.
    """

    name: str
    reader: Callable[[], Iterable[str]] = field(repr=False, compare=False)
    held_out: str | None = None

    def iter_documents(self) -> Iterator[str]:
        """The shard's documents in file order, read lazily."""
        if self.held_out is None:
            yield from self.reader()
            return
        want_held_out = self.held_out == "validation"
        for text in self.reader():
            if is_held_out(text) == want_held_out:
                yield text

    def documents(self) -> list[str]:
        """All of the shard's documents, in file order."""
        return list(self.iter_documents())


@dataclass(frozen=True)
class TextSource:
    """One split of a corpus: its shards in a fixed order and a stable identity for cache keys.

    `identity` depends on what the documents are (file names relative to the corpus root, sizes,
    text field, split, held-out rule), not on where the corpus lies or when it was copied, so a
    cached tokenizer or a checkpoint's data position stays valid when the corpus is moved.
    """

    spec: str
    split: str
    text_field: str
    identity: str
    shards: tuple[Shard, ...]

    def iter_documents(self) -> Iterator[str]:
        """Every document of the split, shard after shard, in file order."""
        for shard in self.shards:
            yield from shard.iter_documents()

    def with_split(self, split: str) -> TextSource:
        """The same corpus's other split (or this one, if `split` is already this split)."""
        if _normalize_split(split) == self.split:
            return self
        return open_source(self.spec, split=split, text_field=self.text_field)


def open_source(spec: str, split: str = "train", text_field: str = "text", require_documents: bool = True) -> TextSource:
    """Open the `split` of the corpus named by `spec` (see the module docstring for the forms);
    an empty split is an error unless `require_documents` is False."""
    split = _normalize_split(split)
    if not isinstance(text_field, str) or not text_field:
        raise ConfigError(f"text_field must be a non-empty field name, got {text_field!r}.")
    spec = str(spec)
    if spec == "builtin":
        source = _builtin_source(split)
    elif spec == "c4":
        source = _hub_c4_source(split, text_field)
    else:
        path = spec[len("c4:") :] if spec.startswith("c4:") else spec
        source = _local_source(spec, path, split, text_field)
    # Not checked: the Hub (reading it here would be slow; its reads fail loudly later) and the builtin
    # corpus, never empty, whose first document costs its whole 7 s parse (the token cache skips it).
    if spec not in ("c4", "builtin") and require_documents:
        _check_not_empty(source)
    return source


def is_held_out(text: str) -> bool:
    """Whether a document belongs to the held-out validation part of a corpus without one."""
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") < HELD_OUT_FRACTION * 2**64


def _normalize_split(split: str) -> str:
    normalized = _SPLIT_NAMES.get(str(split).lower())
    if normalized is None:
        raise ConfigError(f"Unknown split {split!r}: use 'train' or 'validation'.")
    return normalized


def _builtin_source(split: str) -> TextSource:
    shard = Shard(name="builtin", reader=builtin_documents, held_out=split)
    identity = f"{builtin_identity()} split={split} heldout={HELD_OUT_FRACTION} v{_READER_VERSION}"
    return TextSource(spec="builtin", split=split, text_field="text", identity=identity, shards=(shard,))


def _import_datasets():
    try:
        import datasets
    except ImportError as err:
        raise ConfigError(
            "The 'c4' source streams from the Hugging Face Hub and needs the `datasets` package: "
            "pip install 'lowmem[hub]' (or point the data option at a local copy: c4:/path/to/c4/en)."
        ) from err
    return datasets


def _hub_c4_source(split: str, text_field: str) -> TextSource:
    _import_datasets()  # fail at startup, not at the first batch
    hub_split = "train" if split == "train" else "validation"
    count = C4_FILES_PER_SPLIT[split]
    shards = tuple(
        Shard(name=name, reader=functools.partial(_read_hub_file, C4_REPOSITORY, name, text_field))
        for name in (f"en/c4-{hub_split}.{index:05d}-of-{count:05d}.json.gz" for index in range(count))
    )
    identity = f"hub {C4_REPOSITORY} en split={split} field={text_field} v{_READER_VERSION}"
    return TextSource(spec="c4", split=split, text_field=text_field, identity=identity, shards=shards)


def _read_hub_file(repository: str, data_file: str, text_field: str) -> Iterator[str]:
    datasets = _import_datasets()
    try:
        stream = datasets.load_dataset(
            repository, data_files={"train": data_file}, split="train", streaming=True
        )
        for row_number, row in enumerate(stream, start=1):
            if text_field not in row:
                raise DataError(
                    f"{repository}/{data_file}, row {row_number}: no field {text_field!r} "
                    f"(fields present: {', '.join(sorted(row))}). Choose the field that holds the "
                    "text with --text-field (data.text_field in a config; text_field= in Python)."
                )
            yield row[text_field]
    except LowmemError:
        raise
    except Exception as err:  # the Hub's failures come from several libraries; all mean "no data"
        raise DataError(
            f"Could not stream {repository}/{data_file} from the Hugging Face Hub ({err}). This "
            "needs network access; without it, download the C4 files and use the local copy: "
            "c4:/path/to/c4/en (the directory holding c4-train.*.json.gz and c4-validation.*.json.gz)."
        ) from err


def _local_source(spec: str, path: str, split: str, text_field: str) -> TextSource:
    path = os.path.expanduser(path)
    if any(character in path for character in "*?["):
        matches = sorted(match for match in glob.glob(path, recursive=True) if os.path.isfile(match))
        if not matches:
            raise DataError(
                f"No file matches {path!r}. Check the pattern (quote it so the shell does not "
                f"expand it) or give a directory; accepted: {_ACCEPTED_SPECS}."
            )
        files = [match for match in matches if _extension(match)]
        if not files:
            raise DataError(
                f"{path!r} matches {len(matches)} file(s) but none is a supported text file "
                f"({', '.join(SUPPORTED_EXTENSIONS)}), e.g. {matches[0]}. Change the pattern."
            )
        root = os.path.commonpath([os.path.dirname(os.path.abspath(f)) for f in files])
    elif os.path.isdir(path):
        files = _supported_files_under(path)
        if not files:
            raise DataError(
                f"Directory {path!r} holds no supported text files "
                f"({', '.join(SUPPORTED_EXTENSIONS)}, searched recursively). Point the data "
                "option at the directory that holds the corpus files."
            )
        root = path
    elif os.path.isfile(path):
        if not _extension(path):
            raise DataError(
                f"{path!r} is not a supported text file: use one of {', '.join(SUPPORTED_EXTENSIONS)} "
                "(JSON lines with a text field, plain text, or parquet)."
            )
        files = [path]
        root = os.path.dirname(os.path.abspath(path))
    else:
        raise ConfigError(
            f"Unknown data source {spec!r}: it is not a path that exists. Accepted: {_ACCEPTED_SPECS}."
        )

    train_files, validation_files = _assign_splits(files, root)
    held_out = not validation_files
    chosen = train_files if (split == "train" or held_out) else validation_files
    shards = tuple(
        Shard(
            name=_relative(file, root),
            reader=functools.partial(_reader_for(file), file, text_field),
            held_out=split if held_out else None,
        )
        for file in chosen
    )
    return TextSource(
        spec=spec,
        split=split,
        text_field=text_field,
        identity=_files_identity(chosen, root, split, text_field, held_out),
        shards=shards,
    )


def _extension(path: str) -> str | None:
    lowered = path.lower()
    for extension in sorted(SUPPORTED_EXTENSIONS, key=len, reverse=True):
        if lowered.endswith(extension):
            return extension
    return None


def _supported_files_under(directory: str) -> list[str]:
    files: list[str] = []
    for parent, subdirectories, names in os.walk(directory):
        subdirectories[:] = [name for name in subdirectories if not name.startswith(".")]
        files.extend(
            os.path.join(parent, name) for name in names if not name.startswith(".") and _extension(name)
        )
    return sorted(files, key=lambda file: _relative(file, directory))


def _relative(file: str, root: str) -> str:
    return os.path.relpath(os.path.abspath(file), os.path.abspath(root)).replace(os.sep, "/")


def _split_named_in(relative_path: str) -> str | None:
    words = re.split(r"[^a-z0-9]+", relative_path.lower())
    named = {_SPLIT_NAMES[word] for word in words if word in _SPLIT_NAMES}
    return named.pop() if len(named) == 1 else None


def _assign_splits(files: list[str], root: str) -> tuple[list[str], list[str]]:
    named = {file: _split_named_in(_relative(file, root)) for file in files}
    train = [file for file in files if named[file] == "train"]
    validation = [file for file in files if named[file] == "validation"]
    if not train:
        # No file says "train": everything that is not validation is training data, and a corpus
        # made only of validation-named files is just a corpus.
        train = [file for file in files if named[file] != "validation"] or files
        validation = [file for file in validation if file not in train]
    return train, validation


def _files_identity(files: list[str], root: str, split: str, text_field: str, held_out: bool) -> str:
    digest = hashlib.sha256()
    for file in files:
        digest.update(f"{_relative(file, root)}\t{os.path.getsize(file)}\n".encode())
    rule = f"heldout={HELD_OUT_FRACTION}" if held_out else "heldout=files"
    return (
        f"files split={split} field={text_field} {rule} count={len(files)} "
        f"sha256={digest.hexdigest()[:16]} v{_READER_VERSION}"
    )


def _reader_for(file: str) -> Callable[[str, str], Iterator[str]]:
    extension = _extension(file)
    if extension == ".txt":
        return _read_paragraphs
    if extension == ".parquet":
        return _read_parquet
    return _read_json_lines


def _read_json_lines(path: str, text_field: str) -> Iterator[str]:
    opener = gzip.open if path.lower().endswith(".gz") else open
    try:
        # Bytes, decoded per line: a bad byte is then reported by the line a user can open, not by
        # its offset in the decompressed stream.
        with opener(path, "rb") as handle:
            for line_number, raw in enumerate(handle, start=1):
                line = _decoded_line(raw, path, line_number)
                if line.isspace() or not line:
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(
                        f"{path}, line {line_number}: not valid JSON ({err.msg}, column {err.colno}). "
                        f'Each line must be one JSON object such as {{"{text_field}": "..."}}: '
                        "fix or delete that line."
                    ) from None
                yield _text_of(record, path, line_number, text_field)
    except (OSError, EOFError, UnicodeDecodeError) as err:
        raise DataError(
            f"{path}: cannot be read ({err}). The file may be truncated or not {_format_name(path)}; "
            "re-download or re-create it, or remove it from the corpus."
        ) from err


def _decoded_line(raw: bytes, path: str, line_number: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise _not_utf8(path, line_number, 0, raw, err) from None


def _not_utf8(path: str, line_number: int, extra_lines: int, data: bytes, err: UnicodeDecodeError) -> DataError:
    """The bad byte by line and column (1-based, in characters of that line)."""
    line_start = data.rfind(b"\n", 0, err.start) + 1
    column = len(data[line_start:err.start].decode("utf-8")) + 1
    return DataError(
        f"{path}, line {line_number + extra_lines}, column {column}: byte 0x{data[err.start]:02x} is not UTF-8 "
        f"({err.reason}). Convert the file to UTF-8 (e.g. iconv -f latin1 -t utf-8), or fix or delete that line."
    )


def _text_of(record: object, path: str, line_number: int, text_field: str) -> str:
    if not isinstance(record, dict):
        raise DataError(
            f"{path}, line {line_number}: a JSON {type(record).__name__}, not an object. Each line "
            f'must be one JSON object such as {{"{text_field}": "..."}}.'
        )
    if text_field not in record:
        raise DataError(
            f"{path}, line {line_number}: no field {text_field!r} (fields present: "
            f"{', '.join(sorted(map(str, record))) or 'none'}). Choose the field that holds the "
            "text with --text-field (data.text_field in a config; text_field= in Python)."
        )
    text = record[text_field]
    if not isinstance(text, str):
        raise DataError(
            f"{path}, line {line_number}: field {text_field!r} holds a {type(text).__name__}, not a "
            "string. Fix that line, or choose the field that holds the text with --text-field."
        )
    return text


def _format_name(path: str) -> str:
    return "gzipped JSON lines" if path.lower().endswith(".gz") else "UTF-8 JSON lines"


def _read_paragraphs(path: str, text_field: str) -> Iterator[str]:
    del text_field  # plain text has no fields
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as err:
        raise DataError(f"{path}: cannot be read ({err}). Check the file, or remove it from the corpus.") from err
    try:
        content = data.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")  # as text mode reads it
    except UnicodeDecodeError as err:
        raise _not_utf8(path, 1, data[:err.start].count(b"\n"), data, err) from None
    for paragraph in re.split(r"\n[ \t\r\f\v]*\n", content):
        paragraph = paragraph.strip()
        if paragraph:
            yield paragraph


def _read_parquet(path: str, text_field: str) -> Iterator[str]:
    try:
        import pyarrow.parquet as parquet
    except ImportError as err:
        raise ConfigError(f"Reading {path} needs pyarrow: pip install 'lowmem[parquet]'.") from err
    try:
        parquet_file = parquet.ParquetFile(path)
    except Exception as err:  # pyarrow raises its own ArrowInvalid/OSError mix for bad files
        raise DataError(f"{path}: not a readable parquet file ({err}). Re-create it or remove it.") from err
    columns = parquet_file.schema_arrow.names
    if text_field not in columns:
        raise DataError(
            f"{path}: no column {text_field!r} (columns present: {', '.join(columns)}). Choose the column "
            "that holds the text with --text-field (data.text_field in a config; text_field= in Python)."
        )
    row_number = 0
    for batch in parquet_file.iter_batches(columns=[text_field]):
        for text in batch.column(0).to_pylist():
            row_number += 1
            if not isinstance(text, str):
                raise DataError(
                    f"{path}, row {row_number}: column {text_field!r} holds {text!r}, not a string. "
                    "Drop or fix that row, or choose another column with --text-field."
                )
            yield text


def _check_not_empty(source: TextSource) -> None:
    if next(source.iter_documents(), None) is not None:
        return
    if source.shards and source.shards[0].held_out == "validation":
        raise DataError(
            f"The validation split of {source.spec!r} is empty: no document fell in the "
            f"{HELD_OUT_FRACTION:.0%} held out from a corpus this small. Add files named "
            "validation-*.jsonl (or similar) next to the training files, or use a larger corpus."
        )
    raise DataError(
        f"The {source.split} split of {source.spec!r} holds no documents ({len(source.shards)} "
        "file(s), all empty or blank). Point the data option at files that contain text."
    )
