"""The knobbed addition task: its generator's slips and the exact step labels, checked by hand and in bulk."""

from __future__ import annotations

import random
import re
from collections import Counter

import pytest

from megatron_rgm.config import ConfigError
from megatron_rgm.tasks.arithmetic import Problem, Step, names_addends, parse_steps, render, statement
from megatron_rgm.tasks.knobs import (
    LETTERS,
    Knobs,
    StepLabel,
    first_error,
    knob_problems,
    knob_sft_texts,
    knob_steps,
    label_response,
    marked_statement,
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


def test_hand_checked_long_trace_with_letters_and_two_addends_per_step():
    p = Problem("p", marked_statement([6, 7, 1, 5, 9]), "28", [6, 7, 1, 5, 9])
    assert p.problem == "Add a6, b7, c1, d5 and e9."
    # the addends first, named as the statement names them, then the running total; the last step slips by +1
    text = "b7 + c1 + 6 = 14.\n\nd5 + e9 + 14 = 29.\n\n</think>\n\\boxed{29}"
    steps = parse_steps(text, named=True)
    assert steps == [Step(6, 7, 14, more=(1,), letters=("b", "c")), Step(14, 5, 29, more=(9,), letters=("d", "e"))]
    assert names_addends(p.problem) and not names_addends("Add 6, 7 and 1.")
    assert render(steps) == text
    labels, correct = label_response(p, text)
    assert labels == [StepLabel(True, True), StepLabel(False, False)] and not correct
    assert parse_steps("b7 + 6 = 12, no, 13.\n\nE9 + 270 = 279.\n\n", named=True) == \
        [Step(6, 7, 13, retracted=12, letters=("b",)), Step(270, 9, 279, letters=("E",))]
    # a line that is not a named step in full is skipped, not read as the plain step inside it
    assert parse_steps("b7 + 3 + 6 = 16.\n\nx1 + 13 = 14.\n\n", named=True) == [Step(13, 1, 14, letters=("x",))]
    # one addend per step is four steps; a step that adds three addends is counted as far as its operands go
    assert step_truth(p, [Step(6, 7, 13), Step(13, 1, 19, more=(5,)), Step(19, 9, 28)]) == \
        [StepLabel(True, True), StepLabel(True, True), StepLabel(True, True)]
    with pytest.raises(ConfigError, match="letters"):
        marked_statement(list(range(40)))


def test_long_traces_vary_in_length_within_a_problem():
    p = knob_problems(1, seed=0, knobs=Knobs(long=True))[0]
    rng = random.Random(0)
    traces = [knob_steps(p, rng, Knobs(long=True)) for _ in range(40)]
    n = len(p.numbers) - 1
    assert {len(t) for t in traces} == {n, (n + 1) // 2}, "one or two addends per step, drawn per trace"
    for t in traces:
        labels, correct = label_response(p, render(t))
        assert correct and all(l.local_ok and l.on_track for l in labels)
        named = [(x, v) for s in t for x, v in zip(s.letters, (s.b, *s.more))]
        assert named == list(zip(LETTERS[1:], p.numbers[1:])), "each addend once, by its letter, in order"
    # the slips of the other knobs on a two-addends-per-step trace: the dropped carry loses 10 where it carries
    p = Problem("p", marked_statement([7, 5, 6, 8, 2]), "28", [7, 5, 6, 8, 2])
    rng, seen = random.Random(3), set()
    for _ in range(30):
        steps = knob_steps(p, rng, Knobs(long=True, systematic=1.0), error=True)
        labels, correct = label_response(p, render(steps))
        first = steps[0]
        assert first.result == sum(p.numbers[:2 + len(first.more)]) - 10  # 7 + 5 (+ 6) carries: 2 or 8
        assert not correct and not labels[0].local_ok and all(l.local_ok for l in labels[1:])
        seen.add(len(first.more))
    assert seen == {0, 1}


def test_in_bulk_lucky_share_long_lengths_and_agreeing_wrong_answers():
    rng = random.Random(2)
    long = knob_problems(200, seed=0, knobs=Knobs(long=True))
    lengths = [len(p.numbers) - 1 for p in long]
    assert min(lengths) >= 4 and max(lengths) <= 30 and max(lengths) - min(lengths) >= 20
    assert all(p.problem == marked_statement(p.numbers) for p in long)

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
    assert all(len(parse_steps(t.split("<think>\n", 1)[1], named=True)) >= 2 for t in texts)
    with pytest.raises(ConfigError, match="lucky knob"):
        Knobs(lucky=1.5)
    with pytest.raises(ConfigError, match="error_rate"):
        knob_sft_texts(problems, 0, Knobs(), error_rate=2.0)


def test_prepare_writes_the_knobbed_task(tmp_path):
    import json

    from megatron_rgm.tasks.prepare import prepare
    from megatron_rgm.tokenizer import load_tokenizer

    paths = prepare(tmp_path, n_train=40, n_eval=8, n_sft=160, error_rate=0.5,  # vocabulary: LONG_VOCAB
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
        p = Problem(row["id"], row["problem"], row["answer"], [int(x) for x in re.findall(r"\d+", statement_)])
        labels, correct = label_response(p, response)
        assert 2 <= len(labels) <= 30 and statement_ == marked_statement(p.numbers)
        assert tok.decode(tok.encode(text)) == text
        pieces = [tok.decode([i]) for i in tok.encode(text)]  # a letter is one token, and so is a number
        for name in re.findall(r"[a-zA-Z]\d", statement_[4:])[1:]:  # in the statement and again in a step
            assert pieces.count(name) == text.count(name) == 2, (name, pieces)
        assert text.rsplit("{", 1)[1][:-1] in pieces
        if first_error(labels) >= 0:
            slipped += 1
            lucky += correct
    assert slipped == 80 and lucky > 60, (slipped, lucky)  # every slip cancelled, but one at the last step
    with pytest.raises(ConfigError, match="knobbed task"):
        prepare(tmp_path / "x", n_train=4, n_eval=2, n_sft=4, tree_fraction=0.5, knobs=Knobs(long=True))
    assert not (tmp_path / "x").exists()
