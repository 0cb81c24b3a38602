"""The training loop (``--stage rgm`` / ``sft``) on real gloo ranks with the synthetic task's tokenizer and prompts."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from helpers import REPO, TINY, clean_env, head_tensors, make_store, torchrun


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    from megatron_rgm.tasks.prepare import prepare

    return prepare(tmp_path_factory.mktemp("task"), seed=0, n_train=64, n_eval=8, n_sft=256)


def pretrain(nproc: int, args: list[str], metrics) -> list[dict]:
    torchrun("-m megatron_rgm.pretrain", nproc, [*args, "--metrics-file", str(metrics)])
    return [json.loads(line) for line in metrics.read_text().splitlines()]


@pytest.mark.multirank
@pytest.mark.parametrize("layout", [["--tensor-model-parallel-size", "2"], ["--pipeline-model-parallel-size", "2"]],
                         ids=["tp2", "pp2"])
def test_three_colocated_iterations_are_finite_and_on_policy(task, tmp_path, layout):
    rows = pretrain(2, [*TINY, *layout, "--train-iters", "3", "--prompts", str(task["train"]),
                        "--tokenizer", str(task["tokenizer"])], tmp_path / "m.jsonl")
    assert [r["iteration"] for r in rows] == [1, 2, 3]
    for r in rows:
        for key in ("grpo loss", "pg loss", "kl", "entropy", "spr loss", "grad norm", "reward", "response length"):
            assert math.isfinite(r[key]), (key, r)
        # One optimizer step per iteration: training log-probs must equal the sampler's (temperature,
        # padded vocabulary and the KV cache all agree).
        assert abs(r["ppo kl"]) < 1e-5, r["ppo kl"]
        assert 0 <= r["accuracy"] <= 1 and 0 <= r["masked step fraction"] <= 1
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-7), "the reference is the starting policy"
    # The first batch calibrated and oriented the head (on the last stage, over the whole batch): negated iff it
    # ranked reversed. A batch without any step leaves the head as it is.
    if rows[0]["steps"] > 0:
        assert rows[0]["sprm head negated"] == float(rows[0]["sprm initial pairwise"] < 0.5)
    else:
        assert "sprm head negated" not in rows[0] and "sprm calibration shift" not in rows[0]
    assert "sprm head negated" not in rows[1]


@pytest.mark.multirank
def test_tp1_and_tp2_give_the_same_losses(task, tmp_path):
    store = make_store(tmp_path / "store", task, n_groups=2)
    common = [*TINY, "--train-iters", "2", "--rollouts", str(store), "--tokenizer", str(task["tokenizer"]),
              "--sprm-dropout", "0", "--lr", "1e-3", "--sprm-lr", "1e-2"]
    tp1 = pretrain(1, common, tmp_path / "tp1.jsonl")
    tp2 = pretrain(2, [*common, "--tensor-model-parallel-size", "2"], tmp_path / "tp2.jsonl")
    # The SPR mask is a sign test: the counts are equal only if no step logit sits within rounding of 0.
    # The calibration keeps every first-batch logit at least `margin` away (reported, and far above fp32
    # reordering of a TP split, ~1e-6 here), so equal counts are a property of the model, not of the CPU.
    for rows in (tp1, tp2):
        assert rows[0]["sprm calibration margin"] > 1e-4, rows[0]
    assert tp1[0]["sprm calibration shift"] == pytest.approx(tp2[0]["sprm calibration shift"], abs=1e-5)
    for a, b in zip(tp1, tp2, strict=True):
        for key in ("grpo loss", "pg loss", "kl", "entropy", "spr loss", "ppo kl"):
            assert abs(a[key] - b[key]) < 1e-5, (key, a[key], b[key])
        assert a["spr positives"] == b["spr positives"] and a["spr negatives"] == b["spr negatives"]


@pytest.mark.multirank
def test_overlapped_bucketed_gradient_reduction_trains_the_same_weights(task, tmp_path):
    """DP=2 with Megatron-LM's --overlap-grad-reduce and small buckets (several per step, reduced during the last
    micro-batch's backward) against the plain reduction: the same losses, so the same updates, step after step."""
    store = make_store(tmp_path / "store", task, n_groups=2)
    common = [*TINY, "--train-iters", "3", "--rollouts", str(store), "--tokenizer", str(task["tokenizer"]),
              "--micro-batch-size", "1", "--sprm-dropout", "0", "--lr", "1e-3", "--sprm-lr", "1e-2"]
    plain = pretrain(2, common, tmp_path / "plain.jsonl")
    overlap = pretrain(2, [*common, "--overlap-grad-reduce", "--ddp-bucket-size", "4000",
                           "--accumulate-allreduce-grads-in-fp32"], tmp_path / "overlap.jsonl")
    assert plain[-1]["kl"] > 1e-6, "the policy must have moved for the comparison to mean anything"
    for a, b in zip(plain, overlap, strict=True):
        for key in ("grpo loss", "kl", "entropy", "spr loss", "grad norm", "sprm grad norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), (key, a[key], b[key])


MOE = ["--num-experts", "4", "--moe-router-topk", "2", "--moe-ffn-hidden-size", "96", "--moe-aux-loss-coeff", "0.01"]


# GPT-OSS's layer on the tiny geometry: biased linears (the experts' too), quick-GELU gates clamped and offset,
# windows of 8 on every other layer, a learned sink per head, YaRN.
GPT_OSS_LIKE = ["--no-swiglu", "--quick-geglu", "--glu-linear-offset", "1", "--activation-func-clamp-value", "7",
                "--no-disable-bias-linear", "--sliding-window", "8", "--window-attn-skip-freq", "2",
                "--softmax-type", "learnable", "--position-embedding-type", "yarn", "--rotary-scaling-factor", "4",
                "--yarn-original-max-position-embeddings", "64", "--no-yarn-correction-range-round-to-int"]


@pytest.mark.multirank
@pytest.mark.parametrize("layout", [["--tensor-model-parallel-size", "2", "--sequence-parallel"],
                                    ["--expert-model-parallel-size", "2"],
                                    ["--tensor-model-parallel-size", "2", "--sequence-parallel", *GPT_OSS_LIKE]],
                         ids=["tp2", "ep2", "gpt-oss-like-tp2"])
def test_the_head_trains_on_a_mixture_of_experts_backbone(task, tmp_path, layout):
    """Every layer's MLP four experts (two per token): GRPO + SPR run at TP=2 (with sequence parallelism, which
    megatron-core's MoE layers need there; GPT-OSS's biased experts whole on each rank) and with the experts split
    over two data-parallel ranks (EP=2); the routers' load-balancing loss is logged apart from the GRPO and SPR
    losses."""
    store = make_store(tmp_path / "store", task, n_groups=2)
    rows = pretrain(2, [*TINY, *MOE, *layout, "--train-iters", "2", "--rollouts", str(store), "--tokenizer",
                        str(task["tokenizer"]), "--sprm-dropout", "0"], tmp_path / "m.jsonl")
    assert [r["iteration"] for r in rows] == [1, 2]
    for r in rows:
        for key in ("grpo loss", "spr loss", "grad norm", "sprm grad norm", "moe load balancing loss"):
            assert math.isfinite(r[key]), (key, r)
        # Balanced routing gives 1 (top-k probabilities against the share of tokens, times the experts).
        assert 0.5 < r["moe load balancing loss"] < 4, r
    assert rows[1]["kl"] > 0, "the policy moved"


@pytest.mark.multirank
@pytest.mark.parametrize("family", [[], GPT_OSS_LIKE], ids=["qwen3-moe-like", "gpt-oss-like"])
def test_experts_over_two_ranks_train_as_on_one(task, tmp_path, family):
    """The same batches on 2 data-parallel ranks, the experts on each (EP=1) or split over both (EP=2): the same
    losses, SPR counts and gradient norms, iteration by iteration. (Both start from one checkpoint, an EP=1 run's
    first iteration: each layout draws its experts' initial weights from its own generators.)"""
    store = make_store(tmp_path / "store", task, n_groups=2)
    common = [*TINY, *MOE, *family, "--rollouts", str(store), "--tokenizer", str(task["tokenizer"]),
              "--sprm-dropout", "0", "--sprm-lr", "1e-5"]  # a head that moves slowly keeps both classes masked
    pretrain(2, [*common, "--train-iters", "1", "--save", str(tmp_path / "start")], tmp_path / "start.jsonl")
    resume = [*common, "--train-iters", "3", "--load", str(tmp_path / "start"), "--no-load-optim", "--pretrained-checkpoint",
              str(tmp_path / "start")]
    ep1 = pretrain(2, resume, tmp_path / "ep1.jsonl")
    ep2 = pretrain(2, [*resume, "--expert-model-parallel-size", "2"], tmp_path / "ep2.jsonl")
    assert [r["iteration"] for r in ep2] == [2, 3] and ep1[-1]["kl"] > 0, "two iterations, the policy moved"
    assert all(r["spr loss"] > 0 and r["sprm grad norm"] > 0 for r in ep1), ep1  # the head learns in both
    for a, b in zip(ep1, ep2, strict=True):
        for key in ("spr positives", "spr negatives"):
            assert a[key] == b[key], (key, a, b)
        for key in ("grpo loss", "spr loss", "kl", "grad norm", "sprm grad norm", "moe load balancing loss"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (key, a[key], b[key])


@pytest.mark.multirank
def test_spr_loss_decreases_on_a_fixed_batch(task, tmp_path):
    store = make_store(tmp_path / "store", task, n_groups=1, k=8)
    rows = pretrain(2, [*TINY, "--tensor-model-parallel-size", "2", "--train-iters", "6", "--rollouts", str(store),
                        "--tokenizer", str(task["tokenizer"]), "--prompts-per-iter", "1", "--grpo-group-size", "8",
                        "--sprm-dropout", "0", "--sprm-lr", "3e-3", "--grpo-kl-coef", "0"], tmp_path / "m.jsonl")
    spr = [r["spr loss"] for r in rows]
    # The calibration put step logits on both sides of 0, so both classes are masked from the start.
    assert rows[0]["spr positives"] > 0 and rows[0]["spr negatives"] > 0
    assert spr[-1] < spr[0] and spr[-1] < 0.9 * spr[0], spr


@pytest.mark.multirank
def test_mask_warmup_trains_the_head_with_plain_bce_first(task, tmp_path):
    store = make_store(tmp_path / "store", task, n_groups=1, k=8)
    common = [*TINY, "--rollouts", str(store), "--tokenizer", str(task["tokenizer"]), "--prompts-per-iter", "1",
              "--grpo-group-size", "8", "--sprm-dropout", "0", "--sprm-lr", "3e-3"]
    warm = pretrain(1, [*common, "--train-iters", "3", "--sprm-mask-warmup-iters", "2"], tmp_path / "warm.jsonl")
    bce = pretrain(1, [*common, "--train-iters", "2", "--sprm-loss", "bce"], tmp_path / "bce.jsonl")
    # Iterations 1 and 2 are those of a plain-BCE run: the same losses, so the same head after them ...
    for w, b in zip(warm, bce):
        assert w["spr loss"] == pytest.approx(b["spr loss"], rel=1e-6) and "spr positives" not in w
    assert warm[0]["spr loss"] != pytest.approx(warm[1]["spr loss"], rel=1e-3), "the head learned"
    # ... and iteration 3 trains it with the SPR loss, its mask and class counts.
    assert warm[2]["spr positives"] + warm[2]["spr negatives"] > 0


@pytest.mark.multirank
def test_calibration_changes_a_fresh_head_only(task, tmp_path):
    store = make_store(tmp_path / "store", task, n_groups=2)
    common = [*TINY, "--train-iters", "1", "--rollouts", str(store), "--tokenizer", str(task["tokenizer"])]

    def run(name: str, *flags: str) -> tuple[dict, str]:
        proc = torchrun("-m megatron_rgm.pretrain", 1, [*common, *flags, "--save", str(tmp_path / name),
                                                        "--metrics-file", str(tmp_path / f"{name}.jsonl")])
        return json.loads((tmp_path / f"{name}.jsonl").read_text().splitlines()[0]), proc.stdout

    fresh, log = run("fresh")  # a new head: calibrated as before
    assert fresh["sprm calibration margin"] > 0 and "SPRM head: fresh (new); calibrated on iteration 1" in log
    from megatron_rgm.model.load import describe_checkpoint

    assert describe_checkpoint(tmp_path / "fresh").head_trained
    trained = head_tensors(tmp_path / "fresh")
    # The trained head, loaded to start a run (its learning rate 0, so that only a calibration could move it).
    kept, log = run("kept", "--pretrained-checkpoint", str(tmp_path / "fresh"), "--sprm-lr", "0")
    assert "sprm calibration shift" not in kept and "left exactly as it is" in log
    after = head_tensors(tmp_path / "kept")
    assert all(torch.equal(trained[k], after[k]) for k in trained), "a loaded trained head was changed"
    # Asked for, the calibration runs on a trained head too, and moves its output bias by the shift it logs.
    again, log = run("again", "--pretrained-checkpoint", str(tmp_path / "fresh"), "--sprm-lr", "0",
                     "--sprm-recalibrate-head", "--no-sprm-orient-head")
    assert "recalibrated on iteration 1" in log
    moved = head_tensors(tmp_path / "again")
    assert again["sprm calibration shift"] != 0
    assert float(trained["sprm_head.3.bias"] - moved["sprm_head.3.bias"]) == pytest.approx(
        again["sprm calibration shift"], rel=1e-5)
    assert torch.equal(trained["sprm_head.0.weight"], moved["sprm_head.0.weight"])
    # A trained head is applied with the rule it was trained with, or the run is refused.
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=1", "-m",
                           "megatron_rgm.pretrain", *common, "--pretrained-checkpoint", str(tmp_path / "fresh"),
                           "--sprm-step-rule", "contains"], env=clean_env(), capture_output=True, text=True,
                          timeout=300, cwd=REPO)
    assert proc.returncode != 0
    assert "was trained with --sprm-step-rule 'exact' (this run: 'contains')" in proc.stdout + proc.stderr


