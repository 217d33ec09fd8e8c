"""Token batches: exactly-once epochs across ranks, pad masks, packing, seeds, resuming, validation."""

from __future__ import annotations

import io
import json
import re

import pytest
import torch

from lowmem.data import IGNORE_INDEX, TokenLoader, open_source, train_bpe, validation_batches
from lowmem.data.loader import TOKENIZE_CHUNK
from lowmem.errors import CheckpointError, ConfigError, DataError

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
SHARD_SIZES = (21, 15, 11)  # odd sizes: ranks must take turns across shard boundaries to stay balanced
SEQ_LEN = 24


def document_text(index: int) -> str:
    words = [WORDS[(index + step * 5) % len(WORDS)] for step in range(2 + (index * 7) % 23)]
    return f"doc {index} " + " ".join(words)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Three train files (47 documents), a validation file, and a tiny BPE trained on them."""
    directory = tmp_path_factory.mktemp("corpus")
    index = 0
    for shard, size in enumerate(SHARD_SIZES):
        lines = [json.dumps({"text": document_text(index + offset)}) for offset in range(size)]
        (directory / f"train-{shard}.jsonl").write_text("\n".join(lines) + "\n")
        index += size
    validation = [json.dumps({"text": document_text(1000 + offset)}) for offset in range(9)]
    (directory / "validation-0.jsonl").write_text("\n".join(validation) + "\n")
    source = open_source(str(directory))
    tokenizer = train_bpe(source, 300, directory / "bpe.json")
    return source, tokenizer


def document_id(tokenizer, token_ids) -> int:
    return int(re.match(r"doc (\d+)", tokenizer.decode(token_ids, skip_special_tokens=True)).group(1))


def first_rows(loader, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    rows: list[tuple[torch.Tensor, torch.Tensor]] = []
    while len(rows) < count:
        batch = next(loader)
        assert batch["input_ids"].shape == batch["labels"].shape == (loader.micro_batch_size, loader.seq_len)
        assert batch["input_ids"].dtype == batch["labels"].dtype == torch.int64
        rows.extend(zip(batch["input_ids"], batch["labels"]))
    return rows[:count]


def total_documents() -> int:
    return sum(SHARD_SIZES)


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_pad_mode_reads_every_document_once_per_epoch_across_ranks(corpus, world_size):
    source, tokenizer = corpus
    epochs = [[], []]
    for rank in range(world_size):
        share = len(range(rank, total_documents(), world_size))
        loader = TokenLoader(source, tokenizer, SEQ_LEN, 4, seed=7, rank=rank, world_size=world_size)
        rows = first_rows(loader, 2 * share)
        for epoch in range(2):
            epochs[epoch].extend(
                document_id(tokenizer, inputs) for inputs, _ in rows[epoch * share : (epoch + 1) * share]
            )
    for ids in epochs:
        assert sorted(ids) == list(range(total_documents()))
    assert epochs[0] != epochs[1]  # reshuffled each epoch


@pytest.mark.parametrize("world_size", [1, 2])
def test_pack_mode_reads_every_document_once_per_epoch_across_ranks(corpus, world_size):
    source, tokenizer = corpus
    seen = []
    for rank in range(world_size):
        share = len(range(rank, total_documents(), world_size))
        loader = TokenLoader(source, tokenizer, 16, 3, mode="pack", rank=rank, world_size=world_size)
        stream = packed_stream(loader, batches=40)
        segments = split_on(stream, tokenizer.eos_id)
        seen.extend(document_id(tokenizer, segment) for segment in segments[:share])
    assert sorted(seen) == list(range(total_documents()))


def packed_stream(loader, batches: int) -> list[int]:
    """The token stream behind packed batches; checks that consecutive rows continue it."""
    stream: list[int] = []
    for _ in range(batches):
        batch = next(loader)
        assert (batch["labels"] != IGNORE_INDEX).all()  # no position wasted
        for inputs, labels in zip(batch["input_ids"].tolist(), batch["labels"].tolist()):
            assert inputs[1:] == labels[:-1]
            if stream:
                assert stream[-1] == inputs[0]  # rows overlap by one token: each target used once
                stream.extend(inputs[1:] + labels[-1:])
            else:
                stream.extend(inputs + labels[-1:])
    return stream


def split_on(stream: list[int], separator: int) -> list[list[int]]:
    segments, current = [], []
    for token in stream:
        if token == separator:
            segments.append(current)
            current = []
        else:
            current.append(token)
    return segments


def test_pack_stream_is_the_documents_joined_with_eos_in_the_pad_order(corpus):
    source, tokenizer = corpus
    stream = packed_stream(TokenLoader(source, tokenizer, 16, 3, mode="pack", seed=5), batches=60)
    segments = split_on(stream, tokenizer.eos_id)
    assert len(segments) > total_documents()
    first_epoch = segments[: total_documents()]
    ids = [document_id(tokenizer, segment) for segment in first_epoch]
    expected = tokenizer.encode_batch([document_text(index) for index in ids])
    assert first_epoch == expected
    assert stream[: sum(len(tokens) + 1 for tokens in expected)] == [
        token for tokens in expected for token in tokens + [tokenizer.eos_id]
    ]
    pad_rows = first_rows(TokenLoader(source, tokenizer, SEQ_LEN, 5, seed=5), total_documents())
    assert ids == [document_id(tokenizer, inputs) for inputs, _ in pad_rows]


def test_pad_mode_masks_exactly_the_pad_targets(corpus):
    source, tokenizer = corpus
    rows = first_rows(TokenLoader(source, tokenizer, SEQ_LEN, 4), total_documents())
    truncated = padded = 0
    for inputs, labels in rows:
        tokens = tokenizer.encode_batch([document_text(document_id(tokenizer, inputs))])[0]
        row = (tokens + [tokenizer.eos_id])[: SEQ_LEN + 1]
        real_targets = len(row) - 1
        assert inputs.tolist() == row[:SEQ_LEN] + [tokenizer.pad_id] * (SEQ_LEN - len(row[:SEQ_LEN]))
        assert labels.tolist() == row[1:] + [IGNORE_INDEX] * (SEQ_LEN - real_targets)
        assert ((labels == IGNORE_INDEX).nonzero().flatten().tolist()) == list(range(real_targets, SEQ_LEN))
        truncated += real_targets == SEQ_LEN
        padded += real_targets < SEQ_LEN
    assert truncated and padded  # both cases occur in this corpus


def test_same_seed_same_batches_other_seed_other_batches(corpus):
    source, tokenizer = corpus
    for mode in ("pad", "pack"):
        first = [
            next(iter_)
            for iter_ in [TokenLoader(source, tokenizer, SEQ_LEN, 4, mode=mode, seed=1)]
            for _ in range(6)
        ]
        again = TokenLoader(source, tokenizer, SEQ_LEN, 4, mode=mode, seed=1, prefetch=0)
        other = TokenLoader(source, tokenizer, SEQ_LEN, 4, mode=mode, seed=2)
        for batch in first:
            assert_same_batch(batch, next(again))
        assert any(not torch.equal(batch["input_ids"], next(other)["input_ids"]) for batch in first)


def assert_same_batch(left: dict, right: dict) -> None:
    assert left.keys() == right.keys()
    for key in left:
        assert torch.equal(left[key], right[key]), key


@pytest.mark.parametrize("mode", ["pad", "pack"])
@pytest.mark.parametrize(("rank", "world_size"), [(0, 1), (1, 2)])
@pytest.mark.parametrize("batches_before", [0, 3, 11, 30])
def test_state_dict_resumes_to_identical_batches(corpus, mode, rank, world_size, batches_before):
    source, tokenizer = corpus
    uninterrupted = TokenLoader(source, tokenizer, 10, 3, mode=mode, seed=3, rank=rank, world_size=world_size)
    for _ in range(batches_before):
        next(uninterrupted)
    state = uninterrupted.state_dict()
    assert all(isinstance(value, (int, str)) for value in state.values())
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    restored = TokenLoader(source, tokenizer, 10, 3, mode=mode, seed=3, rank=rank, world_size=world_size)
    next(restored)  # a loader that has moved on is put back, too
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert restored.epoch == uninterrupted.epoch
    for _ in range(15):  # across shard and epoch boundaries
        assert_same_batch(next(uninterrupted), next(restored))
    assert restored.state_dict() == uninterrupted.state_dict()


def test_resume_deep_into_a_shard_skips_without_tokenizing(tmp_path, corpus):
    _, tokenizer = corpus
    lines = [json.dumps({"text": document_text(index)}) for index in range(3000)]
    (tmp_path / "train-0.jsonl").write_text("\n".join(lines) + "\n")
    source = open_source(str(tmp_path))
    reference = TokenLoader(source, tokenizer, 8, 50, prefetch=0)
    for _ in range(58):
        next(reference)
    state = reference.state_dict()
    assert state["document"] == 58 * 50
    expected = [next(reference) for _ in range(2)]
    restored = TokenLoader(source, tokenizer, 8, 50, prefetch=0)
    tokenized = []
    encode = tokenizer.encode_batch
    tokenizer.encode_batch = lambda texts: tokenized.append(len(texts)) or encode(texts)
    try:
        restored.load_state_dict(state)
        for batch in expected:  # the rest of the shard, then the next epoch
            assert_same_batch(next(restored), batch)
    finally:
        del tokenizer.encode_batch
    remaining_in_shard = len(source.shards[0].documents()) - 58 * 50
    assert 0 < remaining_in_shard < 50
    assert tokenized == [remaining_in_shard, TOKENIZE_CHUNK]  # none of the 2900 documents before


def test_resume_with_other_settings_is_refused(corpus):
    source, tokenizer = corpus
    state = TokenLoader(source, tokenizer, SEQ_LEN, 2, seed=1).state_dict()
    with pytest.raises(CheckpointError, match=r"seed: saved 1, now 2"):
        TokenLoader(source, tokenizer, SEQ_LEN, 2, seed=2).load_state_dict(state)
    with pytest.raises(CheckpointError, match=r"not written by this version"):
        TokenLoader(source, tokenizer, SEQ_LEN, 2).load_state_dict({"epoch": 0})


def test_epoch_counts_passes_over_the_data(corpus):
    source, tokenizer = corpus
    loader = TokenLoader(source, tokenizer, SEQ_LEN, 1)
    first_rows(loader, total_documents())
    assert loader.epoch == 0
    next(loader)
    assert loader.epoch == 1


def test_validation_batches_stop_at_the_token_budget_and_are_fixed(corpus):
    source, tokenizer = corpus
    batches = validation_batches(source, tokenizer, 8, 2, max_tokens=40)
    targets = [int((labels != IGNORE_INDEX).sum()) for batch in batches for labels in batch["labels"]]
    assert sum(targets) >= 40 > sum(targets[:-1])
    assert all(batch["input_ids"].shape == (2, 8) for batch in batches[:-1])
    assert 1 <= batches[-1]["input_ids"].shape[0] <= 2
    ids = [document_id(tokenizer, inputs) for batch in batches for inputs in batch["input_ids"]]
    assert all(index >= 1000 for index in ids)  # the validation file, whichever split was passed
    assert ids != sorted(ids)  # shuffled
    again = validation_batches(source.with_split("validation"), tokenizer, 8, 2, max_tokens=40)
    for left, right in zip(batches, again, strict=True):
        assert_same_batch(left, right)
    everything = validation_batches(source, tokenizer, 8, 4, max_tokens=10**9, mode="pack")
    assert all((batch["labels"] != IGNORE_INDEX).all() for batch in everything)
    stream_length = sum(
        len(tokens) + 1 for tokens in tokenizer.encode_batch([document_text(1000 + i) for i in range(9)])
    )
    # One pass over the validation documents, cut into rows of 8 targets; the short tail is dropped.
    assert sum(batch["input_ids"].shape[0] for batch in everything) == (stream_length - 1) // 8


def test_held_out_validation_never_overlaps_training_for_a_single_file(tmp_path, corpus):
    _, tokenizer = corpus
    lines = [json.dumps({"text": document_text(index)}) for index in range(400)]
    (tmp_path / "corpus.jsonl").write_text("\n".join(lines) + "\n")
    source = open_source(str(tmp_path / "corpus.jsonl"))
    train_ids = {
        document_id(tokenizer, inputs) for inputs, _ in first_rows(TokenLoader(source, tokenizer, 8, 16), 400)
    }
    validation = validation_batches(source, tokenizer, 8, 4, max_tokens=10**9)
    validation_ids = {document_id(tokenizer, inputs) for batch in validation for inputs in batch["input_ids"]}
    assert validation_ids and len(train_ids) + len(validation_ids) == 400
    assert not train_ids & validation_ids


def test_builtin_validation_never_overlaps_training(tmp_path):
    train_source = open_source("builtin")
    tokenizer = train_bpe(train_source, 400, tmp_path / "builtin.json", max_chars=200_000)
    held_out = list(open_source("builtin", split="validation").iter_documents())
    validation = validation_batches(train_source, tokenizer, 1024, 64, max_tokens=10**9)
    # A padded row's tokens are its first input followed by its real targets; a row that ends in
    # EOS holds a whole document, which must be a held-out one and no training one.
    rows = [
        [int(inputs[0]), *labels[labels != IGNORE_INDEX].tolist()]
        for batch in validation
        for inputs, labels in zip(batch["input_ids"], batch["labels"])
    ]
    assert len(rows) == len(held_out)
    whole = [tokenizer.decode(row[:-1]) for row in rows if row[-1] == tokenizer.eos_id]
    assert len(whole) > len(rows) / 2
    assert set(whole) <= set(held_out)
    assert not set(whole) & set(train_source.iter_documents())


def test_invalid_shapes_and_too_many_ranks(tmp_path, corpus):
    source, tokenizer = corpus
    with pytest.raises(ConfigError, match=r"sequence length"):
        TokenLoader(source, tokenizer, 0, 4)
    with pytest.raises(ConfigError, match=r"micro-batch size"):
        TokenLoader(source, tokenizer, 8, 0)
    with pytest.raises(ConfigError, match=r"Unknown batching mode 'packed'"):
        TokenLoader(source, tokenizer, 8, 4, mode="packed")
    with pytest.raises(ConfigError, match=r"rank"):
        TokenLoader(source, tokenizer, 8, 4, rank=2, world_size=2)
    with pytest.raises(ConfigError, match=r"token budget"):
        validation_batches(source, tokenizer, 8, 4, max_tokens=0)
    (tmp_path / "train-0.jsonl").write_text('{"text": "one"}\n{"text": "two"}\n')
    loader = TokenLoader(open_source(str(tmp_path)), tokenizer, 8, 1, rank=2, world_size=3)
    for _ in range(2):  # the prefetch thread's error is raised again, not turned into a hang
        with pytest.raises(DataError, match=r"Rank 2 of 3 got no document.*fewer processes"):
            next(loader)


def test_read_errors_reach_the_caller_through_the_prefetch_thread(tmp_path, corpus):
    _, tokenizer = corpus
    (tmp_path / "train-0.jsonl").write_text('{"text": "fine"}\n{"text": oops}\n')
    loader = TokenLoader(open_source(str(tmp_path)), tokenizer, 8, 1)
    with pytest.raises(DataError, match=r"train-0\.jsonl, line 2: not valid JSON"):
        next(loader)


@pytest.mark.parametrize("mode", ["pad", "pack"])
def test_steps_read_ahead_give_the_same_batches_and_save_the_position_of_the_next_step(corpus, mode):
    """A GPU run reads each step's batches one step ahead (DeviceBatches, forced on here on the CPU);
    the batches are the same, and a checkpoint holds the position of the first batch not handed out,
    so a resume neither skips nor repeats the step read ahead."""
    from lowmem.data.loader import DeviceBatches

    source, tokenizer = corpus

    def loader():
        return TokenLoader(source, tokenizer, 10, 3, mode=mode, seed=3)

    plain, ahead = DeviceBatches(loader(), 2, "cpu"), DeviceBatches(loader(), 2, "cpu", ahead=True)
    assert not plain.ahead
    plain.read_ahead()  # the CPU default reads nothing ahead: the loader stands where the steps are
    assert plain.state_dict() == plain.loader.state_dict()
    saved = None
    for step in range(1, 9):
        expected, got = next(plain), next(ahead)
        ahead.read_ahead()  # what the trainer does while the step computes
        ahead.read_ahead()  # once only
        for left, right in zip(expected, got, strict=True):
            assert_same_batch(left, right)
        assert ahead.state_dict() == plain.state_dict() != ahead.loader.state_dict()
        if step == 4:
            saved = ahead.state_dict()
    resumed = DeviceBatches(loader(), 2, "cpu", ahead=True)
    next(resumed)
    resumed.read_ahead()
    resumed.load_state_dict(saved)  # drops what it had read ahead
    again = DeviceBatches(loader(), 2, "cpu")
    again.load_state_dict(saved)
    for _ in range(4):
        for left, right in zip(next(again), next(resumed), strict=True):
            assert_same_batch(left, right)
        resumed.read_ahead()
    resumed.close()
