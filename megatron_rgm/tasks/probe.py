"""How well step scores pick the correct trajectory, and the supervised bound on the same features.

    python -m megatron_rgm.tasks.probe RUN_DIR [--k 8] [--folds 2] [--all-layers] [--json RUN_DIR/scorer.json]

Reads ``RUN_DIR/samples.jsonl`` (Best-of-N output with every candidate graded) and ``RUN_DIR/hf`` (the HF
export) of a tiny-preset run. For the SPRM head as trained, and for a *supervised probe* (a head of the same shape
trained with plain BCE on the true step labels of other problems' candidates: the upper bound of what any step
scorer reading these features can do), it reports:

* ``pairwise``: within-problem pairwise accuracy, the fraction of (correct, incorrect) candidate pairs of one
  problem whose geometric-mean scores are ordered right (ties count half);
* ``margin``: mean geometric score of correct candidates minus incorrect ones;
* ``step_auc``: AUC of the step score between right and wrong steps (a step is
  wrong when its sum is wrong or it adds a number that is not the next one);
* ``first_error_f1``: ProcessBench's F1 of the first step scored below a threshold against the first
  wrong step, at the best threshold; ``lucky``: the share of correct candidates with a wrong step, and
  ``lucky_masked``: the share of their wrong steps that SPR's mask leaves out (scored below 0.5);
* ``bon@k``: Best-of-N with the geometric mean, as :mod:`megatron_rgm.evaluation.metrics` counts it.

The probe is cross-fitted: problems are split into ``folds`` parts by index,
and each part is scored by a probe trained on the others.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from megatron_rgm.config import PROMPT_TEMPLATE, ConfigError, run_tool
from megatron_rgm.data.benchmarks import read_jsonl
from megatron_rgm.data.store import RolloutStore
from megatron_rgm.evaluation.metrics import Problem, evaluate, pairwise_accuracy
from megatron_rgm.evaluation.processbench import first_error, processbench_metrics
from megatron_rgm.evaluation.report import aggregate_scores
from megatron_rgm.head import SPRMHead
from megatron_rgm.hf import HFFeature, RGMScorer
from megatron_rgm.tasks.arithmetic import Step, names_addends, parse_steps
from megatron_rgm.tokenizer import load_tokenizer


class NoProbeData(ValueError):
    """No candidate with parseable steps to train the supervised probe on."""


@dataclass
class Candidate:
    """One graded thinking trajectory of a samples file.

    Attributes:
        problem: problem id.
        index: the problem's position in the file (folds split on it).
        correct: its final answer is right.
        prompt, text: the prompt and the thinking text the head scored.
        step_scores: the head's step probabilities, as sampled.
        step_ok: per step, whether it is right (None when the text's steps cannot be parsed one to one).
    """

    problem: str
    index: int
    correct: bool
    prompt: str
    text: str
    step_scores: list[float]
    step_ok: list[bool] | None


def step_labels(numbers: Sequence[int], steps: Sequence[Step]) -> list[bool]:
    """Whether each written step is right: its own sum, and operands that are still to be added.

    A chain step adds addends not used yet (one, or more on the long task) to the previous result (the first
    step starts from an addend); a step that adds a number already used up, or starts from anything but the
    previous result, is wrong even if its sum is right.
    """
    left = Counter(numbers)
    ok, previous = [], None
    for i, s in enumerate(steps):
        if i == 0:
            good = left[s.a] > 0
            left[s.a] -= 1
        else:
            good = s.a == previous
        for x in (s.b, *s.more):
            good = good and left[x] > 0
            left[x] -= 1
        ok.append(bool(good and s.ok))
        previous = s.result
    return ok


def load_candidates(path: str | Path) -> list[Candidate]:
    """Every graded candidate of a Best-of-N samples file (``--complete-all`` output)."""
    out = []
    for n, row in enumerate(read_jsonl(path)):
        if "candidates" not in row or "problem" not in row:
            raise ConfigError(f"{path}: record {n + 1} has no 'candidates'/'problem': pass the samples.jsonl "
                              "written by tools/best_of_n.py")
        numbers = [int(x) for x in re.findall(r"\d+", row["problem"])]
        for c in row["candidates"]:
            if c.get("correct") is None:
                raise ConfigError(f"{path}: record {n + 1} ({row['id']}) has an ungraded candidate: run "
                                  "best_of_n with --complete-all and a gold answer")
            steps = parse_steps(c["text"], names_addends(row["problem"]))
            ok = step_labels(numbers, steps) if len(steps) == len(c["step_scores"]) else None
            out.append(Candidate(str(row["id"]), n, bool(c["correct"]), PROMPT_TEMPLATE.format(problem=row["problem"]),
                                 c["text"], list(c["step_scores"]), ok))
    if not out:
        raise ConfigError(f"{path} holds no candidates")
    return out


def _auc(pos: Sequence[float], neg: Sequence[float]) -> float:
    """P(a positive outranks a negative), ties half; nan when a class is empty."""
    if not pos or not neg:
        return float("nan")
    p, q = torch.tensor(pos, dtype=torch.float64), torch.tensor(neg, dtype=torch.float64)
    diff = p[:, None] - q[None, :]
    return float(((diff > 0).double() + 0.5 * (diff == 0).double()).mean())


def first_error_f1(scores: Sequence[Sequence[float]], labels: Sequence[int]) -> tuple[float, float]:
    """ProcessBench's F1 of "the first step scored below a threshold" against the first wrong step (-1: none), at
    the best of 101 thresholds (the scores' percentiles): ``(f1, threshold)``; nan without candidates."""
    flat = [x for row in scores for x in row]
    if not labels or not flat:
        return float("nan"), float("nan")
    grid = torch.quantile(torch.tensor(flat, dtype=torch.float64), torch.linspace(0, 1, 101, dtype=torch.float64))
    best = (-1.0, 0.5)
    for t in sorted({*(grid + 1e-9).tolist(), 0.5}):
        f1 = processbench_metrics([first_error(row, t) for row in scores], labels)["f1"]
        best = max(best, (f1, t), key=lambda b: (b[0], -abs(b[1] - 0.5)))
    return best


def _masked(wrong_in_correct: Sequence[float]) -> int:
    """How many of a correct trajectory's step probabilities SPR's mask leaves out (below 0.5: logit < 0)."""
    return sum(p < 0.5 for p in wrong_in_correct)


def _kind(step_ok: bool, correct: bool) -> str:
    return f"{'right' if step_ok else 'wrong'} step, {'correct' if correct else 'incorrect'}"


def scorer_metrics(cands: Sequence[Candidate], scores: Sequence[Sequence[float]], k: int = 8) -> dict[str, float]:
    """pairwise, margin, step_auc, first-error F1 and bon@k (geometric) of per-candidate step probabilities
    ``scores``; ``lucky``: the fraction of correct candidates (with step labels) that have a wrong step; and
    ``lucky_masked``: the fraction of those candidates' wrong steps scored below 0.5, which SPR's mask leaves out."""
    agg = aggregate_scores(scores)["geometric"]  # as tools/evaluate.py computes it, so bon@k matches eval.json
    by_problem: dict[str, list[int]] = {}
    for i, c in enumerate(cands):
        by_problem.setdefault(c.problem, []).append(i)
    pairwise, pairs = pairwise_accuracy(agg, [c.correct for c in cands], [c.problem for c in cands])
    labelled = [(s, c.step_ok, c.correct) for c, s in zip(cands, scores) if c.step_ok and len(c.step_ok) == len(s)]
    f1, threshold = first_error_f1([s for s, _, _ in labelled],
                                   [next((i for i, o in enumerate(ok) if not o), -1) for _, ok, _ in labelled])
    lucky = [not all(ok) for _, ok, correct in labelled if correct]
    right = [p for s, ok, _ in labelled for p, o in zip(s, ok) if o]
    wrong = [p for s, ok, _ in labelled for p, o in zip(s, ok) if not o]
    # the mean score of right and wrong steps in correct and incorrect candidates: where outcome labels are wrong
    kinds: dict[str, list[float]] = {_kind(o, c): [] for o in (True, False) for c in (True, False)}
    for s, ok, correct in labelled:
        for p, o in zip(s, ok):
            kinds[_kind(o, correct)].append(p)
    # the share of lucky trajectories' wrong steps SPR's mask leaves out: how much of BCE's label noise it filters
    lucky_wrong = kinds[_kind(False, True)]
    good = [a for a, c in zip(agg, cands) if c.correct]
    bad = [a for a, c in zip(agg, cands) if not c.correct]
    problems = [Problem(pid, [cands[i].correct for i in m], [None] * len(m), {"geometric": [agg[i] for i in m]})
                for pid, m in by_problem.items()]
    return {"pairwise": pairwise, "pairs": pairs,
            "margin": (sum(good) / len(good) - sum(bad) / len(bad)) if good and bad else float("nan"),
            "step_auc": _auc(right, wrong), "right_steps": len(right), "wrong_steps": len(wrong),
            "first_error_f1": f1, "first_error_threshold": threshold,
            "lucky": sum(lucky) / len(lucky) if lucky else float("nan"),
            "lucky_wrong_steps": len(lucky_wrong),
            "mean_score": {kind: sum(v) / len(v) if v else float("nan") for kind, v in kinds.items()},
            "lucky_masked": _masked(lucky_wrong) / len(lucky_wrong) if lucky_wrong else float("nan"),
            f"bon@{k}": evaluate(problems, [k])[f"bon@{k}/geometric"]}


@torch.no_grad()
def step_features(hf_dir: str | Path, cands: Sequence[Candidate], layers: Sequence[int] = ()
                  ) -> tuple[list[torch.Tensor], float, int, dict[int, list[torch.Tensor]]]:
    """Per candidate, the ``[S, h]`` SPRM features at the step positions of its re-tokenised text.

    Args:
        layers: decoder layers (negative: from the top) whose outputs at the same positions are returned too.

    Returns:
        (features; the largest difference between the exported head's scores and the scores recorded while
        sampling, over candidates whose re-tokenisation has as many steps as were scored; how many have not).
        Both are about tokenisation as much as the export: a policy may sample a split of a token (``"1"``,
        ``"2"`` for ``"12"``) that encoding the text merges, which moves the features a little and can merge
        two step tokens. A trained policy writes the canonical pieces, and the difference is then ~1e-6;
        the features of ``layers`` by layer).
    """
    scorer = RGMScorer.from_pretrained(str(hf_dir))
    hooks = {layer: HFFeature(scorer.model, layer) for layer in layers}
    feats, worst, mismatched = [], 0.0, 0
    by_layer: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    for c in cands:
        ids = torch.tensor([scorer.tokenizer.encode(c.prompt + c.text, add_special_tokens=False)])
        layout = scorer.segmenter(ids)
        _, logits = scorer.step_logits(ids, layout.mask)
        f = scorer.feature.value[layout.mask.bool()].float()
        if f.shape[0] != len(c.step_scores):
            mismatched += 1
        elif c.step_scores:
            worst = max(worst, float((torch.sigmoid(logits) - torch.tensor(c.step_scores)).abs().max()))
        feats.append(f)
        for layer, hook in hooks.items():
            by_layer[layer].append(hook.value[layout.mask.bool()].float())
    return feats, worst, mismatched, by_layer


def _fit_probe(x: torch.Tensor, y: torch.Tensor, seed: int, epochs: int = 400
               ) -> Callable[[torch.Tensor], torch.Tensor]:
    """A head of the SPRM's shape trained with BCE on true step labels (class-balanced, dropout 0.5).

    Returns the probe as a function of ``[S, h]`` features to ``[S]`` logits (features are standardised
    with the training set's statistics first)."""
    torch.manual_seed(seed)
    head = SPRMHead(x.shape[1], 2, 0.5, dtype=torch.float32)
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=1e-2)
    pos = float(y.mean()) if len(y) else 0.5
    weight = torch.where(y > 0.5, 0.5 / max(pos, 1e-6), 0.5 / max(1 - pos, 1e-6))
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    head.train()
    for _ in range(epochs):
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(head((x - mean) / std).squeeze(-1), y,
                                                                    weight=weight)
        loss.backward()
        opt.step()
    head.eval()
    return lambda f: head((f - mean) / std).squeeze(-1)


@torch.no_grad()
def _predict(probe, f: torch.Tensor) -> list[float]:
    return torch.sigmoid(probe(f)).tolist() if len(f) else []


def supervised_scores(cands: Sequence[Candidate], feats: Sequence[torch.Tensor], folds: int = 2,
                      seed: int = 0) -> list[list[float]]:
    """Cross-fitted supervised-probe step probabilities for every candidate (see the module docstring)."""
    if folds < 2:
        raise ConfigError(f"--folds must be >= 2 (the probe is scored on problems it did not train on), got {folds}")
    out: list[list[float] | None] = [None] * len(cands)
    for fold in range(folds):
        train = [i for i, c in enumerate(cands)
                 if c.index % folds != fold and c.step_ok and len(feats[i]) == len(c.step_ok)]
        if not train:
            raise NoProbeData(f"fold {fold}: no candidate of the other problems has parseable steps to train on")
        x = torch.cat([feats[i] for i in train])
        y = torch.tensor([float(ok) for i in train for ok in cands[i].step_ok])
        probe = _fit_probe(x, y, seed + fold)
        for i, c in enumerate(cands):
            if c.index % folds == fold:
                out[i] = _predict(probe, feats[i])
    return out


def wrong_agreement(path: str | Path) -> float:
    """How systematic the errors of a samples file are: over problems with at least two incorrect candidates, the
    share of their incorrect candidates that give the problem's most common wrong answer (1: every wrong answer
    agrees, as a majority vote fooled by one common slip sees them); candidates without an answer are left out;
    nan without such problems."""
    agree = total = 0
    for row in read_jsonl(path):
        wrong = Counter(str(c["prediction"]) for c in row.get("candidates", [])
                        if c.get("correct") is False and c.get("prediction") is not None)  # no answer: no vote
        n = sum(wrong.values())
        if n >= 2:
            agree, total = agree + wrong.most_common(1)[0][1], total + n
    return agree / total if total else float("nan")


def rollout_lucky(store_dir: str | Path, tokenizer_path: str | Path) -> dict:
    """Lucky trajectories among the training rollouts of a run (``--save-rollouts``), iteration by iteration.

    For each iteration: ``correct`` rollouts with one-to-one parsed steps, ``lucky``: the share of them with a
    wrong step, and ``lucky_masked``: the share of those wrong steps the head scored below 0.5 when they were
    sampled, which SPR's mask leaves out of the loss (the mask reads the training forward's logits, the same
    weights but with the head's dropout on; on ``--sprm-mask-warmup-iters`` iterations no mask is applied, and the
    share says what it would have left out). ``total`` sums every iteration.
    """
    store, tok = RolloutStore(store_dir, "r"), load_tokenizer(str(tokenizer_path))
    tally: dict[int, list[int]] = {}  # iteration -> [correct, lucky, lucky wrong steps, masked]
    for i in range(len(store)):
        t = store[i]
        if not t.correct or t.step_scores is None:
            continue
        statement = re.search(r"Add ([^.]*)\.", tok.decode(t.tokens[~t.response_mask].tolist()))
        if statement is None:
            continue
        steps = parse_steps(tok.decode(t.tokens[t.response_mask].tolist()), names_addends(statement.group(0)))
        if len(steps) != len(t.step_scores):
            continue
        ok = step_labels([int(x) for x in re.findall(r"\d+", statement.group(1))], steps)
        wrong = [float(p) for p, o in zip(t.step_scores, ok) if not o]
        it = int(t.group_id) // 1_000_000
        tally[it] = [a + b for a, b in zip(tally.get(it, [0, 0, 0, 0]), (1, bool(wrong), len(wrong), _masked(wrong)))]

    def shares(c: list[int]) -> dict:
        return {"correct": c[0], "lucky": c[1] / c[0] if c[0] else float("nan"), "lucky_wrong_steps": c[2],
                "lucky_masked": c[3] / c[2] if c[2] else float("nan")}

    total = [sum(col) for col in zip(*tally.values())] if tally else [0, 0, 0, 0]
    return {"iterations": [{"iteration": it, **shares(c)} for it, c in sorted(tally.items())], "total": shares(total)}


def report(run_dir: str | Path, k: int = 8, folds: int = 2, all_layers: bool = False) -> dict:
    """SPRM-head and supervised-probe metrics of a tiny-preset run directory.

    With ``all_layers``, also the supervised probe on every decoder layer's output (``"layers"``: step AUC and
    BoN@k by layer, ``-1`` the last): where in the network step correctness becomes readable.
    """
    run = Path(run_dir)
    for name in ("samples.jsonl", "hf"):
        if not (run / name).exists():
            raise ConfigError(f"{run / name} does not exist: pass the output directory of a finished tiny run")
    cands = load_candidates(run / "samples.jsonl")
    n_layers = json.loads((run / "hf" / "config.json").read_text())["num_hidden_layers"] if all_layers else 0
    feats, worst, mismatched, by_layer = step_features(run / "hf", cands, range(-n_layers, 0))
    result = {"candidates": len(cands), "problems": len({c.problem for c in cands}),
              "pass@1": sum(c.correct for c in cands) / len(cands),
              "parsed": sum(c.step_ok is not None for c in cands) / len(cands),
              "export_vs_sampled_max_diff": worst, "retokenised_step_mismatch": mismatched,
              "wrong_agreement": wrong_agreement(run / "samples.jsonl"),
              "sprm": scorer_metrics(cands, [c.step_scores for c in cands], k)}
    if (run / "rollouts").is_dir() and (run / "task" / "tokenizer" / "tokenizer.model").is_file():
        result["rollouts"] = rollout_lucky(run / "rollouts", run / "task" / "tokenizer" / "tokenizer.model")
    try:
        result["probe"] = scorer_metrics(cands, supervised_scores(cands, feats, folds), k)
    except NoProbeData as e:  # e.g. a policy too undertrained to write parseable steps
        result["probe"], result["probe_skipped"] = None, str(e)
        return result
    if by_layer:
        result["layers"] = {}
        for layer, f in by_layer.items():
            m = scorer_metrics(cands, supervised_scores(cands, f, folds), k)
            result["layers"][str(layer)] = {"step_auc": m["step_auc"], f"bon@{k}": m[f"bon@{k}"]}
    return result


def format_report(r: dict, k: int = 8) -> str:
    rows = [f"| scorer | pairwise | margin | step AUC | first-error F1 | BoN@{k} geometric |",
            "|---|---:|---:|---:|---:|---:|"]
    for name, key in (("SPRM head (as trained)", "sprm"), ("supervised probe (bound)", "probe")):
        m = r[key]
        if m is None:
            rows.append(f"| {name} | n/a ({r['probe_skipped']}) | | | | |")
            continue
        rows.append(f"| {name} | {m['pairwise']:.3f} | {m['margin']:+.3f} | {m['step_auc']:.3f} | "
                    f"{m.get('first_error_f1', float('nan')):.3f} | {100 * m[f'bon@{k}']:.1f} |")
    if "layers" in r:
        rows += ["", "| decoder layer | probe step AUC | probe BoN@%d |" % k, "|---|---:|---:|"]
        rows += [f"| {layer} | {m['step_auc']:.3f} | {100 * m[f'bon@{k}']:.1f} |" for layer, m in r["layers"].items()]
    h = r["sprm"]
    rows += ["", f"pass@1 {100 * r['pass@1']:.1f} over {r['candidates']} candidates of {r['problems']} problems; "
             f"{h['wrong_steps']} wrong of {h['wrong_steps'] + h['right_steps']} parsed steps; "
             f"{100 * h.get('lucky', float('nan')):.1f}% of the correct candidates have a wrong step (lucky); the head "
             f"scores {100 * h.get('lucky_masked', float('nan')):.1f}% of their {h.get('lucky_wrong_steps', 0)} wrong "
             "steps below 0.5 (what SPR's mask leaves out)"]
    if "rollouts" in r:
        t = r["rollouts"]["total"]
        rows.append(f"training rollouts: {100 * t['lucky']:.1f}% of the {t['correct']} correct ones are lucky; the head "
                    f"scored {100 * t['lucky_masked']:.1f}% of their {t['lucky_wrong_steps']} wrong steps below 0.5 "
                    "when they were sampled")
    return "\n".join(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", help="output directory of a tiny-preset run (samples.jsonl, hf/)")
    p.add_argument("--k", type=int, default=8, help="group size of BoN@k")
    p.add_argument("--folds", type=int, default=2, help="cross-fitting folds of the supervised probe")
    p.add_argument("--all-layers", action="store_true",
                   help="also probe every decoder layer's output (where step correctness becomes readable)")
    p.add_argument("--json", default=None, help="where to write the metrics (default RUN_DIR/scorer.json)")
    a = p.parse_args(argv)

    def body():
        r = report(a.run_dir, a.k, a.folds, a.all_layers)
        Path(a.json or Path(a.run_dir) / "scorer.json").write_text(json.dumps(r, indent=1) + "\n")
        print(format_report(r, a.k))

    return run_tool(body)


if __name__ == "__main__":
    sys.exit(main())
