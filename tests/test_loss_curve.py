"""A pinned loss curve: the GRPO and SPR terms of four tiny iterations, to catch a change in the numbers.

The learning rates keep both classes of the SPR mask in every iteration (with a faster head or backbone
the mask holds one class after an iteration or two, and the SPR loss is then exactly 0, which pins little).

The rollouts come from a store (no sampling), one rank, fixed seeds: the losses depend only on the model
code, the loss code and the optimizer. The pinned values were measured on megatron-core 0.16.1 and hold on
0.19.2; a change that moves them must say why and re-pin (run this file with RGM_PRINT_CURVE=1 to print
the new values). The tolerance covers float reordering across CPUs (AVX2 and AVX-512 kernels, oneDNN's
blockings), several orders of magnitude below what a change of the method moves.
"""

from __future__ import annotations

import json
import os

import pytest

from helpers import TINY, make_store, torchrun

PINNED = {
    # Re-pinned when the loss became normalised over the optimizer step (a token-mean over all its micro-batches,
    # megatron's calculate_per_token_loss) instead of a mean of micro-batch means: the first two iterations are
    # unchanged to the last digit, the updates of the later ones move by ~1e-4.
    "grpo loss": [0.36261285146077477, 0.36125363243950737, 0.35935278292055484, 0.357662558555603],
    "spr loss": [0.6913205464680989, 0.6911389386212384, 0.6909682662398727, 0.4316227436065674],
    # The SPR mask's classes (a sign test per step): both take part in every iteration of this curve.
    "spr positives": [12.0, 12.0, 12.0, 5.0],
    "spr negatives": [21.0, 19.0, 23.0, 18.0],
}
RTOL, ATOL = 1e-4, 1e-6


@pytest.fixture(scope="module")
def curve(tmp_path_factory):
    from megatron_rgm.tasks.prepare import prepare

    root = tmp_path_factory.mktemp("curve")
    task = prepare(root / "task", seed=0, n_train=64, n_eval=8, n_sft=256)
    store = make_store(root / "store", task, n_groups=8, k=8)
    metrics = root / "m.jsonl"
    torchrun("-m megatron_rgm.pretrain", 1, [*TINY, "--train-iters", "4", "--rollouts", str(store), "--tokenizer",
                                             str(task["tokenizer"]), "--grpo-group-size", "8", "--sprm-dropout", "0",
                                             "--lr", "1e-4", "--sprm-lr", "3e-5", "--seed", "7", "--metrics-file", str(metrics)])
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    if os.environ.get("RGM_PRINT_CURVE"):
        print({key: [r[key] for r in rows] for key in PINNED})
    return rows


@pytest.mark.multirank
@pytest.mark.parametrize("key", sorted(PINNED))
def test_the_tiny_loss_curve_is_the_pinned_one(curve, key):
    assert [r["iteration"] for r in curve] == [1, 2, 3, 4]
    got = [r[key] for r in curve]
    assert got == pytest.approx(PINNED[key], rel=RTOL, abs=ATOL), (key, got)
