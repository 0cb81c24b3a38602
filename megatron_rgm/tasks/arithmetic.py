"""Multi-step addition: the synthetic reasoning task of the tiny preset.

A problem asks for the sum of a few small numbers (``"Add 4, 2, 9 and 7."``).
A trace adds them two at a time, one step per line, each step ending with the
step delimiter ``".\\n\\n"``, then boxes the last result::

    Add 4, 2, 9 and 7.          <- problem (prompt = problem + "\\n<think>\\n")
    <think>
    9 + 4 = 13.

    13 + 2 = 15.

    15 + 7 = 22.

    </think>
    \\boxed{22}

Why this shape: every step is locally checkable (``a + b = c`` is right or not
from its own tokens, so the hidden state before the delimiter can know), and
traces stay short (prompt + response of 6 addends: about 50 tokens with
:func:`train_tokenizer`). An erroneous trace has exactly one step whose result
is off by 1 to 3; later steps add correctly to the wrong value, so the final
answer is wrong by the same amount. Optionally (``fixed``) the slip is taken
back within its step (``8 + 4 = 14, no, 12.``) and the trace stays correct.

Two orders of the addends: ``shuffled`` (random, so correct samples of one
problem are different texts) and ``given`` (the statement's order). The tiny
pipeline uses ``given`` with half the slips taken back, for what was measured
(docs/RESULTS.md): with shuffled orders most wrong answers of a tiny policy
came from losing track of which addends were left, a mistake no step shows;
and only traces that sometimes take a slip back give the model a reason to
represent, at the last token of a step, whether that step was right (it must
predict ``", no, "``), which is the feature the SPRM head reads.

Grade responses with :class:`megatron_rgm.rollout.rewards.ExactVerifier`.
"""

from __future__ import annotations

import io
import random
import re
from dataclasses import dataclass
from math import comb
from pathlib import Path
from typing import Iterable, Sequence

import sentencepiece as spm

from megatron_rgm.config import PROMPT_TEMPLATE, ConfigError

STEP = ".\n\n"
THINK_END = "</think>"
BOX = "\\boxed{"
RETRACT = ", no, "
ROUTES = ("chain", "tree")
ORDERS = ("shuffled", "given")
ERROR_DELTAS = (-3, -2, -1, 1, 2, 3)
# Every fixed piece of the format is one token, so numbers are never merged with
# punctuation and a number has the same token id wherever it appears.
# sentencepiece matches user symbols after turning spaces into "▁".
FORMAT_SYMBOLS = (STEP, "\n", "<think>", THINK_END, BOX, "}", ".", ",▁", "▁and▁", "▁+▁", "▁=▁", "Add▁", ",▁no,▁", "▁")
SP_FILE = "tokenizer.model"
LEARNED_PIECES = 32  # vocabulary kept for pieces sentencepiece learns beside the fixed symbols

_STEP_RE = re.compile(r"(\d+) \+ (\d+) = (?:(\d+), no, )?(\d+)\.\n\n")
# The knobbed task's long traces: a line that names its addends as the statement does, then the running total
# (``b7 + c2 + 8 = 17.``).
_NAMED_STEP_RE = re.compile(r"^((?:[A-Za-z]\d+ \+ )+)(\d+) = (?:(\d+), no, )?(\d+)\.\n\n", re.M)
_NAMED_RE = re.compile(r"([A-Za-z])(\d+)")
_NAMED_STATEMENT_RE = re.compile(r"Add [A-Za-z]\d")


@dataclass
class Problem:
    """One addition problem.

    Attributes:
        id: unique within a :func:`make_problems` call (``"add-{seed}-{index}"``).
        problem: the statement, e.g. ``"Add 4, 2, 9 and 7."``.
        answer: the sum, as a string.
        numbers: the addends, in the order the statement lists them.
    """

    id: str
    problem: str
    answer: str
    numbers: list[int]

    def to_json(self) -> dict:
        """The ``{"id", "problem", "answer"}`` record that benchmark loaders read."""
        return {"id": self.id, "problem": self.problem, "answer": self.answer}


