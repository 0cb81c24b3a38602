"""One way to load a tokenizer: an HF tokenizer directory, or a sentencepiece model.

``load_tokenizer(path)`` accepts

* a sentencepiece ``*.model`` file, or a directory holding ``tokenizer.model``
  and no ``tokenizer.json`` / ``tokenizer_config.json`` (what the tiny preset
  trains and what an HF export of it carries): wrapped in
  :class:`SentencePieceTokenizer`, which answers the calls this package makes of
  a transformers tokenizer (``encode(text, add_special_tokens=False)``,
  ``decode(ids)``, ``eos_token_id``, ``len()``, ``save_pretrained``);
* anything else: ``transformers.AutoTokenizer.from_pretrained(path)``.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import sentencepiece as spm

from megatron_rgm import lazy
from megatron_rgm.config import CHAT, ConfigError

SP_FILE = "tokenizer.model"


class SentencePieceTokenizer:
    """A sentencepiece model with the transformers-style calls used across megatron-rgm."""

    def __init__(self, model_file: str | Path):
        self.model_file = Path(model_file)
        self.sp = spm.SentencePieceProcessor(model_file=str(self.model_file))
        self.name_or_path = str(self.model_file)

    @property
    def eos_token_id(self) -> int | None:
        i = self.sp.eos_id()
        return i if i >= 0 else None

    @property
    def bos_token_id(self) -> int | None:
        i = self.sp.bos_id()
        return i if i >= 0 else None

    @property
    def pad_token_id(self) -> int | None:
        i = self.sp.pad_id()
        return i if i >= 0 else self.eos_token_id

    def __len__(self) -> int:
        return self.sp.get_piece_size()

    def get_piece_size(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids = list(self.sp.encode_as_ids(text))
        return ([self.bos_token_id] + ids) if add_special_tokens and self.bos_token_id is not None else ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            ids = [i for i in ids if not (self.sp.is_control(i) or self.sp.is_unknown(i))]
        return self.sp.decode_ids(ids)

    def piece_to_id(self, piece: str) -> int:
        return self.sp.piece_to_id(piece)

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(i)

    def save_pretrained(self, directory: str | Path) -> None:
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        if (out / SP_FILE).resolve() != self.model_file.resolve():
            shutil.copy2(self.model_file, out / SP_FILE)


def is_sentencepiece_dir(path: Path) -> bool:
    """A directory whose tokenizer is a sentencepiece model alone (no HF tokenizer files beside it)."""
    return (path / SP_FILE).exists() and not any(
        (path / n).exists() for n in ("tokenizer.json", "tokenizer_config.json"))


def load_tokenizer(path: str | Path) -> Any:
    """A tokenizer from a sentencepiece model (file or directory) or an HF tokenizer directory.

    Raises:
        ConfigError: ``path`` does not exist or holds no tokenizer.
    """
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"tokenizer {p} does not exist: pass --tokenizer with a sentencepiece .model file or an "
                          "HF tokenizer directory")
    if p.is_file():
        if p.suffix != ".model":
            raise ConfigError(f"tokenizer file {p} is not a sentencepiece .model: pass the model file or the "
                              "directory of an HF tokenizer")
        return SentencePieceTokenizer(p)
    if is_sentencepiece_dir(p):
        return SentencePieceTokenizer(p / SP_FILE)
    transformers = lazy.load("transformers", f"the tokenizer {p} (not a sentencepiece model)")
    try:
        return transformers.AutoTokenizer.from_pretrained(str(p), trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise ConfigError(f"no tokenizer could be loaded from {p} ({e}): pass a directory with tokenizer.json or "
                          f"{SP_FILE}") from None


def vocab_size_of(tokenizer: Any) -> int:
    """Token ids a tokenizer produces (sentencepiece, tokenizers or transformers)."""
    for attr in ("get_piece_size", "get_vocab_size"):
        if hasattr(tokenizer, attr):
            return int(getattr(tokenizer, attr)())
    if hasattr(tokenizer, "__len__"):
        return len(tokenizer)
    raise TypeError(f"cannot read the vocabulary size of {type(tokenizer).__name__}")


def decode_token(tokenizer: Any, token_id: int) -> str:
    """The text of one token id (sentencepiece, tokenizers or transformers)."""
    if hasattr(tokenizer, "decode_ids"):  # sentencepiece
        return tokenizer.decode_ids([token_id])
    return tokenizer.decode([token_id])


def token_texts(tokenizer: Any) -> list[str]:
    """The text of every token id, as :func:`decode_token` gives it (in one call where the tokenizer batches).

    A byte-level BPE token that holds part of a character decodes to U+FFFD; a sentencepiece word piece
    decodes without its leading space. Neither changes where an ASCII step string such as ``".\\n\\n"`` is.
    """
    n = vocab_size_of(tokenizer)
    ids = [[i] for i in range(n)]
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return list(backend.decode_batch(ids, skip_special_tokens=False))  # what decode gives, 7x faster
    if hasattr(tokenizer, "batch_decode"):  # transformers: one call instead of one per id
        return list(tokenizer.batch_decode(ids))
    if hasattr(tokenizer, "decode_batch"):  # tokenizers.Tokenizer
        return list(tokenizer.decode_batch(ids))
    return [decode_token(tokenizer, i) for i in range(n)]


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens added."""
    if hasattr(tokenizer, "encode_as_ids"):  # sentencepiece
        return list(tokenizer.encode_as_ids(text))
    try:
        out = tokenizer.encode(text, add_special_tokens=False)
    except TypeError:
        out = tokenizer.encode(text)
    return list(out.ids if hasattr(out, "ids") else out)


def prompt_text(tokenizer: Any, template: str, problem: str) -> str:
    """How ``problem`` becomes the model's prompt: ``template.format(problem=...)``, or, for ``template ==
    "chat"``, the tokenizer's chat template with the problem as the one user turn and the generation prompt
    added (the model's own conventions, a ``<think>`` it opens included, come with the template).

    Raises:
        ConfigError: ``chat`` with a tokenizer that has no chat template.
    """
    if template != CHAT:
        return template.format(problem=problem)
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__
        raise ConfigError(f"--prompt-template chat: tokenizer {name} has no chat template: pass a tokenizer "
                          "directory whose tokenizer_config.json has one, or a template string such as "
                          "'{problem}\\n<think>\\n'")
    return tokenizer.apply_chat_template([{"role": "user", "content": problem}], tokenize=False,
                                         add_generation_prompt=True)


def prompt_ids(tokenizer: Any, template: str, problem: str) -> list[int]:
    """The token ids of :func:`prompt_text` (special tokens the template writes, such as ``<|im_start|>``, are
    parsed as themselves; nothing is added)."""
    return encode(tokenizer, prompt_text(tokenizer, template, problem))
