"""What an HF export needs to be served as it is: a tokenizer transformers and vLLM load, a chat template, stop tokens.

A run on an HF tokenizer (Qwen, Llama, ...) already carries these files and they are copied. A run on a
sentencepiece model (the tiny preset's) carries only ``tokenizer.model``, which ``AutoTokenizer`` cannot load
on its own: :func:`complete_export` writes beside it

* ``tokenizer.json`` (+ ``tokenizer_config.json``, ``special_tokens_map.json``): the same segmentation,
  built from the model's pieces by :func:`fast_tokenizer` (BPE merges ranked by the pieces' scores, or the
  unigram lattice; the format symbols the trainer fixed as added tokens; byte fallback); a sentencepiece
  setting it does not reproduce is refused by name, never dropped;
* a chat template that renders a problem exactly as the run's prompt template did (:func:`chat_template`);
* ``generation_config.json`` with the tokenizer's BOS / EOS / pad ids, so ``generate`` stops at the answer.
"""

from __future__ import annotations

import json
from pathlib import Path

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as pb
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

from megatron_rgm import lazy
from megatron_rgm.config import CHAT, ConfigError, check_template
from megatron_rgm.tokenizer import SP_FILE, is_sentencepiece_dir

SPACE = "\u2581"  # sentencepiece's whitespace marker
GENERATION_CONFIG = "generation_config.json"


def _proto(model_file: Path):
    m = pb.ModelProto()
    m.ParseFromString(model_file.read_bytes())
    return m, pb.ModelProto.SentencePiece, pb.TrainerSpec


def _refuse_unconvertible(m, trainer_spec, where: Path) -> str:
    model_type = trainer_spec.ModelType.Name(m.trainer_spec.model_type).lower()
    ns = m.normalizer_spec
    settings = {
        "model_type": (model_type, model_type in ("bpe", "unigram")),
        "normalization_rule_name": (ns.name, ns.name == "identity" and not ns.precompiled_charsmap),
        "remove_extra_whitespaces": (ns.remove_extra_whitespaces, not ns.remove_extra_whitespaces),
        # sentencepiece prefixes a space to every run of text between user-defined symbols and takes each off
        # again when decoding; a fast tokenizer's decoder strips only the first.
        "add_dummy_prefix": (ns.add_dummy_prefix, not ns.add_dummy_prefix),
        "escape_whitespaces": (ns.escape_whitespaces, ns.escape_whitespaces),
        "treat_whitespace_as_suffix": (m.trainer_spec.treat_whitespace_as_suffix,
                                       not m.trainer_spec.treat_whitespace_as_suffix),
    }
    bad = [f"{k}={v!r}" for k, (v, ok) in settings.items() if not ok]
    if bad:
        raise ConfigError(f"sentencepiece model {where} uses {', '.join(bad)}, which the HF export does not "
                          "reproduce (it converts bpe or unigram models with the identity normalisation, spaces "
                          "escaped as U+2581, no dummy prefix and no whitespace collapsing): export with a tokenizer directory "
                          "that has tokenizer.json, or train the tokenizer with those settings")
    return model_type


def _refuse_overlapping_symbols(symbols: list[str], where: Path) -> None:
    """A unigram model places its user-defined symbols in the lattice, so where two can overlap (``",▁"`` and
    ``"▁+▁"`` on ``", + "``) the best path decides; an added token is matched leftmost-longest instead."""
    for a in symbols:
        for b in symbols:
            if a != b and any(a.endswith(b[:i]) for i in range(1, min(len(a), len(b)))):
                raise ConfigError(f"sentencepiece unigram model {where} has user-defined symbols {a!r} and {b!r} "
                                  "that can overlap in a text; the HF export matches such symbols leftmost-longest "
                                  "where the unigram lattice may choose otherwise: train the tokenizer with "
                                  "model_type=bpe (sentencepiece matches them leftmost-longest too) or without the "
                                  "overlap")


def fast_tokenizer(model_file: str | Path):
    """A ``tokenizers.Tokenizer`` that segments text as the sentencepiece model ``model_file`` does.

    Control pieces (``<s>``, ``</s>``, ``<pad>``) and user-defined symbols become added tokens (matched
    before the model, never split, as sentencepiece matches them); byte pieces back the byte fallback.

    Raises:
        ConfigError: a setting of the model the conversion does not reproduce (named).
    """
    path = Path(model_file)
    m, piece, trainer_spec = _proto(path)
    model_type = _refuse_unconvertible(m, trainer_spec, path)
    pieces = [(p.piece, p.score, p.type) for p in m.pieces]
    vocab = {text: i for i, (text, _, _) in enumerate(pieces)}
    unk = next((text for text, _, kind in pieces if kind == piece.UNKNOWN), None)
    byte_fallback = m.trainer_spec.byte_fallback
    if model_type == "bpe":
        # sentencepiece merges, at each step, the adjacent pair whose joined piece scores highest: every split
        # of a normal piece into two known pieces is a merge, ranked by the joined piece's score.
        normal = [(text, score) for text, score, kind in pieces if kind == piece.NORMAL]
        ranked = sorted(normal, key=lambda ts: (-ts[1], vocab[ts[0]]))
        merges = []
        for text, _ in ranked:
            splits = [(text[:i], text[i:]) for i in range(1, len(text))
                      if text[:i] in vocab and text[i:] in vocab]
            merges.extend(sorted(splits, key=lambda ab: (vocab[ab[0]], vocab[ab[1]])))
        model = models.BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=byte_fallback)
    else:
        _refuse_overlapping_symbols([text for text, _, kind in pieces if kind == piece.USER_DEFINED], path)
        unk_id = vocab[unk] if unk is not None else None
        model = models.Unigram([(text, score) for text, score, _ in pieces], unk_id, byte_fallback)
    tok = Tokenizer(model)
    tok.normalizer = normalizers.Replace(" ", SPACE)
    decode = [decoders.Replace(SPACE, " ")]
    if byte_fallback:
        decode.append(decoders.ByteFallback())
    decode.append(decoders.Fuse())
    tok.decoder = decoders.Sequence(decode)
    special = [AddedToken(text, special=True, normalized=False)
               for text, _, kind in pieces if kind in (piece.CONTROL, piece.UNKNOWN)]
    user = [AddedToken(text, special=False, normalized=True)
            for text, _, kind in pieces if kind == piece.USER_DEFINED]
    tok.add_special_tokens(special)
    tok.add_tokens(user)
    return tok


