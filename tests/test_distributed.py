"""Launch detection (torchrun, SLURM, single process) and real process groups."""

from __future__ import annotations

import subprocess
import sys

import pytest

from helpers import WORKERS, clean_env, free_port, read_rank_results, torchrun
from megatron_rgm.distributed import LaunchError, first_slurm_host, launch_info


@pytest.mark.parametrize(
    "nodelist, first",
    [
        ("node07", "node07"),
        ("a01,b02", "a01"),
        ("gpu[003-010,012]", "gpu003"),
        ("gpu[12,14-15],cpu[1-2]", "gpu12"),
        ("rack1-[08-09]n", "rack1-08n"),
        ("localhost", "localhost"),
    ],
)
def test_first_slurm_host(nodelist, first):
    assert first_slurm_host(nodelist) == first


def test_launch_info_prefers_torchrun_then_slurm(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_NODELIST", "gpu[003-004]")
    monkeypatch.setenv("SLURM_JOB_ID", "123456")
    info = launch_info()
    assert (info.launcher, info.rank, info.world_size, info.local_rank) == ("slurm", 5, 8, 1)
    assert info.master_addr == "gpu003" and info.master_port == 20000 + 123456 % 20000
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert launch_info().launcher == "torchrun" and launch_info().rank == 2


def test_bad_rank_variable_is_named(monkeypatch):
    monkeypatch.setenv("RANK", "zero")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(LaunchError, match="RANK='zero' is not an integer"):
        launch_info()


@pytest.mark.multirank
def test_torchrun_launch(tmp_path):
    torchrun("report_ranks.py", 2, [str(tmp_path)])
    ranks = read_rank_results(tmp_path)
    assert [r["launcher"] for r in ranks] == ["torchrun", "torchrun"]
    assert [r["tp_rank"] for r in ranks] == [0, 1] and ranks[0]["backend"] == "gloo"
    assert all(r["sum_of_ranks"] == 1.0 for r in ranks)


@pytest.mark.multirank
def test_slurm_launch_without_torchrun(tmp_path):
    """Two processes started as srun would start them: SLURM_* only, no torchrun variables."""
    port = free_port()
    procs = []
    for rank in range(2):
        env = clean_env(SLURM_PROCID=str(rank), SLURM_NTASKS="2", SLURM_LOCALID=str(rank),
                        SLURM_NODELIST="localhost", SLURM_JOB_ID="42", MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, str(WORKERS / "report_ranks.py"), str(tmp_path)],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out[-4000:]
    ranks = read_rank_results(tmp_path)
    assert [(r["launcher"], r["rank"], r["world"], r["local_rank"]) for r in ranks] == [
        ("slurm", 0, 2, 0), ("slurm", 1, 2, 1)]
    assert all(r["master"] == f"localhost:{port}" for r in ranks)
    assert [r["tp_rank"] for r in ranks] == [0, 1]
    assert all(r["sum_of_ranks"] == 1.0 for r in ranks)


def test_world_size_not_divisible_is_a_clear_error(single_rank):
    from megatron_rgm.distributed import ParallelConfig

    with pytest.raises(LaunchError, match="world size 1 is not divisible by tensor x pipeline"):
        single_rank.initialize(ParallelConfig(tensor_model_parallel_size=2))
