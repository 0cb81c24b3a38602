"""Run a function on N gloo/nccl ranks (conversion, verify, rollouts, Best-of-N): in place under torchrun, else by
spawning them."""

from __future__ import annotations

import os
import socket
import sys

import torch.multiprocessing as mp

from megatron_rgm.config import ConfigError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(local_rank: int, world: int, port: int, fn, args, skip_teardown: bool = False) -> None:
    os.environ.update(RANK=str(local_rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local_rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        fn(*args)
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None
    if skip_teardown:
        exit_now(0)


def exit_now(code: int) -> None:
    """End the process without the interpreter's teardown, once its work is done and its output flushed.

    Tearing down torch and megatron-core (about 3,000 modules) pages in
    another ~0.12 GiB (measured: a process that only imports them peaks at
    0.71 GiB, 0.83 GiB at its exit); for a conversion rank that is as much as
    its largest tensor. Every file the tools write is closed before this.
    """
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):
            pass
    os._exit(code)


def run_ranks(fn, world_size: int, *args, skip_teardown: bool = False) -> None:
    """Call ``fn(*args)`` on ``world_size`` ranks (each sets up its own process group from the env).

    Args:
        skip_teardown: spawned ranks end with :func:`exit_now` once ``fn`` returns (``fn`` must have closed
            everything it wrote).
    """
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        if int(os.environ["WORLD_SIZE"]) != world_size:
            raise ConfigError(f"launched with WORLD_SIZE={os.environ['WORLD_SIZE']} but this layout needs "
                              f"{world_size} ranks (tp x pp): launch that many or none and let the tool spawn them")
        fn(*args)
        return
    if world_size == 1:
        _child(0, 1, free_port(), fn, args)
        return
    try:
        mp.start_processes(_child, args=(world_size, free_port(), fn, args, skip_teardown), nprocs=world_size,
                           start_method="spawn")
    except mp.ProcessExitedException as e:
        raise SystemExit(f"a conversion rank failed (exit code {e.exit_code}); its error is printed above") from None
    except mp.ProcessRaisedException as e:
        msg = str(e).strip().splitlines()
        raise SystemExit(f"a conversion rank failed: {msg[-1] if msg else e}") from None
