"""Context parallelism: megatron's load-balanced split, the SPR loss over a split batch, and CP = 2 against CP = 1
on real gloo ranks (the attention itself too: the local implementation gathers keys and values, so nothing is
stubbed).

The worker (tests/workers/context_parallel.py) compares one training step's per-parameter gradients, the gathered
step logits and reference log-probs, and the logged losses and SPR counts; the end-to-end tests compare whole
``megatron_rgm.pretrain`` runs, rollouts sampled in the loop included.
"""

from __future__ import annotations

import json

import pytest
import torch

from helpers import TINY, make_store, read_rank_results, torchrun
from megatron_rgm.config import ConfigError
from megatron_rgm.model.context_parallel import chunk_positions
from megatron_rgm.ops import reference


def test_each_rank_holds_two_mirrored_chunks():
    """CP 2 over 16 positions: 4 chunks of 4; rank 0 the first and the last, rank 1 the middle two."""
    assert chunk_positions(16, 2, 0).tolist() == [0, 1, 2, 3, 12, 13, 14, 15]
    assert chunk_positions(16, 2, 1).tolist() == [4, 5, 6, 7, 8, 9, 10, 11]
    every = torch.cat([chunk_positions(48, 4, r) for r in range(4)]).sort().values
    assert every.tolist() == list(range(48))
    with pytest.raises(ValueError, match="pad micro-batches to a multiple of 4"):
        chunk_positions(18, 2, 0)


