"""RGM inside Megatron-LM's own training loop (``megatron.training.pretrain``) and checkpoints both ways.

Needs ``megatron.training``: megatron-core's wheel ships it from 0.17 on (Python 3.12); the 0.16.1
wheel on Python 3.11 has none, and these tests are skipped there.
"""

from __future__ import annotations

import json
import re

import pytest

from helpers import REPO, clean_env, torchrun
from megatron_rgm.compat import megatron_lm

pytestmark = pytest.mark.skipif(
    not megatron_lm.available(),
    reason="megatron.training (Megatron-LM's pretrain loop) is not installed: it ships with megatron-core>=0.17 "
           "on Python 3.12, not with the 0.16.1 wheel")

# A pretrain_gpt.py command line: 4 layers, hidden 64, GQA, RMSNorm, SwiGLU, RoPE; its layout is in LAYOUTS.
FLAGS = ("--num-layers 4 --hidden-size 64 --num-attention-heads 4 --group-query-attention --num-query-groups 2 "
         "--ffn-hidden-size 128 --seq-length 32 --max-position-embeddings 32 --micro-batch-size 4 "
         "--lr 1e-4 --lr-decay-style constant "
         "--weight-decay 0 --tokenizer-type NullTokenizer --vocab-size 200 --distributed-backend gloo "
         "--use-cpu-initialization --transformer-impl local --no-persist-layer-norm "
         "--no-gradient-accumulation-fusion --no-masked-softmax-fusion --no-bias-swiglu-fusion "
         "--no-bias-dropout-fusion --no-rope-fusion --normalization RMSNorm --swiglu --disable-bias-linear "
         "--position-embedding-type rope --hidden-dropout 0 --attention-dropout 0 --eval-iters 0 "
         "--eval-interval 1000 --log-interval 1 --seed 1234 --num-workers 0 --sprm-dropout 0 "
         # Feature scale: at 0.02 the layer outputs are so small that the fresh head gives every step
         # the same sign, the SPR mask then holds one class only and its loss is 0.
         "--init-method-std 0.5").split()

TRAIN_ITERS = 6  # Megatron-LM saves at iteration SAVED and at the end
SAVED = 4

# (gloo ranks, layout flags). Every DP rank reads the same 4 samples, so the losses are the same in each layout.
LAYOUTS = {
    "tp2": (2, "--tensor-model-parallel-size 2 --global-batch-size 4"),
    # The head on the second stage only; Adam's state sharded over 2 DP ranks, saved and loaded as each side
    # writes it (Megatron-LM dp_reshardable by default, megatron_rgm fully_reshardable).
    "pp2-dp2-distopt": (4, "--pipeline-model-parallel-size 2 --use-distributed-optimizer --global-batch-size 8"),
}


def _iteration_lines(stdout: str) -> list[int]:
    return [int(m.group(1)) for m in re.finditer(r"iteration\s+(\d+)/\s*\d+ \|", stdout)]


@pytest.fixture(scope="module", params=list(LAYOUTS))
def layout(request):
    nproc, flags = LAYOUTS[request.param]
    return nproc, [*FLAGS, *flags.split()]


def _ranks(out, nproc):
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)]


def _last_stage_spr(ranks) -> list[float]:
    """The SPR loss per iteration, the same on every rank of the last pipeline stage (which computes it)."""
    spr = [r["spr"] for r in ranks if r["last_stage"]]
    assert spr and all(s == spr[0] for s in spr), spr
    assert not any(r["spr"] for r in ranks if not r["last_stage"])
    return spr[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, layout):
    """Megatron-LM's pretrain(): 6 iterations with RGM's pieces; its save_checkpoint at 4 (and 6)."""
    nproc, flags = layout
    out = tmp_path_factory.mktemp("megatron_lm")
    proc = torchrun("megatron_lm_pretrain.py", nproc,
                    [str(out / "train"), *flags, "--train-iters", str(TRAIN_ITERS), "--save", str(out / "mlm_ckpt"),
                     "--save-interval", str(SAVED)])
    return out, proc.stdout, _ranks(out / "train", nproc)


@pytest.mark.multirank
def test_megatron_lm_pretrain_trains_the_head_and_the_spr_loss_decreases(trained):
    _, stdout, ranks = trained
    assert _iteration_lines(stdout) == list(range(1, TRAIN_ITERS + 1))
    assert all(r["tp"] * r["pp"] * r["dp"] == len(ranks) and r["iterations"] == TRAIN_ITERS for r in ranks)
    spr = _last_stage_spr(ranks)  # TP and DP ranks see one loss
    assert len(spr) == TRAIN_ITERS
    # Both classes take part (a one-class mask has weight 0 and a loss of exactly 0).
    first = next(line for line in stdout.splitlines() if re.search(r"iteration\s+1/", line))
    negatives = float(re.search(r"spr negatives: ([0-9.E+-]+)", first).group(1))
    positives = float(re.search(r"spr positives: ([0-9.E+-]+)", first).group(1))
    assert positives > 0 and negatives > 0, first
    # Over the first 3 iterations: later a step changes class and joins the mask, and the loss jumps (from
    # iteration 4 in the PP layout, whose stages initialise from seeds of their own, 5 at TP=2).
    assert spr[0] > 0
    assert all(b < a for a, b in zip(spr[:3], spr[1:3])), spr
    assert spr[2] < 0.1 * spr[0], spr


