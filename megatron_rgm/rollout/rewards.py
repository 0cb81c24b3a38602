"""Final-answer rewards: the last ``\\boxed{...}`` of a response, graded against the gold answer.

Outcomes are ``correct``, ``wrong`` and ``format_error`` (no ``\\boxed{}`` at
all), kept apart so training logs can count format failures. Math answers
are graded with math-verify; the synthetic task's exact verifier has the same
interface. math-verify bounds its work with SIGALRM, which only the main
thread may use: elsewhere (worker threads, e.g. a data loader) grading runs
without that timeout.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Protocol

from megatron_rgm import lazy
from megatron_rgm.config import ConfigError

CORRECT, WRONG, FORMAT_ERROR = "correct", "wrong", "format_error"


@dataclass(frozen=True)
class Grade:
    outcome: str  # correct | wrong | format_error
    answer: str | None  # the extracted final answer

    @property
    def reward(self) -> float:
        return 1.0 if self.outcome == CORRECT else 0.0


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), braces matched; None if there is none."""
    best = None
    for marker in ("\\boxed{", "\\fbox{"):
        i = text.rfind(marker)
        if i >= 0 and (best is None or i > best[0]):
            best = (i, marker)
    if best is None:
        return None
    start = best[0] + len(best[1])
    depth = 1
    for j in range(start, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[start:j].strip()
    return None  # unbalanced: the answer was cut off


class Verifier(Protocol):
    def __call__(self, response: str, gold: str) -> Grade: ...


class MathVerifier:
    """math-verify grading of the last boxed answer against a gold answer (LaTeX or plain).

    Args:
        timeout_seconds: per parse / verify call, main thread only.
    """

    def __init__(self, timeout_seconds: int = 5):
        self.timeout = timeout_seconds

    def _timeout(self):
        return self.timeout if threading.current_thread() is threading.main_thread() else None

    def __call__(self, response: str, gold: str) -> Grade:
        math_verify = lazy.load("math_verify", "--verifier math")
        answer = last_boxed(response)
        if answer is None:
            return Grade(FORMAT_ERROR, None)
        t = self._timeout()
        try:
            gold_parsed = math_verify.parse(f"\\boxed{{{gold}}}", parsing_timeout=t)
            pred_parsed = math_verify.parse(f"\\boxed{{{answer}}}", parsing_timeout=t)
            ok = bool(gold_parsed) and bool(pred_parsed) and math_verify.verify(gold_parsed, pred_parsed, timeout_seconds=t)
        except Exception:  # math-verify raises on pathological inputs and on timeouts: a wrong answer
            ok = False
        return Grade(CORRECT if ok else WRONG, answer)


class ExactVerifier:
    """Exact comparison after stripping spaces (and a trailing ``.``): the synthetic task's verifier."""

    def __call__(self, response: str, gold: str) -> Grade:
        answer = last_boxed(response)
        if answer is None:
            return Grade(FORMAT_ERROR, None)
        norm = lambda s: s.replace(" ", "").rstrip(".")  # noqa: E731
        return Grade(CORRECT if norm(answer) == norm(str(gold)) else WRONG, answer)


VERIFIERS = {"math": MathVerifier, "exact": ExactVerifier}


def make_verifier(name: str) -> Verifier:
    """The verifier ``--verifier NAME`` selects."""
    if name not in VERIFIERS:
        raise ConfigError(f"--verifier {name!r} is not one of {', '.join(VERIFIERS)}")
    return VERIFIERS[name]()
