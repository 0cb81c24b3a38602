"""Metrics against hand-computed values, and tools/evaluate.py end to end."""

from __future__ import annotations

import json

import pytest

from helpers import REPO, make_hf, save_tokenizer, tool
from megatron_rgm.config import ConfigError
from megatron_rgm.evaluation.metrics import Problem, evaluate, pairwise_accuracy, pass_at_k


def test_hand_computed_with_ties():
    # correct [T, F, F, T], answers [1, 2, 2, 1], geometric scores [.9, .8, .7, .1]
    p = Problem("a", [True, False, False, True], ["1", "2", "2", "1"], {"geometric": [0.9, 0.8, 0.7, 0.1]})
    m = evaluate([p], [1, 2, 4])
    assert m["pass@1"] == 0.5
    assert m["pass@2"] == pytest.approx(1 - 1 / 6)  # 1 - C(2,2)/C(4,2)
    assert m["oracle@2"] == 1.0
    # groups {0,1}: tie 1-1, first seen (answer 1) wins -> right; {2,3}: tie, answer 2 first -> wrong
    assert m["maj@2"] == 0.5
    assert m["bon@2/geometric"] == 0.5  # .9 (right) and .7 (wrong)
    assert m["wmaj@2"] == 0.5
    assert m["maj@4"] == 1.0  # 2-2 tie: answer 1 seen first
    assert m["bon@4/geometric"] == 1.0
    assert m["wmaj@4"] == 0.0  # answer 2 weighs 1.5 against 1.0


def test_bon_at_1_equals_pass_at_1_and_zero_correct():
    p = Problem("b", [False, True, False], ["3", "4", None], {"geometric": [0.2, 0.5, 0.9], "last": [1, 1, 1]})
    q = Problem("c", [False, False], ["5", "6"], {"geometric": [0.3, 0.4], "last": [0.1, 0.2]})
    m = evaluate([p, q], [1, 2])
    expected = (1 / 3 + 0) / 2
    assert m["bon@1/geometric"] == pytest.approx(expected) and m["pass@1"] == pytest.approx(expected)
    assert m["maj@1"] == pytest.approx(expected)
    # p: one group of 2 (remainder dropped): {0, 1} -> geometric picks 1 (right); q: nothing right
    assert m["bon@2/geometric"] == pytest.approx(0.5)
    assert m["bon@2/last"] == 0.0  # p: tie 1 vs 1 -> the first sample (wrong); q: nothing right


def test_stopped_samples_are_never_picked_and_tokens_are_counted_per_group():
    # geometric scores [.9, .8, .7, .1], sample 0 stopped early: BoN picks among 1..3; tokens per sample
    p = Problem("d", [True, False, True, True], ["1", "2", "1", "1"], {"geometric": [0.9, 0.8, 0.7, 0.1]},
                tokens=[5, 40, 30, 20], stopped=[True, False, False, False])
    m = evaluate([p], [2, 4])
    assert m["bon@4/geometric"] == 0.0  # .8 (wrong) wins once .9 is out
    assert m["bon@2/geometric"] == 0.5  # {0,1}: 1 (wrong); {2,3}: 2 (right)
    assert m["tokens@2"] == pytest.approx((45 + 50) / 2) and m["tokens@4"] == 95
    unstopped = evaluate([Problem("d", p.correct, p.answers, p.scores)], [4])
    assert unstopped["bon@4/geometric"] == 1.0 and "tokens@4" not in unstopped


def test_pairwise_accuracy_by_hand():
    # group a: correct 0.9 vs wrong 0.5 and 0.9 (a tie: half) -> 1.5 of 2; group b: correct 0.2 vs wrong 0.4 -> 0 of 1;
    # group c has no incorrect sample and adds no pair.
    scores = [0.9, 0.5, 0.9, 0.2, 0.4, 0.7]
    correct = [True, False, False, True, False, True]
    groups = ["a", "a", "a", "b", "b", "c"]
    assert pairwise_accuracy(scores, correct, groups) == (pytest.approx(1.5 / 3), 3)
    value, pairs = pairwise_accuracy([0.1, 0.2], [True, True], ["a", "a"])
    assert pairs == 0 and value != value  # nan: nothing to rank


def test_fewer_than_k_samples_is_a_clear_error():
    p = Problem("short", [True, False], ["1", "2"], {})
    with pytest.raises(ConfigError, match="problem short has 2 samples, fewer than k=8"):
        evaluate([p], [8])