def chat_template(prompt_template: str) -> str:
    """A Jinja chat template that renders ``[{"role": "user", "content": problem}]`` with the generation
    prompt exactly as ``prompt_template.format(problem=problem)``; an assistant turn after it is followed by
    the EOS token (how the SFT texts ended). Other roles, and a second user turn, are refused by the
    template (the model was trained on one problem per sequence)."""
    check_template(prompt_template)
    if prompt_template == CHAT:
        raise ConfigError("--prompt-template chat names the tokenizer's own template, and this tokenizer has none: "
                          "pass the template string the model was trained with")
    mark = "\x00problem\x00"
    try:
        rendered = prompt_template.format(problem=mark)  # what prompt_text makes of it, {{ }} escapes and all
    except (KeyError, IndexError, ValueError) as e:
        raise ConfigError(f"--prompt-template {prompt_template!r} is not a format string with only {{problem}} "
                          f"({type(e).__name__}: {e}): escape other braces as {{{{ }}}}") from None
    if rendered.count(mark) != 1:
        raise ConfigError(f"--prompt-template {prompt_template!r} has {{problem}} twice: the chat template can "
                          "place the user's message once")
    head, _, tail = rendered.partition(mark)
    lit = json.dumps  # a JSON string literal is a Jinja string literal with the same escapes
    one_problem = "this model was trained on one problem per conversation: a single user turn, then its answer"
    return (
        "{%- for message in messages -%}"
        "{%- if message['role'] == 'user' and loop.index0 == 0 -%}"
        f"{{{{ {lit(head)} + message['content'] }}}}"
        "{%- if loop.last and add_generation_prompt or not loop.last -%}"
        f"{{{{ {lit(tail)} }}}}"
        "{%- endif -%}"
        "{%- elif message['role'] == 'assistant' and loop.index0 == 1 -%}"
        "{{ message['content'] + eos_token }}"
        "{%- else -%}"
        f"{{{{ raise_exception({lit(one_problem)}) }}}}"
        "{%- endif -%}"
        "{%- endfor -%}")


def complete_export(directory: Path, prompt_template: str) -> list[str]:
    """Write the serving files an export of a sentencepiece-tokenized run lacks (nothing when it has
    HF tokenizer files already); a ``generation_config.json`` where none was copied. Returns the names written.

    The tokenizer files name the generic fast class (``PreTrainedTokenizerFast``, which transformers 4 and 5
    both load as written) and hold the chat template in ``tokenizer_config.json`` (where both read it); the
    longest input is the model's ``max_position_embeddings``.
    """
    written = []
    tokenizer = None
    if is_sentencepiece_dir(directory):
        transformers = lazy.load("transformers", "an HF export's tokenizer files")
        sp = spm.SentencePieceProcessor(model_file=str(directory / SP_FILE))

        def piece(i: int) -> str | None:
            return sp.id_to_piece(i) if i >= 0 else None

        positions = json.loads((directory / "config.json").read_text()).get("max_position_embeddings")
        tokenizer = transformers.PreTrainedTokenizerFast(
            tokenizer_object=fast_tokenizer(directory / SP_FILE), bos_token=piece(sp.bos_id()),
            eos_token=piece(sp.eos_id()), unk_token=piece(sp.unk_id()), pad_token=piece(sp.pad_id()),
            clean_up_tokenization_spaces=False, **({"model_max_length": positions} if positions else {}))
        before = {p.name for p in directory.iterdir()}
        tokenizer.save_pretrained(str(directory))
        config_file = directory / "tokenizer_config.json"
        config = json.loads(config_file.read_text())
        config.update(tokenizer_class="PreTrainedTokenizerFast", chat_template=chat_template(prompt_template))
        config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        written += sorted({p.name for p in directory.iterdir()} - before)
    if not (directory / GENERATION_CONFIG).exists():
        if tokenizer is None:
            transformers = lazy.load("transformers", "an HF export's generation config")
            tokenizer = transformers.AutoTokenizer.from_pretrained(str(directory))
        ids = {k: getattr(tokenizer, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
        (directory / GENERATION_CONFIG).write_text(json.dumps({k: v for k, v in ids.items() if v is not None},
                                                              indent=2) + "\n")
        written.append(GENERATION_CONFIG)
    return written
