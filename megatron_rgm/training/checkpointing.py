"""Megatron distributed checkpoints (``torch_dist``) of RGM models: save, load into any layout.

Layout of a save directory (Megatron-LM's)::

    <dir>/iter_0000010/                  one dist checkpoint per saved iteration
    <dir>/latest_checkpointed_iteration.txt

A checkpoint is written to ``iter_XXXXXXX.tmp`` and renamed when every rank
has finished; the ``latest`` file moves last (written aside, then replaced),
so a save that dies half-way leaves the previous checkpoint current.

Loading compares the checkpoint's keys with the model's: a checkpoint without
an SPRM head loads into an RGM model with its fresh, seeded head (and says
so); an RGM checkpoint loads into a plain GPTModel with the head ignored (and
says so); any other missing tensor is an error naming it.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_rgm.config import ConfigError

LATEST = "latest_checkpointed_iteration.txt"
HEAD_PREFIX = "sprm_head."


class CheckpointError(ConfigError):
    """A checkpoint that cannot be used as asked; the message names it and the fix."""


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _say(msg: str) -> None:
    if _rank() == 0:
        print(f"[checkpoint] {msg}", flush=True)


def iteration_dir(save_dir: str | os.PathLike, iteration: int) -> Path:
    return Path(save_dir) / f"iter_{iteration:07d}"


def latest_iteration(save_dir: str | os.PathLike) -> int | None:
    """The iteration the ``latest`` file points at, or None if there is none."""
    path = Path(save_dir) / LATEST
    if not path.exists():
        return None
    text = path.read_text().strip()
    if not text.isdigit():
        raise CheckpointError(f"{path} holds {text!r}, not an iteration number: delete it or point --load elsewhere")
    return int(text)


def _unwrapped(chunks) -> list[torch.nn.Module]:
    from megatron_rgm.model import unwrap

    out = []
    for chunk in chunks:
        inner = unwrap(chunk)
        while hasattr(inner, "module") and not hasattr(inner, "sharded_state_dict"):
            inner = inner.module
        out.append(inner)
    return out


def model_sharded_state_dict(chunks) -> dict:
    """``{"model": ...}`` (or ``model0``, ``model1``, ... per virtual stage), Megatron-LM's keys."""
    chunks = _unwrapped(chunks)
    if len(chunks) == 1:
        return {"model": chunks[0].sharded_state_dict()}
    return {f"model{i}": c.sharded_state_dict() for i, c in enumerate(chunks)}


def _shutdown_writer_manager() -> None:
    # The torch_dist writer starts a `spawn` multiprocessing Manager for its result
    # queue and keeps it for the life of the process; stop it so nothing outlives us.
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    queue = getattr(filesystem_async, "_results_queue", None)
    if queue is not None:
        manager = getattr(queue, "_manager", None)
        filesystem_async._results_queue = None
        if manager is not None:
            manager.shutdown()


OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


def _layout() -> dict:
    from megatron.core import parallel_state as ps

    return {"tp": ps.get_tensor_model_parallel_world_size(), "pp": ps.get_pipeline_model_parallel_world_size(),
            "dp": ps.get_data_parallel_world_size()}


def rng_state(data_generator: torch.Generator | None = None) -> dict:
    """This rank's random states: python, torch CPU (and CUDA), megatron's tracker, a data generator."""
    import random

    from megatron.core import tensor_parallel

    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    if data_generator is not None:
        state["data"] = data_generator.get_state()
    return state


def set_rng_state(state: dict, data_generator: torch.Generator | None = None) -> None:
    import random

    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    if data_generator is not None and "data" in state:
        data_generator.set_state(state["data"])


def _rng_object(data_generator: torch.Generator | None):
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing import ShardedObject

    # One object per (pp, tp, dp) rank: the states differ between all of them.
    return ShardedObject("rng_state", rng_state(data_generator),
                         (ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size(),
                          ps.get_data_parallel_world_size()),
                         (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank(),
                          ps.get_data_parallel_rank()), replica_id=0)


def save_checkpoint(save_dir: str | os.PathLike, iteration: int, chunks, extra: dict | None = None,
                    keep_last: int | None = None, optimizer=None, data_generator: torch.Generator | None = None) -> Path:
    """Save model chunks, optimizer, RNG states and picklable ``extra`` state as a dist checkpoint. Collective.

    Args:
        optimizer: a megatron optimizer; saved fully reshardable.
        data_generator: the rank's data-order generator, saved with the RNG states.

    Returns:
        The published ``iter_XXXXXXX`` directory.
    """
    from megatron.core import dist_checkpointing

    save_dir = Path(save_dir)
    final = iteration_dir(save_dir, iteration)
    tmp = final.with_name(final.name + ".tmp")
    if _rank() == 0:
        save_dir.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)  # left by a save that died
        tmp.mkdir()
    _barrier()
    state = model_sharded_state_dict(chunks)
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(dict(state), metadata=OPTIMIZER_METADATA)
    state["rng_state"] = _rng_object(data_generator)
    state["rgm_extra"] = dict(extra or {}, iteration=iteration, layout=_layout())
    dist_checkpointing.save(state, str(tmp))
    _shutdown_writer_manager()
    if os.environ.get("MEGATRON_RGM_TEST_DIE_IN_SAVE") == str(iteration):  # tests: killed before publishing
        os.kill(os.getpid(), 9)
    _barrier()
    if _rank() == 0:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        pointer = save_dir / (LATEST + ".tmp")
        pointer.write_text(str(iteration))
        os.replace(pointer, save_dir / LATEST)
        if keep_last:
            saved = sorted(p for p in save_dir.glob("iter_???????") if p.is_dir())
            for old in saved[:-keep_last]:
                shutil.rmtree(old)
    _barrier()
    _say(f"saved iteration {iteration} to {final}")
    return final


