"""Answer extraction and grading (math-verify and exact), and the benchmark loaders."""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import threading
from pathlib import Path

import pytest

from megatron_rgm.config import ConfigError
from megatron_rgm.data.benchmarks import load_benchmark
from megatron_rgm.rollout.rewards import CORRECT, FORMAT_ERROR, WRONG, ExactVerifier, MathVerifier, last_boxed

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "benchmarks"
BENCHMARKS = ["aime24", "aime25", "hmmt25", "math500", "gsm8k_test"]


@pytest.mark.parametrize("name", BENCHMARKS)
def test_every_gold_answer_grades_correct_and_a_perturbed_one_wrong(name):
    rows = load_benchmark(DATA / f"{name}.jsonl")
    assert rows and all(set(r) == {"id", "problem", "answer"} for r in rows)
    verify = MathVerifier()
    # Every distinct gold answer, once: a grade depends on (response, gold) only, and gsm8k's 1319 answers hold
    # 351 distinct values, math500's 500 hold 301 (grading the repeats again took two thirds of this test).
    answers = list(dict.fromkeys(r["answer"] for r in rows))
    wrong_gold = [a for a in answers if verify(f"Thus \\boxed{{{a}}}.", a).outcome != CORRECT]
    assert wrong_gold == []
    right_perturbed = [a for a in answers if verify(f"Thus \\boxed{{{a}+1}}.", a).outcome != WRONG]
    assert right_perturbed == []


def test_loaders_normalise_each_format():
    aime = load_benchmark(DATA / "aime24.jsonl")
    assert aime[0]["problem"].rstrip().endswith("within \\boxed{}.") and aime[0]["answer"].isdigit()
    hmmt = load_benchmark(DATA / "hmmt25.jsonl")
    assert any("," in r["answer"] for r in hmmt)  # the answer that is a list of two values
    gsm = load_benchmark(DATA / "gsm8k_test.jsonl")
    assert len(gsm) == 1319 and all("####" not in r["answer"] for r in gsm) and gsm[0]["answer"] == "18"
    assert len(load_benchmark(DATA / "math500.jsonl")) == 500


def test_last_boxed():
    assert last_boxed("a \\boxed{1} then \\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert last_boxed("\\fbox{7}") == "7"
    assert last_boxed("no answer") is None
    assert last_boxed("cut off \\boxed{\\frac{1}{2") is None


def test_format_error_is_its_own_outcome():
    assert MathVerifier()("I give up.", "3").outcome == FORMAT_ERROR
    assert ExactVerifier()("I give up.", "3").outcome == FORMAT_ERROR
    g = ExactVerifier()("so \\boxed{ 42 }.", "42")
    assert g.outcome == CORRECT and g.reward == 1.0
    assert ExactVerifier()("\\boxed{41}", "42").reward == 0.0


def test_grading_off_the_main_thread():
    out = {}
    t = threading.Thread(target=lambda: out.update(g=MathVerifier()("\\boxed{\\frac{2}{4}}", "0.5")))
    t.start()
    t.join(60)
    assert out["g"].outcome == CORRECT


def _grade(args):
    return MathVerifier()(*args).outcome


def test_grading_in_worker_processes():
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(2, mp_context=ctx) as pool:
        got = list(pool.map(_grade, [("\\boxed{3}", "3"), ("\\boxed{4}", "3"), ("none", "3")]))
    assert got == [CORRECT, WRONG, FORMAT_ERROR]


def test_bad_benchmark_files(tmp_path):
    bad = tmp_path / "probs.jsonl"
    bad.write_text('{"q": "1+1", "a": "2"}\n{"q": "2+2", "a": \n')
    with pytest.raises(ConfigError, match="probs.jsonl:2: not valid JSON"):
        load_benchmark(bad, "q", "a")
    good = tmp_path / "mine.jsonl"
    good.write_text('{"q": "1+1", "a": "2"}\n{"q": "2+2"}\n')
    with pytest.raises(ConfigError, match="record 2 has no field 'a'"):
        load_benchmark(good, "q", "a")
    with pytest.raises(ConfigError, match="record 1 has no field 'problem'.*pass --problem-key"):
        load_benchmark(good)
    with pytest.raises(ConfigError, match="is not a file"):
        load_benchmark(tmp_path / "missing.jsonl", "q", "a")
    assert load_benchmark(_one(tmp_path), "q", "a")[0]["answer"] == "2"


def _one(tmp_path: Path) -> Path:
    f = tmp_path / "one.jsonl"
    f.write_text('{"q": "1+1", "a": 2}\n')
    return f
