"""Scorer metrics of the tiny task: step labels, pairwise accuracy, margin, step AUC, BoN, by hand."""

from __future__ import annotations

import json
import math

import pytest

from megatron_rgm.config import ConfigError
from megatron_rgm.tasks.arithmetic import Step, parse_steps
from megatron_rgm.tasks.probe import Candidate, load_candidates, scorer_metrics, step_labels


def test_step_labels_catch_wrong_sums_and_wrong_operands():
    numbers = [4, 2, 9, 7]
    right = parse_steps("9 + 4 = 13.\n\n13 + 2 = 15.\n\n15 + 7 = 22.\n\n</think>")
    assert step_labels(numbers, right) == [True, True, True]
    # A wrong sum, then steps that add correctly to it: only the slip is wrong.
    slip = [Step(4, 2, 7), Step(7, 9, 16), Step(16, 7, 23)]
    assert step_labels(numbers, slip) == [False, True, True]
    # Adding 9 twice (a number used up) and skipping 7: the sums are right, the second 9 is wrong.
    twice = [Step(4, 9, 13), Step(13, 9, 22), Step(22, 2, 24)]
    assert step_labels(numbers, twice) == [True, False, True]
    # Starting a step from something else than the previous result.
    restart = [Step(4, 2, 6), Step(9, 7, 16)]
    assert step_labels(numbers, restart) == [True, False]
    # A taken-back slip ends right: the step is right.
    assert step_labels([8, 4], parse_steps("8 + 4 = 13, no, 12.\n\n</think>")) == [True]
    # The long task's steps: letters, two addends at a time; every operand must still be there to add.
    long = parse_steps("b2 + c9 + 4 = 15.\n\nd7 + 15 = 22.\n\n</think>", named=True)
    assert [s.letters for s in long] == [("b", "c"), ("d",)] and long[0].more == (9,)
    assert step_labels(numbers, long) == [True, True]
    assert step_labels(numbers, [Step(4, 2, 15, more=(9,)), Step(15, 9, 24)]) == [True, False]  # 9 used up
    assert step_labels(numbers, [Step(4, 2, 16, more=(9,)), Step(16, 7, 23)]) == [False, True]


def _cand(pid, index, correct, scores, ok=None):
    return Candidate(pid, index, correct, "p", "t", scores, ok)


def test_scorer_metrics_by_hand():
    cands = [
        # problem a: correct 0.9 / 0.5, incorrect 0.5: pairs (0.9 > 0.5) = 1, (0.5 = 0.5) = 0.5
        _cand("a", 0, True, [0.9], [True]), _cand("a", 0, True, [0.5], [True]), _cand("a", 0, False, [0.5], [False]),
        _cand("a", 0, False, [0.5, 0.5], [True, False]),  # geometric 0.5: two more pairs, 1 and 0.5
        # problem b: only correct candidates, no pairs
        _cand("b", 1, True, [0.8], None), _cand("b", 1, True, [0.2], None),
        _cand("b", 1, True, [0.3], None), _cand("b", 1, True, [0.4], None),
    ]
    m = scorer_metrics(cands, [c.step_scores for c in cands], k=4)
    assert m["pairs"] == 4 and m["pairwise"] == pytest.approx((1 + 0.5 + 1 + 0.5) / 4)
    good = [0.9, 0.5, 0.8, 0.2, 0.3, 0.4]
    assert m["margin"] == pytest.approx(sum(good) / 6 - 0.5)
    # steps: right 0.9, 0.5, 0.5; wrong 0.5, 0.5 -> 0.9 outranks both, each 0.5 ties both: (2 + 4 * 0.5) / 6
    assert m["right_steps"] == 3 and m["wrong_steps"] == 2
    assert m["step_auc"] == pytest.approx(4 / 6)
    # BoN@4: a picks 0.9 (correct), b is all correct
    assert m["bon@4"] == pytest.approx(1.0)
    m = scorer_metrics(cands, [[0.1], [0.5], [0.6], [0.5, 0.5], [0.8], [0.2], [0.3], [0.4]], k=4)
    assert m["bon@4"] == pytest.approx(0.5)  # a picks its incorrect 0.6


def test_load_candidates_from_a_best_of_n_file(tmp_path):
    row = {"id": "x", "problem": "Add 8, 4 and 3.", "answer": "15", "candidates": [
        {"text": "8 + 4 = 12.\n\n12 + 3 = 15.\n\n</think>", "step_scores": [0.7, 0.6], "correct": True},
        {"text": "8 + 4 = 13.\n\n13 + 3 = 16.\n\n</think>", "step_scores": [0.2, 0.6], "correct": False},
        {"text": "8 + 4 = 12.\n\ngarbage.\n\n</think>", "step_scores": [0.5, 0.5], "correct": False}]}
    path = tmp_path / "samples.jsonl"
    path.write_text(json.dumps(row) + "\n")
    cands = load_candidates(path)
    assert [c.step_ok for c in cands] == [[True, True], [False, True], None]
    assert cands[0].prompt == "Add 8, 4 and 3.\n<think>\n" and cands[1].correct is False
    row["candidates"][0]["correct"] = None
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(ConfigError, match="ungraded candidate"):
        load_candidates(path)


