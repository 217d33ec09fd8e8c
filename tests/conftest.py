"""Shared fixtures: a small synthetic corpus and a fast run config for trainer tests."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch

# Tests use small models, for which one thread is faster than two, and CI's 2 cores are shared by
# the subprocesses some tests start (they inherit OMP_NUM_THREADS).
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")

REVIEWS = Path(__file__).resolve().parents[2] / "shared" / "data" / "reviews"

WORDS = (
    "the a model learns language from text every token predicts next word memory optimizer step "
    "gradient moment rank projection matrix column norm head embedding layer small large fast slow "
    "good bad film story actor plot scene music long short day night people world time"
).split()


def write_corpus(directory: Path, train_docs: int = 400, validation_docs: int = 60, seed: int = 0) -> Path:
    """A directory with train.jsonl and validation.jsonl of short English-like documents."""
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", train_docs), ("validation", validation_docs)):
        with (directory / f"{split}.jsonl").open("w") as f:
            for i in range(count):
                words = [rng.choice(WORDS) for _ in range(rng.randint(20, 120))]
                f.write(json.dumps({"text": f"Document {split} {i}: " + " ".join(words) + "."}) + "\n")
    return directory


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="session")
def token_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("token-cache")


@pytest.fixture
def reviews() -> Path:
    if not (REVIEWS / "validation-00000-of-00001.jsonl.gz").exists():
        pytest.skip(f"the review corpus is not at {REVIEWS} (CI clones the project with ../shared beside it)")
    return REVIEWS


def tiny_run_overrides(corpus: Path, cache: Path, output: Path, **extra) -> dict:
    """Dotted config overrides for a run of a few seconds on the tiny corpus."""
    overrides = {
        "model": "cpu-tiny",
        "data.source": str(corpus),
        "data.vocab_size": 320,
        "data.seq_len": 32,
        "data.seq_mode": "pad",  # the papers' mode: the global batch is the same documents at any world size
        "data.cache_dir": str(cache),
        "train.steps": 12,
        "train.batch_size": 4,
        "train.micro_batch_size": 4,
        "train.eval_tokens": 2000,
        "train.log_every": 1,
        "train.output_dir": str(output),
        "train.progress": False,
        "optim.lr": 3e-3,
    }
    overrides.update(extra)
    return overrides