@pytest.mark.multirank
def test_megatron_lm_optimizer_gives_the_head_its_own_lr_and_weight_decay(trained):
    # add_rgm_args (the extra_args_provider) alone: --lr 1e-4, so the head learns at 10x; --weight-decay 0, the
    # head's matrices at --sprm-weight-decay's 0.01 and its biases at 0 (megatron's rule for 1-D parameters).
    # All ranks' groups together: with PP the head is on the last stage, with the distributed optimizer a group
    # lists the parameters of this DP rank's shard.
    groups = [g for r in trained[2] for g in r["param_groups"]]
    assert not any(g["mixed"] for g in groups), groups
    head, policy = [g for g in groups if g["head"]], [g for g in groups if not g["head"]]
    assert head and policy
    assert all(g["lr"] == pytest.approx(1e-3) for g in head) and all(g["lr"] == pytest.approx(1e-4) for g in policy)
    assert sorted({(d, round(g["weight_decay"], 9)) for g in head for d in g["dims"]}) == [(1, 0.0), (2, 0.01)]
    assert all(g["weight_decay"] == 0.0 for g in policy)


@pytest.fixture(scope="module")
def exchanged(trained, layout):
    """Plain Megatron-LM checkpoint -> RGM; Megatron-LM checkpoint with head + optimizer -> RGM and a step;
    RGM's save_checkpoint; then Megatron-LM's pretrain resumes the RGM checkpoint for one iteration."""
    import torch

    nproc, flags = layout
    out, _, _ = trained
    ex = out / "exchange"
    torchrun("megatron_lm_checkpoint.py", nproc,
             [str(ex), str(out / "mlm_ckpt"), *flags, "--train-iters", "1", "--save", str(ex / "plain_ckpt"),
              "--save-interval", "1"])
    proc = torchrun("megatron_lm_pretrain.py", nproc,
                    [str(out / "resume"), *flags, "--train-iters", "6", "--load", str(ex / "rgm_ckpt"),
                     "--use-checkpoint-opt_param-scheduler"])
    return {
        "train_spr": _last_stage_spr(trained[2]),
        "exchange": torch.load(ex / "logits.pt"),
        "result": json.loads((ex / "result.json").read_text()),
        "resume": torch.load(out / "resume" / "logits.pt"),
        "resume_ranks": _ranks(out / "resume", nproc),
        "resume_stdout": proc.stdout,
        "dir": ex,
    }


def _max_diff(a, b) -> float:
    return float((a.float() - b.float()).abs().max())


@pytest.mark.multirank
def test_plain_megatron_lm_checkpoint_loads_into_rgm_with_equal_logits_and_a_fresh_head(exchanged):
    got = exchanged["result"]["plain_into_rgm"]
    assert got["megatron_lm"] and got["fresh_head"] and got["head_kept"]
    assert got["iteration"] == 1
    ex = exchanged["exchange"]
    assert ex["plain_saved"].shape == ex["plain_into_rgm"].shape
    assert _max_diff(ex["plain_saved"], ex["plain_into_rgm"]) == 0.0
    assert any("scheduler" in item for item in got["not_loaded"])  # named, not silently skipped
    assert got["optimizer_states"] == 0  # no moments for the head: the optimizer starts fresh, not at step 1


@pytest.mark.multirank
def test_megatron_lm_checkpoint_with_head_resumes_in_rgm_with_its_optimizer(exchanged):
    got = exchanged["result"]["head_ckpt_into_rgm"]
    assert got["megatron_lm"] and not got["fresh_head"] and got["iteration"] == SAVED
    assert got["adam_before"] == 0.0 and got["adam_after"] > 0.0  # Adam moments came from the checkpoint
    step = exchanged["result"]["resumed_step"]
    # RGM's step 5 from Megatron-LM's iteration-4 weights, optimizer and RNG is Megatron-LM's own step 5.
    assert step["ok"]
    assert step["spr loss"] == pytest.approx(exchanged["train_spr"][SAVED], rel=1e-6, abs=1e-9)