def test_first_error_f1_and_lucky_share_by_hand():
    from megatron_rgm.tasks.probe import first_error_f1

    # labels: first wrong step 1, none, 0. Scores that drop exactly there are found at a threshold between.
    scores = [[0.9, 0.2, 0.8], [0.9, 0.7], [0.1, 0.9]]
    f1, t = first_error_f1(scores, [1, -1, 0])
    assert f1 == 1.0 and 0.2 < t <= 0.7
    # a scorer that ranks the wrong step of the first candidate above its right ones cannot get it right
    f1, _ = first_error_f1([[0.2, 0.9, 0.8], [0.9, 0.7], [0.1, 0.9]], [1, -1, 0])
    assert f1 < 1.0
    cands = [_cand("a", 0, True, [0.9, 0.2], [True, False]),  # lucky: right answer, a wrong step
             _cand("a", 0, True, [0.9, 0.8], [True, True]), _cand("a", 0, False, [0.1], [False])]
    m = scorer_metrics(cands, [c.step_scores for c in cands], k=2)
    assert m["lucky"] == pytest.approx(0.5)
    assert m["lucky_wrong_steps"] == 1 and m["lucky_masked"] == 1.0  # its wrong step is scored 0.2: masked out
    kinds = dict(m["mean_score"])
    assert math.isnan(kinds.pop("right step, incorrect"))  # the incorrect candidate has no right step
    assert kinds == {"right step, correct": pytest.approx((0.9 + 0.9 + 0.8) / 3),
                     "wrong step, correct": pytest.approx(0.2), "wrong step, incorrect": pytest.approx(0.1)}
    cands[0] = _cand("a", 0, True, [0.9, 0.6], [True, False])  # the head lets the wrong step through
    m = scorer_metrics(cands, [c.step_scores for c in cands], k=2)
    assert m["lucky_masked"] == 0.0
    assert m["first_error_f1"] == 1.0


def test_lucky_rollouts_and_what_the_mask_leaves_out_by_hand(tmp_path):
    """Training rollouts read back from a real store and a real tokenizer, labelled by hand."""
    import numpy as np

    from megatron_rgm.config import PROMPT_TEMPLATE
    from megatron_rgm.data.store import RolloutStore, Trajectory, tokenizer_fingerprint
    from megatron_rgm.tasks.arithmetic import train_tokenizer
    from megatron_rgm.tasks.probe import rollout_lucky
    from megatron_rgm.tokenizer import load_tokenizer

    prompt = PROMPT_TEMPLATE.format(problem="Add 4, 2, 9 and 1.")  # true totals 6, 15, 16
    responses = {  # text, correct, step scores
        "clean": ("4 + 2 = 6.\n\n6 + 9 = 15.\n\n15 + 1 = 16.\n\n</think>\n\\boxed{16}", True, [0.9, 0.8, 0.9]),
        "lucky": ("4 + 2 = 7.\n\n7 + 9 = 15.\n\n15 + 1 = 16.\n\n</think>\n\\boxed{16}", True, [0.2, 0.7, 0.9]),
        "wrong": ("4 + 2 = 7.\n\n7 + 9 = 16.\n\n16 + 1 = 17.\n\n</think>\n\\boxed{17}", False, [0.2, 0.3, 0.3]),
        "lucky, unmasked": ("4 + 2 = 5.\n\n5 + 9 = 15.\n\n15 + 1 = 16.\n\n</think>\n\\boxed{16}", True,
                            [0.6, 0.1, 0.9]),
        "unparsed": ("4 + 2 = 6.\n\n</think>\n\\boxed{16}", True, [0.9, 0.9]),  # 1 step, 2 scores: skipped
    }
    tok = load_tokenizer(str(train_tokenizer([prompt + r for r, _, _ in responses.values()], tmp_path / "tok",
                                             vocab_size=512, max_number=40)))
    store = RolloutStore(tmp_path / "rollouts", "a", tokenizer=tokenizer_fingerprint(tok))
    p_ids = tok.encode(prompt)

    def traj(name, iteration):
        text, correct, scores = responses[name]
        ids = p_ids + tok.encode(text)
        n = len(ids)
        return Trajectory(tokens=np.array(ids), response_mask=np.arange(n) >= len(p_ids), log_probs=np.zeros(n),
                          step_positions=np.arange(len(scores)), reward=float(correct), correct=correct,
                          prompt_id=0, group_id=iteration * 1_000_000, step_scores=np.array(scores))

    store.append(0, [traj("clean", 0), traj("lucky", 0), traj("wrong", 0), traj("unparsed", 0),
                     traj("lucky, unmasked", 1), traj("clean", 1)])
    r = rollout_lucky(tmp_path / "rollouts", tmp_path / "tok" / "tokenizer.model")
    first, second = r["iterations"]
    # iteration 0: 2 correct parsed (clean, lucky); lucky's wrong steps 0.2 and 0.7: one masked out
    assert first == {"iteration": 0, "correct": 2, "lucky": 0.5, "lucky_wrong_steps": 2, "lucky_masked": 0.5}
    # iteration 1: the lucky one's wrong steps 0.6 and 0.1
    assert second == {"iteration": 1, "correct": 2, "lucky": 0.5, "lucky_wrong_steps": 2, "lucky_masked": 0.5}
    assert r["total"] == {"correct": 4, "lucky": 0.5, "lucky_wrong_steps": 4, "lucky_masked": 0.5}


def test_wrong_agreement_by_hand(tmp_path):
    from megatron_rgm.tasks.probe import wrong_agreement

    def row(*answers):  # "ok" is a correct candidate, anything else a wrong answer
        return {"candidates": [{"prediction": a, "correct": a == "ok"} for a in answers]}

    path = tmp_path / "samples.jsonl"
    rows = [row("18", "18", "18", "17", "ok"),  # 3 of its 4 wrong answers agree
            row("ok", "ok", "ok", "9"),  # one wrong candidate: no agreement to count
            row("5", "6", "ok", "ok"),  # 1 of 2
            row(None, None, None, "7", "ok")]  # no answer is no vote: one wrong answer left, not counted
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert wrong_agreement(path) == pytest.approx((3 + 1) / (4 + 2))
    path.write_text(json.dumps(row("ok", "1")) + "\n")
    assert math.isnan(wrong_agreement(path))
