"""The synthetic addition task: traces, grading, tokenizer, step segmentation, prepared files."""

from __future__ import annotations

import json
import random

import pytest
import torch

from megatron_rgm.config import ConfigError
from megatron_rgm.data.benchmarks import load_benchmark
from megatron_rgm.rollout.rewards import CORRECT, WRONG, ExactVerifier
from megatron_rgm.steps import StepSegmenter, single_token_id
from megatron_rgm.tasks import (
    STEP,
    make_problems,
    make_steps,
    make_trace,
    parse_steps,
    prompt_text,
    render,
    sft_texts,
    train_tokenizer,
)
from megatron_rgm.tasks.prepare import main, prepare
from megatron_rgm.tokenizer import load_tokenizer

FILES = ("tokenizer/tokenizer.model", "train_prompts.jsonl", "eval_prompts.jsonl", "sft.jsonl", "task.json")


@pytest.fixture(scope="module")
def problems():
    return make_problems(200, seed=3)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory, problems):
    path = train_tokenizer(sft_texts(problems, seed=3), tmp_path_factory.mktemp("tok"))
    return load_tokenizer(path)


def _replay(problem, steps, route):
    """Check the propagation rule: every step adds two values still available (numbers or earlier results)."""
    pool = sorted(problem.numbers)
    for i, s in enumerate(steps):
        if route == "chain" and i > 0:
            assert s.a == steps[i - 1].result  # the running total comes first
        for v in (s.a, s.b):
            assert v in pool, (problem.numbers, steps)
            pool.remove(v)
        pool.append(s.result)
    assert pool == [steps[-1].result]


def test_problems_deterministic_distinct_and_sized():
    a, b = make_problems(300, seed=7), make_problems(300, seed=7)
    assert [p.to_json() for p in a] == [p.to_json() for p in b]
    assert [p.to_json() for p in a] != [p.to_json() for p in make_problems(300, seed=8)]
    assert len({tuple(sorted(p.numbers)) for p in a}) == 300 and len({p.id for p in a}) == 300
    for p in a:
        assert 3 <= len(p.numbers) <= 6 and all(1 <= x <= 9 for x in p.numbers)
        assert p.answer == str(sum(p.numbers)) and p.problem.startswith("Add ") and p.problem.endswith(".")
    other = make_problems(100, seed=9, exclude=[p.numbers for p in a])
    assert not {tuple(sorted(p.numbers)) for p in other} & {tuple(sorted(p.numbers)) for p in a}


@pytest.mark.parametrize("route", ["chain", "tree"])
def test_traces_grade_and_propagate(problems, route):
    verify, rng = ExactVerifier(), random.Random(0)
    for p in problems:
        for error in (False, True):
            seed = rng.random()
            steps = make_steps(p, random.Random(seed), error, route)
            response = make_trace(p, random.Random(seed), error, route)
            assert all(s.retracted is None for s in steps) and ", no, " not in response
            assert response == render(steps) and parse_steps(response) == steps
            assert response.endswith(f"{STEP}</think>\n\\boxed{{{steps[-1].result}}}")
            assert len(steps) == len(p.numbers) - 1
            _replay(p, steps, route)
            wrong = [s for s in steps if not s.ok]
            if error:
                assert len(wrong) == 1 and 1 <= abs(wrong[0].result - wrong[0].a - wrong[0].b) <= 3
                assert wrong[0].result >= 0
            else:
                assert not wrong
            grade = verify(response, p.answer)
            assert grade.answer == str(steps[-1].result) and grade.outcome == (WRONG if error else CORRECT)


@pytest.mark.parametrize("route", ["chain", "tree"])
def test_fixed_slips_stay_correct(problems, route):
    rng = random.Random(0)
    for p in problems:
        steps = make_steps(p, rng, error=True, route=route, fixed=True)
        response = render(steps)
        assert parse_steps(response) == steps and all(s.ok for s in steps)
        _replay(p, steps, route)
        fixes = [s for s in steps if s.retracted is not None]
        assert len(fixes) == 1 and 1 <= abs(fixes[0].retracted - fixes[0].result) <= 3
        assert f"{fixes[0].retracted}, no, {fixes[0].result}.\n\n" in response
        assert ExactVerifier()(response, p.answer).outcome == CORRECT


