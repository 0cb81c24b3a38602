"""Reflective Best-of-N: the choice, the continuation, both backends and layouts, then tools/evaluate.py.

A scripted sampler (character tokens, chosen step logits, boxed answers) pins the logic with graded answers; a
tiny random Qwen2 (steered so that steps and ``</think>`` are frequent) runs the tool end to end.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import REPO, clean_env, tool, torchrun
from megatron_rgm.config import AGGREGATIONS, PROMPT_TEMPLATE, ConfigError
from megatron_rgm.inference import BestOfN, BestOfNConfig, choose
from megatron_rgm.rollout.sampler import Rollout, SamplingParams
from megatron_rgm.rollout.sampling import RESPONSE_BUDGET

# --- a scripted sampler: the logic with known scores and gradable answers -------------------------------------

EOS = 1


class CharTokenizer:
    eos_token_id = EOS

    def encode(self, text, add_special_tokens=False):
        return [ord(c) for c in text]

    def decode(self, ids):
        return "".join(chr(i) for i in ids if i != EOS)


class ScriptedSampler:
    """Thinking: the scripted texts and step logits. Answer: ``\\boxed{x}`` for a prompt ending ``ANSWER=x</think>``."""

    position_limit = 10_000

    def __init__(self, thoughts: list[tuple[str, list[float]]]):
        self.thoughts = thoughts
        self.calls: list[SamplingParams] = []

    def generate(self, prompt_ids, k, params):
        self.calls.append(params)
        if not params.stop_strings and k > 1:  # whole responses (--bon-mode complete): the script, each to eos
            rows = [(t.replace("[eos]", "") + f" so \\boxed{{{t.split('ANSWER=')[1][0]}}}", logits)
                    for t, logits in self.thoughts[:k]]
            seqs = [list(prompt_ids) + CharTokenizer().encode(t) + [EOS] for t, _ in rows]
            return self._rollout(prompt_ids, rows, seqs)
        if params.stop_strings:
            rows = [(t, logits) for t, logits in self.thoughts[:k]]
        else:
            text = CharTokenizer().decode(prompt_ids)
            answer = text.rsplit("ANSWER=", 1)[-1].removesuffix("</think>") if "ANSWER=" in text else "?"
            rows = [(f" so \\boxed{{{answer}}}.", [])]
        seqs = [list(prompt_ids) + CharTokenizer().encode(t) + ([EOS] if not params.stop_strings else [])
                for t, _ in rows]
        if params.stop_strings:  # an "[eos]" marker in a script ends that candidate with eos
            seqs = [s[:-5] + [EOS] if CharTokenizer().decode(s).endswith("[eos]") else s for s in seqs]
        return self._rollout(prompt_ids, rows, seqs)

    def generate_batch(self, prompts, k, params, max_batch=None, stopper=None):
        assert stopper is None, "the scripted sampler has no early stopping"
        return [self.generate(p, k, par) for p, par in zip(prompts, params)]

    @staticmethod
    def _rollout(prompt_ids, rows, seqs) -> Rollout:
        width = max(map(len, seqs))
        tokens = torch.tensor([s + [0] * (width - len(s)) for s in seqs])
        flat = torch.tensor([x for _, logits in rows for x in logits], dtype=torch.float32)
        cu = torch.tensor([0] + [len(logits) for _, logits in rows]).cumsum(0).to(torch.int32)
        zeros = torch.zeros(tokens.shape)
        return Rollout(tokens, len(prompt_ids), torch.tensor(list(map(len, seqs))), zeros, zeros, flat, cu,
                       torch.zeros(tokens.shape, dtype=torch.bool))


THOUGHTS = [  # step logits chosen so that the aggregations disagree (probabilities in the comments)
    ("a.\n\nANSWER=5</think>", [4.0, -3.0]),  # .98 .05: never best
    ("b.\n\nANSWER=7</think>", [1.0, 1.0]),  # .73 .73: best geometric (.731), product, min
    ("c.\n\nANSWER=5</think>", [-2.0, 5.0]),  # .12 .99: best last
    ("d.\n\nANSWER=7 [eos]", [6.0, 6.0, -0.5]),  # .998 .998 .38: best arithmetic (geometric .721); ended by eos
]
PROBLEM = {"id": "p0", "problem": "Add 3 and 4.", "answer": "7"}


def scripted(k=4, **kw) -> tuple[BestOfN, ScriptedSampler]:
    sampler = ScriptedSampler(THOUGHTS)
    return BestOfN(sampler, CharTokenizer(), BestOfNConfig(k=k, verifier="exact", **kw)), sampler


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_choice_is_the_argmax_of_the_recorded_aggregates(aggregation):
    bon, _ = scripted(aggregation=aggregation)
    record = bon.solve(PROBLEM, 0)
    aggregates = [c["aggregate"] for c in record["candidates"]]
    assert record["chosen"] == max(range(4), key=lambda j: aggregates[j])
    p = [torch.sigmoid(torch.tensor(logits)) for _, logits in THOUGHTS]
    expected = {"geometric": [x.log().mean().exp() for x in p], "arithmetic": [x.mean() for x in p],
                "product": [x.prod() for x in p], "min": [x.min() for x in p], "last": [x[-1] for x in p]}[aggregation]
    assert aggregates == pytest.approx([float(e) for e in expected], rel=1e-5)
    for c, (_, logits) in zip(record["candidates"], THOUGHTS):
        assert c["step_scores"] == pytest.approx(torch.sigmoid(torch.tensor(logits)).tolist(), rel=1e-6)


def test_aggregations_choose_differently_and_ties_go_to_the_first():
    chosen = {a: scripted(aggregation=a)[0].solve(PROBLEM, 0)["chosen"] for a in AGGREGATIONS}
    assert chosen == {"geometric": 1, "arithmetic": 3, "product": 1, "min": 1, "last": 2}
    assert choose([0.2, 0.7, 0.7, 0.1]) == 1 and choose([0.0, 0.0]) == 0


def test_the_chosen_trajectory_is_continued_and_graded():
    bon, sampler = scripted(aggregation="min")  # picks candidate 1 ("ANSWER=7")
    r = bon.solve(PROBLEM, 0)
    c = r["candidates"][1]
    assert r["chosen"] == 1 and r["response"] == c["response"]
    assert r["response"].startswith(c["text"]) and r["response"] == c["text"] + " so \\boxed{7}."
    assert r["prediction"] == "7" and r["correct"] is True
    assert len(sampler.calls) == 2 and sampler.calls[1].temperature == 0 and not sampler.calls[1].stop_strings
    assert sampler.calls[0].stop_strings == ["</think>"] and sampler.calls[0].eos_token_ids == [EOS]
    assert r["responses"][0] == r["candidates"][0]["text"]  # not continued without complete_all
    bon, _ = scripted(aggregation="last")  # picks candidate 2 (answer 5): wrong
    r = bon.solve(PROBLEM, 0)
    assert r["chosen"] == 2 and r["prediction"] == "5" and r["correct"] is False


def test_budgets_and_penalty_default_to_the_model_and_the_reference():
    bon, sampler = scripted(aggregation="min")
    assert (bon.cfg.sampling.max_new_tokens, bon.cfg.answer_max_new_tokens) == (None, None)
    assert bon.cfg.sampling.repetition_penalty == 1.05  # the reference's Best-of-N sampling; training's is 1
    record = bon.solve(PROBLEM, 0)
    answered = sampler.calls[1]  # the chosen trajectory's answer: every position it leaves
    chosen = len(CharTokenizer().encode(PROMPT_TEMPLATE.format(problem=PROBLEM["problem"]) +
                                        record["candidates"][1]["text"]))
    assert answered.max_new_tokens == ScriptedSampler.position_limit - chosen
    assert answered.repetition_penalty == 1.05
    # Every position left, up to the paper's 32k: a 131k-position model does not reserve 131k per sample.
    assert SamplingParams().budget(100, 1000) == 900 and SamplingParams(max_new_tokens=7).budget(100, 1000) == 7
    assert SamplingParams().budget(100, 131072) == RESPONSE_BUDGET == 32768


def test_complete_all_answers_every_candidate_and_keeps_an_eos_one():
    bon, sampler = scripted(complete_all=True, aggregation="min")
    r = bon.solve(PROBLEM, 0)
    assert [c["finish"] for c in r["candidates"]] == ["think_end"] * 3 + ["eos"]
    assert len(sampler.calls) == 1 + 3, "the eos-finished candidate is already complete"
    assert [c["correct"] for c in r["candidates"]] == [False, True, False, False]  # the eos one has no \\boxed
    assert r["candidates"][3]["response"] == r["candidates"][3]["text"]
    assert all(c["response"].startswith(c["text"]) for c in r["candidates"])
    alone, _ = scripted(aggregation="min")
    assert alone.solve(PROBLEM, 0)["response"] == r["response"]
    assert r["responses"] == [c["response"] for c in r["candidates"]]


def test_complete_mode_scores_whole_responses_and_grades_the_picks_own_answer():
    bon, sampler = scripted(aggregation="min", mode="complete")
    r = bon.solve(PROBLEM, 0)
    assert len(sampler.calls) == 1, "no continuation: the candidates are whole responses"
    assert sampler.calls[0].stop_strings == [] and sampler.calls[0].eos_token_ids == [EOS]
    assert [c["finish"] for c in r["candidates"]] == ["eos"] * 4
    c = r["candidates"][r["chosen"]]
    assert r["chosen"] == 1 and r["response"] == c["text"] == "b.\n\nANSWER=7</think> so \\boxed{7}"
    assert (r["prediction"], r["correct"]) == ("7", True)
    assert all("correct" not in x for j, x in enumerate(r["candidates"]) if j != r["chosen"])
    graded, _ = scripted(aggregation="last", mode="complete", complete_all=True)
    r = graded.solve(PROBLEM, 0)
    assert r["chosen"] == 2 and r["correct"] is False
    assert [x["correct"] for x in r["candidates"]] == [False, True, False, True]
    with pytest.raises(ConfigError, match="--bon-mode 'x' is unknown"):
        BestOfNConfig(mode="x")


def test_k1_bon_equals_pass1_in_the_evaluation(tmp_path):
    from megatron_rgm.evaluation.report import run

    problems = [{"id": str(i), "problem": f"q{i}", "answer": a} for i, a in enumerate(["7", "5", "7", "3"])]
    out = tmp_path / "k1.jsonl"
    bon, _ = scripted(k=1)
    summary = bon.run(problems, out)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert all(r["chosen"] == 0 and len(r["candidates"]) == 1 for r in rows)
    assert summary == {"problems": 4, "graded": 4, "correct": 1}  # only the gold "5" matches
    metrics = run(out, [1], verifier="exact")
    assert metrics["bon@1/geometric"] == metrics["pass@1"] == 0.25


def test_a_failure_leaves_no_output(tmp_path):
    bon, sampler = scripted()

    def boom(*a):
        raise ConfigError("prompt too long")

    out = tmp_path / "o.jsonl"
    bon.run([PROBLEM], out)
    assert out.exists()
    out.unlink()
    sampler.generate = boom
    with pytest.raises(ConfigError):
        bon.run([PROBLEM], out)
    assert list(tmp_path.iterdir()) == []


def test_early_stopping_rule_on_hand_values():
    """Which candidates of one problem end: (running aggregate, steps, still decoding) each."""
    from megatron_rgm.inference.pruning import PruneRule

    group = [(0.9999, 2, True), (0.99, 2, True), (0.5, 2, True), (0.2, 1, True), (0.95, 3, False)]
    # On probabilities the saturated pair is 0.0099 apart: only 0.5 trails the best (0.9999) by more than 0.1; the
    # one-step candidate is not judged yet and a finished one is never ended.
    assert PruneRule(0.1, min_steps=2).stops(group) == [2]
    # On log-odds (9.21, 4.60, 0, -, 2.94) a margin of 2 ends 0.99 as well.
    assert PruneRule(2.0, min_steps=2, scale="logit").stops(group) == [1, 2]
    assert PruneRule(5.0, min_steps=2, scale="logit").stops(group) == [2]
    # A finished candidate sets the bar; a best with too few steps does not.
    assert PruneRule(2.0, min_steps=2, scale="logit").stops([(0.99, 2, True), (0.9999, 4, False)]) == [0]
    assert PruneRule(0.1, min_steps=2).stops([(0.3, 2, True), (0.99, 1, True)]) == []
    assert PruneRule(0.1, min_steps=1).stops([(0.3, 2, True), (0.99, 1, True)]) == [0]
    # Aggregates of exactly 0 and 1 have finite log-odds: 1 ends 0, and equal aggregates end nothing.
    assert PruneRule(1.0, min_steps=1, scale="logit").stops([(1.0, 1, True), (0.0, 1, True)]) == [1]
    assert PruneRule(1.0, min_steps=1, scale="logit").stops([(1.0, 1, True), (1.0, 1, True)]) == []
    with pytest.raises(ConfigError, match="--bon-prune-scale 'odds' is unknown: use one of prob, logit"):
        PruneRule(0.1, scale="odds")
    with pytest.raises(ConfigError, match="--bon-prune-scale 'odds' is unknown"):
        BestOfNConfig(prune_scale="odds")  # checked with or without a margin


# --- a tiny random Qwen2, both backends, then tools/evaluate.py -----------------------------------------------

@pytest.fixture(scope="module")
def setup(qwen2_checkpoints):
    # root/hf: steered (helpers.steer: steps and </think> frequent) with a scaled-up head; root/mcore: its conversion.
    root, converted = qwen2_checkpoints["bon"]
    converted()
    prompts = root / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"q": f"Add {i} and {i + 1}.", "a": str(2 * i + 1)}) for i in range(3)))
    return root, prompts


SAMPLED = ["--problem-key", "q", "--answer-key", "a", "--k", "4", "--temperature", "1.0", "--max-new-tokens", "24",
           "--answer-max-new-tokens", "8", "--complete-all", "--seed", "3"]


def best_of_n(*args: str) -> None:
    """The megatron backend in a fresh process (it sets up process groups and rank variables)."""
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "best_of_n.py"), *args], env=clean_env(),
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def megatron_tp1(setup):
    root, prompts = setup
    out = root / "tp1.jsonl"
    best_of_n("--prompts", str(prompts), "--output", str(out), "--mcore-path", str(root / "mcore"), *SAMPLED)
    return read(out)


def test_megatron_output(megatron_tp1):
    from megatron_rgm.evaluation.report import aggregate_scores

    rows = megatron_tp1
    assert len(rows) == 3 and all(len(r["candidates"]) == 4 for r in rows)
    cands = [c for r in rows for c in r["candidates"]]
    assert sum(len(c["step_scores"]) for c in cands) >= 6, "the steered model should write steps"
    assert any(c["finish"] == "think_end" for c in cands)
    assert len({round(c["aggregate"], 2) for c in cands}) > 3 and any(r["chosen"] > 0 for r in rows)
    for r in rows:
        aggregates = [c["aggregate"] for c in r["candidates"]]
        assert r["chosen"] == choose(aggregates)
        assert aggregates == aggregate_scores(r["step_scores"])["geometric"]  # what evaluate's BoN ranks by
        for c in r["candidates"]:
            assert all(0 < p < 1 for p in c["step_scores"])
            # Byte-level tokens: a character split at the boundary decodes as U+FFFD in the thinking alone.
            assert c["response"].startswith(c["text"].rstrip("\ufffd"))
            assert c["response"] == c["text"] if c["finish"] == "eos" else len(c["response"]) > len(c["text"])
            assert c["correct"] is False  # a random model writes no \\boxed{}
        assert r["response"] == r["candidates"][r["chosen"]]["response"]


@pytest.mark.multirank
def test_reflective_early_stopping_ends_trailing_candidates_on_the_same_draws(setup, megatron_tp1, tmp_path):
    """With the rule on, a candidate that trails its problem's best ends early: the others are the very candidates
    of the run without it (a generator per sample), a stopped one is a prefix of its unstopped self, it is never
    picked, and the decode tokens spent drop."""
    root, prompts = setup
    out = tmp_path / "pruned.jsonl"
    best_of_n("--prompts", str(prompts), "--output", str(out), "--mcore-path", str(root / "mcore"), *SAMPLED,
              "--bon-prune-margin", "0.05", "--bon-prune-min-steps", "1", "--bon-prune-every", "1", "--max-batch", "6")
    pruned = read(out)
    stopped = 0
    for full, cut in zip(megatron_tp1, pruned):
        assert not cut["stopped"][cut["chosen"]]
        for a, b in zip(full["candidates"], cut["candidates"]):
            if b["finish"] == "stopped":
                stopped += 1
                assert a["text"].startswith(b["text"].rstrip("\ufffd")) and b["tokens"] < a["tokens"]
                assert "response" not in b and b["step_scores"] == pytest.approx(a["step_scores"][:len(b["step_scores"])],
                                                                                rel=1e-4, abs=1e-6)
            else:
                assert (b["text"], b["finish"]) == (a["text"], a["finish"])
                assert b["step_scores"] == pytest.approx(a["step_scores"], rel=1e-4, abs=1e-6)
    assert stopped > 0, "the rule should stop some of these candidates"
    assert sum(sum(r["tokens"]) for r in pruned) < sum(sum(r["tokens"]) for r in megatron_tp1)


@pytest.mark.multirank
def test_megatron_tp2_equals_tp1(setup, megatron_tp1, tmp_path):
    root, prompts = setup
    out = tmp_path / "tp2.jsonl"
    torchrun(str(REPO / "tools" / "best_of_n.py"), 2, ["--prompts", str(prompts), "--output", str(out),
                                                        "--mcore-path", str(root / "mcore"), "--tp", "2", *SAMPLED])
    _assert_same(read(out), megatron_tp1)


def test_hf_backend_equals_megatron(setup, megatron_tp1, tmp_path):
    root, prompts = setup  # root/hf: the weights the checkpoint was converted from (export round trip: test_convert)
    out = tmp_path / "hf.jsonl"
    assert tool("best_of_n").main(["--prompts", str(prompts), "--output", str(out), "--backend", "hf",
                                   "--hf-path", str(root / "hf"), *SAMPLED]) == 0
    _assert_same(read(out), megatron_tp1)


@pytest.mark.multirank
def test_complete_mode_on_both_backends(setup, tmp_path):
    """The reference's mode: whole responses (past ``</think>``, to EOS or the budget), no continuation; the
    two backends draw the same responses and make the same picks."""
    root, prompts = setup
    flags = [*SAMPLED, "--bon-mode", "complete"]
    best_of_n("--prompts", str(prompts), "--output", str(tmp_path / "m.jsonl"), "--mcore-path", str(root / "mcore"),
              *flags)
    assert tool("best_of_n").main(["--prompts", str(prompts), "--output", str(tmp_path / "h.jsonl"), "--backend",
                                   "hf", "--hf-path", str(root / "hf"), *flags]) == 0
    rows = read(tmp_path / "m.jsonl")
    _assert_same(read(tmp_path / "h.jsonl"), rows)
    cands = [c for r in rows for c in r["candidates"]]
    assert {c["finish"] for c in cands} <= {"eos", "length"} and all(c["response"] == c["text"] for c in cands)
    assert any("</think>" in c["text"] and not c["text"].endswith("</think>") for c in cands), \
        "some response should go on past the end of its thinking"


@pytest.fixture(scope="module")
def real_vocab(tmp_path_factory):
    """A random Qwen2 (hidden 64) on the real Qwen2 vocabulary with its ChatML template, steered to write
    ``".\n\n"`` (id 382) and ``</think>``, with a scaled-up head; and its Megatron conversion."""
    from helpers import convert, make_hf, qwen_vocab, steer

    root = tmp_path_factory.mktemp("real_vocab")
    tok = qwen_vocab("qwen2")
    hf = make_hf("qwen2", root / "hf", vocab=len(tok))
    tok.save_pretrained(hf)
    steer(hf)
    torch.manual_seed(1)
    head = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Dropout(), torch.nn.Linear(128, 1))
    with torch.no_grad():
        head[0].weight *= 100
        head[3].weight *= 3
    torch.save(head.state_dict(), hf / "score_module.pt")
    convert("hf-to-mcore", "--hf-path", str(hf), "--output", str(root / "mcore"), "--sprm-head",
            str(hf / "score_module.pt"))
    prompts = root / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"q": f"Add {i} and {i + 1}.", "a": str(2 * i + 1)}) for i in range(3)))
    return root, prompts


@pytest.mark.multirank
@pytest.mark.parametrize("mode", ["think", "complete"])
def test_chat_templated_best_of_n_on_a_real_vocabulary(real_vocab, tmp_path, mode):
    """ChatML prompts rendered by the tokenizer (its template travels into the checkpoint's hf_assets), the
    exact step rule on the real vocabulary; the megatron and HF backends draw, score and pick the same."""
    root, prompts = real_vocab
    # Top-k 20: a random model's next-token distribution over 151k tokens is nearly flat, and a draw from ~140k
    # nucleus members of ~7e-6 each flips with fp32 reordering between backends; among 20 it does not.
    flags = [*SAMPLED, "--top-k", "20", "--bon-mode", mode, "--prompt-template", "chat"]
    best_of_n("--prompts", str(prompts), "--output", str(tmp_path / "m.jsonl"), "--mcore-path", str(root / "mcore"),
              *flags)
    assert tool("best_of_n").main(["--prompts", str(prompts), "--output", str(tmp_path / "h.jsonl"), "--backend",
                                   "hf", "--hf-path", str(root / "hf"), *flags]) == 0
    rows = read(tmp_path / "m.jsonl")
    _assert_same(read(tmp_path / "h.jsonl"), rows)
    assert sum(len(c["step_scores"]) for r in rows for c in r["candidates"]) >= 6, "the steered model writes steps"
    assert (root / "mcore" / "hf_assets" / "chat_template.jinja").exists()


def _assert_same(rows: list[dict], ref: list[dict]) -> None:
    """Same draws (same seeds, logits within fp32 reordering), same texts, step scores within 1e-5, same choice.

    The choice is an argmax of aggregates that two backends compute within ~1e-6 of each other: it must be the
    same wherever the reference's best aggregate leads the runner-up by more than that; within it, either of the
    tied candidates is a right answer. Most problems here are far from a tie (checked, so this is not vacuous).
    """
    decided = 0
    for r, q in zip(rows, ref, strict=True):
        assert [c["text"] for c in r["candidates"]] == [c["text"] for c in q["candidates"]]
        assert r["responses"] == q["responses"]
        for c, d in zip(r["candidates"], q["candidates"]):
            assert c["step_scores"] == pytest.approx(d["step_scores"], abs=1e-5)
        aggregates = [c["aggregate"] for c in q["candidates"]]
        best = max(aggregates)
        tied = [i for i, a in enumerate(aggregates) if best - a <= 1e-5]
        assert r["chosen"] in tied, (r["chosen"], aggregates)
        decided += len(tied) == 1
    assert decided >= len(ref) - 1, "the picks compared must mostly be away from ties"


def test_best_of_n_then_evaluate_writes_table_and_plot(setup, megatron_tp1, capsys):
    root, prompts = setup
    out = root / "tp1.jsonl"
    assert tool("evaluate").main([str(out), "--k", "1", "2", "4", "--json", str(root / "eval.json"),
                                  "--table", str(root / "eval.md"), "--plot", str(root / "eval.png")]) == 0
    metrics = json.loads((root / "eval.json").read_text())
    assert metrics["bon@1/geometric"] == metrics["pass@1"]
    chosen_acc = sum(r["correct"] for r in megatron_tp1) / len(megatron_tp1)
    assert metrics["bon@4/geometric"] == chosen_acc
    assert "| bon@k/geometric |" in (root / "eval.md").read_text() and "bon@k/geometric" in capsys.readouterr().out
    assert (root / "eval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_k1_chooses_the_single_candidate(setup, tmp_path):
    root, prompts = setup
    out = tmp_path / "k1.jsonl"
    assert tool("best_of_n").main([
        "--prompts", str(prompts), "--output", str(out), "--backend", "hf", "--hf-path", str(root / "hf"),
        "--problem-key", "q", "--answer-key", "a", "--k", "1", "--temperature", "0", "--max-new-tokens", "8",
        "--answer-max-new-tokens", "4", "--complete-all"]) == 0
    rows = read(out)
    assert all(r["chosen"] == 0 and r["responses"] == [r["response"]] for r in rows)
    from megatron_rgm.evaluation.report import run

    metrics = run(out, [1])
    assert metrics["bon@1/geometric"] == metrics["pass@1"] == sum(r["correct"] for r in rows) / len(rows)


# --- rescoring a draw with another export's head (tools/rescore.py) ------------------------------------------

@pytest.fixture(scope="module")
def hf_draw(setup, tmp_path_factory):
    """A draw of the steered export (hf backend, every candidate answered) and a second export: the same weights
    with the head's output negated, a head that ranks the candidates its own way."""
    root, prompts = setup
    tmp = tmp_path_factory.mktemp("rescore")
    draw = tmp / "draw.jsonl"
    assert tool("best_of_n").main(["--prompts", str(prompts), "--output", str(draw), "--backend", "hf",
                                   "--hf-path", str(root / "hf"), *SAMPLED]) == 0
    other = tmp / "other"
    other.mkdir()
    for f in (root / "hf").iterdir():
        if f.is_file():
            (other / f.name).write_bytes(f.read_bytes())
    head = torch.load(other / "score_module.pt", weights_only=True)
    head["3.weight"], head["3.bias"] = -head["3.weight"], -head["3.bias"]
    torch.save(head, other / "score_module.pt")
    return root, draw, other, tmp


def test_rescoring_keeps_the_candidates_and_counts_the_re_tokenised_ones(hf_draw, capsys):
    root, draw, _, tmp = hf_draw
    out = tmp / "self.jsonl"
    assert tool("rescore").main([str(draw), "--hf-path", str(root / "hf"), "--output", str(out)]) == 0
    before, after = read(draw), read(out)
    keep = ("text", "response", "prediction", "correct", "finish", "tokens")
    moved = 0
    for r, q in zip(before, after, strict=True):
        assert (q["id"], q["problem"], q["answer"], q["responses"]) == (r["id"], r["problem"], r["answer"], r["responses"])
        assert r["prompt_template"] == q["prompt_template"] == PROMPT_TEMPLATE  # best_of_n names it; rescore reads it
        for c, d in zip(r["candidates"], q["candidates"], strict=True):
            assert {k: d.get(k) for k in keep} == {k: c.get(k) for k in keep}
            moved += len(c["step_scores"]) != len(d["step_scores"])
    # A candidate is scored from its text, which a policy's non-canonical token splits (and, for this random
    # model, bytes that are no UTF-8) do not survive: the summary counts the candidates whose steps moved.
    assert f"{moved} candidates scored on another number of steps" in capsys.readouterr().out
    assert all(q["scored_by"] == str(root / "hf") for q in after)


def test_another_head_picks_by_its_own_scores_on_the_same_candidates(hf_draw):
    from megatron_rgm.evaluation.report import aggregate_scores, run
    from megatron_rgm.hf import RGMScorer

    _, draw, other, tmp = hf_draw
    out = tmp / "other.jsonl"
    assert tool("rescore").main([str(draw), "--hf-path", str(other), "--output", str(out),
                                 "--aggregation", "arithmetic"]) == 0
    before, after = read(draw), read(out)
    scorer = RGMScorer.from_pretrained(str(other))
    for r, q in zip(before, after, strict=True):
        assert [c["text"] for c in q["candidates"]] == [c["text"] for c in r["candidates"]]  # the same candidates
        assert q["responses"] == r["responses"] and q["aggregation"] == "arithmetic"
        direct = scorer.score_responses([r["problem"]] * 4, [c["text"] for c in r["candidates"]], PROMPT_TEMPLATE)
        for d, want in zip(q["candidates"], direct):
            assert d["step_scores"] == pytest.approx(want.step_scores, abs=1e-6)
        aggregates = [c["aggregate"] for c in q["candidates"]]
        assert aggregates == aggregate_scores(q["step_scores"])["arithmetic"]  # what evaluate's BoN ranks by
        assert q["chosen"] == choose(aggregates)
        best = q["candidates"][q["chosen"]]
        assert (q["response"], q["prediction"], q["correct"]) == (best["response"], best["prediction"], best["correct"])
    assert any(q["chosen"] != r["chosen"] for r, q in zip(before, after)), "the negated head should pick otherwise"
    metrics = run(out, [1, 4])
    assert metrics["bon@4/arithmetic"] == sum(q["correct"] for q in after) / len(after)


@pytest.mark.parametrize("case, expect", [
    ("unanswered", "candidate 1 never answered: draw with --complete-all"),
    ("stopped", "candidate 2 stopped early, with no answer"),
    ("not_samples", "has no 'candidates'/'problem'"),
    ("same_file", "is the samples file"),
    ("aggregation", "--aggregation 'median' is unknown"),
    ("template", "has no {problem} field"),
    ("other_template", "is not the draw's '{problem}\\n<think>\\n'"),
    ("no_text", "has candidate 0 without its 'text' and 'step_scores'"),
    ("output_dir", "is a directory: pass a file path"),
    ("output_under_file", "is a file, not a directory"),
])
def test_rescore_user_errors(hf_draw, case, expect, capsys):
    root, draw, _, tmp = hf_draw
    rows = read(draw)
    bad = tmp / f"{case}.jsonl"
    if case == "unanswered":
        del rows[0]["candidates"][1]["response"]
    if case == "stopped":
        rows[1]["candidates"][2]["finish"] = "stopped"
    if case == "not_samples":
        rows = [{"id": "0", "answer": "1", "responses": ["x"]}]
    if case == "no_text":
        del rows[2]["candidates"][0]["text"]
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = {"same_file": bad, "output_dir": tmp, "output_under_file": bad / "x.jsonl"}.get(case, tmp / f"{case}.out.jsonl")
    argv = [str(bad), "--hf-path", str(root / "hf"), "--output", str(out)]
    argv += {"aggregation": ["--aggregation", "median"], "template": ["--prompt-template", "Q: "],
             "other_template": ["--prompt-template", "Q: {problem}\\nA:"]}.get(case, [])
    assert tool("rescore").main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert expect in lines[-1] and lines[-1].startswith("error: ")
    assert case in ("same_file", "output_dir") or not out.exists()
    assert bad.read_text() == "".join(json.dumps(r) + "\n" for r in rows)  # the draw is left as it was
    assert not list(tmp.glob("*.tmp*"))


# --- user errors: one line, exit 2, nothing written -----------------------------------------------------------

@pytest.mark.parametrize("case, expect", [
    ("missing_prompts", "is not a file"),
    ("empty_prompts", "holds no prompts"),
    ("k0", "--k must be >= 1"),
    ("aggregation", "--aggregation 'median' is unknown"),
    ("missing_ckpt", "does not exist"),
    ("no_hf_path", "--backend hf needs --hf-path"),
    ("bad_hf_path", "is not a directory"),
    ("prune_margin", "--bon-prune-margin must be in (0, 1) with --bon-prune-scale prob"),
    ("prune_logit", "--bon-prune-margin must be > 0 with --bon-prune-scale logit"),
])
def test_user_errors(tmp_path, capsys, case, expect):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"q": "Add 1 and 2.", "a": "3"}\n' if case != "empty_prompts" else "\n")
    out = tmp_path / "out.jsonl"
    argv = ["--prompts", str(prompts), "--output", str(out), "--problem-key", "q", "--answer-key", "a",
            "--mcore-path", str(tmp_path)]
    argv += {"missing_prompts": ["--prompts", str(tmp_path / "none.jsonl")], "empty_prompts": [],
             "k0": ["--k", "0"], "aggregation": ["--aggregation", "median"],
             "missing_ckpt": ["--mcore-path", str(tmp_path / "nope")], "no_hf_path": ["--backend", "hf"],
             "bad_hf_path": ["--backend", "hf", "--hf-path", str(tmp_path / "nope")],
             "prune_margin": ["--bon-prune-margin", "1.5"],
             "prune_logit": ["--bon-prune-margin", "0", "--bon-prune-scale", "logit"]}[case]
    if case == "empty_prompts":
        argv += ["--backend", "hf", "--hf-path", str(tmp_path)]
    assert tool("best_of_n").main(argv) == 2
    # One line of ours, last; a first import of megatron-core may log torch's "No CUDA runtime" line before it.
    lines = capsys.readouterr().err.strip().splitlines()
    ours = [line for line in lines if line.startswith("error: ")]
    assert len(ours) == 1 and lines[-1] == ours[0] and expect in ours[0], lines
    assert not out.exists()
