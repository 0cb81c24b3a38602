"""Write the tiny preset's data: tokenizer, RL train prompts, eval prompts, SFT texts.

    python -m megatron_rgm.tasks.prepare --output DIR [--seed 0] [--n-train 2000] [--n-eval 200] [--n-sft 4000]

Files under DIR: ``tokenizer/tokenizer.model``, ``train_prompts.jsonl`` and
``eval_prompts.jsonl`` (lines ``{"id", "problem", "answer"}``; read them with
``load_benchmark(path, "problem", "answer")`` or ``--problem-key problem
--answer-key answer``), ``sft.jsonl`` (lines ``{"text"}``: prompt + response,
no EOS token) and ``task.json`` (the arguments and token-length stats).
Train and eval problems never share a multiset of addends. The same
arguments write the same bytes.
"""

from __future__ import annotations

import argparse
import json
import sys
from math import ceil
from pathlib import Path

from megatron_rgm.config import ConfigError, run_tool
from megatron_rgm.tasks.arithmetic import (
    SP_FILE,
    check_ranges,
    make_problems,
    prompt_text,
    sft_texts,
    train_tokenizer,
)
from megatron_rgm.tasks.knobs import LONG_VOCAB, Knobs, knob_problems, knob_sft_texts, named_symbols
from megatron_rgm.tokenizer import load_tokenizer


def _write_jsonl(path: Path, rows) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def task_paths(out_dir: str | Path) -> dict[str, Path]:
    """Where :func:`prepare` writes its files under ``out_dir``, by name (tokenizer, train, eval, sft, meta)."""
    out = Path(out_dir)
    return {"tokenizer": out / "tokenizer" / SP_FILE, "train": out / "train_prompts.jsonl",
            "eval": out / "eval_prompts.jsonl", "sft": out / "sft.jsonl", "meta": out / "task.json"}


def prepare(out_dir: str | Path, seed: int = 0, n_train: int = 2000, n_eval: int = 200, n_sft: int = 4000, *,
            error_rate: float = 0.3, min_terms: int = 3, max_terms: int = 6, max_value: int = 9,
            tree_fraction: float = 0.0, fix_rate: float = 0.0, order: str = "shuffled",
            vocab_size: int | None = None, knobs: Knobs | None = None) -> dict[str, Path]:
    """Generate the task's files under ``out_dir``.

    Args:
        out_dir: output directory (created if needed; files in it are overwritten).
        seed: random seed of problems, traces and tokenizer.
        n_train: RL training prompts; the SFT texts are written for these problems.
        n_eval: evaluation prompts, disjoint from the training ones.
        n_sft: SFT texts (traces of the training problems, several per problem).
        error_rate: fraction of SFT texts with a slip (one step's result off by 1..3).
        fix_rate: fraction of those slips taken back within the step; the rest propagate to a wrong answer.
        min_terms, max_terms, max_value: problem ranges (see :func:`make_problems`).
        tree_fraction: fraction of SFT traces on the ``tree`` route.
        order: ``shuffled`` (addends in a random order) or ``given`` (the statement's order).
        vocab_size: upper bound of the tokenizer's vocabulary (None: 512, or ``LONG_VOCAB`` with ``knobs.long``).
        knobs: the knobbed task (:mod:`megatron_rgm.tasks.knobs`): its slips, always in the statement's order
            (no ``tree_fraction``), and with ``knobs.long`` its 5-31 addends instead of ``min_terms`` /
            ``max_terms``, named by letters in the statement and the steps (letter and value one token).

    Returns:
        Paths by name: ``tokenizer`` (the .model file), ``train``, ``eval``, ``sft``, ``meta``.
    """
    if knobs is not None:
        if tree_fraction:
            raise ConfigError("the knobbed task adds the numbers in the statement's order: drop --tree-fraction, or "
                              "the knobs")
        if knobs.long:
            min_terms, max_terms = knobs.terms
        order = "given"
    check_ranges(min_terms, max_terms, max_value)
    for name, v in (("n_train", n_train), ("n_eval", n_eval), ("n_sft", n_sft)):
        if v < 0:
            raise ConfigError(f"{name} must be >= 0, got {v}")
    if n_sft and not n_train:
        raise ConfigError(f"n_sft={n_sft} SFT texts need training problems: pass n_train >= 1")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # One draw, then a split: the eval set does not change with n_train.
    long = knobs is not None and knobs.long
    if vocab_size is None:
        vocab_size = LONG_VOCAB if long else 512
    if long:  # the knob's 5-31 addends, named by letters
        problems = knob_problems(n_eval + n_train, seed, knobs, max_value)
    else:
        problems = make_problems(n_eval + n_train, seed, min_terms=min_terms, max_terms=max_terms,
                                 max_value=max_value)
    eval_set, train_set = problems[:n_eval], problems[n_eval:]
    per_problem = max(1, ceil(n_sft / max(n_train, 1)))
    if knobs is None:
        texts = sft_texts(train_set, seed, error_rate=error_rate, traces_per_problem=per_problem,
                          tree_fraction=tree_fraction, fix_rate=fix_rate, order=order)[:n_sft]
    else:
        texts = knob_sft_texts(train_set, seed, knobs, error_rate=error_rate, fix_rate=fix_rate,
                               traces_per_problem=per_problem)[:n_sft]
    # Prompts join the SFT texts so the tokenizer also sees numbers only eval problems use.
    tok_path = train_tokenizer(texts + [prompt_text(p) for p in problems], out / "tokenizer", vocab_size=vocab_size,
                               max_number=max_terms * max_value, extra_symbols=named_symbols(max_value) if long else ())
    paths = task_paths(out)
    _write_jsonl(paths["train"], (p.to_json() for p in train_set))
    _write_jsonl(paths["eval"], (p.to_json() for p in eval_set))
    _write_jsonl(paths["sft"], ({"text": t} for t in texts))

    tok = load_tokenizer(tok_path)
    lengths = sorted(len(tok.encode(t)) for t in texts) or [0]
    meta = dict(seed=seed, n_train=n_train, n_eval=n_eval, n_sft=len(texts), error_rate=error_rate, fix_rate=fix_rate,
                min_terms=min_terms, max_terms=max_terms, max_value=max_value, tree_fraction=tree_fraction, order=order,
                knobs=None if knobs is None else vars(knobs),
                vocab_size=len(tok), sft_tokens_max=lengths[-1], sft_tokens_mean=round(sum(lengths) / len(lengths), 2))
    paths["meta"].write_text(json.dumps(meta, indent=1) + "\n")
    return paths


