"""Data for the Block-State Transformer: corpora, tokenizers, token caches, training and evaluation batches.

Typical use::

    corpus = load_corpus("python-stdlib")                      # or "shakespeare", a directory, hf:<name>
    tok = build_tokenizer("bytes")                              # or "bpe" (corpus=corpus), "x.model"
    train = tokenize_split(corpus, tok, "train")                # cached .npy, memory-mapped
    loader = SegmentLoader(train, seq_len=512, batch_size=8, seed=0, rank=rank, world_size=world)
    batch = next(loader)                                        # {"input_ids", "labels"} (B, L) int64
    state = loader.state_dict()                                 # resume: loader.load_state_dict(state)

    valid = tokenize_split(corpus, tok, "validation")
    for batch in eval_batches(valid, 512, 8): ...              # every token scored once
    bpb = bits_per_byte(total_nll_nats, valid.num_bytes)

    task = make_task("mqar", seq_len=256)                      # synthetic tasks (blockstate.data.synthetic)
"""

from .common import SPLITS, DataError, ReadStats, default_cache_dir
from .corpora import BUILTIN_CORPORA, Corpus, describe_corpus, hash_split, load_corpus
from .segments import (
    IGNORE_INDEX,
    PAD_ID,
    SegmentLoader,
    bits_per_byte,
    eval_batches,
    num_segments,
    segment_table,
)
from .synthetic import SyntheticSet, SyntheticTask, make_task, task_names
from .tokenized import TokenizedSplit, tokenize_split
from .tokenizers import (
    BytesTokenizer,
    HFTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    build_tokenizer,
    load_tokenizer,
    train_bpe,
)

__all__ = [
    "BUILTIN_CORPORA", "IGNORE_INDEX", "PAD_ID", "SPLITS", "BytesTokenizer", "Corpus", "DataError",
    "HFTokenizer", "ReadStats", "SegmentLoader", "SentencePieceTokenizer", "SyntheticSet", "SyntheticTask",
    "TokenizedSplit", "Tokenizer",
    "bits_per_byte", "build_tokenizer", "default_cache_dir", "describe_corpus", "eval_batches", "hash_split",
    "load_corpus", "load_tokenizer", "make_task", "num_segments", "segment_table", "task_names", "tokenize_split",
    "train_bpe",
]