@dataclass(frozen=True)
class Step:
    """One written step ``a + b = result``, or ``a + b = retracted, no, result`` when a slip was caught.

    Attributes:
        a, b: the operands.
        result: the value the step ends with (what later steps use).
        retracted: a wrong first result the step took back, or None.
        more: addends after ``b`` (the knobbed task's long traces add up to two per step).
        letters: the letters naming the addends ``b, *more`` in the statement, or ``()``. A named step writes its
            addends first, each as the statement does (letter and value), then the running total ``a``:
            ``"b7 + c2 + 8 = 17."``.
    """

    a: int
    b: int
    result: int
    retracted: int | None = None
    more: tuple[int, ...] = ()
    letters: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.a + self.b + sum(self.more) == self.result

    def text(self) -> str:
        if self.letters:
            operands = " + ".join([f"{m}{x}" for m, x in zip(self.letters, (self.b, *self.more))] + [str(self.a)])
        else:
            operands = " + ".join(map(str, (self.a, self.b, *self.more)))
        fix = "" if self.retracted is None else f"{self.retracted}{RETRACT}"
        return f"{operands} = {fix}{self.result}{STEP}"


def statement(numbers: Sequence[int]) -> str:
    """``"Add 1, 2 and 3."`` for ``[1, 2, 3]``."""
    return f"Add {', '.join(map(str, numbers[:-1]))} and {numbers[-1]}."


def _capacity(min_terms: int, max_terms: int, max_value: int) -> int:
    """How many distinct multisets of addends the ranges allow."""
    return sum(comb(max_value + k - 1, k) for k in range(min_terms, max_terms + 1))


def check_ranges(min_terms: int, max_terms: int, max_value: int) -> None:
    """Raise ConfigError on impossible problem ranges."""
    if min_terms < 2 or max_terms < min_terms:
        raise ConfigError(f"terms per problem must satisfy 2 <= min_terms <= max_terms, got min_terms={min_terms}, "
                          f"max_terms={max_terms}: raise max_terms or lower min_terms")
    if max_value < 1:
        raise ConfigError(f"max_value must be >= 1, got {max_value}")


def make_problems(n: int, seed: int, *, min_terms: int = 3, max_terms: int = 6, max_value: int = 9,
                  exclude: Iterable[Sequence[int]] = ()) -> list[Problem]:
    """``n`` problems with pairwise different multisets of addends, the same for the same arguments.

    Args:
        n: how many problems.
        seed: random seed; ids are ``add-{seed}-{index}``.
        min_terms, max_terms: the number of addends is uniform in this range.
        max_value: addends are uniform in ``[1, max_value]``.
        exclude: multisets of addends (any order) not to produce, e.g. another split's problems.

    Raises:
        ConfigError: the ranges cannot give ``n`` distinct problems.
    """
    check_ranges(min_terms, max_terms, max_value)
    if n < 0:
        raise ConfigError(f"the number of problems must be >= 0, got {n}")
    seen = {tuple(sorted(x)) for x in exclude}
    room = _capacity(min_terms, max_terms, max_value) - len(seen)
    # Rejection sampling slows down near the capacity; half of it is plenty for this task.
    if n > room // 2:
        raise ConfigError(f"{n} distinct problems asked for, but {min_terms}-{max_terms} addends in 1..{max_value} "
                          f"allow about {max(room // 2, 0)}: raise max_value or max_terms, or ask for fewer")
    rng = random.Random(f"arithmetic-problems-{seed}")
    out: list[Problem] = []
    while len(out) < n:
        numbers = [rng.randint(1, max_value) for _ in range(rng.randint(min_terms, max_terms))]
        key = tuple(sorted(numbers))
        if key in seen:
            continue
        seen.add(key)
        out.append(Problem(f"add-{seed}-{len(out)}", statement(numbers), str(sum(numbers)), numbers))
    return out


def prompt_text(problem: Problem) -> str:
    """What the policy is given: ``problem + "\\n<think>\\n"``."""
    return PROMPT_TEMPLATE.format(problem=problem.problem)


