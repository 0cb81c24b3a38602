"""Best-of-N again on candidates already drawn: every candidate's thinking scored by an RGM export's head.

Two heads compared on one draw see the same candidates, so the difference between their picks is the heads'
alone, not the draws' (two runs' policies sample apart as soon as their weights differ at all). One draw of k
candidates also serves any number of heads: the draw is the expensive part, a scoring pass is a forward each.

The input is a Best-of-N samples file (``tools/best_of_n.py --complete-all``: every candidate answered and
graded, so whichever the new scores pick has its answer). The output has the same records and candidates,
their ``step_scores`` and ``aggregate`` from the new head, ``chosen`` its argmax (ties: the lowest index, as
``bon@k`` in the evaluation) and ``response``, ``prediction``, ``correct`` those of the new pick;
``scored_by`` names the export. ``tools/evaluate.py`` reads it like any samples file.

A candidate is scored from its text: the prompt as the draw's template renders it (best_of_n records it), then
the thinking's tokens as the export's tokenizer encodes it; only the thinking's tokens end steps, as in
sampling. A policy that sampled a non-canonical split of a token (``"1"``, ``"2"`` for ``"12"``) is scored on
the merged token, which moves the features a little; the summary counts the candidates whose number of steps
changed that way.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

from megatron_rgm.config import AGGREGATIONS, PROMPT_TEMPLATE, ConfigError, check_template
from megatron_rgm.data.benchmarks import read_jsonl
from megatron_rgm.evaluation.report import aggregate_scores
from megatron_rgm.hf import RGMScorer
from megatron_rgm.inference.best_of_n import choose


def check_samples(rows: list[dict], path: str | Path, template: str | None) -> str:
    """Every record must hold answered candidates, none stopped early (the new head may pick any of them), all
    drawn with one prompt template; returns the template to score with (``template``, else the draw's)."""
    if not rows:
        raise ConfigError(f"{path} holds no records: pass the output of tools/best_of_n.py")
    drawn = {row.get("prompt_template") for row in rows if isinstance(row, dict)} - {None}
    if len(drawn) > 1:
        raise ConfigError(f"{path} mixes prompt templates {sorted(drawn)}: rescore the draws of one template apart")
    if template is not None and drawn and template != next(iter(drawn)):
        raise ConfigError(f"--prompt-template {template!r} is not the draw's {next(iter(drawn))!r}: the head must "
                          "read the prompt the policy sampled after, so leave the flag out")
    for n, row in enumerate(rows, 1):
        if not isinstance(row, dict) or not isinstance(row.get("candidates"), list) or not row["candidates"] \
                or "problem" not in row:
            raise ConfigError(f"{path}: record {n} has no 'candidates'/'problem': pass the output of "
                              "tools/best_of_n.py")
        for j, c in enumerate(row["candidates"]):
            if not (isinstance(c, dict) and isinstance(c.get("text"), str) and isinstance(c.get("step_scores"), list)):
                raise ConfigError(f"{path}: record {n} ({row.get('id')}) has candidate {j} without its 'text' and "
                                  "'step_scores': pass the output of tools/best_of_n.py")
            if c.get("finish") == "stopped":
                raise ConfigError(f"{path}: record {n} ({row.get('id')}) has candidate {j} stopped early, with no "
                                  "answer: rescore a draw made without --bon-prune-margin")
            if "response" not in c:
                raise ConfigError(f"{path}: record {n} ({row.get('id')}) has candidate {j} never answered: draw "
                                  "with --complete-all, so that every candidate the new head may pick has its answer")
    return template if template is not None else next(iter(drawn), PROMPT_TEMPLATE)


def rescore_record(row: dict, scorer: RGMScorer, template: str, aggregation: str, source: str) -> tuple[dict, int]:
    """``row`` with its candidates scored by ``scorer`` (the export at ``source``) and the pick made again; and
    how many candidates were scored on a different number of steps than recorded (re-tokenised text)."""
    cands = row["candidates"]
    scored = scorer.score_responses([row["problem"]] * len(cands), [c["text"] for c in cands], template)
    steps = [s.step_scores for s in scored]
    aggregates = aggregate_scores(steps)[aggregation]  # tools/evaluate.py's own, so its bon@k ranks the same
    changed = sum(len(s) != len(c["step_scores"]) for s, c in zip(steps, cands))
    out = copy.deepcopy(row)
    for c, s, a in zip(out["candidates"], steps, aggregates):
        c["step_scores"], c["aggregate"] = s, a
    chosen = choose(aggregates)
    best = out["candidates"][chosen]
    out.update(aggregation=aggregation, chosen=chosen, response=best["response"], prediction=best.get("prediction"),
               correct=best.get("correct"), step_scores=steps, scored_by=source)
    return out, changed


def rescore(samples: str | Path, hf_path: str | Path, output: str | Path, template: str | None = None,
            aggregation: str = "geometric") -> dict:
    """Score every candidate of ``samples`` with the export at ``hf_path``; write ``output`` all at once.

    ``template``: how the draw's problems became prompts; None: the one its records name (best_of_n writes it),
    else the default. A template that differs from the draw's is refused.

    Returns:
        ``{"problems", "candidates", "picks_changed", "steps_changed", "graded", "correct"}``.
    """
    if template is not None:
        check_template(template)
    if aggregation not in AGGREGATIONS:
        raise ConfigError(f"--aggregation {aggregation!r} is unknown: use one of {', '.join(AGGREGATIONS)}")
    out = Path(output)
    if out.is_dir():
        raise ConfigError(f"--output {out} is a directory: pass a file path")
    if out.resolve() == Path(samples).resolve():
        raise ConfigError(f"--output {out} is the samples file: write the rescored draw to a new file")
    parent = next((q for q in out.absolute().parents if q.exists()), None)
    if parent is not None and not parent.is_dir():
        raise ConfigError(f"--output {out}: {parent} is a file, not a directory: pass a path under a directory")
    rows = read_jsonl(samples)
    template = check_samples(rows, samples, template)
    scorer = RGMScorer.from_pretrained(str(hf_path))
    summary = {"problems": len(rows), "candidates": 0, "picks_changed": 0, "steps_changed": 0, "graded": 0,
               "correct": 0}
    records = []
    for row in rows:
        record, changed = rescore_record(row, scorer, template, aggregation, str(hf_path))
        records.append(record)
        summary["candidates"] += len(row["candidates"])
        summary["picks_changed"] += int(record["chosen"] != row.get("chosen"))
        summary["steps_changed"] += changed
        if record["correct"] is not None:
            summary["graded"] += 1
            summary["correct"] += int(record["correct"])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    try:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return summary