@pytest.mark.multirank
def test_sft_then_store_from_generate_rollouts_then_rgm(task, tmp_path):
    sft = tmp_path / "sft"
    torchrun("-m megatron_rgm.pretrain", 1, ["--preset", "tiny", "--stage", "sft", "--sft-data", str(task["sft"]),
                                             "--tokenizer", str(task["tokenizer"]), "--train-iters", "2",
                                             "--micro-batch-size", "4", "--lr", "1e-3", "--save", str(sft)])
    store = tmp_path / "store"
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "generate_rollouts.py"), "--prompts",
                           str(task["train"]), "--output", str(store), "--backend", "megatron", "--mcore-path",
                           str(sft), "--k", "4", "--limit", "2", "--max-new-tokens", "24", "--temperature", "0.6",
                           "--verifier", "exact"], env=clean_env(), capture_output=True, text=True, timeout=600,
                          cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    rows = pretrain(1, [*TINY, "--train-iters", "2", "--rollouts", str(store), "--tokenizer",
                        str(task["tokenizer"]), "--pretrained-checkpoint", str(sft), "--save", str(tmp_path / "rgm")],
                    tmp_path / "m.jsonl")
    assert [r["iteration"] for r in rows] == [1, 2]
    # The store's old log-probs came from the same weights at the same temperature: on-policy.
    assert abs(rows[0]["ppo kl"]) < 1e-5 and math.isfinite(rows[1]["grpo loss"])
    assert (tmp_path / "rgm" / "hf_assets" / "tokenizer.model").exists()
    # What Megatron-LM's loop reads to resume: samples consumed so far (2 iterations of 2 prompts x 4).
    from megatron_rgm.checkpoint import read_common_state, resolve_checkpoint

    saved = read_common_state(resolve_checkpoint(tmp_path / "rgm")[0])["args"]
    assert (saved.global_batch_size, saved.consumed_train_samples) == (8, 16)
    # A training checkpoint (optimizer state and all) exports to HF; the export scores with its own tokenizer.
    from megatron_rgm.convert import mcore_to_hf
    from megatron_rgm.hf import RGMScorer

    mcore_to_hf(str(tmp_path / "rgm"), str(tmp_path / "hf"))
    scorer = RGMScorer.from_pretrained(str(tmp_path / "hf"))
    scored = scorer.score(["Add 1, 2 and 3.\n<think>\n1 + 2 = 3.\n\n3 + 3 = 6.\n\n</think>\n\\boxed{6}"])[0]
    assert len(scored.step_scores) == 2 and all(0 < p < 1 for p in scored.step_scores)