def make_steps(problem: Problem, rng: random.Random, error: bool = False, route: str = "chain",
               fixed: bool = False, order: str = "shuffled") -> list[Step]:
    """The steps of one trace (``len(numbers) - 1`` of them).

    Args:
        problem: the problem.
        rng: source of the random order (and of the error).
        error: make exactly one step's result wrong by 1..3 (a random step); later
            steps add correctly to the wrong value.
        fixed: with ``error``, the step takes the wrong result back at once
            (``7 + 5 = 13, no, 12.``) and the trace stays correct.
        route: ``chain`` adds each next number (in a random order) to the running
            total; ``tree`` adds any two of the numbers and partial sums left.
        order: ``shuffled`` takes the numbers in a random order; ``given`` takes them
            in the order the statement lists them (``chain`` only), so no step has to
            remember which addends are left and every slip is an arithmetic one.
    """
    if route not in ROUTES:
        raise ConfigError(f"unknown route {route!r}: choose one of {', '.join(ROUTES)}")
    if order not in ORDERS:
        raise ConfigError(f"unknown order {order!r}: choose one of {', '.join(ORDERS)}")
    if order == "given" and route != "chain":
        raise ConfigError(f"order 'given' needs route 'chain' (got {route!r}): the tree route picks numbers at random")
    pool = list(problem.numbers)
    if order == "shuffled":
        rng.shuffle(pool)
    else:
        pool.reverse()  # pop() takes from the end: the statement's order
    n_steps = len(pool) - 1
    bad = rng.randrange(n_steps) if error else -1
    steps: list[Step] = []
    for i in range(n_steps):
        if route == "chain":
            a = steps[-1].result if steps else pool.pop()
            b = pool.pop()
        else:
            a = pool.pop(rng.randrange(len(pool)))
            b = pool.pop(rng.randrange(len(pool)))
        result, retracted = a + b, None
        if i == bad:
            slip = result + rng.choice([d for d in ERROR_DELTAS if result + d >= 0])
            result, retracted = (result, slip) if fixed else (slip, None)
        steps.append(Step(a, b, result, retracted))
        if route == "tree":
            pool.append(result)
    return steps


def render(steps: Sequence[Step]) -> str:
    """The response text of ``steps``: the steps, ``</think>``, the boxed last result."""
    return "".join(s.text() for s in steps) + f"{THINK_END}\n{BOX}{steps[-1].result}}}"


def make_trace(problem: Problem, rng: random.Random, error: bool = False, route: str = "chain",
               fixed: bool = False, order: str = "shuffled") -> str:
    """One response (the text after the prompt), correct unless ``error`` and not ``fixed``; see :func:`make_steps`."""
    return render(make_steps(problem, rng, error, route, fixed, order))


def names_addends(problem: str) -> bool:
    """Whether a problem statement names its addends (``"Add a6, b7 and c1."``, the knobbed task's long one)."""
    return _NAMED_STATEMENT_RE.match(problem) is not None


def parse_steps(response: str, named: bool = False) -> list[Step]:
    """The ``a + b = c.\\n\\n`` steps written before ``</think>`` (malformed lines are skipped); with ``named``
    (a statement that :func:`names_addends`), the lines ``b7 + c2 + 8 = 17.\\n\\n`` instead."""
    head = response.split(THINK_END, 1)[0]
    steps = []
    if named:
        for m in _NAMED_STEP_RE.finditer(head):
            names, total, retracted, result = m.groups()
            letters, addends = zip(*((x, int(v)) for x, v in _NAMED_RE.findall(names)))
            steps.append(Step(int(total), addends[0], int(result), None if retracted is None else int(retracted),
                              addends[1:], letters))
        return steps
    for m in _STEP_RE.finditer(head):
        a, b, retracted, result = m.groups()
        steps.append(Step(int(a), int(b), int(result), None if retracted is None else int(retracted)))
    return steps


def check_sft_args(traces_per_problem: int, **fractions: float) -> None:
    """Raise ConfigError unless ``traces_per_problem >= 1`` and every named fraction is in [0, 1]."""
    for name, v in fractions.items():
        if not 0.0 <= v <= 1.0:
            raise ConfigError(f"{name} must be in [0, 1], got {v}")
    if traces_per_problem < 1:
        raise ConfigError(f"traces_per_problem must be >= 1, got {traces_per_problem}")


