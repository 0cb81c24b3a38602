"""One table of several tiny-task runs (seeds of one setting), with their mean: what docs/RESULTS.md reports.

    python -m megatron_rgm.tasks.summary RUN [RUN ...] [--k 8] [--json OUT.json]

Reads each run directory's ``eval.json`` (tools/evaluate.py's metrics) and ``scorer.json``
(:mod:`megatron_rgm.tasks.probe`): accuracy by method at k, the head's step AUC, first-error F1, pairwise
accuracy and margin, how far wrong answers agree (the share of a problem's wrong candidates that give its most
common wrong answer), and the lucky shares (of the evaluation candidates and of the training rollouts) with the
share of their wrong steps that SPR's mask leaves out; then the head's mean score of right and wrong steps in correct
and incorrect candidates. Accuracies are in %, the mean row is over the runs given.

``--lengths`` adds a third table from each run's ``samples.jsonl``, the one the long knob is judged by: how long
the correct and the incorrect candidates are (in steps, the head's scores per candidate), how often a problem's
candidates differ in length, and for each aggregation the length of its picks and how often it picks the
problem's shortest candidate.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from megatron_rgm.config import ConfigError, run_tool
from megatron_rgm.data.benchmarks import read_jsonl
from megatron_rgm.evaluation.metrics import bon_pick, k_groups
from megatron_rgm.evaluation.report import aggregate_scores

AGGREGATIONS = ("geometric", "arithmetic", "product")
KINDS = ("right step, correct", "right step, incorrect", "wrong step, correct", "wrong step, incorrect")


def columns(k: int) -> list[tuple[str, str, str]]:
    """(header, source file, key) of each column; ``%`` keys are shown in percent."""
    acc = [("pass@1", "eval", "pass@1"), (f"maj@{k}", "eval", f"maj@{k}"), (f"wmaj@{k}", "eval", f"wmaj@{k}")]
    acc += [(f"BoN@{k} {a[:5]}", "eval", f"bon@{k}/{a}") for a in AGGREGATIONS]
    acc += [(f"oracle@{k}", "eval", f"oracle@{k}"), ("wrong answers agreeing %", "scorer", "wrong_agreement")]
    head = [("step AUC", "sprm", "step_auc"), ("first-error F1", "sprm", "first_error_f1"),
            ("pairwise", "sprm", "pairwise"), ("margin", "sprm", "margin"), ("lucky %", "sprm", "lucky"),
            ("lucky masked %", "sprm", "lucky_masked"), ("rollouts lucky %", "rollouts", "lucky"),
            ("rollouts masked %", "rollouts", "lucky_masked")]
    return acc + head


def kind_columns() -> list[tuple[str, str, str]]:
    """The head's mean score of right and wrong steps in correct and incorrect candidates."""
    return [(kind, "kinds", kind) for kind in KINDS]


def run_row(run: str | Path, k: int) -> dict[str, float]:
    """A run's values by column header (nan where the run has no such value)."""
    run = Path(run)
    files = {}
    for name, fix in (("eval.json", "python tools/evaluate.py RUN/samples.jsonl --k 1 2 8 --json RUN/eval.json"),
                      ("scorer.json", "python -m megatron_rgm.tasks.probe RUN")):
        if not (run / name).is_file():
            raise ConfigError(f"{run / name} does not exist: pass the output directory of a finished tiny run "
                              "(python -m megatron_rgm.tasks.pipeline)")
        try:
            files[name] = json.loads((run / name).read_text())
        except ValueError as e:
            raise ConfigError(f"{run / name} is not readable JSON ({e}): write it again with {fix}") from None
    scorer = files["scorer.json"]
    if not isinstance(scorer, dict) or "sprm" not in scorer:
        raise ConfigError(f"{run / 'scorer.json'} has no 'sprm' metrics: write it again with "
                          "python -m megatron_rgm.tasks.probe RUN")
    sources = {"eval": files["eval.json"], "scorer": scorer, "sprm": scorer["sprm"],
               "rollouts": scorer.get("rollouts", {}).get("total", {}), "kinds": scorer["sprm"].get("mean_score", {})}
    if f"maj@{k}" not in sources["eval"]:
        raise ConfigError(f"{run / 'eval.json'} has no maj@{k}: pass a --k the run evaluated "
                          f"({', '.join(key[4:] for key in sources['eval'] if key.startswith('maj@'))})")
    return {h: float(sources[src].get(key, math.nan)) for h, src, key in columns(k) + kind_columns()}


