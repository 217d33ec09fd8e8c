"""Tokenizers: a byte-level BPE that lowmem trains and caches, or a Hugging Face tokenizer.

`load_tokenizer(spec, source)`:

- ``"bpe"``: a byte-level BPE (GPT-2's pre-tokenization, all 256 bytes in the vocabulary, so any
  text round-trips) trained with the `tokenizers` library on the first `BPE_TRAINING_CHARS`
  characters of the source's training split, read in the source's fixed file order. Special
  tokens as in T5: pad id 0 (``<pad>``), eos id 1 (``</s>``). The result is cached as JSON under
  ``<cache_dir>/tokenizers/`` keyed by a hash of the source's identity, the vocabulary size and the
  training recipe; later runs load it instead of training. The `tokenizers` version is not in the key:
  a tokenizer file carried to a machine with another version (the GPU check does this) must be used
  as it is, not retrained into a possibly different vocabulary.
- a path to a ``.json`` file written by `train_bpe` (``lowmem tokenizer train``).
- anything else: a Hugging Face tokenizer, by Hub name (``t5-base``, the papers') or local
  directory, through `transformers.AutoTokenizer`. Only fast (Rust-backed) tokenizers are accepted.

Every tokenizer encodes through the Rust batch encoder, without special tokens (the loader appends
EOS itself) and treating text that looks like a special token (a literal ``</s>`` in a document)
as ordinary text, so that no document can inject a control token.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from lowmem.data.sources import TextSource
from lowmem.errors import ConfigError

logger = logging.getLogger(__name__)

PAD_TOKEN = "<pad>"
EOS_TOKEN = "</s>"
# 20 M characters train an 8k-vocabulary BPE in well under a minute on two cores; the merges
# barely change with more text at these vocabulary sizes.
BPE_TRAINING_CHARS = 20_000_000
_BPE_MIN_FREQUENCY = 2
_BPE_RECIPE_VERSION = 1
_MIN_BPE_VOCAB = 256 + 2  # every byte, plus pad and eos


class Tokenizer:
    """A tokenizer as the loader and the model see it.

    `vocab_size` is the embedding size the model needs (every id the tokenizer can emit is below
    it); `pad_id` and `eos_id` are the ids the loader uses; `name` identifies it in logs and in
    the loader's saved position; `path` is the JSON file it was loaded from or saved to, if any.
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        name: str,
        pad_id: int,
        eos_id: int,
        vocab_size: int | None = None,
        path: Path | None = None,
        aliases: tuple[str, ...] = (),
    ) -> None:
        backend.no_truncation()
        backend.no_padding()
        backend.encode_special_tokens = True
        self._backend = backend
        self.name = name
        self.pad_id = int(pad_id)
        self.eos_id = int(eos_id)
        self.vocab_size = int(vocab_size if vocab_size is not None else backend.get_vocab_size())
        self.path = path
        # Other names of this same tokenizer that saved data positions may carry (a cached BPE's
        # name before its cache key dropped the `tokenizers` version).
        self.aliases = tuple(aliases)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text (no special tokens added), encoded in parallel in Rust."""
        return [
            encoding.ids
            for encoding in self._backend.encode_batch_fast(list(texts), add_special_tokens=False)
        ]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """The text of `ids`; pad and eos appear as ``<pad>``/``</s>`` unless skipped."""
        return self._backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def __repr__(self) -> str:
        return (
            f"Tokenizer({self.name!r}, vocab_size={self.vocab_size}, "
            f"pad_id={self.pad_id}, eos_id={self.eos_id})"
        )


def default_cache_dir() -> Path:
    """``$LOWMEM_CACHE``, or ``~/.cache/lowmem``."""
    return Path(os.environ.get("LOWMEM_CACHE") or Path.home() / ".cache" / "lowmem")


def load_tokenizer(
    spec: str,
    source: TextSource | None = None,
    vocab_size: int = 8192,
    cache_dir: str | Path | None = None,
) -> Tokenizer:
    """The tokenizer named by `spec` (see the module docstring); `source` is needed for ``"bpe"``."""
    spec = str(spec)
    if spec == "bpe":
        if source is None:
            raise ConfigError(
                "The 'bpe' tokenizer is trained on the training data, but no data source was given. "
                "Pass the source, or name a tokenizer file or a Hugging Face tokenizer instead."
            )
        path = bpe_cache_path(source, vocab_size, cache_dir)
        tokenizer = None
        if path.is_file():
            try:
                tokenizer = _tokenizer_from_file(path, name=path.stem)
            except Exception as err:  # tokenizers reports a bad file as a bare Exception; retrain
                logger.warning("Cached tokenizer %s is unreadable (%s); training it again.", path, err)
            else:
                logger.info("Reusing the cached BPE tokenizer %s", path)
                _warn_if_smaller(tokenizer, vocab_size, source)
        tokenizer = tokenizer or train_bpe(source, vocab_size, path)
        tokenizer.aliases = (_bpe_name(source, vocab_size, tokenizers.__version__),)
        return tokenizer
    if spec.endswith(".json") and os.path.isfile(os.path.expanduser(spec)):
        path = Path(os.path.expanduser(spec))
        return _tokenizer_from_file(path, name=path.stem)
    return _load_hugging_face(spec)


def bpe_cache_path(source: TextSource, vocab_size: int, cache_dir: str | Path | None = None) -> Path:
    """Where `load_tokenizer("bpe", source, vocab_size)` keeps its trained tokenizer."""
    _check_vocab_size(vocab_size)
    directory = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return directory / "tokenizers" / f"{_bpe_name(source, vocab_size)}.json"


def _bpe_name(source: TextSource, vocab_size: int, tokenizers_version: str | None = None) -> str:
    """bpe-<vocab>-<hash of the source, vocabulary size and recipe>; with `tokenizers_version`, the
    name the same BPE had when the key held that version (checkpoints written then carry it)."""
    key = {"source": source.with_split("train").identity, "vocab_size": int(vocab_size),
           "recipe": _bpe_recipe(BPE_TRAINING_CHARS)}
    if tokenizers_version is not None:
        key["tokenizers"] = tokenizers_version
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return f"bpe-{int(vocab_size)}-{digest}"


def train_bpe(
    source: TextSource,
    vocab_size: int,
    path: str | Path,
    max_chars: int = BPE_TRAINING_CHARS,
) -> Tokenizer:
    """Train a byte-level BPE on the first `max_chars` characters of `source`'s training split.

    Saves it as JSON at `path` (written whole or not at all, so concurrent runs never read half a
    file) and returns it.
    """
    _check_vocab_size(vocab_size)
    path = Path(path)
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=int(vocab_size),
        min_frequency=_BPE_MIN_FREQUENCY,
        special_tokens=[PAD_TOKEN, EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    started = time.perf_counter()
    backend.train_from_iterator(_training_texts(source.with_split("train"), max_chars), trainer=trainer)
    seconds = time.perf_counter() - started
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    backend.save(str(partial))
    os.replace(partial, path)
    logger.info(
        "Trained a %d-token BPE on %s in %.1f s; saved to %s",
        backend.get_vocab_size(),
        source.spec,
        seconds,
        path,
    )
    tokenizer = Tokenizer(backend, name=path.stem, pad_id=0, eos_id=1, path=path)
    _warn_if_smaller(tokenizer, vocab_size, source)
    return tokenizer


def _warn_if_smaller(tokenizer: Tokenizer, asked: int, source: TextSource) -> None:
    """Say so when the text had too few repeated pairs for the vocabulary asked: the file is still
    named for the asked size (it is what the cache is keyed by), the model gets the smaller one."""
    if tokenizer.vocab_size < asked:
        logger.warning(
            "The BPE has %d tokens, not the %d asked: %s has too few pairs seen at least %d times to merge "
            "more. The model's vocabulary is %d; train on more text, or ask for --vocab-size %d to say so.",
            tokenizer.vocab_size, asked, source.spec, _BPE_MIN_FREQUENCY, tokenizer.vocab_size,
            tokenizer.vocab_size,
        )


def _bpe_recipe(max_chars: int) -> dict:
    return {
        "model": "byte-level-bpe",
        "special_tokens": [PAD_TOKEN, EOS_TOKEN],
        "min_frequency": _BPE_MIN_FREQUENCY,
        "max_chars": int(max_chars),
        "version": _BPE_RECIPE_VERSION,
    }


def _check_vocab_size(vocab_size: int) -> None:
    if not isinstance(vocab_size, int) or vocab_size < _MIN_BPE_VOCAB:
        raise ConfigError(
            f"BPE vocabulary size {vocab_size!r} is too small: a byte-level BPE needs at least "
            f"{_MIN_BPE_VOCAB} tokens (256 bytes + pad + eos). Use e.g. 4096 or 8192."
        )


def _training_texts(source: TextSource, max_chars: int) -> Iterator[list[str]]:
    """The first `max_chars` characters of `source`, in batches for the trainer. A long document goes
    in as the loader's pieces (cut at whitespace, where the pre-tokenizer splits anyway, so the counts
    and the vocabulary are the same): the trainer pre-tokenizes each string whole, and one 50 MB line
    took 1.9 GiB that way."""
    from lowmem.data.loader import _pieces  # the loader imports this module; one cutting rule for both

    batch: list[str] = []
    remaining = max_chars
    for text in source.iter_documents():
        text = text[:remaining]
        batch.extend(piece for piece, _ in _pieces(text))
        remaining -= len(text)
        if remaining <= 0:
            break
        if len(batch) >= 1000:
            yield batch
            batch = []
    if batch:
        yield batch


def _tokenizer_from_file(path: Path, name: str) -> Tokenizer:
    backend = tokenizers.Tokenizer.from_file(str(path))
    pad_id = backend.token_to_id(PAD_TOKEN)
    eos_id = backend.token_to_id(EOS_TOKEN)
    if pad_id is None or eos_id is None:
        raise ConfigError(
            f"Tokenizer file {path} has no {PAD_TOKEN} or {EOS_TOKEN} token, which the loader needs. "
            "Use a file written by `lowmem tokenizer train`, or a Hugging Face tokenizer directory."
        )
    return Tokenizer(backend, name=name, pad_id=pad_id, eos_id=eos_id, path=path)


def _load_hugging_face(spec: str) -> Tokenizer:
    location = os.path.expanduser(spec)
    if spec.startswith(("/", "./", "../", "~")) and not os.path.exists(location):
        raise ConfigError(
            f"No tokenizer at {spec!r}: the path does not exist. Give 'bpe', a tokenizer .json file, "
            "a directory saved with save_pretrained, or a Hugging Face Hub name such as 't5-base'."
        )
    try:
        from transformers import AutoTokenizer
    except ImportError as err:
        raise ConfigError(
            f"Loading the Hugging Face tokenizer {spec!r} needs transformers: pip install 'lowmem[hub]' "
            "(or use --tokenizer bpe, which needs nothing else)."
        ) from err
    try:
        hugging_face = AutoTokenizer.from_pretrained(location)
    except (OSError, ValueError) as err:
        raise ConfigError(
            f"Could not load the tokenizer {spec!r} ({err}). A Hub name like 't5-base' is downloaded "
            "and needs the network; without it, pass a local directory saved with save_pretrained "
            "(or copied from the Hugging Face cache), or use 'bpe' to train one on the data."
        ) from err
    backend = getattr(hugging_face, "backend_tokenizer", None)
    if backend is None:
        raise ConfigError(
            f"The tokenizer {spec!r} has no fast (Rust) version, which lowmem needs for speed. "
            "Convert it with transformers (AutoTokenizer.from_pretrained(..., use_fast=True)) and save it."
        )
    eos_id = hugging_face.eos_token_id if hugging_face.eos_token_id is not None else hugging_face.sep_token_id
    if eos_id is None:
        raise ConfigError(
            f"The tokenizer {spec!r} has no end-of-sequence token, which separates documents. "
            "Use a tokenizer with an eos token (t5-base, gpt2, ...) or 'bpe'."
        )
    # The loader masks padding by position, so a tokenizer without a pad token can pad with eos.
    pad_id = hugging_face.pad_token_id if hugging_face.pad_token_id is not None else eos_id
    return Tokenizer(backend, name=spec, pad_id=pad_id, eos_id=eos_id, vocab_size=len(hugging_face))
