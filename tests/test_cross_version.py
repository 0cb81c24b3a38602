"""A checkpoint written under one supported megatron-core loads and resumes under the other.

0.16 keeps a checkpoint's common state in ``common.pt``; 0.19 keeps it inside
the ``torch_dist`` files and reads ``common.pt`` first where one exists. Our
save writes both (``megatron_rgm.compat.mcore.write_legacy_common_state``), so a
lab pinned to 0.16 can take a checkpoint trained on 0.19 and the other way.

Needs a second interpreter with the project and the other megatron-core:
``MEGATRON_RGM_OTHER_PYTHON`` (``.ci/run`` sets it for its second leg).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import REPO, WORKERS, clean_env, free_port

OTHER = os.environ.get("MEGATRON_RGM_OTHER_PYTHON", "")
THIS = sys.executable
MODEL = ["--preset", "tiny", "--stage", "backbone-check", "--micro-batch-size", "2", "--lr", "1e-3"]

pytestmark = [
    pytest.mark.multirank,
    pytest.mark.skipif(not OTHER, reason="MEGATRON_RGM_OTHER_PYTHON (an interpreter with the other megatron-core) "
                                         "is not set; .ci/run sets it"),
]


def launch(python: str, target: list[str], args: list[str]) -> subprocess.CompletedProcess:
    cmd = [python, "-m", "torch.distributed.run", "--nproc-per-node=1", f"--master-port={free_port()}", *target,
           *args]
    proc = subprocess.run(cmd, env=clean_env(), capture_output=True, text=True, timeout=600, cwd=REPO)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def mcore_version(python: str) -> str:
    out = subprocess.run([python, "-c", "import megatron.core; print(megatron.core.__version__)"],
                         env=clean_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Two iterations of the backbone check saved by each interpreter."""
    root = tmp_path_factory.mktemp("xversion")
    versions = {"this": mcore_version(THIS), "other": mcore_version(OTHER)}
    assert versions["this"] != versions["other"], f"both interpreters run megatron-core {versions['this']}"
    for name, python in (("this", THIS), ("other", OTHER)):
        launch(python, ["-m", "megatron_rgm.pretrain"], [*MODEL, "--train-iters", "2", "--save", str(root / name)])
    return root, versions


def logits_and_continuation(python: str, ckpt: Path, out: Path) -> tuple[torch.Tensor, list[float]]:
    out.mkdir()
    launch(python, [str(WORKERS / "reshard_logits.py")],
           [str(ckpt), json.dumps(MODEL), str(out), "1x1", json.dumps(["--train-iters", "4"])])
    return torch.load(out / "logits_tp1_pp1.pt"), json.loads((out / "continued_tp1_pp1.json").read_text())


@pytest.mark.parametrize("writer", ["this", "other"])
def test_checkpoint_loads_and_resumes_under_the_other_megatron_core(saved, writer):
    root, versions = saved
    reader = "other" if writer == "this" else "this"
    ckpt = root / writer
    assert (ckpt / "iter_0000002" / "common.pt").is_file(), "both versions read the common state from common.pt"
    python = {"this": THIS, "other": OTHER}
    own_logits, own_losses = logits_and_continuation(python[writer], ckpt, root / f"{writer}_by_{writer}")
    logits, losses = logits_and_continuation(python[reader], ckpt, root / f"{writer}_by_{reader}")
    # Same torch, same kernels, same weights and Adam state: the reader continues the writer's run exactly
    # (a tolerance of fp32 rounding only, in case the two torch builds sum in different orders).
    torch.testing.assert_close(logits, own_logits, rtol=0, atol=1e-6,
                               msg=f"megatron-core {versions[reader]} read {versions[writer]}'s weights differently")
    assert len(losses) == len(own_losses) == 2
    assert losses == pytest.approx(own_losses, abs=1e-6), (versions, losses, own_losses)