def resolve_checkpoint(path: str | os.PathLike, iteration: int | None = None) -> tuple[Path, int]:
    """The ``iter_XXXXXXX`` directory to load and its iteration.

    Args:
        path: a save directory (its ``latest`` file, or ``iteration``) or one checkpoint directory.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint path {path} does not exist: pass a directory written by --save")
    if not path.is_dir():
        raise CheckpointError(f"checkpoint path {path} is a file, not a directory: pass the --save directory")
    if (path / "metadata.json").exists() or path.name.startswith("iter_"):
        return path, int(path.name[5:12]) if path.name[5:12].isdigit() else 0
    iteration = latest_iteration(path) if iteration is None else iteration
    if iteration is None:
        raise CheckpointError(f"{path} has no {LATEST}: it holds no finished checkpoint")
    ckpt = iteration_dir(path, iteration)
    if not ckpt.is_dir():
        raise CheckpointError(f"checkpoint {ckpt} does not exist (the latest file points at a missing directory)")
    return ckpt, iteration


@dataclass
class LoadResult:
    iteration: int
    extra: dict
    fresh_head: bool  # the checkpoint had no head; the model keeps its own
    ignored_head: bool  # the checkpoint had a head the model has no place for


def load_checkpoint(load_dir: str | os.PathLike, chunks, iteration: int | None = None, optimizer=None,
                    data_generator: torch.Generator | None = None) -> LoadResult:
    """Load a checkpoint saved by :func:`save_checkpoint` into any TP/PP layout. Collective.

    Weights always load. The optimizer state loads when ``optimizer`` is given
    and the checkpoint has one (saved fully reshardable, so any layout); the
    RNG states (and ``data_generator``'s) only into the layout they were
    saved from, since they are per rank (a different layout is said and skipped).

    Args:
        load_dir: a save directory (uses its ``latest`` file) or an ``iter_XXXXXXX`` directory.
        chunks: this rank's model chunks (wrapped or not), built for the current layout.
        iteration: a specific iteration instead of the latest.
        optimizer: restore its state too (None: weights only, e.g. to fine-tune).
        data_generator: restore this rank's data-order generator.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    ckpt, iteration = resolve_checkpoint(load_dir, iteration)
    common = dist_checkpointing.load_common_state_dict(str(ckpt))
    extra = common.get("rgm_extra", {}) if isinstance(common, dict) else {}
    state = model_sharded_state_dict(chunks)
    has_optimizer = isinstance(common, dict) and "optimizer" in common  # param groups live in the common part
    if optimizer is not None and has_optimizer:
        state["optimizer"] = optimizer.sharded_state_dict(dict(state), is_loading=True, metadata=OPTIMIZER_METADATA)
    same_layout = extra.get("layout") == _layout()
    if same_layout and "layout" in extra:
        state["rng_state"] = _rng_object(data_generator)
    loaded, ckpt_only, model_only = dist_checkpointing.load(state, str(ckpt), strict=StrictHandling.RETURN_ALL)
    # dist_checkpointing: "missing" = in the checkpoint, not asked for; "unexpected" = asked for, absent.
    head_missing = {k for k in model_only if HEAD_PREFIX in k}
    other_missing = sorted(k for k in model_only if HEAD_PREFIX not in k)
    if other_missing:
        raise CheckpointError(
            f"checkpoint {ckpt} lacks {len(other_missing)} tensors the model needs, e.g. {other_missing[:3]}: "
            "it was saved from a different architecture"
        )
    # Optimizer moments carry the head's names too: only model tensors say whether the head was left out.
    ckpt_only = {k for k in ckpt_only if not k.startswith(("optimizer", "rng_state"))}
    head_ignored = any(HEAD_PREFIX in k for k in ckpt_only)
    for key, chunk in zip(sorted(k for k in state if k.startswith("model")), _unwrapped(chunks)):
        missing, unexpected = chunk.load_state_dict(loaded[key], strict=False)
        missing = [m for m in missing if not m.startswith(HEAD_PREFIX) and not m.endswith("_extra_state")]
        if missing:
            raise CheckpointError(f"checkpoint {ckpt} did not provide {missing[:3]} for {key}")
    if head_missing:
        _say(f"{ckpt} has no SPRM head: the model keeps its fresh, seeded head")
    if head_ignored:
        _say(f"{ckpt} carries an SPRM head this model has no place for: ignored")
    if "optimizer" in state:
        optimizer.load_state_dict(loaded["optimizer"])
    elif optimizer is not None:
        _say(f"{ckpt} has no optimizer state: the optimizer starts fresh")
    if "rng_state" in state:
        set_rng_state(loaded["rng_state"], data_generator)
    elif "layout" in extra:
        _say(f"{ckpt} was saved at layout {extra['layout']}, this run is {_layout()}: RNG states start fresh")
    return LoadResult(iteration, extra, bool(head_missing), head_ignored)
