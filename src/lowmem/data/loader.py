"""Token batches for training and evaluation: padded or packed, seeded, split across ranks, resumable.

The order of epoch ``e``: the shards in the order of a permutation drawn from ``(seed, e)``; inside
each shard, its documents in the order of a permutation drawn from ``(seed, e, shard)``. Document
``i`` of that order, counted across the whole epoch, belongs to rank ``i % world_size``, so the
ranks' shares are disjoint, differ in size by at most one document, and together hold every
document exactly once per epoch. Only one shard is in memory at a time; each rank reads every shard
but tokenizes only its own documents.

Each rank's document stream becomes rows of ``seq_len + 1`` tokens, ``input_ids = row[:-1]`` and
``labels = row[1:]``:

- ``pad`` (the papers'): one document per row, its tokens + EOS cut to ``seq_len + 1``, padded
  with the pad id; a label is -100 exactly where its target is padding.
- ``pack``: the documents, each followed by EOS, form one stream; row ``k`` is the stream's tokens
  ``k*seq_len ... k*seq_len + seq_len`` (consecutive rows share one token), so every token after
  the first is a target exactly once and no label is -100.

A document longer than `PIECE_CHARS` characters is never tokenized whole (a 50 MB line would take
gigabytes in the Rust encoder): in pad mode only a prefix long enough for ``seq_len + 1`` tokens is
tokenized; in pack mode the text is cut at whitespace (after a non-space character, where the
pre-tokenizers of byte-level BPE and SentencePiece split anyway, so the tokens are those of the
whole text) into pieces tokenized one by one and streamed, so memory is bounded by the pieces in
flight, not by the document.

The position saved by `state_dict` is the next document (epoch, shard, document) plus, in pack
mode, how many of its tokens were already used; restoring re-reads that shard and skips the
documents before it without tokenizing them.
"""

from __future__ import annotations

import queue
import re
import threading
import weakref
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import NamedTuple

import numpy as np
import torch

from lowmem.data.sources import TextSource
from lowmem.data.tokenizer import Tokenizer
from lowmem.errors import CheckpointError, ConfigError, DataError
from lowmem.models.chunked_loss import IGNORE_INDEX  # the loss's unscored label: padding targets get it

MODES = ("pad", "pack")
# Documents per call of the Rust batch encoder: large enough to keep its threads busy, small
# enough that a resumed or validation read does not tokenize much it will not use.
TOKENIZE_CHUNK = 512
# Longer documents are tokenized in pieces of at most this many characters (see the module docstring),
# and one call of the encoder gets at most CHUNK_CHARS characters.
PIECE_CHARS = 1 << 16
CHUNK_CHARS = 1 << 18
# A whitespace character preceded by a non-space one, searched in reversed text (see _cut).
_SAFE_CUT = re.compile(r"\s(?=\S)")
_STATE_FORMAT = "lowmem.TokenLoader/1"
_SHARD_ORDER = 0
_DOCUMENT_ORDER = 1


class _Position(NamedTuple):
    """Where a rank's document stream stands: `document` indexes the shard's shuffled order."""

    epoch: int
    shard_position: int
    documents_before: int
    document: int

    def next(self) -> _Position:
        return self._replace(document=self.document + 1)


