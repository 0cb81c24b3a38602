"""Per-problem metrics over n sampled responses, averaged over problems.

* ``pass@1``: mean correctness of the samples;
* ``pass@k``: the unbiased estimator ``1 - C(n-c, k) / C(n, k)``;
* ``maj@k``, ``wmaj@k`` (score-weighted majority), ``bon@k/<aggregation>`` and
  ``oracle@k`` follow the reference protocol: the samples are split into
  disjoint groups of k (in order; a remainder smaller than k is dropped),
  each group picks one response, and correctness is averaged over groups.

Majority voting groups answers by equivalence (math-verify by default); ties
go to the answer seen first. Best-of-N keeps the highest aggregated step
score among the samples an early-stopping rule did not end; ties go to the
first sample. ``tokens@k`` (when the samples record their tokens) is the
decode tokens a group of k spent, averaged like the rest.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import comb
from typing import Callable, Sequence

from megatron_rgm.config import ConfigError


@dataclass
class Problem:
    """One problem's samples.

    Attributes:
        id: problem id.
        correct: per-sample correctness.
        answers: per-sample extracted final answers (None: no answer).
        scores: per-sample aggregated step scores, by aggregation name.
        tokens: per-sample decode tokens spent (None: not recorded).
        stopped: per-sample, ended early by a Best-of-N stopping rule (never picked; None: no rule ran).
    """

    id: str
    correct: list[bool]
    answers: list[str | None]
    scores: dict[str, list[float]]
    tokens: list[int] | None = None
    stopped: list[bool] | None = None


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for n samples with c correct."""
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def pairwise_accuracy(scores: Sequence[float], correct: Sequence[bool], groups: Sequence) -> tuple[float, int]:
    """Within-group ranking of correct above incorrect samples.

    Returns ``(fraction of (correct, incorrect) pairs of one group whose scores are ordered right, ties
    counting half; number of such pairs)``; the fraction is nan when no group holds both.
    """
    members: dict = {}
    for score, ok, g in zip(scores, correct, groups, strict=True):
        members.setdefault(g, ([], []))[0 if ok else 1].append(float(score))
    hits, pairs = 0.0, 0
    for good, bad in members.values():
        hits += sum((a > b) + 0.5 * (a == b) for a in good for b in bad)
        pairs += len(good) * len(bad)
    return (hits / pairs if pairs else float("nan")), pairs


def k_groups(n: int, k: int, pid: str) -> list[range]:
    """A problem's ``n`` samples taken ``k`` at a time, in order (the rest left out): what @k metrics average over."""
    if k < 1:
        raise ConfigError(f"--k must be >= 1 (samples per group), got {k}")
    if n < k:
        raise ConfigError(f"problem {pid} has {n} samples, fewer than k={k}: sample at least k per problem "
                          "or drop that k")
    return [range(i, i + k) for i in range(0, n - k + 1, k)]


def bon_pick(group: Sequence[int], scores: Sequence[float], stopped: Sequence[bool]) -> int:
    """Best-of-N's sample in ``group``: a stopped one last, then the highest score, then the first."""
    return max(group, key=lambda i: (not stopped[i], scores[i], -i))


def cluster(answers: Sequence[str | None], same: Callable[[str, str], bool]) -> list[int]:
    """Cluster id per answer (None answers get their own, never-winning cluster -1)."""
    reps: list[str] = []
    ids = []
    for a in answers:
        if a is None:
            ids.append(-1)
            continue
        for j, r in enumerate(reps):
            if a == r or same(a, r):
                ids.append(j)
                break
        else:
            reps.append(a)
            ids.append(len(reps) - 1)
    return ids


def _vote(members: Sequence[int], clusters: Sequence[int], weights: Sequence[float]) -> int | None:
    """The member index whose cluster has the largest total weight (first seen wins ties)."""
    totals: dict[int, float] = {}
    first: dict[int, int] = {}
    for i in members:
        c = clusters[i]
        if c < 0:
            continue
        totals[c] = totals.get(c, 0.0) + weights[i]
        first.setdefault(c, i)
    if not totals:
        return None
    best = max(totals, key=lambda c: (totals[c], -first[c]))
    return first[best]


def problem_metrics(p: Problem, ks: Sequence[int], clusters: Sequence[int]) -> dict[str, float]:
    n, c = len(p.correct), sum(p.correct)
    out = {"pass@1": c / n if n else 0.0}
    for k in ks:
        groups = k_groups(n, k, p.id)
        out[f"pass@{k}"] = pass_at_k(n, c, k)
        out[f"oracle@{k}"] = sum(any(p.correct[i] for i in g) for g in groups) / len(groups)
        ones = [1.0] * n
        maj = [_vote(g, clusters, ones) for g in groups]
        out[f"maj@{k}"] = sum(p.correct[i] if i is not None else False for i in maj) / len(groups)
        if p.tokens is not None:
            out[f"tokens@{k}"] = sum(sum(p.tokens[i] for i in g) for g in groups) / len(groups)
        stopped = p.stopped or [False] * n
        for agg, scores in p.scores.items():
            best = [bon_pick(g, scores, stopped) for g in groups]
            out[f"bon@{k}/{agg}"] = sum(p.correct[i] for i in best) / len(groups)
            if agg == "geometric":
                wmaj = [_vote(g, clusters, scores) for g in groups]
                out[f"wmaj@{k}"] = sum(p.correct[i] if i is not None else False for i in wmaj) / len(groups)
    return out


def evaluate(problems: Sequence[Problem], ks: Sequence[int], same: Callable[[str, str], bool] | None = None
             ) -> dict[str, float]:
    """Every metric, averaged over problems (fractions in [0, 1])."""
    if not problems:
        raise ConfigError("no problems to evaluate")
    same = same or (lambda a, b: False)
    totals: dict[str, float] = {}
    for p in problems:
        for key, value in problem_metrics(p, ks, cluster(p.answers, same)).items():
            totals[key] = totals.get(key, 0.0) + value
    return {key: value / len(problems) for key, value in totals.items()}
