"""Corpora and token splits for the data tests: files from a dict, a small text corpus, splits whose tokens
name their document."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from blockstate.data import TokenizedSplit

EOS = 65535  # test splits use unique token values, so a target identifies its document and position


def write_files(root: Path, files: dict[str, str | bytes]) -> Path:
    """Create ``files`` (relative path -> content) under ``root``."""
    for rel, content in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, str):
            p.write_text(content, encoding="utf-8")
        else:
            p.write_bytes(content)
    return root


def text_corpus(root: Path, n: int = 40, seed: int = 0) -> Path:
    """``n`` small English-ish .txt files of varied length (some nested) for corpus and BPE tests."""
    rng = np.random.default_rng(seed)
    words = "the of and to in a is that for it as was with be by on not he this are or his from at".split()
    files = {}
    for i in range(n):
        k = int(rng.integers(5, 400))
        body = " ".join(words[j] for j in rng.integers(0, len(words), k))
        files[f"{'sub/' if i % 3 == 0 else ''}doc{i:03d}.txt"] = f"Document {i}: {body}\nÆther café ✓ {i}\n"
    return write_files(root, files)


def unique_split(lengths: list[int]) -> TokenizedSplit:
    """A split whose documents have the given token counts and globally unique, increasing token values."""
    docs, start = [], 1
    for n in lengths:
        docs.append(np.arange(start, start + n))
        start += n
    assert start < EOS
    return TokenizedSplit.from_documents(docs, [2 * n for n in lengths], eos_id=EOS, vocab_size=EOS + 1)


def doc_of(data: TokenizedSplit, token: int) -> int:
    """Document index of a (unique) token value of :func:`unique_split`."""
    firsts = 1 + np.concatenate([[0], np.cumsum(np.diff(data.offsets) - 1)[:-1]])  # empty docs: next start
    return int(np.searchsorted(firsts, token, side="right") - 1)


def targets(batch: dict) -> list[int]:
    """Tokens a batch asks the model to predict (HF shift: labels[:, 1:])."""
    lab = batch["labels"][:, 1:]
    return lab[lab != -100].tolist()
