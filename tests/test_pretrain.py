"""The entry point runs at TP=2, PP=2 and DP=2 (distributed optimizer) on gloo ranks."""

from __future__ import annotations

import math
import re

import pytest

from helpers import torchrun
from megatron_rgm.pretrain import main

LINE = re.compile(r"iteration\s+(\d+)/\s*(\d+) \| lm loss: (\S+) \| grad norm: (\S+)")


@pytest.mark.multirank
@pytest.mark.parametrize("layout", [
    # TP=2 and PP=2 run the training loop itself in test_training.py; the distributed optimizer here.
    ["--use-distributed-optimizer", "--global-batch-size", "8"],
])
def test_backbone_check_runs(layout):
    proc = torchrun("-m megatron_rgm.pretrain", 2, ["--preset", "tiny", "--stage", "backbone-check", "--train-iters", "3",
                                                     "--micro-batch-size", "2", "--lr", "1e-3", *layout])
    lines = [LINE.search(line) for line in proc.stdout.splitlines()]
    lines = [m for m in lines if m]
    assert [int(m.group(1)) for m in lines] == [1, 2, 3]
    for m in lines:
        assert math.isfinite(float(m.group(3))) and math.isfinite(float(m.group(4)))
    assert "backbone check done" in proc.stdout


def test_invalid_flags_exit_2_with_the_message(capsys):
    assert main(["--tensor-model-parallel-size", "3"]) == 2
    assert "does not divide --num-attention-heads" in capsys.readouterr().err
