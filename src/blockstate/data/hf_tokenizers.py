"""The project's tokenizers as ``transformers`` tokenizers, so a saved run loads with ``AutoTokenizer``.

* byte-level BPE (and any ``tokenizer.json``): a ``PreTrainedTokenizerFast`` (built in :mod:`.tokenizers`);
* bytes: :class:`BlockStateBytesTokenizer`, a ``PreTrainedTokenizer`` subclass (ids 0-255 are the bytes, 256 is
  EOS); a Python class because a fast tokenizer only takes valid Unicode, and invalid UTF-8 must survive;
* SentencePiece: :class:`BlockStateSentencePieceTokenizer`, a ``PreTrainedTokenizer`` over ``spm.model`` run by
  the sentencepiece library itself, so it encodes exactly as training did (converting a SentencePiece model
  to ``tokenizer.json`` needs protobuf, and its encodings can differ on some models).

Every one has EOS = BOS = PAD = the document separator used in training, and adds it *before* the text
(``tok("def f(")`` = ``[EOS] + ids``), because every training document follows a separator. A literal
``<|endoftext|>`` in a text is text (``split_special_tokens``), as it was in training. ``import blockstate``
registers both classes with ``AutoTokenizer`` (by the ``tokenizer_class`` of ``tokenizer_config.json``).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer, PretrainedConfig, PreTrainedTokenizer
from transformers.tokenization_utils_base import AddedToken

EOS_TOKEN = "<|endoftext|>"
SPM_FILE = "spm.model"


def _special(token: Any) -> AddedToken:
    if isinstance(token, AddedToken):
        return token
    if isinstance(token, dict):  # as some transformers versions write it in tokenizer_config.json
        token = token.get("content", EOS_TOKEN)
    return AddedToken(str(token), special=True, normalized=False, lstrip=False, rstrip=False)


class _SeparatorFirst:
    """Shared special-token layout: ``[EOS] A`` and ``[EOS] A [EOS] B``."""

    def build_inputs_with_special_tokens(self, token_ids_0: list[int],
                                         token_ids_1: list[int] | None = None) -> list[int]:
        eos = [self.eos_token_id]
        return eos + list(token_ids_0) + ([] if token_ids_1 is None else eos + list(token_ids_1))

    def get_special_tokens_mask(self, token_ids_0: list[int], token_ids_1: list[int] | None = None,
                                already_has_special_tokens: bool = False) -> list[int]:
        if already_has_special_tokens:
            return [1 if i == self.eos_token_id else 0 for i in token_ids_0 + (token_ids_1 or [])]
        return [1] + [0] * len(token_ids_0) + ([] if token_ids_1 is None else [1] + [0] * len(token_ids_1))

    def create_token_type_ids_from_sequences(self, token_ids_0: list[int],
                                             token_ids_1: list[int] | None = None) -> list[int]:
        return [0] * len(self.build_inputs_with_special_tokens(token_ids_0, token_ids_1))

    def num_special_tokens_to_add(self, pair: bool = False) -> int:
        return 2 if pair else 1


class BlockStateBytesTokenizer(_SeparatorFirst, PreTrainedTokenizer):
    """UTF-8 bytes: ids 0-255 are the byte values, id 256 is ``<|endoftext|>`` (vocab 257, ``len(tok)``).

    Text is encoded with ``surrogateescape``, so a string decoded with ``errors="surrogateescape"`` (the
    ``errors`` argument of ``decode``, or of the constructor) encodes back to the very bytes, invalid UTF-8
    included. The default ``errors="replace"`` shows an invalid byte as U+FFFD, as the training sample did."""

    model_input_names = ["input_ids", "attention_mask"]
    vocab_files_names: dict[str, str] = {}

    def __init__(self, eos_token: Any = EOS_TOKEN, errors: str = "replace", **kwargs: Any) -> None:
        self.errors = errors
        eos = _special(eos_token)
        self._added_tokens_decoder = {256: eos}
        for key in ("bos_token", "pad_token", "added_tokens_decoder"):
            kwargs.pop(key, None)
        kwargs.setdefault("split_special_tokens", True)
        kwargs.setdefault("clean_up_tokenization_spaces", False)
        super().__init__(eos_token=eos, bos_token=eos, pad_token=eos, errors=errors, **kwargs)

    @property
    def vocab_size(self) -> int:
        return 256

    def get_vocab(self) -> dict[str, int]:
        vocab = {chr(i): i for i in range(256)}
        vocab.update(self.added_tokens_encoder)
        return vocab

    def _tokenize(self, text: str, **kwargs: Any) -> list[str]:
        try:
            raw = text.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:  # a lone surrogate that no byte decoded to: as the corpus reader would
            raw = text.encode("utf-8", "replace")
        return [chr(b) for b in raw]

    def _convert_token_to_id(self, token: str) -> int:
        return ord(token) if len(token) == 1 and ord(token) < 256 else self.eos_token_id

    def _convert_id_to_token(self, index: int) -> str:
        return chr(index) if 0 <= index < 256 else str(self.eos_token)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return self._decode([self._convert_token_to_id_with_added_voc(t) for t in tokens])

    def _decode(self, token_ids: Any, skip_special_tokens: bool = False,
                clean_up_tokenization_spaces: bool | None = None, errors: str | None = None, **kwargs: Any) -> str:
        ids = [int(token_ids)] if isinstance(token_ids, int) else [int(i) for i in token_ids]
        errors = errors or self.errors
        out, run = [], bytearray()
        for i in ids:
            if 0 <= i < 256:
                run.append(i)
            elif not skip_special_tokens and i == self.eos_token_id:
                out += [run.decode("utf-8", errors), str(self.eos_token)]
                run = bytearray()
        out.append(run.decode("utf-8", errors))
        return "".join(out)

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str, ...]:
        return ()  # nothing beyond tokenizer_config.json: the vocabulary is the 256 byte values


class BlockStateSentencePieceTokenizer(_SeparatorFirst, PreTrainedTokenizer):
    """A SentencePiece model (``spm.model``) as training used it: EOS is the model's ``</s>``, or an extra id
    ``piece_size`` named ``<|endoftext|>`` when the model has none."""

    model_input_names = ["input_ids", "attention_mask"]
    vocab_files_names = {"vocab_file": SPM_FILE}

    def __init__(self, vocab_file: str, eos_token: Any = None, **kwargs: Any) -> None:
        import sentencepiece

        self.vocab_file = str(vocab_file)
        self.sp = sentencepiece.SentencePieceProcessor(model_file=self.vocab_file)
        n = self.sp.get_piece_size()
        self._eos = self.sp.eos_id() if self.sp.eos_id() >= 0 else n
        eos = _special(self.sp.id_to_piece(self._eos) if self._eos < n else (eos_token or EOS_TOKEN))
        self._added_tokens_decoder = {self._eos: eos}
        for key in ("bos_token", "pad_token", "added_tokens_decoder"):
            kwargs.pop(key, None)
        kwargs.setdefault("split_special_tokens", True)
        kwargs.setdefault("clean_up_tokenization_spaces", False)
        super().__init__(eos_token=eos, bos_token=eos, pad_token=eos, **kwargs)

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def get_vocab(self) -> dict[str, int]:
        vocab = {self.sp.id_to_piece(i): i for i in range(self.vocab_size)}
        vocab.update(self.added_tokens_encoder)
        return vocab

    def _tokenize(self, text: str, **kwargs: Any) -> list[str]:
        return self.sp.encode(text, out_type=str)

    def _convert_token_to_id(self, token: str) -> int:
        return self.sp.piece_to_id(token)

    def _convert_id_to_token(self, index: int) -> str:
        return self.sp.id_to_piece(index) if 0 <= index < self.vocab_size else str(self.eos_token)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return self._decode([self._convert_token_to_id_with_added_voc(t) for t in tokens])

    def _decode(self, token_ids: Any, skip_special_tokens: bool = False,
                clean_up_tokenization_spaces: bool | None = None, **kwargs: Any) -> str:
        ids = [int(token_ids)] if isinstance(token_ids, int) else [int(i) for i in token_ids]
        out, run = [], []
        for i in ids:
            if i != self._eos and 0 <= i < self.vocab_size:
                run.append(i)
            elif not skip_special_tokens and i == self._eos:
                out += [self.sp.decode(run), str(self.eos_token)]
                run = []
        out.append(self.sp.decode(run))
        return "".join(out)

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str, ...]:
        target = Path(save_directory) / ((filename_prefix + "-" if filename_prefix else "") + SPM_FILE)
        if Path(self.vocab_file).resolve() != target.resolve():
            shutil.copyfile(self.vocab_file, target)
        return (str(target),)


class BlockStateTokenizerConfig(PretrainedConfig):
    """Only a key for ``AutoTokenizer.register`` (it maps config classes to tokenizers); never a model's config,
    so no model type is tied to one tokenizer: ``tokenizer_config.json`` names the class."""

    model_type = "blockstate-tokenizer"


class BlockStateSentencePieceTokenizerConfig(PretrainedConfig):
    """The same, for the SentencePiece class (one tokenizer class per key)."""

    model_type = "blockstate-sentencepiece-tokenizer"


_registered = False


def register() -> None:
    """Make ``AutoTokenizer.from_pretrained(dir)`` find both classes by the ``tokenizer_class`` of
    ``tokenizer_config.json`` (called by ``import blockstate``; public API only)."""
    global _registered
    if _registered:
        return
    AutoTokenizer.register(BlockStateTokenizerConfig, tokenizer_class=BlockStateBytesTokenizer, exist_ok=True)
    AutoTokenizer.register(BlockStateSentencePieceTokenizerConfig, tokenizer_class=BlockStateSentencePieceTokenizer,
                           exist_ok=True)
    _registered = True