@pytest.mark.multirank
def test_sprm_only_trains_the_head_and_leaves_the_policy(task, tmp_path):
    store = make_store(tmp_path / "store", task, n_groups=2)
    rows = pretrain(2, [*TINY, "--tensor-model-parallel-size", "2", "--train-iters", "2", "--rollouts", str(store),
                        "--tokenizer", str(task["tokenizer"]), "--sprm-only", "--sprm-dropout", "0"],
                    tmp_path / "m.jsonl")
    for r in rows:
        assert "grpo loss" not in r and math.isfinite(r["spr loss"])
        assert r["grad norm"] == 0.0, "the policy is frozen: no gradient reaches it"
    # After calibration both classes are masked, so the head learns (a later batch may mask one class only,
    # and then the SPR loss is 0 by definition).
    assert rows[0]["spr positives"] > 0 and rows[0]["spr negatives"] > 0 and rows[0]["sprm grad norm"] > 0


def test_orient_head_negates_a_reversed_head_and_keeps_an_aligned_one():
    import torch

    from megatron_rgm.evaluation.metrics import pairwise_accuracy
    from megatron_rgm.model import SPRMHead
    from megatron_rgm.ops import segment_aggregate
    from megatron_rgm.training.calibration import orient_head

    torch.manual_seed(0)
    head = SPRMHead(16, 2, 0.0).eval()
    x = torch.randn(8 * 4 * 3, 16)  # 8 prompts x 4 trajectories x 3 steps
    cu = torch.arange(0, x.shape[0] + 1, 3)
    groups = [g for g in range(8) for _ in range(4)]
    with torch.no_grad():
        z = head(x).squeeze(-1)
    scores = segment_aggregate(z, cu, "geometric")
    # In every group the head's two best trajectories are the incorrect ones: a fully reversed start.
    correct = []
    for g in range(8):
        order = scores[4 * g:4 * g + 4].argsort().tolist()
        correct += [order.index(j) < 2 for j in range(4)]
    assert orient_head(head, z, cu, correct, groups) == {"sprm initial pairwise": 0.0, "sprm head negated": 1.0}
    with torch.no_grad():
        flipped = head(x).squeeze(-1)
    torch.testing.assert_close(flipped, -z)
    after = segment_aggregate(flipped, cu, "geometric").tolist()
    assert pairwise_accuracy(after, correct, groups) == (1.0, 32)
    # Aligned (or without any group holding both outcomes): the head is left as it is.
    state = {k: v.clone() for k, v in head.state_dict().items()}
    assert orient_head(head, flipped, cu, correct, groups)["sprm head negated"] == 0.0
    assert orient_head(head, flipped, cu, [True] * 32, groups)["sprm head negated"] == 0.0
    for k, v in head.state_dict().items():
        assert torch.equal(v, state[k]), k


