"""Reliability of the training loop: kill -9 and resume, death inside a save, NaN/Inf guard, a dead rank."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from helpers import REPO, TINY, WORKERS, clean_env, free_port, make_store, torchrun

VOLATILE = ("tokens/s",)


def launch(nproc: int, args: list[str], env: dict | None = None, fault: list[str] | None = None) -> subprocess.Popen:
    """``torchrun -m megatron_rgm.pretrain ARGS``; ``fault``: POINT [KEY=VALUE ...] where every rank kills itself
    (tests/workers/with_fault.py)."""
    target = [str(WORKERS / "with_fault.py"), *fault, "--", "-m"] if fault else ["-m"]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", f"--master-port={free_port()}",
           *target, "megatron_rgm.pretrain", *args]
    return subprocess.Popen(cmd, env=clean_env(**(env or {})), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL torchrun and every process under it (it starts its workers in sessions of their own)."""
    import psutil

    tree = [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    for pid in tree:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    psutil.wait_procs([p for p in map(_process, tree) if p is not None], timeout=30)


def _process(pid: int):
    import psutil

    try:
        return psutil.Process(pid)
    except psutil.NoSuchProcess:
        return None


def rows_by_iteration(path) -> dict[int, dict]:
    """The last line logged for each iteration (a resumed run logs the repeated ones again)."""
    out = {}
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:  # cut by the kill
            continue
        out[r["iteration"]] = {k: v for k, v in r.items() if k not in VOLATILE and not k.startswith("time/")}
    return out


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        (isinstance(a[k], float) and np.isnan(a[k]) and np.isnan(b[k])) or a[k] == b[k] for k in a)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, task_files):
    root = tmp_path_factory.mktemp("full")
    torchrun("-m megatron_rgm.pretrain", 2, [*RUN(task_files), "--save", str(root / "ckpt"), "--metrics-file",
                                             str(root / "m.jsonl")])
    return rows_by_iteration(root / "m.jsonl")


@pytest.fixture(scope="module")
def task_files(tmp_path_factory):
    from megatron_rgm.tasks.prepare import prepare

    return prepare(tmp_path_factory.mktemp("task"), seed=0, n_train=64, n_eval=8, n_sft=64)


def RUN(task) -> list[str]:  # noqa: N802 - the flags of every run in this file
    return [*TINY, "--tensor-model-parallel-size", "2", "--train-iters", "3", "--save-interval", "1",
            "--prompts", str(task["train"]), "--tokenizer", str(task["tokenizer"]), "--grpo-kl-coef", "0",
            "--max-response-length", "16"]


@pytest.mark.multirank
def test_killed_inside_a_save_then_at_a_random_point_then_resumed_is_bitwise_identical(task_files, uninterrupted,
                                                                                        tmp_path):
    """Three launches of one run: SIGKILL inside the save of iteration 2, SIGKILL of torchrun and all its
    workers at a random point, then to the end; every iteration must equal the uninterrupted run's."""
    from megatron_rgm.checkpoint import latest_iteration

    ckpt, metrics = tmp_path / "ckpt", tmp_path / "m.jsonl"
    args = [*RUN(task_files), "--save", str(ckpt), "--load", str(ckpt), "--metrics-file", str(metrics)]
    # 1. Rank 0 dies after writing iteration 2, before publishing it: the previous checkpoint stays current.
    proc = launch(2, args, fault=["checkpoint.before_publish", "iteration=2"])
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0, out[-2000:]
    assert latest_iteration(ckpt) == 1 and (ckpt / "iter_0000002.tmp").is_dir()
    assert not (ckpt / "iter_0000002").exists()
    # 2. Resumed, then killed from outside after a random delay (inside an iteration or a save).
    logged = len(metrics.read_text().splitlines())
    proc = launch(2, args)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if len(metrics.read_text().splitlines()) > logged:  # the resumed run got through an iteration
            time.sleep(random.Random().uniform(0, 2.0))
            break
        time.sleep(0.1)
    kill_tree(proc)
    # 3. Resumed to the end.
    torchrun("-m megatron_rgm.pretrain", 2, args)
    resumed = rows_by_iteration(metrics)
    assert sorted(resumed) == [1, 2, 3]
    for it in (1, 2, 3):
        assert same(resumed[it], uninterrupted[it]), (it, resumed[it], uninterrupted[it])
    assert latest_iteration(ckpt) == 3


@pytest.mark.multirank
def test_nonfinite_steps_are_skipped_and_stop_the_run(task_files, tmp_path):
    store = make_store(tmp_path / "store", task_files, n_groups=2, nan_log_probs=True)
    proc = launch(2, [*TINY, "--tensor-model-parallel-size", "2", "--train-iters", "5", "--rollouts", str(store),
                      "--tokenizer", str(task_files["tokenizer"]), "--max-consecutive-nonfinite", "2",
                      "--metrics-file", str(tmp_path / "m.jsonl")])
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert "error: iteration 2: 2 optimizer steps in a row had NaN/Inf gradients" in out, out[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [r["skipped steps"] for r in rows] == [1.0], "iteration 1 logged with its skipped step"


def test_a_nonfinite_gradient_never_reaches_the_weights(single_rank):
    import torch
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from megatron_rgm.arguments import parse_args
    from megatron_rgm.model import build_model
    from megatron_rgm.training.optimizer import build_optimizer, optimizer_step

    args = parse_args(["--preset", "tiny", "--stage", "backbone-check", "--lr", "1e-2"])
    single_rank.initialize(args.parallel)
    model = [DistributedDataParallel(args.transformer, DistributedDataParallelConfig(), m) for m in build_model(args)]
    optimizer = build_optimizer(model, args.optim, args.transformer)
    before = {n: p.detach().clone() for n, p in model[0].named_parameters()}
    for n, p in model[0].named_parameters():
        p.main_grad.fill_(float("nan") if "sprm_head.3.bias" in n else 0.5)
    result = optimizer_step(optimizer, 1.0, 1.0)
    assert not result.ok and not np.isfinite(result.head_grad_norm)
    for n, p in model[0].named_parameters():
        assert torch.equal(p, before[n]), n
    for p in model[0].parameters():
        p.main_grad.fill_(0.5)
    assert optimizer_step(optimizer, 1.0, 1.0).ok
    assert not torch.equal(next(model[0].parameters()), next(iter(before.values())))


@pytest.mark.multirank
def test_a_dead_rank_makes_the_others_exit_with_a_message(task_files, tmp_path):
    """Ranks started without torchrun (as srun does): nothing kills the survivor but its own timeout."""
    store = make_store(tmp_path / "store", task_files, n_groups=2)
    metrics = tmp_path / "m.jsonl"
    port = free_port()
    procs = []
    for rank in range(2):
        env = clean_env(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                        MASTER_PORT=str(port))
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "megatron_rgm.pretrain", *TINY, "--tensor-model-parallel-size", "2",
             "--train-iters", "1000", "--rollouts", str(store), "--tokenizer", str(task_files["tokenizer"]),
             "--distributed-timeout-minutes", "0.25", "--metrics-file", str(metrics)],
            env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    deadline = time.time() + 240
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 1):
        time.sleep(0.2)
    procs[0].kill()
    started = time.time()
    out, _ = procs[1].communicate(timeout=120)
    assert procs[1].returncode == 1, out[-3000:]
    assert "error: rank 1 lost its peers" in out and "resume with --load" in out, out[-3000:]
    assert time.time() - started < 60
