"""Checkpoints of the training entry point: exact resume, resharding, atomic publish, keep-last."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from helpers import torchrun
from megatron_rgm.checkpoint import CheckpointError, latest_iteration

LINE = re.compile(r"iteration\s+(\d+)/\s*\d+ \| lm loss: (\S+) \| grad norm: (\S+)")
FLAGS = ["--preset", "tiny", "--stage", "backbone-check", "--tensor-model-parallel-size", "2", "--micro-batch-size", "2",
         "--lr", "1e-3"]


def losses(stdout: str) -> dict[int, tuple[str, str]]:
    return {int(m.group(1)): (m.group(2), m.group(3)) for m in map(LINE.search, stdout.splitlines()) if m}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    full = torchrun("-m megatron_rgm.pretrain", 2, FLAGS + ["--train-iters", "4", "--save", str(root / "a"),
                                                           "--save-interval", "2"])
    # A save that died half-way: a stale .tmp directory and nothing published for it.
    (root / "a" / "iter_0000006.tmp").mkdir()
    (root / "a" / "iter_0000006.tmp" / "junk").write_text("partial")
    # Bitwise resume (kill -9, death inside a save) is shown on the training loop in test_reliability.py.
    return root, losses(full.stdout)


@pytest.mark.multirank
def test_latest_pointer_ignores_unfinished_saves(runs):
    root, _ = runs
    assert latest_iteration(root / "a") == 4
    assert sorted(p.name for p in (root / "a").iterdir() if p.is_dir()) == [
        "iter_0000002", "iter_0000004", "iter_0000006.tmp"]


@pytest.mark.multirank
def test_saved_at_tp2_loads_at_tp1_pp2_and_tp2_pp2_with_identical_logits_and_continues(runs):
    """The TP=2 checkpoint of iteration 4 (weights and Adam state) at TP=1 x PP=2 and TP=2 x PP=2.

    Right after the load the logits equal the saver's (loaded back at TP=2); two more iterations at each
    layout give the losses of continuing at TP=2: the optimizer state was resharded, not restarted.
    """
    root, saved = runs
    out = root / "reshard"
    out.mkdir()
    argv, more = json.dumps(FLAGS), json.dumps(["--train-iters", "6"])
    torchrun("reshard_logits.py", 2, [str(root / "a"), argv, str(out), "2x1,1x2", more])
    torchrun("reshard_logits.py", 4, [str(root / "a"), argv, str(out), "2x2", more])
    saver = torch.load(out / "logits_tp2_pp1.pt")
    reference = json.loads((out / "continued_tp2_pp1.json").read_text())
    assert len(reference) == 2 and all(math.isfinite(x) for x in reference), reference  # iterations 5 and 6
    assert max(reference) < float(saved[1][0]), (reference, saved)  # on from iteration 4, not from scratch
    for layout in ("tp1_pp2", "tp2_pp2"):
        torch.testing.assert_close(torch.load(out / f"logits_{layout}.pt"), saver, rtol=0, atol=1e-5)
        continued = json.loads((out / f"continued_{layout}.json").read_text())
        assert continued == pytest.approx(reference, rel=0, abs=1e-5), (layout, continued, reference)


@pytest.mark.multirank
@pytest.mark.parametrize("nproc, layout", [(2, []), (4, ["--pipeline-model-parallel-size", "2"])],
                         ids=["dp2", "pp2-dp2"])
def test_the_distributed_optimizer_resumes_exactly(tmp_path, nproc, layout):
    """DP=2 with the distributed optimizer and torch's Adam (the CPU): stop after iteration 2, resume to 4, and get
    the uninterrupted run's losses and grad norms. Without megatron_rgm's fixes to megatron-core the load fails (an
    assertion on a fresh optimizer, then a KeyError on Adam's step); with a step tensor shared by all parameters
    iteration 4 moves (its grad norm by ~10%); at PP=2 the tied output layer's bucket comes first on the last stage,
    and without the bucket offsets fixed the saved master weights and moments there are other parameters' (on
    0.19.2 the resumed iteration 3 gave lm loss 3.089 for 3.043)."""
    flags = [*FLAGS, "--tensor-model-parallel-size", "1", "--use-distributed-optimizer", "--global-batch-size", "8",
             *layout]
    whole = torchrun("-m megatron_rgm.pretrain", nproc, [*flags, "--train-iters", "4"])
    torchrun("-m megatron_rgm.pretrain", nproc, [*flags, "--train-iters", "2", "--save", str(tmp_path / "a"),
                                                 "--save-interval", "2"])
    resumed = torchrun("-m megatron_rgm.pretrain", nproc, [*flags, "--train-iters", "4", "--load",
                                                           str(tmp_path / "a")])
    got, want = losses(resumed.stdout), losses(whole.stdout)
    assert sorted(got) == [3, 4] and sorted(want) == [1, 2, 3, 4]
    assert [got[i] for i in (3, 4)] == [want[i] for i in (3, 4)], (got, want)


def test_bad_load_paths(tmp_path):
    from megatron_rgm.checkpoint import load_checkpoint

    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope", [])
    (tmp_path / "f").write_text("x")
    with pytest.raises(CheckpointError, match="is a file"):
        load_checkpoint(tmp_path / "f", [])
    with pytest.raises(CheckpointError, match="holds no finished checkpoint"):
        load_checkpoint(tmp_path, [])
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("seven")
    with pytest.raises(CheckpointError, match="not an iteration number"):
        load_checkpoint(tmp_path, [])


def test_publish_keeps_the_old_directory_until_the_new_one_is_in_place(tmp_path, monkeypatch):
    import os

    from megatron_rgm.checkpoint import publish

    final, tmp = tmp_path / "iter_0000002", tmp_path / "iter_0000002.tmp"
    final.mkdir()
    (final / "old").write_text("1")
    tmp.mkdir()
    (tmp / "new").write_text("2")
    real_replace, calls = os.replace, []

    def dies_on_the_second_rename(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:
            raise OSError("killed between the renames")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", dies_on_the_second_rename)
    with pytest.raises(OSError):
        publish(tmp, final)
    # The old copy survives a publish that dies half-way (it used to be deleted before the rename).
    assert (tmp_path / "iter_0000002.old" / "old").read_text() == "1" and (tmp / "new").exists()
    monkeypatch.setattr(os, "replace", real_replace)
    publish(tmp, final)  # the next publish clears the leftover
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000002"] and (final / "new").read_text() == "2"
    pointer = tmp_path / "latest.tmp"
    pointer.write_text("2")
    publish(pointer, tmp_path / "latest")  # a file: one atomic rename
    assert (tmp_path / "latest").read_text() == "2" and not pointer.exists()


def test_the_state_made_to_shape_a_load_changes_no_weight_and_is_forgotten_unless_loaded(single_rank):
    """materialise_optimizer_state steps a fresh distributed optimizer on torch's Adam once, with weight decay and
    even an epsilon of 0 (0/0 would be NaN), and leaves every weight bitwise as it was; forget_unloaded_state then
    clears that state, so an optimizer nothing was loaded into starts at step 0."""
    from megatron.core.distributed import DistributedDataParallel
    from megatron.core.optimizer import distrib_optimizer

    from megatron_rgm.arguments import parse_args
    from megatron_rgm.compat.mcore import forget_unloaded_state, materialise_optimizer_state
    from megatron_rgm.model import build_model
    from megatron_rgm.training.optimizer import build_optimizer, ddp_config

    if distrib_optimizer.HAVE_APEX_OR_TE:
        pytest.skip("apex or Transformer Engine's Adam keeps its step in the param groups: nothing to make")
    args = parse_args(["--preset", "tiny", "--stage", "backbone-check", "--use-distributed-optimizer",
                       "--weight-decay", "0.1", "--micro-batch-size", "1", "--global-batch-size", "1"])
    single_rank.initialize(args.parallel)
    model = [DistributedDataParallel(args.transformer, ddp_config(args), m) for m in build_model(args)]
    optimizer = build_optimizer(model, args.optim, args.transformer)
    for opt in optimizer.chained_optimizers:
        for group in opt.optimizer.param_groups:
            group["eps"] = 0.0
    before = {n: p.detach().clone() for n, p in model[0].named_parameters()}
    inner = [opt.optimizer for opt in optimizer.chained_optimizers]
    groups = [(g["lr"], g["weight_decay"], g["eps"]) for o in inner for g in o.param_groups]
    assert any(wd > 0 for _, wd, _ in groups)
    made = materialise_optimizer_state(optimizer)
    assert made and all(len(o.state) > 0 for o in inner)
    assert all(float(st["step"]) == 1.0 for o in inner for st in o.state.values())
    for n, p in model[0].named_parameters():
        assert torch.equal(p, before[n]), n
    assert [(g["lr"], g["weight_decay"], g["eps"]) for o in inner for g in o.param_groups] == groups  # restored
    optimizer.state_dict()  # what failed on a fresh optimizer (a bare assertion)
    assert forget_unloaded_state(made) == len(made) and all(not o.state for o in inner)
