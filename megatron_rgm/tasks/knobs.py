"""The addition task with three knobs, each where one of the method's claims is supposed to show.

The plain task (:mod:`megatron_rgm.tasks.arithmetic`) gives SPR little to do: a slip always reaches the
answer, so outcome labels are nearly clean step labels; traces are 2-5 steps, too short for a length bias;
and slips of +-1..3 scatter the wrong answers, so majority voting is hard to beat. Here:

* ``lucky``: the fraction of slipped traces whose next step slips back by the opposite amount (it writes the true
  running total instead of the written one plus the addend). The answer comes out right from two wrong steps:
  an outcome label of 1 on wrong steps, the noise SPR's mask is meant to filter. The second slip is the next
  step's, not a random later one's, so a policy can learn it (it keeps the true total anyway): with a random
  later step, a warm-started policy wrote a lucky trajectory in only 6.4% of its correct samples
  (docs/RESULTS.md).
* ``long``: 5-31 addends, and a trace adds one or two of them per step (its choice, for the whole trace), so
  trajectories are 2-30 steps long and the candidates of one problem differ in length by up to 2x, as the paper's
  do. Without that, every candidate of a problem would have the same number of steps, the product of the step
  scores would rank them exactly as their geometric mean does, and no length bias could show. Each addend is
  named by a letter in the statement, letter and value in one token (``Add a6, b7 and c1.``), and a step writes
  the addends it adds as the statement does, then the running total (``b7 + c1 + 6 = 14.``). Copying the next
  addend is then one lookup by letter, the letter being the one after the previous step's. It is still slow to
  learn: after 2000 SFT iterations the tiny policy copies 58% of the addends right; without letters, 13% after
  600 iterations, chance among 1..9 (docs/RESULTS.md).
* ``systematic``: the fraction of slips that are one common mistake, the dropped carry (``7 + 5 = 2``: the
  first step whose units carry loses its ten). Wrong answers then agree (the answer minus 10), and a majority
  vote can be fooled by them.

The addends are always taken in the statement's order (``given``), so the true running total after every step
is known, and :func:`step_truth` labels any written trace, the generator's or a policy's, exactly:
``local_ok`` (the step's own arithmetic is right) and ``on_track`` (its result is the true running total).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

from megatron_rgm.config import ConfigError
from megatron_rgm.tasks.arithmetic import (
    ERROR_DELTAS,
    Problem,
    Step,
    check_sft_args,
    make_problems,
    names_addends,
    parse_steps,
    prompt_text,
    render,
)

LONG_TERMS = (5, 31)  # addends with ``long``: 2-30 steps
SHORT_TERMS = (3, 6)
LONG_GROUPS = (1, 2)  # addends a long trace adds per step
LETTERS = "abcdefghijklmnopqrstuvwxyzABCDE"  # one per addend of a long problem
LONG_RESPONSE = 188  # tokens a long trace may need: 30 steps of 6, a taken-back slip's 3 and the answer's 5
LONG_VOCAB = 1024  # the named addends (31 letters x 9 values) and every sum up to 279 as one token each


def named_symbols(max_value: int) -> tuple[str, ...]:
    """The tokenizer pieces of the long task's named addends, ``"a1" .. "E{max_value}"``, each one token."""
    return tuple(f"{m}{x}" for m in LETTERS for x in range(1, max_value + 1))


@dataclass(frozen=True)
class Knobs:
    """The three knobs (see the module docstring); all off is the plain task in the given order."""

    lucky: float = 0.0
    long: bool = False
    systematic: float = 0.0

    def __post_init__(self) -> None:
        for name in ("lucky", "systematic"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"the {name} knob is a fraction of the slipped traces: it must be in [0, 1], "
                                  f"got {value}")

    @property
    def terms(self) -> tuple[int, int]:
        return LONG_TERMS if self.long else SHORT_TERMS


@dataclass(frozen=True)
class StepLabel:
    """The truth about one written step.

    Attributes:
        local_ok: ``a + b (+ more) == result``, the step's own arithmetic.
        on_track: ``result`` is the true running total of the addends so far (the statement's order).
    """

    local_ok: bool
    on_track: bool


def marked_statement(numbers: Sequence[int]) -> str:
    """``"Add a1, b2 and c3."`` for ``[1, 2, 3]``: the long task's statement, a letter per addend."""
    if len(numbers) > len(LETTERS):
        raise ConfigError(f"{len(numbers)} addends, but the long task has {len(LETTERS)} letters to name them: "
                          f"ask for at most {len(LETTERS)}")
    named = [f"{m}{x}" for m, x in zip(LETTERS, numbers)]
    return f"Add {', '.join(named[:-1])} and {named[-1]}."