@pytest.mark.multirank
def test_rgm_checkpoint_loads_and_resumes_in_megatron_lm_load_checkpoint(exchanged):
    # Megatron-LM's load_checkpoint read iteration 5 and the weights saved by megatron_rgm, then trained.
    assert _iteration_lines(exchanged["resume_stdout"]) == [6]
    assert all(r["iterations"] == 1 for r in exchanged["resume_ranks"])
    # ... and its iteration 6 is the uninterrupted run's: weights, Adam state and schedule carried over.
    assert _last_stage_spr(exchanged["resume_ranks"])[0] == pytest.approx(exchanged["train_spr"][SAVED + 1], rel=1e-6,
                                                                    abs=1e-9)
    assert _max_diff(exchanged["exchange"]["rgm_saved"], exchanged["resume"]["before"]) == 0.0
    assert "successfully loaded checkpoint" in exchanged["resume_stdout"]
    assert "at iteration 5" in exchanged["resume_stdout"]


def test_activate_lists_each_megatron_lm_patch_with_its_reason():
    # In a process of its own: the patches change torch and megatron for the life of the process.
    import subprocess
    import sys

    code = ("import json; from megatron_rgm.compat import megatron_lm; megatron_lm.activate(force=True); "
            "print(json.dumps([[p.target, p.reason] for p in megatron_lm.applied_patches()]))")
    proc = subprocess.run([sys.executable, "-c", code], env=clean_env(), capture_output=True, text=True,
                          timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    patches = dict(json.loads(proc.stdout.strip().splitlines()[-1]))
    for target in ("megatron.training.arguments.get_device_arch_version",
                   "megatron.training.training.initialize_megatron", "megatron.training.training.load_checkpoint",
                   "megatron.core.datasets.utils.compile_helpers"):
        assert target in patches and patches[target], sorted(patches)


def _word_tokenizer(out, size: int = 200) -> None:
    """A word-level HF tokenizer of ``size`` ids (the Megatron-LM run's vocabulary), with ".\\n\\n" as one token."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "</s>"] + [f"w{i}" for i in range(size - 3)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_tokens([AddedToken(".\n\n", normalized=False)])  # id size - 1
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>").save_pretrained(out)


def _tool(name: str, *args: str, check: bool = True):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, str(REPO / "tools" / f"{name}.py"), *args], env=clean_env(),
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


@pytest.mark.multirank
def test_the_tools_rebuild_a_megatron_lm_checkpoint_from_its_args(exchanged, tmp_path):
    """Export, verify, rollouts and Best-of-N on the plain checkpoint Megatron-LM's own loop saved."""
    from megatron_rgm.data.store import RolloutStore

    plain = str(exchanged["dir"] / "plain_ckpt")
    # Export (the vocabulary of 200 is in its args) and compare the export with the checkpoint at TP=2.
    _tool("convert_checkpoint", "mcore-to-hf", "--mcore-path", plain, "--output", str(tmp_path / "hf"))
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["vocab_size"] == 200 and config["num_hidden_layers"] == 4 and config["num_key_value_heads"] == 2
    assert not (tmp_path / "hf" / "score_module.pt").exists()  # Megatron-LM's plain GPT has no head to export
    _tool("convert_checkpoint", "verify", "--hf-path", str(tmp_path / "hf"), "--mcore-path", plain, "--tp", "2",
          "--json", str(tmp_path / "verify.json"))
    assert json.loads((tmp_path / "verify.json").read_text())["max_abs_logit_diff"] < 1e-4

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"problem": f"w{i} w{i + 1}", "answer": "w3"}) for i in range(2)))
    sampling = ["--prompts", str(prompts), "--problem-key", "problem", "--answer-key", "answer", "--k", "2",
                "--max-new-tokens", "8", "--temperature", "1.0", "--verifier", "exact"]
    # No tokenizer travels with a Megatron-LM checkpoint: the tool says which flag to pass.
    proc = _tool("generate_rollouts", *sampling, "--output", str(tmp_path / "none"), "--backend", "megatron",
                 "--mcore-path", plain, check=False)
    assert proc.returncode == 2 and "pass --tokenizer" in proc.stderr, proc.stderr[-2000:]
    _word_tokenizer(tmp_path / "tok")
    _tool("generate_rollouts", *sampling, "--output", str(tmp_path / "store"), "--backend", "megatron",
          "--mcore-path", plain, "--tokenizer", str(tmp_path / "tok"), "--tp", "2")
    store = RolloutStore(tmp_path / "store", "r")
    assert len(store) == 4
    for i in range(4):
        t = store[i]
        assert (t.log_probs[t.response_mask] < 0).all() and (t.tokens < 200).all()
    _tool("best_of_n", *sampling, "--output", str(tmp_path / "bon.jsonl"), "--mcore-path", plain,
          "--tokenizer", str(tmp_path / "tok"), "--complete-all", "--answer-max-new-tokens", "4")
    rows = [json.loads(line) for line in (tmp_path / "bon.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(len(r["candidates"]) == 2 for r in rows)
