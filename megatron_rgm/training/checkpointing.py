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

Megatron-LM (``megatron.training.checkpointing``, megatron-core 0.17+ wheels) both ways:

* what we save also carries what Megatron-LM's ``load_checkpoint`` reads from the
  common state: ``iteration``, ``checkpoint_version`` (3.0), ``args`` (a Namespace with
  the model geometry and layout its checks read, see :func:`megatron_lm_args`),
  ``rng_state`` in its layout (one object per (pp, tp) rank, a replica over data
  parallelism, a list holding this rank's python/numpy/torch/CUDA/tracker states under
  its key names) and, with an optimizer, ``opt_param_scheduler`` (a constant schedule
  at ``num_steps = iteration x global batch``) and param groups whose ``min_lr`` is a
  number (``None`` is written as 0.0, Megatron-LM's default ``--min-lr``). Our own
  per-(pp, tp, dp) RNG states travel beside it as ``rng_state_per_rank``; ``rgm_extra``
  is unchanged.
* a checkpoint Megatron-LM saved (``torch_dist``) loads here: weights (a GPT without the
  head leaves the model's fresh head, and says so), its optimizer when the param groups
  match (``min_lr`` 0.0 and ``None`` count as equal), its RNG states when the TP/PP
  layout is the same; what does not carry over (its LR scheduler, rerun state machine,
  FLOP counter, args) is named in a message.
"""

from __future__ import annotations

import argparse
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_rgm.compat.mcore import write_legacy_common_state
from megatron_rgm.config import ConfigError

LATEST = "latest_checkpointed_iteration.txt"
ASSETS = "hf_assets"  # tokenizer (and HF config.json) beside the iteration directories
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


RNG_KEY = "rng_state_per_rank"  # ours; "rng_state" holds Megatron-LM's layout (older RGM checkpoints: ours)
MEGATRON_LM_CHECKPOINT_VERSION = 3.0


def _rng_object(data_generator: torch.Generator | None, key: str = "rng_state"):
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing import ShardedObject

    # One object per (pp, tp, dp) rank: the states differ between all of them.
    return ShardedObject(key, rng_state(data_generator),
                         (ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size(),
                          ps.get_data_parallel_world_size()),
                         (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank(),
                          ps.get_data_parallel_rank()), replica_id=0)


def _megatron_lm_rng_state() -> dict:
    """This rank's states under Megatron-LM's names (``megatron.training.checkpointing.get_rng_state``)."""
    import random

    import numpy as np
    from megatron.core import tensor_parallel

    # On the CPU (megatron_rgm.cpu) the "CUDA" generator megatron forks is the CPU one.
    cuda_state = torch.cuda.get_rng_state() if torch.cuda.is_available() else torch.get_rng_state()
    return {"random_rng_state": random.getstate(), "np_rng_state": np.random.get_state(),
            "torch_rng_state": torch.get_rng_state(), "cuda_rng_state": cuda_state,
            "rng_tracker_states": tensor_parallel.get_cuda_rng_tracker().get_states()}


def _megatron_lm_rng_states() -> list:
    """Every data-parallel rank's states, in dp-rank order (Megatron-LM picks ``[dp_rank]`` under
    ``--data-parallel-random-init``, else ``[0]``). Collective over the data-parallel group."""
    from megatron.core import parallel_state as ps

    mine = _megatron_lm_rng_state()
    size = ps.get_data_parallel_world_size()
    if size == 1 or not dist.is_initialized():
        return [mine]
    states = [None] * size
    dist.all_gather_object(states, mine, group=ps.get_data_parallel_group())
    return states


def _megatron_lm_rng_object(value):
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing import ShardedObject

    # Megatron-LM's layout: one object per (pp, tp) rank, data-parallel ranks are replicas.
    return ShardedObject("rng_state", value,
                         (ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size()),
                         (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank()),
                         replica_id=ps.get_data_parallel_rank(with_context_parallel=True))


def _set_megatron_lm_rng_state(states: list) -> None:
    import random

    import numpy as np
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    dp_rank = ps.get_data_parallel_rank()
    state = states[dp_rank] if len(states) > dp_rank else states[0]
    random.setstate(state["random_rng_state"])
    np.random.set_state(state["np_rng_state"])
    torch.set_rng_state(state["torch_rng_state"])
    if torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda_rng_state"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["rng_tracker_states"])


def _inner_module(chunks):
    return _unwrapped(chunks)[0]


def megatron_lm_args(chunks, iteration: int, *, optimizer=None, global_batch_size: int | None = None,
                     overrides: dict | None = None) -> argparse.Namespace:
    """The ``args`` Namespace Megatron-LM's ``load_checkpoint`` reads from a checkpoint.

    Its resume checks compare ``num_layers``, ``hidden_size``, ``num_attention_heads`` (and, with a ``--vocab-file``, ``max_position_embeddings``,
    ``make_vocab_size_divisible_by``, ``padded_vocab_size``, ``tokenizer_type``); it reads
    the TP/PP sizes (RNG and distributed-optimizer layout), ``world_size`` and
    ``data_parallel_size`` (rerun state), ``no_save_rng`` / ``no_save_optim`` and the
    consumed-sample counters. ``overrides`` adds or replaces entries (e.g.
    ``tokenizer_type``, ``make_vocab_size_divisible_by`` for a run with a vocab file).
    The rest of the geometry (normalization, SwiGLU, biases, QK norm, RoPE base, precision, the
    head's ``sprm_*`` options) is recorded too, under Megatron-LM's names, so that
    :func:`megatron_rgm.model.load.describe_checkpoint` rebuilds the model from ``args`` alone.
    Not a full Megatron-LM argument set: ``--use-checkpoint-args`` needs more.
    """
    from megatron.core import parallel_state as ps

    model = _inner_module(chunks)
    config = model.config
    position = getattr(model, "position_embedding_type", "learned_absolute")
    ns = argparse.Namespace(
        num_layers=config.num_layers, hidden_size=config.hidden_size,
        num_attention_heads=config.num_attention_heads, num_query_groups=config.num_query_groups,
        ffn_hidden_size=config.ffn_hidden_size, kv_channels=config.kv_channels,
        # add_position_embedding is left out: Megatron-LM reads it as its --no-position-embedding flag
        # (True unless given, whatever the position embedding type) and takes True when it is missing.
        position_embedding_type=position,
        max_position_embeddings=getattr(model, "max_sequence_length", None),
        padded_vocab_size=getattr(model, "vocab_size", None),
        untie_embeddings_and_output_weights=not getattr(model, "share_embeddings_and_output_weights", True),
        tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=ps.get_pipeline_model_parallel_world_size(),
        data_parallel_size=ps.get_data_parallel_world_size(),
        world_size=dist.get_world_size() if dist.is_initialized() else 1,
        iteration=iteration, no_save_rng=False, no_save_optim=optimizer is None,
        data_parallel_random_init=False,  # weights start equal on every data-parallel rank
        skipped_train_samples=0, consumed_valid_samples=0, ckpt_format="torch_dist", use_dist_ckpt=True,
        saved_by="megatron_rgm",
        normalization=config.normalization, norm_epsilon=config.layernorm_epsilon,
        swiglu=bool(config.gated_linear_unit), add_bias_linear=bool(config.add_bias_linear),
        add_qkv_bias=bool(config.add_qkv_bias), qk_layernorm=bool(config.qk_layernorm),
        group_query_attention=config.num_query_groups not in (None, config.num_attention_heads),
        rotary_base=getattr(model, "rotary_base", None), rotary_percent=getattr(model, "rotary_percent", 1.0),
        bf16=bool(config.bf16), fp16=bool(config.fp16), num_experts=config.num_moe_experts,
    )
    attachment = getattr(model, "sprm", None)
    if attachment is not None:
        rgm = attachment.rgm_config
        ns.sprm_layer, ns.sprm_hidden_mult = rgm.sprm_layer, rgm.sprm_hidden_mult
        ns.sprm_step_tokens = [t.encode("unicode_escape").decode() for t in rgm.sprm_step_tokens]
    if global_batch_size:
        ns.global_batch_size = global_batch_size
        ns.consumed_train_samples = iteration * global_batch_size
    for key, value in (overrides or {}).items():
        setattr(ns, key, value)
    return ns


def _param_group_lists(state, found=None) -> list:
    """Every ``param_groups`` list in an optimizer (sharded) state dict, chained or not."""
    found = [] if found is None else found
    if isinstance(state, dict):
        for key, value in state.items():
            if key == "param_groups" and isinstance(value, list):
                found.append(value)
            else:
                _param_group_lists(value, found)
    elif isinstance(state, (list, tuple)):
        for value in state:
            _param_group_lists(value, found)
    return found


def _megatron_lm_param_groups(optimizer_state) -> None:
    # Megatron-LM's param groups always carry a number for min_lr (--min-lr, 0.0 by default), and from
    # megatron-core 0.19 saved and current groups are matched on it: write None as 0.0.
    for groups in _param_group_lists(optimizer_state):
        for i, group in enumerate(groups):
            if isinstance(group, dict) and group.get("min_lr", 0.0) is None:
                groups[i] = dict(group, min_lr=0.0)


def _group_identifier_keys() -> tuple:
    from megatron.core.optimizer import optimizer as moptimizer

    return tuple(getattr(moptimizer, "param_group_identifier_keys", ()))


def _identifier(group: dict, keys: tuple) -> tuple:
    out = []
    for key in keys:
        value = group.get(key, group.get(f"pre_{key}"))
        out.append(0.0 if key == "min_lr" and value is None else value)
    return tuple(out)


def _align_param_groups(optimizer, loaded_optimizer, ckpt) -> None:
    """Make the checkpoint's param groups match the live optimizer's where they mean the same thing.

    megatron matches saved and current groups on ``param_group_identifier_keys``; a ``min_lr`` of None
    (ours) and 0.0 (Megatron-LM's default) are the same schedule. Any other difference is an error
    naming the groups and the fix.
    """
    keys = _group_identifier_keys()
    if not keys:
        return
    current = {}
    for group in optimizer.param_groups:
        current.setdefault(_identifier(group, keys), group)
    for groups in _param_group_lists(loaded_optimizer):
        for i, group in enumerate(groups):
            if not isinstance(group, dict):
                continue
            live = current.get(_identifier(group, keys))
            if live is None:
                have = sorted({tuple(zip(keys, k)) for k in current}, key=str)
                raise CheckpointError(
                    f"checkpoint {ckpt} has an optimizer param group {dict(zip(keys, _identifier(group, keys)))} "
                    f"that this optimizer does not have (its groups: {[dict(h) for h in have]}): build the "
                    "optimizer with the same learning rates, weight-decay rules and min lr as the run that saved "
                    "it, or load weights only (optimizer=None; --no-load-optim / --finetune)")
            groups[i] = dict(group, **{k: live[k] for k in ("min_lr",) if k in live})


def _scheduler_state(optimizer, iteration: int, global_batch_size: int | None) -> dict:
    """``opt_param_scheduler`` as Megatron-LM saves it, for RGM's constant learning rate (after warm-up)."""
    groups = [g for g in optimizer.param_groups if not g.get("sprm_head")] or list(optimizer.param_groups)
    group = groups[0]
    max_lr = group.get("max_lr", group.get("lr", 0.0))
    min_lr = group.get("min_lr")
    steps = iteration * (global_batch_size or 1)
    wd = group.get("base_weight_decay", group.get("weight_decay", 0.0))
    return {"max_lr": float(max_lr), "lr_warmup_steps": 0, "num_steps": steps, "lr_decay_style": "constant",
            "lr_decay_steps": max(steps, 1), "min_lr": float(min_lr if min_lr is not None else 0.0),
            "start_wd": float(wd), "end_wd": float(wd), "wd_incr_style": "constant", "wd_incr_steps": max(steps, 1)}


def _global_batch_size() -> int | None:
    try:
        from megatron.core.num_microbatches_calculator import get_current_global_batch_size

        return get_current_global_batch_size()
    except Exception:  # the calculator is only set up by Megatron-LM's initialisation
        return None


def save_checkpoint(save_dir: str | os.PathLike, iteration: int, chunks, extra: dict | None = None,
                    keep_last: int | None = None, optimizer=None, data_generator: torch.Generator | None = None,
                    global_batch_size: int | None = None, megatron_lm_overrides: dict | None = None) -> Path:
    """Save model chunks, optimizer, RNG states and picklable ``extra`` state as a dist checkpoint. Collective.

    The checkpoint also loads with Megatron-LM's ``load_checkpoint`` (see the module docstring).

    Args:
        optimizer: a megatron optimizer; saved fully reshardable.
        data_generator: the rank's data-order generator, saved with the RNG states.
        global_batch_size: samples per iteration, for Megatron-LM's consumed-samples counter and its
            scheduler's ``num_steps`` (default: Megatron-LM's microbatch calculator when it is set up,
            else 1 sample per iteration).
        megatron_lm_overrides: extra or replaced entries of the ``args`` Megatron-LM reads
            (:func:`megatron_lm_args`).

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
    global_batch_size = global_batch_size or _global_batch_size()
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(dict(state), metadata=OPTIMIZER_METADATA)
        _megatron_lm_param_groups(state["optimizer"])
        state["opt_param_scheduler"] = _scheduler_state(optimizer, iteration, global_batch_size)
    state[RNG_KEY] = _rng_object(data_generator, RNG_KEY)
    state["rgm_extra"] = dict(extra or {}, iteration=iteration, layout=_layout(), rng_key=RNG_KEY)
    # What Megatron-LM's load_checkpoint reads from the common state.
    state["rng_state"] = _megatron_lm_rng_object(_megatron_lm_rng_states())
    state["iteration"] = iteration
    state["checkpoint_version"] = MEGATRON_LM_CHECKPOINT_VERSION
    state["args"] = megatron_lm_args(chunks, iteration, optimizer=optimizer, global_batch_size=global_batch_size,
                                     overrides=megatron_lm_overrides)
    state["num_floating_point_operations_so_far"] = 0
    dist_checkpointing.save(state, str(tmp), content_metadata=dict(OPTIMIZER_METADATA))
    _shutdown_writer_manager()
    if _rank() == 0:  # so that megatron-core 0.16 opens what 0.19 wrote (compat.mcore)
        write_legacy_common_state(tmp)
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


def read_common_state(ckpt: str | os.PathLike) -> dict:
    """The common (non-sharded) state of one checkpoint directory: ``rgm_extra``, Megatron-LM's ``args``, ..."""
    from megatron.core import dist_checkpointing

    try:
        common = dist_checkpointing.load_common_state_dict(str(ckpt))
    except Exception as e:  # a torn or foreign directory: name it rather than show a loader's internals
        raise CheckpointError(f"{ckpt} is not a readable dist checkpoint ({type(e).__name__}: {e}): pass a "
                              "directory written by megatron-rgm's or Megatron-LM's save_checkpoint") from None
    return common if isinstance(common, dict) else {}


def read_tensor_names(ckpt: str | os.PathLike) -> list[str]:
    """The sharded tensors one checkpoint directory holds (model, optimizer and RNG entries alike)."""
    from megatron.core import dist_checkpointing

    return list(dist_checkpointing.load_tensors_metadata(str(ckpt)))


@dataclass
class LoadResult:
    iteration: int
    extra: dict
    fresh_head: bool  # the checkpoint had no head; the model keeps its own
    ignored_head: bool  # the checkpoint had a head the model has no place for
    megatron_lm: bool = False  # written by Megatron-LM's save_checkpoint
    not_loaded: list = field(default_factory=list)  # parts of the checkpoint that did not carry over, named


def _is_megatron_lm(common) -> bool:
    return isinstance(common, dict) and "rgm_extra" not in common and ("args" in common or "iteration" in common)


def _check_megatron_lm_geometry(ckpt, args, chunks) -> None:
    if args is None:
        return
    config = _inner_module(chunks).config
    wrong = [(name, getattr(args, name), getattr(config, name)) for name in
             ("num_layers", "hidden_size", "num_attention_heads")
             if getattr(args, name, None) is not None and getattr(args, name) != getattr(config, name)]
    if wrong:
        diff = ", ".join(f"{n}: checkpoint {a}, model {b}" for n, a, b in wrong)
        raise CheckpointError(f"Megatron-LM checkpoint {ckpt} was saved from another architecture ({diff}): "
                              "build the model with the checkpoint's --num-layers/--hidden-size/--num-attention-heads")


def load_checkpoint(load_dir: str | os.PathLike, chunks, iteration: int | None = None, optimizer=None,
                    data_generator: torch.Generator | None = None) -> LoadResult:
    """Load a checkpoint saved by :func:`save_checkpoint` (or by Megatron-LM) into any TP/PP layout. Collective.

    Weights always load. The optimizer state loads when ``optimizer`` is given
    and the checkpoint has one (saved fully reshardable, so any layout); the
    RNG states (and ``data_generator``'s) only into the layout they were
    saved from, since they are per rank (a different layout is said and skipped).

    A checkpoint written by Megatron-LM's ``save_checkpoint`` (``torch_dist``) loads
    the same way: its weights (without a head, the model keeps its fresh head), its
    optimizer when the param groups match, its RNG states at the same TP/PP layout;
    its LR scheduler, rerun state and FLOP counter do not carry over, and a message
    names them.

    Args:
        load_dir: a save directory (uses its ``latest`` file) or an ``iter_XXXXXXX`` directory.
        chunks: this rank's model chunks (wrapped or not), built for the current layout.
        iteration: a specific iteration instead of the latest.
        optimizer: restore its state too (None: weights only, e.g. to fine-tune).
        data_generator: restore this rank's data-order generator.
    """
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.validation import StrictHandling

    ckpt, iteration = resolve_checkpoint(load_dir, iteration)
    common = dist_checkpointing.load_common_state_dict(str(ckpt))
    foreign = _is_megatron_lm(common)
    extra = common.get("rgm_extra", {}) if isinstance(common, dict) else {}
    not_loaded: list[str] = []
    if foreign:
        iteration = int(common.get("iteration", iteration) or 0)
        _check_megatron_lm_geometry(ckpt, common.get("args"), chunks)
    metadata = (common.get("content_metadata") if isinstance(common, dict) else None) or OPTIMIZER_METADATA
    state = model_sharded_state_dict(chunks)
    has_optimizer = isinstance(common, dict) and "optimizer" in common  # param groups live in the common part
    if optimizer is not None and has_optimizer:
        state["optimizer"] = optimizer.sharded_state_dict(dict(state), is_loading=True, metadata=dict(metadata))
    rng_key = extra.get("rng_key", "rng_state")
    own_rng = "layout" in extra and extra.get("layout") == _layout()
    if own_rng:
        state[rng_key] = _rng_object(data_generator, rng_key)
    mlm_rng = False
    if foreign:
        args = common.get("args")
        saved = (getattr(args, "tensor_model_parallel_size", 1), getattr(args, "pipeline_model_parallel_size", 1))
        here = (ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size())
        if getattr(args, "no_save_rng", False):
            not_loaded.append("RNG states (saved with --no-save-rng)")
        elif saved != here:
            not_loaded.append(f"RNG states (saved at TP, PP = {saved}, this run is {here})")
        else:
            state["rng_state"] = _megatron_lm_rng_object(None)
            mlm_rng = True
    loaded, ckpt_only, model_only = dist_checkpointing.load(state, str(ckpt), strict=StrictHandling.RETURN_ALL)
    # dist_checkpointing: "missing" = in the checkpoint, not asked for; "unexpected" = asked for, absent.
    if mlm_rng and any(k.startswith("rng_state") for k in model_only):
        mlm_rng = False
        not_loaded.append("RNG states (the checkpoint has none for this rank)")
        model_only = {k for k in model_only if not k.startswith("rng_state")}
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
    other_ignored = sorted(k for k in ckpt_only if HEAD_PREFIX not in k)
    if other_ignored:
        not_loaded.append(f"{len(other_ignored)} tensors the model has no place for, e.g. {other_ignored[:3]}")
        if not foreign:
            _say(f"{ckpt} holds {len(other_ignored)} tensors this model has no place for, ignored: "
                 f"e.g. {other_ignored[:3]} (was it saved with another architecture, e.g. untied embeddings?)")
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
        if head_missing:
            # The checkpoint has no moments for the head: a partial optimizer state is not a resume.
            _say(f"{ckpt} has no optimizer state for the SPRM head: the optimizer starts fresh "
                 "(load with optimizer=None / --no-load-optim to fine-tune from its weights)")
        else:
            _align_param_groups(optimizer, loaded["optimizer"], ckpt)
            optimizer.load_state_dict(loaded["optimizer"])
    elif optimizer is not None:
        _say(f"{ckpt} has no optimizer state: the optimizer starts fresh")
    if own_rng:
        set_rng_state(loaded[rng_key], data_generator)
    elif mlm_rng:
        _set_megatron_lm_rng_state(loaded["rng_state"])
        if data_generator is not None:
            not_loaded.append("the data-order generator (Megatron-LM saves none)")
    elif "layout" in extra:
        _say(f"{ckpt} was saved at layout {extra['layout']}, this run is {_layout()}: RNG states start fresh")
    if foreign:
        sched = common.get("opt_param_scheduler") or common.get("lr_scheduler")
        if sched:
            not_loaded.append(f"its learning-rate scheduler (num_steps {sched.get('num_steps')}, max_lr "
                              f"{sched.get('max_lr')}, {sched.get('lr_decay_style')}): RGM sets learning rates itself")
        if common.get("rerun_state_machine"):
            not_loaded.append("its rerun state machine")
        if common.get("num_floating_point_operations_so_far"):
            not_loaded.append("its FLOP counter (num_floating_point_operations_so_far)")
        if common.get("args") is not None:
            not_loaded.append("its args (only the geometry was checked against the model)")
        if optimizer is not None and not has_optimizer:
            not_loaded.append("the optimizer (saved with --no-save-optim)")
        _say(f"{ckpt} is a Megatron-LM checkpoint (iteration {iteration}): loaded weights"
             + (", optimizer" if "optimizer" in state and not head_missing else "")
             + (", RNG states" if mlm_rng else "")
             + (f"; not carried over: {'; '.join(not_loaded)}" if not_loaded else ""))
    return LoadResult(iteration, extra, bool(head_missing), head_ignored, foreign, not_loaded)