class TokenLoader:
    """An endless iterator of ``{"input_ids", "labels"}`` batches of ``micro_batch_size`` rows.

    See the module docstring for the order, the two modes and the rank split. `epoch` is the
    (0-based) epoch of the last document used. `prefetch` chunks of `TOKENIZE_CHUNK` documents
    are read and tokenized ahead in a background thread (0: in the caller's thread); the batches
    are the same either way.
    """

    def __init__(
        self,
        source: TextSource,
        tokenizer: Tokenizer,
        seq_len: int,
        micro_batch_size: int,
        mode: str = "pad",
        seed: int = 42,
        rank: int = 0,
        world_size: int = 1,
        prefetch: int = 4,
    ) -> None:
        _check_shape(seq_len, micro_batch_size, mode)
        if not isinstance(seed, int) or seed < 0:
            raise ConfigError(f"The data seed must be a non-negative integer, got {seed!r}.")
        if not (
            isinstance(world_size, int)
            and world_size >= 1
            and isinstance(rank, int)
            and 0 <= rank < world_size
        ):
            raise ConfigError(f"Need 0 <= rank < world_size, got rank={rank!r}, world_size={world_size!r}.")
        if not isinstance(prefetch, int) or prefetch < 0:
            raise ConfigError(
                f"prefetch counts chunks tokenized ahead: a non-negative integer, got {prefetch!r}."
            )
        if not source.shards:
            raise DataError(f"The {source.split} split of {source.spec!r} has no files to read.")
        self.source = source
        self.tokenizer = tokenizer
        self.seq_len = seq_len
        self.micro_batch_size = micro_batch_size
        self.mode = mode
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.prefetch = prefetch
        self.epoch = 0
        self._reading = _Reading(source, tokenizer, seed, rank, world_size, seq_len + 1 if mode == "pad" else None)
        self._prefetcher: _Prefetcher | None = None
        self._restart(_Position(0, 0, 0, 0), token_offset=0)

    def __iter__(self) -> TokenLoader:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self.mode == "pad":
            rows = [self._next_document_row() for _ in range(self.micro_batch_size)]
            return _padded_batch(rows, self.seq_len, self.tokenizer.pad_id)
        return _packed_batch([self._next_window() for _ in range(self.micro_batch_size)])

    def state_dict(self) -> dict:
        """The exact position, as plain numbers and strings (loads with ``weights_only=True``)."""
        return {
            "format": _STATE_FORMAT,
            "mode": self.mode,
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "source": self.source.identity,
            "tokenizer": self.tokenizer.name,
            "epoch": self._resume.epoch,
            "shard_position": self._resume.shard_position,
            "documents_before": self._resume.documents_before,
            "document": self._resume.document,
            "token_offset": self._token_offset,
            "last_epoch": self.epoch,
            "origin_epoch": self._reading.origin[0],
            "origin_document": self._reading.origin[1],
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where the loader that wrote `state` stood."""
        if not isinstance(state, dict) or state.get("format") != _STATE_FORMAT:
            raise CheckpointError(
                "The checkpoint's data position was not written by this version of TokenLoader; "
                "resume without restoring the data position (the run restarts its data order)."
            )
        expected = {
            "mode": self.mode,
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "source": self.source.identity,
            "tokenizer": self.tokenizer.name,
        }
        known_names = {"tokenizer": (self.tokenizer.name, *getattr(self.tokenizer, "aliases", ()))}
        different = [
            f"{key}: saved {state.get(key)!r}, now {value!r}"
            for key, value in expected.items()
            if state.get(key) not in known_names.get(key, (value,))
        ]
        if different:
            raise CheckpointError(
                "Cannot resume the data position: the checkpoint was written with other data settings ("
                + "; ".join(different)
                + "). Resume with the same data, tokenizer, mode, seed and number of processes."
            )
        position = _Position(
            int(state["epoch"]),
            int(state["shard_position"]),
            int(state["documents_before"]),
            int(state["document"]),
        )
        self.epoch = int(state["last_epoch"])
        self._reading = replace(self._reading, origin=(int(state.get("origin_epoch", 0)), int(state.get("origin_document", 0))))
        self._restart(position, token_offset=int(state["token_offset"]))

    def load_resharded(self, states: list[dict]) -> None:
        """Continue the global order where the loaders of a run of `len(states)` processes (one
        state per rank) stood together, split over this run's processes: exact in pad mode, where
        every rank has used as many whole documents, so together they used a prefix of the epoch's
        order; the rest of that epoch is split from its first unused document."""
        for state in states:
            if not isinstance(state, dict) or state.get("format") != _STATE_FORMAT:
                raise CheckpointError("The checkpoint's data position was not written by this version of TokenLoader.")
        saved = len(states)
        if self.mode != "pad":
            raise CheckpointError(
                f"The checkpoint was written by {saved} process(es), this run has {self.world_size}: in pack mode "
                "each rank stands inside its own document, so no split over another number of processes "
                "continues the global order exactly. Resume with the same number of processes, or train in pad mode.")
        self.load_state_dict({**states[0], "rank": self.rank, "world_size": self.world_size})
        # Each rank's position is one past the last document it used (0: none yet in this epoch).
        nexts = sorted((int(s["epoch"]), int(s["documents_before"]) + int(s["document"])) for s in states)
        epoch, after = nexts[-1]
        used_equally = all(e == epoch for e, _ in nexts) and (
            [g for _, g in nexts] == list(range(after - saved + 1, after + 1)) or all(g == 0 for _, g in nexts))
        if not used_equally:
            raise CheckpointError(
                f"The {saved} saved data positions do not end a common prefix of the global order (epoch, next "
                f"document per rank: {nexts}); resume with {saved} processes.")
        last = max(states, key=lambda s: (int(s["epoch"]), int(s["documents_before"]) + int(s["document"])))
        self.epoch = max(int(s["last_epoch"]) for s in states)
        self._reading = replace(self._reading, origin=(epoch, after))
        self._restart(_Position(int(last["epoch"]), int(last["shard_position"]), int(last["documents_before"]),
                                int(last["document"])), token_offset=0)

    def close(self) -> None:
        """Stop the prefetch thread (it also stops when the loader is garbage-collected)."""
        if self._prefetcher is not None:
            self._prefetcher.close()
            self._prefetcher = None

    def _restart(self, position: _Position, token_offset: int) -> None:
        self.close()
        chunks = _tokenized_chunks(self._reading, position)
        if self.prefetch > 0:
            self._prefetcher = _Prefetcher(chunks, self.prefetch)
            weakref.finalize(self, self._prefetcher.close)
            chunks = self._prefetcher
        self._stream = _Documents(chunks)
        self._resume = position
        # Tokens already used of the document at `_resume` (saved), and of the first pending piece.
        self._token_offset = token_offset
        self._piece_offset = token_offset
        self._pending: deque[tuple[_Position, list[int], bool]] = deque()

    def _next_document_row(self) -> list[int]:
        position, tokens, _ = next(self._stream)  # pad mode: one piece per document
        self._resume = position.next()
        self.epoch = position.epoch
        return tokens[: self.seq_len + 1]

    def _next_window(self) -> list[int]:
        # The window starts `_piece_offset` tokens into the first pending piece.
        needed = self.seq_len + 1
        self._drop_used_pieces()
        window: list[int] = []
        index, offset = 0, self._piece_offset
        while len(window) < needed:
            if index == len(self._pending):
                self._pending.append(next(self._stream))
            window.extend(self._pending[index][1][offset : offset + needed - len(window)])
            index, offset = index + 1, 0
        self._advance(self.seq_len)
        return window

    def _drop_used_pieces(self) -> None:
        # After a restart `_piece_offset` counts tokens of the whole document: skip its used pieces.
        while True:
            if not self._pending:
                self._pending.append(next(self._stream))
            _, tokens, last = self._pending[0]
            if self._piece_offset < len(tokens) or last:
                return
            self._piece_offset -= len(tokens)
            self._pending.popleft()

    def _advance(self, count: int) -> None:
        while count > 0:
            position, tokens, last = self._pending[0]
            self.epoch = position.epoch
            remaining = len(tokens) - self._piece_offset
            if remaining <= count:
                count -= remaining
                self._pending.popleft()
                self._piece_offset = 0
                if last:  # the document is used up
                    self._resume, self._token_offset = position.next(), 0
                else:
                    self._resume, self._token_offset = position, self._token_offset + remaining
            else:
                self._resume, self._token_offset = position, self._token_offset + count
                self._piece_offset += count
                count = 0


class DeviceBatches:
    """A run's optimizer steps, each `per_step` micro-batches of `loader` on `device`; also the
    checkpoint component of the data position (the loader's `state_dict`, same format).

    On the CPU a step's batches are read from the loader when the step asks for them, as the loader
    gives them. On a GPU, `read_ahead()` (which the trainer calls while a step computes) reads the
    next step's batches, pins them (page-locked host memory) and copies them with non_blocking=True
    on a side stream, so the copy overlaps the step's compute instead of blocking the host; the step
    that takes them makes its stream wait for the copy. The position saved is the first batch not yet
    handed out, so a resume reads again what was read ahead. `ahead` forces reading ahead on or off
    (default: on a GPU only).
    """

    def __init__(self, loader: TokenLoader, per_step: int, device: torch.device | str, ahead: bool | None = None) -> None:
        self.loader, self.per_step, self.device = loader, per_step, torch.device(device)
        self.ahead = self.device.type == "cuda" if ahead is None else ahead
        self._copies = torch.cuda.Stream(self.device) if self.ahead and self.device.type == "cuda" else None
        self._next: list[dict[str, torch.Tensor]] | None = None  # the step read ahead
        self._position: dict | None = None  # the loader's position before it

    def __iter__(self) -> DeviceBatches:
        return self

    def __next__(self) -> list[dict[str, torch.Tensor]]:
        if self._next is None:
            return [{key: value.to(self.device) for key, value in next(self.loader).items()}
                    for _ in range(self.per_step)]
        batches, self._next, self._position = self._next, None, None
        if self._copies is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_stream(self._copies)
            for batch in batches:
                for tensor in batch.values():
                    tensor.record_stream(current)  # allocated on the copy stream, used on this one
        return batches

    def read_ahead(self) -> None:
        """Read the next step's batches now and start their copies to the device (when reading
        ahead, and not already done)."""
        if not self.ahead or self._next is not None:
            return
        self._position = self.loader.state_dict()
        host = [next(self.loader) for _ in range(self.per_step)]
        if self._copies is None:
            self._next = [{key: value.to(self.device) for key, value in batch.items()} for batch in host]
            return
        with torch.cuda.stream(self._copies):
            self._next = [{key: value.pin_memory().to(self.device, non_blocking=True) for key, value in batch.items()}
                          for batch in host]

    def state_dict(self) -> dict:
        return self._position if self._next is not None else self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """The loader's position; from a run of another number of processes, every rank's
        ({"saved_ranks": [...]}, lowmem.train.checkpoint), continued by `TokenLoader.load_resharded`."""
        self._next, self._position = None, None
        if "saved_ranks" in state:
            self.loader.load_resharded(state["saved_ranks"])
        else:
            self.loader.load_state_dict(state)

    def close(self) -> None:
        self.loader.close()


@dataclass(frozen=True)
class _Reading:
    """What fixes a rank's document order; kept apart from the loader so that a prefetch thread
    does not keep a dropped loader alive."""

    source: TextSource
    tokenizer: Tokenizer
    seed: int
    rank: int
    world_size: int
    prefix_tokens: int | None = None  # pad mode: only this many tokens of a document are used
    # (epoch, document): in that epoch the split counts documents from that one (a run resumed at
    # another number of processes splits the rest of the epoch from where the whole run stood).
    origin: tuple[int, int] = (0, 0)


def _cut(text: str, start: int, size: int) -> int:
    """Where to end a piece of `text` starting at `start`: the last whitespace character after a
    non-space one within `size` characters (there the pre-tokenizer splits anyway), or `size`
    characters on if the second half of the window has none."""
    high = start + size
    if high >= len(text):
        return len(text)
    low = start + size // 2
    found = _SAFE_CUT.search(text[low : high + 1][::-1])
    return high if found is None else high - found.start()


def _pieces(text: str) -> Iterator[tuple[str, bool]]:
    """(piece, is_last) of `text`, each at most PIECE_CHARS characters, cut by _cut."""
    start = 0
    while len(text) - start > PIECE_CHARS:
        end = _cut(text, start, PIECE_CHARS)
        yield text[start:end], False
        start = end
    yield text[start:], True


def _prefix_tokens(tokenizer: Tokenizer, text: str, count: int) -> list[int]:
    """The first `count` or more tokens of a long `text` (all of them + EOS if it has fewer), from the
    shortest cut prefix that yields them."""
    size = PIECE_CHARS
    while True:
        end = _cut(text, 0, size)
        tokens = tokenizer.encode_batch([text[:end]])[0]
        if end == len(text):
            tokens.append(tokenizer.eos_id)
            return tokens
        if len(tokens) >= count:
            return tokens
        size *= 4


def _tokenized_chunks(reading: _Reading, start: _Position) -> Iterator[list[tuple[_Position, list[int], bool]]]:
    """This rank's documents from `start` on, forever, each as its tokens + EOS, in chunks of
    (position, tokens, is_last_piece); a long document comes as several pieces (module docstring)."""
    epoch, first_shard, documents_before, first_document = start
    shards = reading.source.shards
    while True:
        whole_epoch = first_shard == 0 and first_document == 0
        found_any = False
        shard_order = _permutation(reading.seed, (epoch, _SHARD_ORDER), len(shards))
        for shard_position in range(first_shard, len(shards)):
            shard_index = int(shard_order[shard_position])
            texts = shards[shard_index].documents()
            order = _permutation(reading.seed, (epoch, _DOCUMENT_ORDER, shard_index), len(texts))
            # Skipping to this rank's first document at or after `first_document` costs nothing:
            # a resumed loader tokenizes only what it will use.
            shift = reading.origin[1] if epoch == reading.origin[0] else 0
            first_mine = (
                first_document + (reading.rank + shift - documents_before - first_document) % reading.world_size
            )
            # Entries (position, text to tokenize or None, tokens or None, is_last_piece).
            pending: list[tuple[_Position, str | None, list[int] | None, bool]] = []
            chars = 0
            for index in range(first_mine, len(texts), reading.world_size):
                text = texts[order[index]]
                position = _Position(epoch, shard_position, documents_before, index)
                if len(text) <= PIECE_CHARS:
                    entries = [(position, text, None, True)]
                elif reading.prefix_tokens is not None:
                    entries = [(position, None, _prefix_tokens(reading.tokenizer, text, reading.prefix_tokens), True)]
                else:
                    entries = ((position, piece, None, last) for piece, last in _pieces(text))
                for entry in entries:
                    pending.append(entry)
                    chars += len(entry[1]) if entry[1] is not None else PIECE_CHARS
                    if len(pending) >= TOKENIZE_CHUNK or chars >= CHUNK_CHARS:
                        found_any = True
                        yield _encode(reading.tokenizer, pending)
                        pending, chars = [], 0
            if pending:
                found_any = True
                yield _encode(reading.tokenizer, pending)
            documents_before += len(texts)
            first_document = 0
        if whole_epoch and not found_any:
            source = reading.source
            raise DataError(
                f"Rank {reading.rank} of {reading.world_size} got no document from the {source.split} "
                f"split of {source.spec!r}: it holds fewer documents than there are ranks. "
                "Use a larger corpus or fewer processes."
            )
        epoch, first_shard, documents_before = epoch + 1, 0, 0


def _encode(tokenizer: Tokenizer, entries: list) -> list[tuple[_Position, list[int], bool]]:
    """Tokenize the entries' texts in one batch; the last piece of each document gets EOS."""
    encoded = iter(tokenizer.encode_batch([text for _, text, tokens, _ in entries if tokens is None]))
    out = []
    for position, _, tokens, last in entries:
        if tokens is None:
            tokens = next(encoded)
            if last:
                tokens.append(tokenizer.eos_id)
        out.append((position, tokens, last))
    return out


class _Failure(NamedTuple):
    error: BaseException


class _Prefetcher:
    """Runs an iterator in a daemon thread, up to `depth` items ahead (the Rust tokenizer
    releases the GIL, so tokenizing overlaps the training step)."""

    def __init__(self, items: Iterator, depth: int) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._failure: _Failure | None = None
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(items,), name="lowmem-prefetch", daemon=True)
        self._thread.start()

    def _run(self, items: Iterator) -> None:
        try:
            for item in items:
                if not self._put(item):
                    return
        except BaseException as error:  # handed to the consumer, which raises it
            self._put(_Failure(error))
        else:
            self._put(_Failure(StopIteration()))

    def _put(self, item: object) -> bool:
        while not self._stopped.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> _Prefetcher:
        return self

    def __next__(self):
        if self._failure is None:
            item = self._queue.get()
            if not isinstance(item, _Failure):
                return item
            self._failure = item  # the thread has ended: every later call raises the same
        raise self._failure.error

    def close(self) -> None:
        self._stopped.set()