def test_the_shares_of_a_split_batch_add_up_to_its_spr_loss():
    """Each share of a batch's steps, divided by the whole batch's denominator, gives a term; the terms add up to
    the batch's SPR loss and their gradients are its gradient (the mask and weights do not depend on the split)."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(12, generator=g, dtype=torch.float64)
    cu = torch.tensor([0, 5, 12])
    correct = torch.tensor([True, False])
    whole_z = z.clone().requires_grad_(True)
    whole = reference.spr_loss(whole_z, cu, correct)
    whole.backward()
    counts = reference.spr_counts(z, cu, correct)
    assert counts.min() > 0, "both classes must be masked for the test to mean something"
    share_z = z.clone().requires_grad_(True)
    first, second = [0, 1, 5, 6, 7], [2, 3, 4, 8, 9, 10, 11]  # each trajectory cut between the shares
    total = 0
    for idx, cuts in ((first, [0, 2, 5]), (second, [0, 3, 7])):
        part = share_z[idx]
        total = total + reference.spr_loss(part, torch.tensor(cuts), correct, counts=counts, batch_counts=counts)
    total.backward()
    torch.testing.assert_close(total, whole, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(share_z.grad, whole_z.grad, rtol=1e-12, atol=1e-12)
    # without the batch's denominator a share's loss is its own mean: the terms would not add up
    alone = reference.spr_loss(z[first], torch.tensor([0, 2, 5]), correct, counts=counts)
    assert abs(float(alone) - float(reference.spr_loss(z[first], torch.tensor([0, 2, 5]), correct, counts=counts,
                                                       batch_counts=counts))) > 1e-3


def test_micro_batches_are_padded_to_whole_chunks():
    from workers.common import tiny_args

    from megatron_rgm.training.batching import length_multiple

    assert length_multiple(tiny_args()) == 8
    assert length_multiple(tiny_args(extra=["--context-parallel-size", "2"])) == 32
    assert length_multiple(tiny_args(tp=2, sp=True, extra=["--context-parallel-size", "4"])) == 128


def test_sliding_windows_are_refused_under_context_parallelism():
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_rgm.model.context_parallel import ContextParallelAttention

    config = TransformerConfig(num_layers=1, hidden_size=16, num_attention_heads=2, window_size=(8, 0),
                               context_parallel_size=2)
    with pytest.raises(ConfigError, match="sliding-window attention .* --context-parallel-size 1"):
        ContextParallelAttention(config, 1, AttnMaskType.causal, "self")


# --- real ranks ------------------------------------------------------------------------------------------------

GROUPS = {  # one torchrun launch per group: (ranks, layouts, loss)
    "two-spr": (2, ["cp2", "cp2_presplit"], "spr"), "two-bce": (2, ["cp2", "cp2_presplit"], "bce"),
    "four-spr": (4, ["cp2_tp2_sp", "cp2_pp2"], "spr")}


@pytest.fixture(scope="module")
def step_results(tmp_path_factory):
    """``get(case)``: the ranks' results for ``layout-loss``, launching its group on first use (a selection of
    cases, as tools/gpu_check.sh makes, launches only theirs)."""
    out = {}

    def get(case: str) -> list[dict]:
        if case not in out:
            name, (nproc, layouts, loss) = next((n, g) for n, g in GROUPS.items()
                                                 if case.rsplit("-", 1) in ([x, g[2]] for x in g[1]))
            d = tmp_path_factory.mktemp(f"cp-{name}")
            torchrun("context_parallel.py", nproc, ["--out", str(d), "--layouts", *layouts, "--loss", loss])
            ranks = read_rank_results(d)
            assert len(ranks) == nproc
            for layout in layouts:
                out[f"{layout}-{loss}"] = [r[layout] for r in ranks]
        return out[case]

    return get


@pytest.mark.multirank
@pytest.mark.parametrize("case", ["cp2-spr", "cp2-bce", "cp2_presplit-spr", "cp2_presplit-bce", "cp2_tp2_sp-spr",
                                  "cp2_pp2-spr"])
def test_a_training_step_under_context_parallelism_matches_cp1(step_results, case):
    """One optimizer step's gradients (every parameter), losses, SPR counts, gathered step logits and reference
    log-probs. ``presplit``: micro-batches split before ``forward_step`` and without the trainer's loss scales, as
    a Megatron-LM loop hands them over."""
    ranks = step_results(case)
    for r in ranks:
        # the SPR mask is a sign test: the worker put every step logit well away from 0
        assert r["min_abs_step_logit"] > 1e-4
        for name, rel in r["grad_rel"].items():  # (a near-cancelling sum, such as a bias's, by its absolute error)
            assert rel <= 1e-4 or r["grad_diff"][name] <= 1e-7, (case, r["cp_rank"], name, rel)
    last = [r for r in ranks if "metrics" in r]
    assert {r["cp_rank"] for r in last} == {0, 1}
    for r in last:
        assert r["num_steps"] == 16
        assert r["step_logits_diff"] < 1e-5 and r["ref_log_probs_diff"] < 1e-5
        got, want = r["metrics"], r["ref_metrics"]
        assert set(got) == set(want)
        for key in want:
            assert abs(got[key] - want[key]) <= 1e-5 * max(1.0, abs(want[key])), (case, key, got[key], want[key])
        if case.endswith("spr"):
            assert want["spr positives"] > 0 and want["spr negatives"] > 0 and want["spr loss"] > 0
    head = [n for n in last[0]["grad_abs_max"] if n.startswith("sprm_head.")]
    assert head and all(last[0]["grad_abs_max"][n] > 0 for n in head), "the head must be trained by the step"


def _pretrain(nproc, args, path) -> list[dict]:
    torchrun("-m megatron_rgm.pretrain", nproc, [*args, "--metrics-file", str(path)])
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    from megatron_rgm.tasks.prepare import prepare

    return prepare(tmp_path_factory.mktemp("cptask"), seed=0, n_train=32, n_eval=4, n_sft=16)


EXACT = ("grpo loss", "pg loss", "kl", "entropy", "ppo kl", "spr loss", "grad norm", "sprm grad norm")


def _same_run(a: list[dict], b: list[dict], keys=EXACT) -> None:
    for x, y in zip(a, b, strict=True):
        for key in keys:
            assert abs(x[key] - y[key]) <= 1e-5 * max(1.0, abs(x[key])), (x["iteration"], key, x[key], y[key])
        for key in ("reward", "response length", "steps", "spr positives", "spr negatives"):
            assert x.get(key) == y.get(key), (x["iteration"], key, x.get(key), y.get(key))


@pytest.mark.multirank
def test_training_from_a_store_under_context_parallelism_matches_cp1(task, tmp_path):
    """Two iterations on stored rollouts (trajectories of different lengths): CP 2 against one rank."""
    store = make_store(tmp_path / "store", task, n_groups=2, varied_lengths=True)
    common = [*TINY, "--train-iters", "2", "--rollouts", str(store), "--tokenizer", str(task["tokenizer"]),
              "--sprm-dropout", "0", "--lr", "1e-3", "--sprm-lr", "1e-2", "--grpo-kl-coef", "0.01",
              "--max-position-embeddings", "64"]
    cp1 = _pretrain(1, common, tmp_path / "cp1.jsonl")
    cp2 = _pretrain(2, [*common, "--context-parallel-size", "2"], tmp_path / "cp2.jsonl")
    assert cp1[0]["sprm calibration margin"] > 1e-4  # counts are compared exactly: no logit near 0
    assert cp1[0]["spr positives"] > 0 and cp1[0]["spr negatives"] > 0
    _same_run(cp1, cp2)


@pytest.mark.multirank
def test_a_token_budget_with_pipeline_and_context_parallelism_trains_as_padded_batches(task, tmp_path):
    """PP 2 x CP 2 with a 64-token budget (micro-batches of other sizes and lengths, their shapes exchanged between
    the stages) against PP 2 with padded micro-batches of 2: the policy term is a token-mean over the step and BCE a
    mean over its steps, so the gradients are equal (the logged SPR loss is a mean over micro-batches, which the
    regrouping changes)."""
    store = make_store(tmp_path / "store", task, n_groups=2, varied_lengths=True)
    common = [*TINY, "--micro-batch-size", "2", "--train-iters", "2", "--rollouts", str(store),
              "--tokenizer", str(task["tokenizer"]), "--sprm-dropout", "0", "--lr", "1e-3", "--sprm-lr", "1e-2",
              "--grpo-kl-coef", "0.01", "--sprm-loss", "bce", "--max-position-embeddings", "64",
              "--pipeline-model-parallel-size", "2"]
    padded = _pretrain(2, common, tmp_path / "padded.jsonl")
    budget = _pretrain(4, [*common, "--context-parallel-size", "2", "--max-tokens-per-microbatch", "64"],
                       tmp_path / "budget.jsonl")
    _same_run(padded, budget, keys=tuple(k for k in EXACT if k != "spr loss"))


@pytest.fixture(scope="module")
def colocated(task, tmp_path_factory):
    """Two iterations sampling their rollouts in the loop, on one rank: the flags and the metrics."""
    common = [*TINY, "--train-iters", "2", "--prompts", str(task["train"]), "--tokenizer", str(task["tokenizer"]),
              "--sprm-dropout", "0", "--grpo-kl-coef", "0.01"]
    return common, _pretrain(1, common, tmp_path_factory.mktemp("colocated") / "one.jsonl")


@pytest.mark.multirank
@pytest.mark.parametrize("layout", [(2, ["--context-parallel-size", "2"]),
                                    (2, ["--tensor-model-parallel-size", "2", "--sequence-parallel"]),
                                    (4, ["--context-parallel-size", "2", "--tensor-model-parallel-size", "2",
                                         "--sequence-parallel"])],
                         ids=["cp2", "tp2_sp", "cp2_tp2_sp"])
def test_rollouts_sampled_in_the_loop_under_context_and_sequence_parallelism(colocated, tmp_path, layout):
    """The sampler runs whole sequences with CP and SP switched off (a decode step's one token cannot be split);
    training then splits them. The same rollouts as on one rank, and the training log-probs equal the sampler's
    (``ppo kl`` 0 at one optimizer step per iteration)."""
    nproc, extra = layout
    common, one = colocated
    split = _pretrain(nproc, [*common, *extra], tmp_path / "split.jsonl")
    _same_run(one, split)
    for r in split:
        assert abs(r["ppo kl"]) < 1e-5, r["ppo kl"]


@pytest.mark.parametrize("flags, message", [
    (["--rollout-backend", "vllm"], "--rollout-backend native with --context-parallel-size > 1"),
    (["--transformer-impl", "transformer_engine"], "switched off, which needs --transformer-impl local"),
    (["--max-position-embeddings", "40"], "--max-position-embeddings 40 is not a multiple of 32"),
    (["--stage", "backbone-check", "--seq-length", "18"], "--seq-length 18 does not split into 4 equal chunks"),
], ids=["vllm", "transformer-engine-sampling", "position-cap", "backbone-seq-length"])
def test_what_context_parallelism_cannot_run_is_refused_at_start(flags, message, tmp_path):
    """Refused before a model is built, naming the flag and the fix (the vLLM backend: every CP rank would start
    an engine of its own; Transformer Engine: the sampler switches CP off on the local attention only)."""
    from megatron_rgm.arguments import parse_args
    from megatron_rgm.training.batching import check_context_parallel

    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"problem": "1 + 1", "answer": "2"}\n')
    base = ["--preset", "tiny", "--context-parallel-size", "2", "--stage", "rgm", "--prompts", str(prompts),
            "--tokenizer", str(tmp_path), "--max-position-embeddings", "64"]
    check_context_parallel(parse_args(base))  # the base itself runs
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        check_context_parallel(parse_args([*base, *flags]))


@pytest.mark.multirank
def test_a_run_under_context_parallelism_resumes_exactly(task, tmp_path):
    """Saved at iteration 2 and resumed to 3 under CP 2, the same numbers as 3 iterations straight: each CP rank
    keeps its own random state (with head dropout a rank draws as many numbers as its share holds steps)."""
    store = make_store(tmp_path / "store", task, n_groups=2, varied_lengths=True)
    common = [*TINY, "--micro-batch-size", "2", "--rollouts", str(store), "--tokenizer", str(task["tokenizer"]),
              "--lr", "1e-3", "--sprm-lr", "1e-2", "--grpo-kl-coef", "0", "--sprm-dropout", "0.5",
              "--max-position-embeddings", "64", "--context-parallel-size", "2"]
    straight = _pretrain(2, [*common, "--train-iters", "3"], tmp_path / "straight.jsonl")
    _pretrain(2, [*common, "--train-iters", "2", "--save", str(tmp_path / "ckpt"), "--save-interval", "2"],
              tmp_path / "first.jsonl")
    resumed = _pretrain(2, [*common, "--train-iters", "3", "--load", str(tmp_path / "ckpt")],
                        tmp_path / "resumed.jsonl")
    assert [r["iteration"] for r in resumed] == [3]
    for key in (*EXACT, "spr positives", "spr negatives"):
        if key != "kl":  # (no reference model: --grpo-kl-coef 0)
            assert straight[-1][key] == resumed[-1][key], (key, straight[-1][key], resumed[-1][key])


@pytest.mark.multirank
def test_the_backbone_check_under_context_parallelism_gives_cp1_losses():
    """--stage backbone-check at CP 2: the same LM losses as on one rank (each share's part of the mean, the
    printed loss the whole micro-batch's)."""
    import re

    line = re.compile(r"iteration\s+(\d+)/\s*\d+ \| lm loss: (\S+) \| grad norm: (\S+)")
    args = ["--preset", "tiny", "--stage", "backbone-check", "--train-iters", "3", "--micro-batch-size", "2",
            "--lr", "1e-3", "--seq-length", "32", "--hidden-dropout", "0", "--attention-dropout", "0"]
    runs = []
    for nproc, extra in ((1, []), (2, ["--context-parallel-size", "2"])):
        out = torchrun("-m megatron_rgm.pretrain", nproc, [*args, *extra]).stdout
        runs.append([(int(m.group(1)), float(m.group(2)), float(m.group(3))) for m in map(line.search, out.splitlines())
                     if m])
    one, cp2 = runs
    assert [r[0] for r in one] == [r[0] for r in cp2] == [1, 2, 3]
    for (_, loss_a, norm_a), (_, loss_b, norm_b) in zip(one, cp2):
        assert loss_a == pytest.approx(loss_b, rel=1e-5) and norm_a == pytest.approx(norm_b, rel=1e-3)


def test_a_batch_split_elsewhere_must_carry_its_global_positions():
    from megatron_rgm.integration import batch_inputs

    tokens = torch.zeros(2, 8, dtype=torch.long)
    with pytest.raises(ConfigError, match="needs its global position_ids"):
        batch_inputs({"tokens": tokens, "cp_local": True})
    positions = torch.arange(8, 16).expand(2, 8)
    assert torch.equal(batch_inputs({"tokens": tokens, "cp_local": True, "position_ids": positions})[1], positions)


@pytest.mark.multirank
def test_the_sft_stage_under_context_parallelism_matches_cp1(task, tmp_path):
    """The language-model warm start: the loss over each share's response tokens, normalised over the step, gives
    CP 1's losses and gradients."""
    common = ["--preset", "tiny", "--stage", "sft", "--sft-data", str(task["sft"]), "--tokenizer",
              str(task["tokenizer"]), "--train-iters", "2", "--micro-batch-size", "4", "--lr", "1e-3",
              "--hidden-dropout", "0", "--attention-dropout", "0"]
    one = _pretrain(1, common, tmp_path / "one.jsonl")
    cp2 = _pretrain(2, [*common, "--context-parallel-size", "2"], tmp_path / "cp2.jsonl")
    for a, b in zip(one, cp2, strict=True):
        for key in ("lm loss", "grad norm"):
            assert abs(a[key] - b[key]) <= 1e-5 * max(1.0, abs(a[key])), (key, a[key], b[key])