def sft_texts(problems: Sequence[Problem], seed: int, *, error_rate: float = 0.3, traces_per_problem: int = 4,
              tree_fraction: float = 0.0, fix_rate: float = 0.0, order: str = "shuffled") -> list[str]:
    """Full texts (prompt + response) for the warm-start SFT, shuffled.

    Args:
        problems: the problems to write traces for.
        seed: random seed.
        error_rate: fraction of traces (rounded) with a slip: one step's result off by 1..3.
        traces_per_problem: traces per problem, each in its own random order.
        tree_fraction: fraction of traces on the ``tree`` route (the rest ``chain``).
        fix_rate: fraction of the slips (rounded) taken back within their step
            (``7 + 5 = 13, no, 12.``); the others propagate to a wrong answer, so
            ``error_rate * (1 - fix_rate)`` of the traces end wrong.
        order: ``shuffled`` or ``given`` (see :func:`make_steps`; ``given`` needs ``tree_fraction=0``).

    Returns:
        ``len(problems) * traces_per_problem`` strings ``prompt_text(p) + response``.
    """
    check_sft_args(traces_per_problem, error_rate=error_rate, tree_fraction=tree_fraction, fix_rate=fix_rate)
    if order == "given" and tree_fraction > 0:
        raise ConfigError(f"order 'given' cannot be combined with tree_fraction={tree_fraction}: the tree route "
                          "picks numbers at random; pass tree_fraction=0 or order 'shuffled'")
    rng = random.Random(f"arithmetic-sft-{seed}")
    jobs = [p for p in problems for _ in range(traces_per_problem)]
    slips = rng.sample(range(len(jobs)), round(error_rate * len(jobs)))
    fixed, slipped = set(slips[:round(fix_rate * len(slips))]), set(slips)
    texts = [prompt_text(p) + make_trace(p, rng, i in slipped, "tree" if rng.random() < tree_fraction else "chain",
                                         i in fixed, order)
             for i, p in enumerate(jobs)]
    rng.shuffle(texts)
    return texts


def train_tokenizer(texts: Iterable[str], out_dir: str | Path, vocab_size: int = 512,
                    max_number: int | None = 100, model_type: str = "bpe", extra_symbols: Sequence[str] = ()) -> Path:
    """Train a sentencepiece tokenizer on task texts, in-process and deterministically.

    The format pieces (:data:`FORMAT_SYMBOLS`: the step delimiter ``".\\n\\n"``,
    ``<think>``, ``</think>``, ``\\boxed{``, ...) and the numbers ``0..max_number``
    are single tokens; text is not normalised and unknown characters fall back
    to bytes, so ``decode(encode(x)) == x`` for any text without ``"▁"`` (which
    sentencepiece reads as a space).

    Args:
        texts: training texts (e.g. :func:`sft_texts`).
        out_dir: where ``tokenizer.model`` is written (created if needed).
        vocab_size: upper bound of the vocabulary (the model's embedding rows).
        max_number: the numbers ``0..max_number`` are made single tokens, as many as
            ``vocab_size`` leaves room for beside :data:`LEARNED_PIECES` learned pieces
            (None: none; the trainer learns pieces of the numbers it sees).
        model_type: ``bpe`` or ``unigram``.
        extra_symbols: more pieces to keep whole, after the format symbols (the knobbed task's named addends).

    Returns:
        The path of ``tokenizer.model`` (load it with :func:`megatron_rgm.tokenizer.load_tokenizer`).

    Raises:
        ConfigError: ``vocab_size`` cannot hold the bytes and the fixed symbols.
    """
    fixed = list(FORMAT_SYMBOLS) + list(extra_symbols)
    base = 4 + 256 + len(fixed)  # unk/bos/eos/pad, byte fallback, format symbols
    if vocab_size < base + LEARNED_PIECES:
        extra = f", {len(extra_symbols)} task symbols" if extra_symbols else ""
        raise ConfigError(f"vocab_size {vocab_size} cannot hold the 256 byte pieces, 4 special and "
                          f"{len(FORMAT_SYMBOLS)} format symbols{extra} plus {LEARNED_PIECES} learned pieces: use "
                          f"vocab_size >= {base + LEARNED_PIECES} (more keeps more numbers whole)")
    n_numbers = 0 if max_number is None else min(max_number + 1, vocab_size - base - LEARNED_PIECES)
    symbols = fixed + [str(i) for i in range(n_numbers)]
    buf = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(list(texts)), model_writer=buf, model_type=model_type, vocab_size=vocab_size,
            hard_vocab_limit=False,  # a small task cannot fill 512 pieces: vocab_size is an upper bound
            user_defined_symbols=symbols, normalization_rule_name="identity", remove_extra_whitespaces=False,
            add_dummy_prefix=False, byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=3,
            num_threads=1, shuffle_input_sentence=False, input_sentence_size=0, max_sentence_length=1 << 16,
            minloglevel=2)
    except RuntimeError as e:
        raise ConfigError(f"sentencepiece could not train on these texts with vocab_size={vocab_size} "
                          f"({str(e).splitlines()[-1]}): pass other texts or another vocab_size") from None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / SP_FILE
    path.write_bytes(buf.getvalue())
    return path
