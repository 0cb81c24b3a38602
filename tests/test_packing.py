"""Token-budget micro-batches and packed rows: the plan, the packed batch, the model on a packed row, and training.

A packed row must give every sample what it gets alone in a padded row: the same log-probs, the same step
logits, the same losses and gradients. The model-level test compares a packed row with the padded rows of
the same samples; the training tests compare whole optimizer steps at TP=2 and PP=2 on gloo.
"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from helpers import TINY, make_store, torchrun
from megatron_rgm.data.packing import collate_packed, empty_batch, input_length, plan_microbatches, round_up
from megatron_rgm.data.sources import collate
from megatron_rgm.data.store import Trajectory
from megatron_rgm.integration import batch_inputs
from megatron_rgm.model import build_model
from workers.common import tiny_args


def _sample(n: int, rng: random.Random, vocab: int = 90, prompt: int = 3) -> Trajectory:
    ids = np.array([rng.randrange(1, vocab) for _ in range(n)])
    mask = np.arange(n) >= prompt
    steps = np.array(sorted(rng.sample(range(prompt, n - 1), k=min(3, n - 1 - prompt))), dtype=np.int64)
    return Trajectory(tokens=ids, response_mask=mask, log_probs=np.array([-rng.random() for _ in range(n)]),
                      step_positions=steps, reward=float(rng.random() < 0.5), correct=rng.random() < 0.5,
                      prompt_id=0, group_id=0)


@pytest.mark.parametrize("pack", [True, False])
def test_plan_keeps_every_sample_once_under_the_budget(pack):
    rng = random.Random(0)
    lengths = [rng.choice([5, 9, 30, 61, 64, 3]) for _ in range(40)]
    plan = plan_microbatches(lengths, 64, pack, multiple=8)
    assert sorted(i for g in plan for i in g) == list(range(40))
    for g in plan:
        cost = sum(lengths[i] for i in g) if pack else len(g) * round_up(max(lengths[i] for i in g), 8)
        assert cost <= 64, (g, cost)
    if pack:  # first-fit decreasing: no two micro-batches could be merged
        sums = sorted(sum(lengths[i] for i in g) for g in plan)
        assert sums[0] + sums[1] > 64
    # fewer micro-batches than one per sample, and the padded plan needs at least as many as packing
    assert len(plan) < 40
    assert len(plan_microbatches(lengths, 64, False, 8)) >= len(plan_microbatches(lengths, 64, True, 8))


def test_packed_row_holds_each_sample_as_its_padded_row():
    rng = random.Random(1)
    samples = [_sample(n, rng) for n in (12, 7, 20)]
    adv = torch.tensor([0.5, -1.0, 2.0])
    packed = collate_packed(samples, 40, limit=64, advantages=adv)
    offset = 0
    for i, s in enumerate(samples):
        n = input_length(s, 64)
        alone = collate([s], n, advantages=adv[i:i + 1])
        seg = slice(offset, offset + n)
        for key in ("tokens", "labels", "loss_mask", "old_log_probs", "step_mask"):
            assert torch.equal(packed[key][0, seg], alone[key][0]), key
        assert torch.equal(packed["position_ids"][0, seg], torch.arange(n))
        assert torch.all(packed["advantages"][0, seg] == adv[i])
        # attention: causal inside the sample, nothing outside it
        mask = packed["attention_mask"][0, 0]
        assert torch.equal(~mask[seg, seg], torch.ones(n, n, dtype=torch.bool).tril())
        assert mask[seg, :offset].all() and mask[seg, offset + n:].all()
        offset += n
    assert packed["loss_mask"][0, offset:].sum() == 0 and not packed["step_mask"][0, offset:].any()
    assert packed["cu_seqlens"].tolist() == [0, 11, 17, 36]
    steps = [int((np.asarray(s.step_positions) < input_length(s, 64)).sum()) for s in samples]
    assert packed["cu_steps"].tolist() == [0, *np.cumsum(steps).tolist()]
    assert packed["correct"].tolist() == [s.correct for s in samples]
    with pytest.raises(ValueError, match="do not fit"):
        collate_packed(samples, 30, limit=64)


def test_an_empty_micro_batch_has_nothing_to_train_on():
    b = empty_batch(8)
    assert b["loss_mask"].sum() == 0 and not b["step_mask"].any() and b["correct"].numel() == 1


# GPT-OSS's attention: windows of 8 on every other layer and a learned sink per head. megatron-core's windowed
# softmax replaced the packing mask with its window (samples saw each other within 8 tokens): compat fixes that.
WINDOWED = ["--sliding-window", "8", "--window-attn-skip-freq", "2", "--softmax-type", "learnable"]


@pytest.mark.parametrize("features", [[], WINDOWED], ids=["causal", "windows-and-sinks"])
def test_a_packed_row_gives_each_sample_its_padded_logits_and_step_logits(single_rank, features):
    """Attention confined to each sample, RoPE at its own positions: the packed row's outputs at a sample's
    positions equal the sample's outputs alone (fp32 rounding of different matmul shapes only). (RoPE is relative,
    so under the mask a sample's offset cancels in exact arithmetic; rotating by the sample's own positions keeps
    the angles, and their rounding, those of the sample alone.)"""
    args = tiny_args(extra=["--sprm-dropout", "0", *features])
    single_rank.initialize(args.parallel)
    model = build_model(args)[0].eval()
    rng = random.Random(2)
    samples = [_sample(n, rng, vocab=args.model.vocab_size) for n in (17, 9, 26)]
    packed = collate_packed(samples, 56, limit=64)
    with torch.no_grad():
        tokens, pos, mask, kw = batch_inputs(packed)
        logits, step_logits = model(tokens, pos, mask, step_mask=packed["step_mask"], **kw)
        offset, alone_steps = 0, []
        for s in samples:
            n = input_length(s, 64)
            one = collate([s], n)
            t, p, m, k = batch_inputs(one)
            l1, s1 = model(t, p, m, step_mask=one["step_mask"], **k)
            torch.testing.assert_close(logits[:, offset:offset + n], l1, rtol=1e-5, atol=1e-5)
            alone_steps.append(s1)
            offset += n
        torch.testing.assert_close(step_logits, torch.cat(alone_steps), rtol=1e-5, atol=1e-5)
        # and the mask matters: without it the second sample attends to the first
        wrong, _ = model(tokens, pos, None, step_mask=packed["step_mask"], **kw)
        assert (wrong[:, 17:26] - logits[:, 17:26]).abs().max() > 1e-3


# --- whole optimizer steps on gloo ------------------------------------------------------------------------------

def _pretrain(nproc, args, path) -> list[dict]:
    torchrun("-m megatron_rgm.pretrain", nproc, [*args, "--metrics-file", str(path)])
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from megatron_rgm.tasks.prepare import prepare

    root = tmp_path_factory.mktemp("packing")
    task = prepare(root / "task", seed=0, n_train=16, n_eval=4, n_sft=16)
    return task, make_store(root / "store", task, n_groups=2, varied_lengths=True)


POLICY = ("pg loss", "kl", "entropy", "ppo kl", "grpo loss")


@pytest.mark.multirank
@pytest.mark.parametrize("layout", [["--tensor-model-parallel-size", "2", "--sequence-parallel"],
                                    ["--pipeline-model-parallel-size", "2"], []], ids=["tp2", "pp2", "dp2"])
def test_token_budget_and_packing_train_as_padded_batches(store, tmp_path, layout):
    """Regrouped (budget of 64 tokens: several micro-batches of other sizes) and packed steps against padded ones
    of --micro-batch-size 2 (at DP=2 the ranks need different numbers of micro-batches: the shorter runs empty ones). The policy term is a token-mean over the step and BCE a mean over its steps, so the
    gradients are equal, and so are the next iteration's losses."""
    task, path = store
    common = [*TINY, *layout, "--micro-batch-size", "2", "--train-iters", "2", "--rollouts", str(path),
              "--tokenizer", str(task["tokenizer"]), "--sprm-dropout", "0", "--lr", "1e-3", "--sprm-lr", "1e-2",
              "--sprm-loss", "bce", "--max-position-embeddings", "64"]
    padded = _pretrain(2, common, tmp_path / "padded.jsonl")
    runs = {"budget": _pretrain(2, [*common, "--max-tokens-per-microbatch", "64"], tmp_path / "budget.jsonl"),
            "packed": _pretrain(2, [*common, "--max-tokens-per-microbatch", "64", "--pack-sequences"],
                                tmp_path / "packed.jsonl")}
    for name, rows in runs.items():
        for a, b in zip(padded, rows, strict=True):
            for key in ("grad norm", "sprm grad norm", *POLICY):
                assert abs(a[key] - b[key]) <= 1e-5 * max(1.0, abs(a[key])), (name, key, a[key], b[key])
            assert a["steps"] == b["steps"]


@pytest.mark.multirank
def test_packing_one_micro_batch_keeps_the_spr_loss(store, tmp_path):
    """With the SPR loss (mask counts per micro-batch), the samples of one padded micro-batch packed into one row:
    the same counts, the same loss and gradients."""
    task, path = store
    common = [*TINY, "--tensor-model-parallel-size", "2", "--micro-batch-size", "8", "--train-iters", "2",
              "--rollouts", str(path), "--tokenizer", str(task["tokenizer"]), "--sprm-dropout", "0",
              "--lr", "1e-3", "--sprm-lr", "1e-2", "--max-position-embeddings", "64"]
    padded = _pretrain(2, common, tmp_path / "padded.jsonl")
    packed = _pretrain(2, [*common, "--max-tokens-per-microbatch", "2048", "--pack-sequences"],
                       tmp_path / "packed.jsonl")
    for a, b in zip(padded, packed, strict=True):
        assert a["spr positives"] == b["spr positives"] and a["spr negatives"] == b["spr negatives"]
        for key in ("spr loss", "grad norm", "sprm grad norm", *POLICY):
            assert abs(a[key] - b[key]) <= 1e-5 * max(1.0, abs(a[key])), (key, a[key], b[key])