def test_given_order_adds_the_numbers_as_the_statement_lists_them(problems):
    rng = random.Random(0)
    for p in problems[:100]:
        for error, fixed in ((False, False), (True, False), (True, True)):
            steps = make_steps(p, rng, error, fixed=fixed, order="given")
            assert [steps[0].a] + [s.b for s in steps] == p.numbers  # every operand in the statement's order
            assert all(s.a == prev.result for prev, s in zip(steps, steps[1:]))
            assert sum(not s.ok for s in steps) == (1 if error and not fixed else 0)
            assert parse_steps(render(steps)) == steps
        # Only the slips differ between correct traces of one problem.
        assert len({make_trace(p, rng, order="given") for _ in range(8)}) == 1
    texts = sft_texts(problems[:50], seed=2, error_rate=1.0, fix_rate=0.5, order="given")
    assert sum(", no, " in t for t in texts) == 100  # 200 traces, every one slips, half taken back
    with pytest.raises(ConfigError, match="order 'given' needs route 'chain'"):
        make_steps(problems[0], rng, route="tree", order="given")
    with pytest.raises(ConfigError, match="tree_fraction"):
        sft_texts(problems[:5], seed=0, tree_fraction=0.5, order="given")
    with pytest.raises(ConfigError, match="unknown order"):
        make_steps(problems[0], rng, order="sorted")


def test_errors_land_on_every_step():
    p = make_problems(1, seed=0, min_terms=6, max_terms=6)[0]
    rng = random.Random(0)
    where = {[s.ok for s in make_steps(p, rng, True)].index(False) for _ in range(200)}
    assert where == {0, 1, 2, 3, 4}


def test_correct_traces_take_several_routes(problems):
    rng = random.Random(0)
    for p in problems[:50]:
        routes = {make_trace(p, rng) for _ in range(16)}
        assert len(routes) >= min(3, len(set(p.numbers)))
    p = next(p for p in problems if len(set(p.numbers)) == 4)
    assert len({make_trace(p, rng) for _ in range(200)}) >= 12  # up to 4! orders


def test_prompt_matches_rollout_template(problems):
    p = problems[0]
    assert prompt_text(p) == f"{p.problem}\n<think>\n"
    text = sft_texts([p], seed=0, error_rate=0.0, traces_per_problem=1)[0]
    steps = text[len(prompt_text(p)):].split("</think>")[0]
    assert text == f"{p.problem}\n<think>\n{steps}</think>\n\\boxed{{{p.answer}}}"


@pytest.mark.parametrize("fix_rate", [0.0, 0.5])
def test_sft_texts_error_rate_and_shuffle(problems, fix_rate):
    kw = dict(error_rate=0.3, traces_per_problem=4, tree_fraction=0.5, fix_rate=fix_rate)
    texts = sft_texts(problems, seed=1, **kw)
    assert len(texts) == 800 and texts == sft_texts(problems, seed=1, **kw)
    by_problem = {prompt_text(p): p for p in problems}
    n_wrong = n_fixed = 0
    for t in texts:
        prompt, response = t.split("\n<think>\n")
        grade = ExactVerifier()(response, by_problem[prompt + "\n<think>\n"].answer)
        n_wrong += grade.outcome == WRONG
        n_fixed += ", no, " in response
        assert grade.outcome == CORRECT or ", no, " not in response
    assert n_wrong + n_fixed == 240 and n_fixed == round(fix_rate * 240)
    assert len({t.split("\n")[0] for t in texts[:10]}) >= 5  # shuffled: a problem's traces are not adjacent
    with pytest.raises(ConfigError, match="error_rate"):
        sft_texts(problems, seed=1, error_rate=1.5)


def test_tokenizer_round_trip_and_single_tokens(problems, tokenizer):
    assert len(tokenizer) <= 512 and tokenizer.eos_token_id is not None and tokenizer.pad_token_id is not None
    step_id = single_token_id(tokenizer, STEP)
    assert step_id is not None
    texts = sft_texts(problems, seed=4, tree_fraction=0.5) + ["Add 99, 100 and 7.\n<think>\n", "café ▸ {x}\t\n"]
    for t in texts:
        assert tokenizer.decode(tokenizer.encode(t)) == t
    for t in sft_texts(problems, seed=4, fix_rate=0.5):
        ids = tokenizer.encode(t)
        assert ids.count(step_id) == t.count(STEP)
    for n in (0, 7, 42, 54):  # every number is one token, the same id wherever it appears
        assert len(tokenizer.encode(str(n))) == 1
        assert tokenizer.encode(f"Add {n}, 1 and 2.")[1] == tokenizer.encode(f"1 + 2 = {n}.\n\n")[4]