class _Documents:
    """The documents of a chunk iterator one by one; a read error is raised again on every later
    call instead of ending the stream (a generator would stop after its first exception)."""

    def __init__(self, chunks: Iterator[list]) -> None:
        self._chunks = chunks
        self._chunk: deque = deque()
        self._failure: BaseException | None = None

    def __iter__(self) -> _Documents:
        return self

    def __next__(self):
        while not self._chunk:
            if self._failure is not None:
                raise self._failure
            try:
                self._chunk = deque(next(self._chunks))
            except Exception as error:
                self._failure = error
                raise
        return self._chunk.popleft()


def validation_batches(
    source: TextSource,
    tokenizer: Tokenizer,
    seq_len: int,
    micro_batch_size: int,
    max_tokens: int,
    mode: str = "pad",
    seed: int = 42,
) -> list[dict[str, torch.Tensor]]:
    """A fixed list of batches from the validation split of `source`, in shuffled order.

    Reads one pass of the validation documents (`source.with_split("validation")`, shuffled as the
    loader's epoch 0 with `seed`) and stops as soon as the batches hold `max_tokens` targets that
    are not -100, or when the documents run out; the last batch may have fewer rows. Every rank
    gets the same list.
    """
    return list(iter_validation_batches(source, tokenizer, seq_len, micro_batch_size, max_tokens, mode, seed))