def knob_problems(n: int, seed: int, knobs: Knobs, max_value: int = 9,
                  exclude: Sequence[Sequence[int]] = ()) -> list[Problem]:
    """``n`` distinct problems with as many addends as ``knobs`` asks for (:func:`make_problems`); with
    ``knobs.long`` their statements name each addend by a letter (:func:`marked_statement`)."""
    low, high = knobs.terms
    problems = make_problems(n, seed, min_terms=low, max_terms=high, max_value=max_value, exclude=exclude)
    if knobs.long:
        problems = [Problem(p.id, marked_statement(p.numbers), p.answer, p.numbers) for p in problems]
    return problems


def _carries(total: int, group: Sequence[int]) -> bool:
    """Whether adding ``group`` to ``total`` carries out of the units."""
    return total % 10 + sum(x % 10 for x in group) >= 10


def knob_steps(problem: Problem, rng: random.Random, knobs: Knobs, error: bool = False,
               fixed: bool = False) -> list[Step]:
    """The steps of one trace, in the statement's order; with ``error`` a slip as the knobs draw it.

    With ``knobs.long`` the trace adds one or two addends per step (drawn once for the trace), each named by its
    letter. A slip is the dropped carry with probability
    ``knobs.systematic`` (where some step carries; otherwise, and for the other slips, a result off by 1..3 at a
    random step). With probability ``knobs.lucky`` the next step (where there is one) slips back by the opposite
    amount: its result and the final answer are the true totals. ``fixed``: the slip is taken back within its
    step instead (``7 + 5 = 2, no, 12.``), and the trace stays right.
    """
    numbers = problem.numbers
    per_step = rng.choice(LONG_GROUPS) if knobs.long else 1
    starts = list(range(1, len(numbers), per_step))  # index of each step's first addend
    groups = [numbers[i:i + per_step] for i in starts]
    n_steps = len(groups)
    offsets = [0] * n_steps  # what each step's written result adds to its true result
    retracted: dict[int, int] = {}  # a slip taken back within its step
    if error:
        truth = [sum(numbers[:i + len(g)]) for i, g in zip(starts, groups)]
        carries = [i for i in range(n_steps) if _carries(truth[i] - sum(groups[i]), groups[i])]
        if carries and rng.random() < knobs.systematic:
            bad, delta = carries[0], -10
        else:
            bad = rng.randrange(n_steps)
            delta = rng.choice([d for d in ERROR_DELTAS if truth[bad] + d >= 0])
        if fixed:
            retracted[bad] = truth[bad] + delta
        else:
            offsets[bad] = delta
            if bad < n_steps - 1 and rng.random() < knobs.lucky:
                offsets[bad + 1] -= delta
    steps, total = [], numbers[0]
    for i, (start, group) in enumerate(zip(starts, groups)):
        a = total
        total = a + sum(group) + offsets[i]
        steps.append(Step(a, group[0], total, retracted.get(i), tuple(group[1:]),
                          tuple(LETTERS[start:start + len(group)]) if knobs.long else ()))
    return steps


def step_truth(problem: Problem, steps: Sequence[Step]) -> list[StepLabel]:
    """Each step's :class:`StepLabel`: a step that adds ``n`` operands after the running total is on track when
    its result is the true total of the addends so far, counted by operands (a step beyond them never is)."""
    out, used = [], 1
    for s in steps:
        used += 1 + len(s.more)
        on_track = used <= len(problem.numbers) and s.result == sum(problem.numbers[:used])
        out.append(StepLabel(local_ok=s.ok, on_track=on_track))
    return out


def first_error(labels: Sequence[StepLabel]) -> int:
    """Index of the first step whose own arithmetic is wrong (ProcessBench's label), -1 if none is."""
    return next((i for i, label in enumerate(labels) if not label.local_ok), -1)


def label_response(problem: Problem, response: str) -> tuple[list[StepLabel], bool]:
    """The step labels of a written response and whether its boxed answer is right."""
    steps = parse_steps(response, names_addends(problem.problem))
    boxed = response.rsplit("\\boxed{", 1)
    answer = boxed[1].split("}", 1)[0].strip() if len(boxed) == 2 else None
    return step_truth(problem, steps), answer == problem.answer


def knob_sft_texts(problems: Sequence[Problem], seed: int, knobs: Knobs, *, error_rate: float = 0.3,
                   fix_rate: float = 0.0, traces_per_problem: int = 4) -> list[str]:
    """Warm-start texts (prompt + response), shuffled: ``error_rate`` of the traces (rounded) slip as
    :func:`knob_steps` draws it, ``fix_rate`` of those slips (rounded) taken back within their step (what gives a
    policy a reason to represent, at a step's end, whether the step was right)."""
    check_sft_args(traces_per_problem, error_rate=error_rate, fix_rate=fix_rate)
    rng = random.Random(f"knobs-sft-{seed}")
    jobs = [p for p in problems for _ in range(traces_per_problem)]
    slips = rng.sample(range(len(jobs)), round(error_rate * len(jobs)))
    fixed, slipped = set(slips[:round(fix_rate * len(slips))]), set(slips)
    texts = [prompt_text(p) + render(knob_steps(p, rng, knobs, i in slipped, i in fixed)) for i, p in enumerate(jobs)]
    rng.shuffle(texts)
    return texts