def test_step_segmenter_counts_written_steps(problems, tokenizer):
    seg = StepSegmenter.from_tokenizer(tokenizer)
    assert seg.step_ids.tolist() == [single_token_id(tokenizer, STEP)]
    assert seg.think_start == single_token_id(tokenizer, "<think>") is not None
    assert seg.think_end == single_token_id(tokenizer, "</think>") is not None
    rng = random.Random(2)
    for p in problems[:100]:
        prompt = tokenizer.encode(prompt_text(p))
        for error in (False, True):
            response = make_trace(p, rng, error, rng.choice(["chain", "tree"]), fixed=rng.random() < 0.5)
            ids = prompt + tokenizer.encode(response)
            assert tokenizer.decode(ids) == prompt_text(p) + response  # the split is a token boundary
            mask = torch.arange(len(ids)) >= len(prompt)
            layout = seg(torch.tensor([ids]), mask[None])
            assert layout.mask.sum().item() == len(parse_steps(response)) == len(p.numbers) - 1
            for pos in layout.positions.tolist():  # the scored state is the result token before ".\n\n"
                assert ids[pos + 1] == seg.step_ids[0] and tokenizer.decode([ids[pos]]).isdigit()


def test_token_lengths(tokenizer):
    longest = make_problems(50, seed=0, min_terms=6, max_terms=6, max_value=20)
    rng = random.Random(0)
    lengths = [len(tokenizer.encode(prompt_text(p) + make_trace(p, rng, e, r, fixed=e)))
               for p in longest for e in (False, True) for r in ("chain", "tree")]
    assert max(lengths) < 160


def test_prepare_writes_loadable_disjoint_deterministic_files(tmp_path):
    kw = dict(seed=5, n_train=300, n_eval=40, n_sft=500, fix_rate=0.5)
    paths = prepare(tmp_path / "a", **kw)
    prepare(tmp_path / "b", **kw)
    for name in FILES:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert paths["tokenizer"] == tmp_path / "a" / FILES[0]
    train = load_benchmark(paths["train"], "problem", "answer")
    evals = load_benchmark(paths["eval"], "problem", "answer")
    assert len(train) == 300 and len(evals) == 40
    key = lambda r: tuple(sorted(int(x) for x in r["problem"][4:-1].replace(" and", ",").split(", ")))  # noqa: E731
    assert not {key(r) for r in train} & {key(r) for r in evals}
    assert not {r["id"] for r in train} & {r["id"] for r in evals}
    sft = [json.loads(line)["text"] for line in paths["sft"].read_text().splitlines()]
    assert len(sft) == 500
    train_prompts = {r["problem"] for r in train}
    assert all(t.split("\n<think>\n")[0] in train_prompts for t in sft)
    meta = json.loads(paths["meta"].read_text())
    assert meta["vocab_size"] <= 512 and meta["sft_tokens_max"] < 160
    tok = load_tokenizer(tmp_path / "a" / "tokenizer")
    assert all(tok.decode(tok.encode(t)) == t for t in sft)
    # the eval set does not depend on the training set's size
    assert load_benchmark(prepare(tmp_path / "c", seed=5, n_train=10, n_eval=40, n_sft=20)["eval"],
                          "problem", "answer") == evals


def test_prepare_cli_and_user_errors(tmp_path, capsys):
    assert main(["--output", str(tmp_path / "cli"), "--n-train", "20", "--n-eval", "5", "--n-sft", "30"]) == 0
    assert all((tmp_path / "cli" / name).exists() for name in FILES)
    assert main(["--output", str(tmp_path / "x"), "--min-terms", "1"]) == 2
    assert "min_terms" in capsys.readouterr().err
    assert main(["--output", str(tmp_path / "x"), "--max-value", "2", "--max-terms", "3", "--n-train", "500"]) == 2
    assert "raise max_value" in capsys.readouterr().err
    assert main(["--output", str(tmp_path / "x"), "--vocab-size", "256"]) == 2
    assert "vocab_size" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="route"):
        make_trace(make_problems(1, 0)[0], random.Random(0), route="zigzag")
