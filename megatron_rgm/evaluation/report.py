"""Samples jsonl -> metrics: grading, answer clustering, step-score aggregation, table, JSON and plot.

Samples (one line per problem)::

    {"id": str, "answer": str, "responses": [str, ...], "step_scores": [[float, ...], ...],
     "tokens": [int, ...], "stopped": [bool, ...]}

``step_scores`` (probabilities, one list per response) is optional; without
it only pass@k, maj@k and oracle@k are reported. ``tokens`` (decode tokens
each response cost) adds the ``tokens@k`` row; ``stopped`` (responses a
Best-of-N early-stopping rule ended) keeps those out of BoN's picks.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Sequence

import torch

from megatron_rgm import lazy, ops
from megatron_rgm.config import AGGREGATIONS, ConfigError
from megatron_rgm.data.benchmarks import read_jsonl
from megatron_rgm.evaluation.metrics import Problem, evaluate
from megatron_rgm.rollout.rewards import CORRECT, make_verifier


def aggregate_scores(step_scores: Sequence[Sequence[float]]) -> dict[str, list[float]]:
    """Per-response aggregates of step probabilities for every aggregation."""
    flat = torch.tensor([s for steps in step_scores for s in steps], dtype=torch.float32)
    cu = torch.zeros(len(step_scores) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor([len(s) for s in step_scores]).cumsum(0)
    return {mode: ops.segment_aggregate(flat, cu, mode, from_probs=True).tolist() for mode in AGGREGATIONS}


def load_problems(path: str | Path, verifier: str = "math") -> tuple[list[Problem], Callable[[str, str], bool]]:
    """Problems from a samples jsonl, each response graded against the gold answer."""
    grade = make_verifier(verifier)
    problems = []
    for n, row in enumerate(read_jsonl(path), 1):
        for key in ("id", "answer", "responses"):
            if key not in row:
                raise ConfigError(f"{path}: record {n} has no field {key!r}: each line needs id, answer, responses")
        responses = row["responses"]
        if not isinstance(responses, list) or not all(isinstance(r, str) for r in responses):
            raise ConfigError(f"{path}: record {n} ({row['id']}): 'responses' must be a list of strings")
        scores = {}
        if row.get("step_scores") is not None:
            steps = row["step_scores"]
            if not isinstance(steps, list) or len(steps) != len(responses):
                count = len(steps) if isinstance(steps, list) else 0
                raise ConfigError(f"{path}: record {n} ({row['id']}) has {count} step-score lists for "
                                  f"{len(responses)} responses: give one list per response")
            if not all(isinstance(s, list) and all(isinstance(p, (int, float)) and 0 <= p <= 1 for p in s)
                       for s in steps):
                raise ConfigError(f"{path}: record {n} ({row['id']}): step_scores must be lists of probabilities in "
                                  "[0, 1] (apply a sigmoid to head logits)")
            scores = aggregate_scores(steps)
        per_response = {}
        for key, kind in (("tokens", int), ("stopped", bool)):
            values = row.get(key)
            if values is None:
                continue
            if not isinstance(values, list) or len(values) != len(responses) or \
                    not all(isinstance(v, kind) and (kind is bool or v >= 0) for v in values):
                raise ConfigError(f"{path}: record {n} ({row['id']}): {key!r} must be one "
                                  f"{'non-negative integer' if kind is int else 'boolean'} per response")
            per_response[key] = values
        grades = [grade(r, str(row["answer"])) for r in responses]
        problems.append(Problem(str(row["id"]), [g.outcome == CORRECT for g in grades],
                                [g.answer for g in grades], scores, **per_response))

    def same(a: str, b: str) -> bool:
        return grade(f"\\boxed{{{a}}}", b).outcome == CORRECT

    return problems, same


def markdown_table(metrics: dict[str, float], ks: Sequence[int]) -> str:
    rows = ["pass@k", "oracle@k", "maj@k", "wmaj@k"] + [f"bon@k/{a}" for a in AGGREGATIONS]
    head = "| method | " + " | ".join(f"k={k}" for k in ks) + " |\n|---|" + "---:|" * len(ks) + "\n"
    lines = ["| pass@1 | " + " | ".join(f"{100 * metrics['pass@1']:.1f}" for _ in ks) + " |"]
    for r in rows:
        vals = [metrics.get(r.replace("@k", f"@{k}")) for k in ks]
        if all(v is None for v in vals):
            continue
        lines.append(f"| {r} | " + " | ".join("-" if v is None else f"{100 * v:.1f}" for v in vals) + " |")
    tokens = [metrics.get(f"tokens@{k}") for k in ks]
    if any(v is not None for v in tokens):  # decode tokens a group of k spent (a count, not a percentage)
        lines.append("| tokens@k | " + " | ".join("-" if v is None else f"{v:.0f}" for v in tokens) + " |")
    return head + "\n".join(lines) + "\n"


def plot(metrics: dict[str, float], ks: Sequence[int], path: str | Path) -> None:
    plt = lazy.pyplot("the accuracy-vs-k plot")
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in ["pass@k", "oracle@k", "maj@k", "wmaj@k"] + [f"bon@k/{a}" for a in AGGREGATIONS]:
        ys = [metrics.get(name.replace("@k", f"@{k}")) for k in ks]
        if any(y is None for y in ys):
            continue
        ax.plot(ks, [100 * y for y in ys], marker="o", label=name)
    ax.axhline(100 * metrics["pass@1"], color="grey", linestyle="--", label="pass@1")
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(ks), [str(k) for k in ks])
    ax.set_xlabel("k (samples per problem)")
    ax.set_ylabel("accuracy (%)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(samples: str | Path, ks: Sequence[int], json_out: str | None = None, table_out: str | None = None,
        plot_out: str | None = None, verifier: str = "math") -> dict[str, float]:
    for flag, out in (("--json", json_out), ("--table", table_out), ("--plot", plot_out)):
        if out and not Path(out).parent.is_dir():
            raise ConfigError(f"{flag} {out}: directory {Path(out).parent} does not exist: create it first")
    problems, same = load_problems(samples, verifier)
    metrics = evaluate(problems, ks, same)
    table = markdown_table(metrics, ks)
    if json_out:
        Path(json_out).write_text(json.dumps(metrics, indent=2, sort_keys=True))
    if table_out:
        Path(table_out).write_text(table)
    if plot_out:
        plot(metrics, ks, plot_out)
    print(table, end="")
    return metrics