def add_knob_args(p: argparse.ArgumentParser) -> None:
    """``--lucky``, ``--long``, ``--systematic``: the knobbed task (any of them given selects it)."""
    p.add_argument("--lucky", type=float, help="knobbed task: fraction of slipped traces whose slip the next step "
                   "cancels (right answer, wrong steps)")
    p.add_argument("--long", action="store_true", help="knobbed task: 5-31 addends, one or two per step (2-30 "
                   "steps)")
    p.add_argument("--systematic", type=float, help="knobbed task: fraction of slips that are the dropped carry")


def knobs_from_args(a) -> Knobs | None:
    if a.lucky is None and not a.long and a.systematic is None:
        return None
    return Knobs(lucky=a.lucky or 0.0, long=a.long, systematic=a.systematic or 0.0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-train", type=int, default=2000, help="RL training prompts")
    p.add_argument("--n-eval", type=int, default=200, help="evaluation prompts (disjoint from training)")
    p.add_argument("--n-sft", type=int, default=4000, help="SFT texts (traces of the training problems)")
    p.add_argument("--error-rate", type=float, default=0.3, help="fraction of SFT traces with a slip in one step")
    p.add_argument("--fix-rate", type=float, default=0.0, help="fraction of slips taken back within their step")
    p.add_argument("--min-terms", type=int, default=3)
    p.add_argument("--max-terms", type=int, default=6)
    p.add_argument("--max-value", type=int, default=9, help="addends are in 1..max-value")
    p.add_argument("--tree-fraction", type=float, default=0.0, help="fraction of SFT traces on the tree route")
    p.add_argument("--order", choices=("shuffled", "given"), default="shuffled",
                   help="addends in a random order, or in the statement's order")
    p.add_argument("--vocab-size", type=int, default=None,
                   help=f"upper bound of the tokenizer's vocabulary (default 512; {LONG_VOCAB} with --long)")
    add_knob_args(p)
    a = p.parse_args(argv)

    def body():
        paths = prepare(a.output, a.seed, a.n_train, a.n_eval, a.n_sft, error_rate=a.error_rate,
                        min_terms=a.min_terms, max_terms=a.max_terms, max_value=a.max_value,
                        tree_fraction=a.tree_fraction, fix_rate=a.fix_rate, order=a.order,
                        vocab_size=a.vocab_size, knobs=knobs_from_args(a))
        for name, path in paths.items():
            print(f"{name}: {path}")

    return run_tool(body)


if __name__ == "__main__":
    sys.exit(main())