def iter_validation_batches(
    source: TextSource,
    tokenizer: Tokenizer,
    seq_len: int,
    micro_batch_size: int,
    max_tokens: int | None,
    mode: str = "pad",
    seed: int = 42,
    unscored: dict[str, int] | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """The batches of `validation_batches`, one at a time (`lowmem eval` streams a whole source);
    `max_tokens` None reads the documents to the end. `unscored`, if given, counts the targets that
    the shape leaves out: "cut" (pad mode: the ends of documents longer than a row) and "tail" (pack
    mode: the stream's last partial sequence), so a caller can say how much text it did not score."""
    _check_shape(seq_len, micro_batch_size, mode)
    if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
        raise ConfigError(f"The validation token budget must be a positive integer, got {max_tokens!r}.")
    loader = TokenLoader(
        source.with_split("validation"), tokenizer, seq_len, micro_batch_size, mode, seed, prefetch=0
    )
    make_batch = (
        (lambda rows: _padded_batch(rows, seq_len, tokenizer.pad_id)) if mode == "pad" else _packed_batch
    )
    rows: list[list[int]] = []
    targets = 0
    for row in _one_epoch_of_rows(loader, unscored if unscored is not None else {}):
        rows.append(row)
        targets += len(row) - 1
        if len(rows) == micro_batch_size:
            yield make_batch(rows)
            rows = []
        if max_tokens is not None and targets >= max_tokens:
            break
    if rows:
        yield make_batch(rows)


def _one_epoch_of_rows(loader: TokenLoader, unscored: dict[str, int]) -> Iterator[list[int]]:
    unscored.setdefault("cut", 0)
    unscored.setdefault("tail", 0)
    stream: list[int] = []
    for position, tokens, _ in _Documents(_tokenized_chunks(loader._reading, _Position(0, 0, 0, 0))):
        if position.epoch > 0:
            break
        if loader.mode == "pad":
            unscored["cut"] += max(0, len(tokens) - (loader.seq_len + 1))
            yield tokens[: loader.seq_len + 1]
            continue
        stream.extend(tokens)
        start = 0
        while len(stream) - start >= loader.seq_len + 1:
            yield stream[start : start + loader.seq_len + 1]
            start += loader.seq_len
        del stream[:start]
    unscored["tail"] = max(0, len(stream) - 1)  # reached only when the documents ran out


def _check_shape(seq_len: int, micro_batch_size: int, mode: str) -> None:
    if not isinstance(seq_len, int) or seq_len < 1:
        raise ConfigError(f"The sequence length must be a positive integer, got {seq_len!r}.")
    if not isinstance(micro_batch_size, int) or micro_batch_size < 1:
        raise ConfigError(f"The micro-batch size must be a positive integer, got {micro_batch_size!r}.")
    if mode not in MODES:
        raise ConfigError(f"Unknown batching mode {mode!r}: use 'pad' (one document per row) or 'pack'.")


def _permutation(seed: int, keys: tuple[int, ...], size: int) -> np.ndarray:
    return np.random.default_rng([seed, *keys]).permutation(size)


def _padded_batch(rows: list[list[int]], seq_len: int, pad_id: int) -> dict[str, torch.Tensor]:
    input_ids = np.full((len(rows), seq_len), pad_id, dtype=np.int64)
    labels = np.full((len(rows), seq_len), IGNORE_INDEX, dtype=np.int64)
    for index, row in enumerate(rows):
        inputs = row[:seq_len]
        input_ids[index, : len(inputs)] = inputs
        labels[index, : len(row) - 1] = row[1:]
    return {"input_ids": torch.from_numpy(input_ids), "labels": torch.from_numpy(labels)}


def _packed_batch(windows: list[list[int]]) -> dict[str, torch.Tensor]:
    rows = np.asarray(windows, dtype=np.int64)
    return {
        "input_ids": torch.from_numpy(np.ascontiguousarray(rows[:, :-1])),
        "labels": torch.from_numpy(np.ascontiguousarray(rows[:, 1:])),
    }
