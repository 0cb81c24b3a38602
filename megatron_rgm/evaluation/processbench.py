"""Step-level evaluation in ProcessBench's format: find the first wrong step from SPRM scores.

A record is ``{"id", "problem", "steps": [...], "label"}`` with ``label`` the
index of the first wrong step or -1 when every step is right. The SPRM scores
each step (the hidden state before the delimiter that ends it); the predicted
first error is the first step whose score falls below a threshold (-1 if
none). Reported: accuracy on erroneous samples (predicted index == label),
accuracy on correct samples (predicted -1), and their harmonic mean (F1).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch

from megatron_rgm.config import ConfigError


def load_processbench(path: str | Path) -> list[dict]:
    """Records of a ProcessBench json file (a list of objects)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path} is not a file: pass a ProcessBench json file")
    try:
        rows = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from None
    for n, row in enumerate(rows):
        for key in ("problem", "steps", "label"):
            if key not in row:
                raise ConfigError(f"{path}: record {n} has no field {key!r}")
    return rows


def trajectory_ids(tokenizer, problem: str, steps: Sequence[str], delimiter: str = ".\n\n"):
    """Token ids of ``problem`` + ``<think>`` + steps, each closed by the delimiter, and the
    position scored for each step (its last token, just before the delimiter)."""
    enc = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    ids = enc(problem + "\n<think>\n")
    delim = enc(delimiter)
    positions = []
    for step in steps:
        text = step.strip()
        if text.endswith(delimiter[0]):  # keep a step's own full stop: the delimiter brings one
            text = text[:-1]
        ids += enc(text) if text else []
        positions.append(len(ids) - 1)
        ids += delim
    return ids, positions


def first_error(scores: Sequence[float], threshold: float) -> int:
    return next((i for i, s in enumerate(scores) if s < threshold), -1)


def processbench_metrics(predictions: Sequence[int], labels: Sequence[int]) -> dict[str, float]:
    """Accuracy on erroneous samples, on correct samples, and their harmonic mean (F1), as fractions."""
    err = [p == l for p, l in zip(predictions, labels) if l != -1]
    cor = [p == -1 for p, l in zip(predictions, labels) if l == -1]
    acc_err = sum(err) / len(err) if err else 0.0
    acc_cor = sum(cor) / len(cor) if cor else 0.0
    f1 = 2 * acc_err * acc_cor / (acc_err + acc_cor) if acc_err + acc_cor else 0.0
    return {"error_acc": acc_err, "correct_acc": acc_cor, "f1": f1, "n": len(labels)}


def choose_threshold(step_scores: Sequence[Sequence[float]], labels: Sequence[int]) -> float:
    """The threshold that maximises F1 on these samples (candidates: midpoints of the sorted scores)."""
    values = sorted({s for scores in step_scores for s in scores})
    if not values:
        return 0.5
    candidates = [values[0] - 1e-6] + [(a + b) / 2 for a, b in zip(values, values[1:])] + [values[-1] + 1e-6]

    def f1(t: float) -> float:
        return processbench_metrics([first_error(s, t) for s in step_scores], labels)["f1"]

    return max(candidates, key=lambda t: (f1(t), -abs(t - 0.5)))


@torch.no_grad()
def score_records(scorer, records: Sequence[dict], delimiter: str = ".\n\n") -> list[list[float]]:
    """SPRM step probabilities for each record, one trajectory at a time (an :class:`RGMScorer`)."""
    out = []
    device = next(scorer.model.parameters()).device
    for rec in records:
        ids, positions = trajectory_ids(scorer.tokenizer, rec["problem"], rec["steps"], delimiter)
        ids_t = torch.tensor([ids], device=device)
        mask = torch.zeros_like(ids_t, dtype=torch.bool)
        mask[0, positions] = True
        _, logits = scorer.step_logits(ids_t, mask)
        out.append(torch.sigmoid(logits).tolist())
    return out


def evaluate_processbench(scorer, records: Sequence[dict], threshold: float | None = None,
                          calibration_fraction: float = 0.5) -> dict:
    """Scores, a threshold (given, or chosen on the first ``calibration_fraction`` of the records),
    and metrics on the remaining records (all of them when the threshold is given)."""
    scores = score_records(scorer, records)
    labels = [int(r["label"]) for r in records]
    if threshold is None:
        cut = max(1, int(len(records) * calibration_fraction))
        if cut >= len(records):
            raise ConfigError(f"{len(records)} records leave none to evaluate after calibrating on {cut}: "
                              "pass --threshold or more records")
        threshold = choose_threshold(scores[:cut], labels[:cut])
        scores, labels = scores[cut:], labels[cut:]
    preds = [first_error(s, threshold) for s in scores]
    return dict(processbench_metrics(preds, labels), threshold=threshold)