@pytest.mark.parametrize("n", [2, 3, 5, 17, 64, 101])
def test_calibration_never_puts_a_logit_on_the_boundary(n):
    """Odd and even batches: both classes masked, every logit at least the reported margin from 0."""
    import torch

    from megatron_rgm.training.calibration import calibration_shift

    torch.manual_seed(n)
    z = torch.randn(n) * 0.3 + 2.0  # a fresh head: every logit of one sign
    shift, margin = calibration_shift(z)
    moved = z.double() - shift
    assert margin > 0
    assert float(moved.abs().min()) >= margin * (1 - 1e-9)
    below, above = int((moved < 0).sum()), int((moved > 0).sum())
    assert below + above == n and min(below, above) >= max(1, -(-n // 4)), (below, above)
    # A median shift would have put the middle logit of an odd batch exactly on 0: this one cannot.
    if n % 2:
        assert float((z.double() - z.double().median()).abs().min()) == 0.0


def test_calibration_takes_the_widest_gap_near_the_median():
    import torch

    from megatron_rgm.training.calibration import calibration_shift

    # sorted: 0, 1, 1.001, 5, 6, 7, 8, 9: the central splits (2..6) have gaps .001, 3.999, 1, 1, 1
    z = torch.tensor([9.0, 0.0, 5.0, 1.001, 8.0, 1.0, 7.0, 6.0])
    shift, margin = calibration_shift(z)
    assert shift == pytest.approx((1.001 + 5.0) / 2) and margin == pytest.approx((5.0 - 1.001) / 2)
    # the gap 0 -> 1 is wider than some central ones but would leave one step alone below: not a candidate
    z = torch.tensor([0.0, 3.0, 3.1, 3.2, 3.3, 3.4, 3.5, 3.6])
    shift, _ = calibration_shift(z)
    assert 3.0 < shift < 3.6
    # equal gaps: the one nearest the middle
    shift, margin = calibration_shift(torch.arange(9.0))
    assert (shift, margin) in ((3.5, 0.5), (4.5, 0.5))
    # nothing to split: no shift, and a margin of 0 says so
    assert calibration_shift(torch.tensor([0.7])) == (0.0, 0.0)
    assert calibration_shift(torch.full((5,), 0.7)) == (0.0, 0.0)
    # central logits all equal: the nearest split that separates anything
    shift, margin = calibration_shift(torch.tensor([0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 2.0]))
    assert margin == 0.5 and shift in (0.5, 1.5)


def test_orientation_does_not_depend_on_rounding_of_near_equal_scores():
    """Two trajectories of a group whose scores differ only by rounding count as a tie, whichever is larger."""
    import torch

    from megatron_rgm.model import SPRMHead
    from megatron_rgm.ops import segment_aggregate
    from megatron_rgm.training.calibration import orient_head

    cu = torch.tensor([0, 1, 2, 3, 4])
    groups, correct = [0, 0, 1, 1], [True, False, True, False]
    decisions = []
    for eps in (3e-7, -3e-7):  # about one float32 ulp of the scores
        # group 0: a clear win for the correct one; group 1: equal but for rounding, in either direction
        z = torch.tensor([1.0, -1.0, 0.3, 0.3 + eps])
        scores = segment_aggregate(z, cu, "geometric")
        assert scores[2] != scores[3], "the scores must differ for the tie rule to be what is tested"
        head = SPRMHead(4, 1, 0.0)
        decisions.append(orient_head(head, z, cu, correct, groups))
    assert decisions[0] == decisions[1] == {"sprm initial pairwise": 0.75, "sprm head negated": 0.0}
    # exactly 0.5 keeps the head
    z = torch.tensor([1.0, -1.0, -1.0, 1.0])
    assert orient_head(SPRMHead(4, 1, 0.0), z, cu, correct, groups)["sprm head negated"] == 0.0


def test_sft_files_with_a_bad_line_are_named(task, tmp_path):
    from megatron_rgm.config import ConfigError
    from megatron_rgm.tokenizer import load_tokenizer
    from megatron_rgm.data.sources import read_sft

    tok = load_tokenizer(task["tokenizer"])
    bad = tmp_path / "sft.jsonl"
    bad.write_text('{"text": "Add 1 and 2."}\n{"text": \n')
    with pytest.raises(ConfigError, match="sft.jsonl:2: not valid JSON"):
        read_sft(str(bad), tok, tok.eos_token_id)
    bad.write_text('{"text": "Add 1 and 2."}\n{"question": "x"}\n')
    with pytest.raises(ConfigError, match="record 2 has neither 'text' nor 'prompt' and 'response'"):
        read_sft(str(bad), tok, tok.eos_token_id)
    prompt_and_response = tmp_path / "pr.jsonl"
    prompt_and_response.write_text('{"prompt": "Add 1 and 2.", "response": "3"}\n')
    [(ids, prompt_len)] = read_sft(str(prompt_and_response), tok, tok.eos_token_id)
    assert ids[-1] == tok.eos_token_id and prompt_len == len(tok.encode("Add 1 and 2."))


def test_stage_needs_its_data_flags(capsys):
    from megatron_rgm.pretrain import main

    assert main(["--preset", "tiny", "--train-iters", "1"]) == 2
    assert "--stage rgm needs --prompts FILE" in capsys.readouterr().err
    assert main(["--preset", "tiny", "--stage", "sft"]) == 2
    assert "--stage sft needs --sft-data" in capsys.readouterr().err
    assert main(["--preset", "tiny", "--sprm-only", "--pipeline-model-parallel-size", "2", "--rollouts", "x"]) == 2
    assert "--sprm-only freezes the policy" in capsys.readouterr().err
