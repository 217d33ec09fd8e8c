"""The data layer: text sources, tokenizers and token batches.

source = open_source("../shared/data/reviews")            # or "builtin", "c4", a glob ...
tokenizer = load_tokenizer("bpe", source, vocab_size=8192) # or "t5-base"
batches = TokenLoader(source, tokenizer, seq_len=256, micro_batch_size=32)
evaluation = validation_batches(source, tokenizer, 256, 32, max_tokens=1_000_000)
"""

from lowmem.data.loader import IGNORE_INDEX, TokenLoader, iter_validation_batches, validation_batches
from lowmem.data.sources import HELD_OUT_FRACTION, Shard, TextSource, open_source
from lowmem.data.tokenizer import Tokenizer, default_cache_dir, load_tokenizer, train_bpe

__all__ = [
    "HELD_OUT_FRACTION",
    "IGNORE_INDEX",
    "Shard",
    "TextSource",
    "TokenLoader",
    "Tokenizer",
    "default_cache_dir",
    "load_tokenizer",
    "open_source",
    "train_bpe",
    "iter_validation_batches",
    "validation_batches",
]
