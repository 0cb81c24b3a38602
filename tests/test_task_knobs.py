"""The knobbed addition task: its generator's slips and the exact step labels, checked by hand and in bulk."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from megatron_rgm.config import ConfigError
from megatron_rgm.tasks.arithmetic import Problem, Step, parse_steps, render, statement
from megatron_rgm.tasks.knobs import (
    Knobs,
    StepLabel,
    first_error,
    knob_problems,
    knob_sft_texts,
    knob_steps,
    label_response,
    step_truth,
)


def _problem(*numbers: int) -> Problem:
    return Problem("p", statement(numbers), str(sum(numbers)), list(numbers))


def test_hand_checked_labels_of_a_dropped_carry():
    p = _problem(4, 8, 3)
    steps = [Step(4, 8, 2), Step(2, 3, 5)]  # 4 + 8 = 12 written as 2; then right arithmetic on a wrong total
    assert step_truth(p, steps) == [StepLabel(False, False), StepLabel(True, False)]
    assert first_error(step_truth(p, steps)) == 0
    labels, correct = label_response(p, render(steps))
    assert labels == step_truth(p, steps) and not correct


def test_hand_checked_labels_of_cancelling_slips():
    p = _problem(4, 2, 9, 1)  # true totals 6, 15, 16
    steps = [Step(4, 2, 7), Step(7, 9, 16), Step(16, 1, 16)]  # +1 at step 0, taken back (-1) at step 2
    labels, correct = label_response(p, render(steps))
    assert labels == [StepLabel(False, False), StepLabel(True, False), StepLabel(False, True)]
    assert correct, "two slips that cancel give the right answer: a lucky trajectory"
    assert first_error(labels) == 0
    # the generator's lucky slip: the very next step writes the true total (7 + 9 = 15)
    steps = [Step(4, 2, 7), Step(7, 9, 15), Step(15, 1, 16)]
    labels, correct = label_response(p, render(steps))
    assert correct and labels == [StepLabel(False, False), StepLabel(False, True), StepLabel(True, True)]


def test_a_clean_trace_is_all_right_and_has_no_first_error():
    p = _problem(3, 5, 9)
    labels, correct = label_response(p, render(knob_steps(p, random.Random(0), Knobs())))
    assert correct and all(l.local_ok and l.on_track for l in labels) and first_error(labels) == -1


def test_the_generator_writes_the_slip_the_knobs_ask_for():
    p = _problem(7, 5, 6, 8, 2)  # totals 12, 18, 26, 28; 7 + 5 carries first
    rng = random.Random(1)
    for _ in range(50):
        steps = knob_steps(p, rng, Knobs(systematic=1.0), error=True)
        assert steps[0] == Step(7, 5, 2), "the dropped carry is at the first step that carries"
        assert steps[-1].result == 28 - 10
        labels, correct = label_response(p, render(steps))
        assert not correct and [l.local_ok for l in labels] == [False, True, True, True]
    for _ in range(50):
        steps = knob_steps(p, rng, Knobs(lucky=1.0), error=True)
        labels, correct = label_response(p, render(steps))
        bad = [i for i, l in enumerate(labels) if not l.local_ok]
        if bad[0] == len(steps) - 1:  # a slip at the last step has no later step to cancel it
            assert not correct and bad == [3]
        else:
            assert correct and bad == [bad[0], bad[0] + 1], (steps, labels)  # the next step slips back
            assert not labels[bad[0]].on_track and all(l.on_track for l in labels[bad[1]:])
            assert steps[bad[1]].result == sum(p.numbers[:bad[1] + 2]), "it writes the true running total"


def test_in_bulk_lucky_share_long_lengths_and_agreeing_wrong_answers():
    rng = random.Random(2)
    long = knob_problems(200, seed=0, knobs=Knobs(long=True))
    lengths = [len(p.numbers) - 1 for p in long]
    assert min(lengths) >= 4 and max(lengths) <= 30 and max(lengths) - min(lengths) >= 20

    problems = knob_problems(100, seed=1, knobs=Knobs())
    lucky = [label_response(p, render(knob_steps(p, rng, Knobs(lucky=0.5), error=True))) for p in problems]
    lucky_share = sum(c for _, c in lucky) / len(lucky)
    assert 0.2 < lucky_share < 0.5, lucky_share  # half the slips cancel, when a later step exists
    assert all(any(not l.local_ok for l in labels) for labels, _ in lucky), "every slipped trace has a wrong step"

    p = _problem(7, 5, 6, 8, 2)
    wrong = Counter(render(knob_steps(p, rng, Knobs(systematic=0.8), error=True)).rsplit("{", 1)[1]
                    for _ in range(400))
    top, count = wrong.most_common(1)[0]
    assert top == "18}" and count / 400 > 0.7, wrong  # most wrong answers agree: 28 - 10
    scattered = Counter(render(knob_steps(p, rng, Knobs(), error=True)).rsplit("{", 1)[1] for _ in range(400))
    assert scattered.most_common(1)[0][1] / 400 < 0.3, scattered


def test_a_fixed_slip_is_taken_back_within_its_step():
    p = _problem(7, 5, 6)
    steps = knob_steps(p, random.Random(0), Knobs(systematic=1.0, lucky=1.0), error=True, fixed=True)
    assert steps[0] == Step(7, 5, 12, retracted=2) and steps[1] == Step(12, 6, 18)
    assert "7 + 5 = 2, no, 12." in render(steps)
    labels, correct = label_response(p, render(steps))
    assert correct and all(l.local_ok and l.on_track for l in labels)


def test_sft_texts_parse_back_and_knobs_are_checked():
    problems = knob_problems(10, seed=3, knobs=Knobs(long=True))
    texts = knob_sft_texts(problems, seed=0, knobs=Knobs(lucky=0.5, long=True, systematic=0.5), error_rate=0.5)
    assert len(texts) == 40
    assert all(len(parse_steps(t.split("<think>\n", 1)[1])) >= 4 for t in texts)
    with pytest.raises(ConfigError, match="lucky knob"):
        Knobs(lucky=1.5)
    with pytest.raises(ConfigError, match="error_rate"):
        knob_sft_texts(problems, 0, Knobs(), error_rate=2.0)


def test_prepare_writes_the_knobbed_task(tmp_path):
    import json

    from megatron_rgm.tasks.prepare import prepare
    from megatron_rgm.tokenizer import load_tokenizer

    paths = prepare(tmp_path, n_train=40, n_eval=8, n_sft=160, error_rate=0.5, vocab_size=640,
                    knobs=Knobs(lucky=1.0, long=True, systematic=0.0))
    meta = json.loads(paths["meta"].read_text())
    assert meta["knobs"] == {"lucky": 1.0, "long": True, "systematic": 0.0} and meta["order"] == "given"
    problems = {json.loads(line)["problem"]: json.loads(line) for line in paths["train"].read_text().splitlines()}
    tok = load_tokenizer(paths["tokenizer"])
    lucky = slipped = 0
    for line in paths["sft"].read_text().splitlines():
        text = json.loads(line)["text"]
        statement_, response = text.split("\n<think>\n", 1)
        row = problems[statement_]
        p = Problem(row["id"], row["problem"], row["answer"], [int(x) for x in
                    statement_[4:-1].replace(" and ", ", ").split(", ")])
        labels, correct = label_response(p, response)
        assert 4 <= len(labels) <= 30
        assert tok.decode(tok.encode(text)) == text
        if first_error(labels) >= 0:
            slipped += 1
            lucky += correct
    assert slipped == 80 and lucky > 60, (slipped, lucky)  # every slip cancelled, but one at the last step
    with pytest.raises(ConfigError, match="knobbed task"):
        prepare(tmp_path / "x", n_train=4, n_eval=2, n_sft=4, tree_fraction=0.5, knobs=Knobs(long=True))
    assert not (tmp_path / "x").exists()