def _mean(values: list[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else math.nan


def table(runs: list[str | Path], k: int = 8) -> tuple[str, dict[str, dict[str, float]]]:
    """The markdown table (a row per run, then their mean) and the values by run name and ``"mean"``."""
    names = [Path(r).name for r in runs]
    for name in names:
        if name == "mean" or names.count(name) > 1:
            raise ConfigError(f"run directory name {name!r} is {'the mean row' if name == 'mean' else 'given twice'}:"
                              " rows are named by directory, so give each run its own name (runs/lucky-s0, ...)")
    rows = {name: run_row(r, k) for name, r in zip(names, runs)}
    parts = [[h for h, _, _ in columns(k)], [h for h, _, _ in kind_columns()]]
    rows["mean"] = {h: _mean([r[h] for r in rows.values()]) for part in parts for h in part}

    def cell(h: str, v: float) -> str:
        if math.isnan(v):
            return ""
        if h == "margin":
            return f"{v:+.3f}"
        return f"{100 * v:.1f}" if h.endswith("%") or "@" in h else f"{v:.3f}"

    tables = []
    for part in parts:  # the accuracies and the head's metrics; then its mean score by kind of step
        lines = ["| run | " + " | ".join(part) + " |", "|---|" + "---:|" * len(part)]
        for name, r in rows.items():
            label = f"**{name}**" if name == "mean" else name
            lines.append(f"| {label} | " + " | ".join(cell(h, r[h]) for h in part) + " |")
        tables.append("\n".join(lines))
    return "\n\n".join(tables), rows


def length_row(run: str | Path, k: int) -> dict[str, float]:
    """The length table's values of one run. Candidates are taken ``k`` at a time, in order, and each aggregation
    picks in each group as ``tools/evaluate.py`` does (a stopped candidate last, then the highest score, then the
    first); a candidate without steps scores 0. Shares are per group, averaged over each problem, then over the
    problems; the candidates' lengths are over all of them."""
    path = Path(run) / "samples.jsonl"
    if not path.is_file():
        raise ConfigError(f"{path} does not exist: pass the output directory of a finished tiny run")
    steps = {True: [], False: []}
    per_problem = []  # per problem: its shares by column
    for n, row in enumerate(read_jsonl(path), 1):
        cands = row.get("candidates") or []
        if any(c.get("correct") is None for c in cands):
            raise ConfigError(f"{path}: record {n} has an ungraded candidate: pass a samples file of best_of_n "
                              "with --complete-all")
        groups = k_groups(len(cands), k, str(row.get("id", n)))
        lens = [len(c.get("step_scores") or []) for c in cands]
        correct = [bool(c["correct"]) for c in cands]
        stopped = row.get("stopped") or [False] * len(cands)
        for length, ok in zip(lens, correct):
            steps[ok].append(length)
        scores = aggregate_scores([c.get("step_scores") or [] for c in cands])
        shares = {"lengths differ %": _mean([float(len({lens[i] for i in g}) > 1) for g in groups])}
        for a in AGGREGATIONS:
            best = [bon_pick(g, scores[a], stopped) for g in groups]
            shares[f"BoN@{k} {a} %"] = _mean([float(correct[i]) for i in best])
            shares[f"{a}: pick steps"] = _mean([float(lens[i]) for i in best])
            shares[f"{a}: picks shortest %"] = _mean([float(lens[i] == min(lens[j] for j in g))
                                                      for i, g in zip(best, groups)])
        per_problem.append(shares)
    if not per_problem:
        raise ConfigError(f"{path} holds no problems: pass the samples.jsonl of a finished run")
    out = {"steps, correct": _mean(steps[True]), "steps, incorrect": _mean(steps[False])}
    return out | {h: _mean([p[h] for p in per_problem]) for h in per_problem[0]}


def lengths_table(runs: list[str | Path], k: int = 8) -> tuple[str, dict[str, dict[str, float]]]:
    """The length table (a row per run, then their mean) and its values by run name and ``"mean"``."""
    rows = {Path(r).name: length_row(r, k) for r in runs}
    heads = list(next(iter(rows.values())))
    rows["mean"] = {h: _mean([r[h] for r in rows.values()]) for h in heads}
    lines = ["| run | " + " | ".join(heads) + " |", "|---|" + "---:|" * len(heads)]
    for name, r in rows.items():
        cells = ["" if math.isnan(r[h]) else f"{100 * r[h]:.1f}" if h.endswith("%") else f"{r[h]:.1f}"
                 for h in heads]
        lines.append(f"| {'**mean**' if name == 'mean' else name} | " + " | ".join(cells) + " |")
    return "\n".join(lines), rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="output directories of finished tiny runs")
    p.add_argument("--k", type=int, default=8, help="the k of maj@k, wmaj@k, BoN@k and oracle@k")
    p.add_argument("--json", default=None, help="also write the values, by run and mean, to this file")
    p.add_argument("--lengths", action="store_true",
                   help="add the table of candidate lengths and of each aggregation's picks (samples.jsonl)")
    a = p.parse_args(argv)

    def body():
        text, rows = table(a.runs, a.k)
        if a.lengths:
            more, extra = lengths_table(a.runs, a.k)
            text += "\n\n" + more
            rows = {name: {**r, **extra[name]} for name, r in rows.items()}
        print(text)
        if a.json:  # strict JSON: a value a run does not have is null
            out = Path(a.json)
            out.parent.mkdir(parents=True, exist_ok=True)
            clean = {n: {h: None if math.isnan(v) else v for h, v in r.items()} for n, r in rows.items()}
            out.write_text(json.dumps(clean, indent=1, allow_nan=False) + "\n")

    return run_tool(body)


if __name__ == "__main__":
    sys.exit(main())