def test_unbiased_pass_at_k():
    assert pass_at_k(5, 0, 3) == 0.0
    assert pass_at_k(5, 3, 3) == 1.0
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)


def test_evaluate_tool_end_to_end(tmp_path):
    rows = [
        {"id": "p1", "answer": "\\frac{1}{2}", "responses": ["so \\boxed{0.5}", "\\boxed{1/3}", "\\boxed{\\frac{2}{4}}",
                                                               "no answer"],
         "step_scores": [[0.9, 0.8], [0.2], [0.6, 0.7, 0.9], []]},
        {"id": "p2", "answer": "7", "responses": ["\\boxed{7}", "\\boxed{8}", "\\boxed{8}", "\\boxed{7}"],
         "step_scores": [[0.4], [0.9, 0.95], [0.3], [0.5]]},
    ]
    samples = tmp_path / "samples.jsonl"
    samples.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert tool("evaluate").main([str(samples), "--k", "1", "2", "4", "--json", str(tmp_path / "e.json"),
                                  "--table", str(tmp_path / "e.md"), "--plot", str(tmp_path / "e.png")]) == 0
    assert (tmp_path / "e.png").stat().st_size > 0
    m = json.loads((tmp_path / "e.json").read_text())
    assert m["pass@1"] == pytest.approx((2 / 4 + 2 / 4) / 2)
    for key in ("pass@2", "maj@2", "bon@2/geometric", "bon@4/arithmetic", "bon@4/product", "bon@4/min",
                "bon@4/last", "oracle@4"):
        assert 0.0 <= m[key] <= 1.0
    # p1: geometric scores .85, .2, .75, 0 -> sample 0 (right); p2: .4, .92, .3, .5 -> sample 1 (wrong)
    assert m["bon@4/geometric"] == pytest.approx(0.5)
    # maj@4: p1 {1/2: 2, 1/3: 1} -> right (0.5 == 2/4 under math-verify); p2 tie 7-8, 7 first -> right
    assert m["maj@4"] == 1.0
    assert m["bon@1/geometric"] == pytest.approx(m["pass@1"])
    assert "bon@k/geometric" in (tmp_path / "e.md").read_text()
    assert (tmp_path / "e.png").stat().st_size > 1000


# --- ProcessBench ---------------------------------------------------------------------------------

from megatron_rgm.evaluation.processbench import (choose_threshold, first_error, processbench_metrics,  # noqa: E402
                                                  trajectory_ids)


def test_processbench_metrics_by_hand():
    # labels: two erroneous (first error at 1 and 0), two correct
    labels = [1, 0, -1, -1]
    preds = [1, 2, -1, 0]
    m = processbench_metrics(preds, labels)
    assert m["error_acc"] == 0.5 and m["correct_acc"] == 0.5 and m["f1"] == 0.5
    assert first_error([0.9, 0.4, 0.2], 0.5) == 1 and first_error([0.9, 0.8], 0.5) == -1


def test_threshold_choice_separates_when_it_can():
    scores = [[0.9, 0.2, 0.8], [0.95, 0.9], [0.1, 0.9]]
    labels = [1, -1, 0]
    t = choose_threshold(scores, labels)
    assert processbench_metrics([first_error(s, t) for s in scores], labels)["f1"] == 1.0


def test_processbench_end_to_end_on_real_records(tmp_path):
    """A tiny random Qwen2 export with a tokenizer trained here scores real ProcessBench records."""
    import torch
    from transformers import AutoTokenizer

    from megatron_rgm.evaluation.processbench import evaluate_processbench, load_processbench
    from megatron_rgm.hf import RGMScorer, load_causal_lm
    from megatron_rgm.model import SPRMHead

    records = load_processbench(REPO.parent / "shared" / "data" / "processbench" / "gsm8k.json")[:8]
    hf = make_hf("qwen2", tmp_path / "hf")
    save_tokenizer(hf)
    torch.manual_seed(0)
    scorer = RGMScorer(load_causal_lm(str(hf)), SPRMHead(64, 2, 0.0), AutoTokenizer.from_pretrained(str(hf)))
    ids, positions = trajectory_ids(scorer.tokenizer, records[0]["problem"], records[0]["steps"])
    assert len(positions) == len(records[0]["steps"]) and positions == sorted(positions)
    report = evaluate_processbench(scorer, records)
    assert report["n"] == 4 and 0.0 <= report["f1"] <= 1.0
    given = evaluate_processbench(scorer, records, threshold=0.5)
    assert given["n"] == 8 and given["threshold"] == 0.5
