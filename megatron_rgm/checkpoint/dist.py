"""Save and load a dist checkpoint (``torch_dist``) of RGM models, into any TP/PP layout.

A checkpoint is written to ``iter_XXXXXXX.tmp`` and renamed when every rank has
finished; the ``latest`` file moves last (written aside, then replaced), so a save
that dies half-way leaves the previous checkpoint current.

Loading compares the checkpoint's keys with the model's: a checkpoint without an
SPRM head loads into an RGM model with its fresh, seeded head (and says so); an RGM
checkpoint loads into a plain GPTModel with the head ignored (and says so); any other
missing tensor is an error naming it. Checkpoints go both ways with Megatron-LM
(:mod:`.megatron_lm`).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from megatron_rgm import faults
from megatron_rgm.checkpoint.files import (HEAD_PREFIX, LATEST, RUN_CONFIG, CheckpointError, iteration_dir,
                                           publish, read_common_state, read_tensor_names, resolve_checkpoint)
from megatron_rgm.checkpoint.megatron_lm import (MEGATRON_LM_CHECKPOINT_VERSION, align_param_groups,
                                                 check_megatron_lm_geometry, current_global_batch_size,
                                                 is_megatron_lm, megatron_lm_args, megatron_lm_param_groups,
                                                 not_carried_over, scheduler_state)
from megatron_rgm.checkpoint.rng import (RNG_KEY, layout, megatron_lm_rng_object, megatron_lm_rng_states,
                                         rng_object, set_megatron_lm_rng_state, set_rng_state)
from megatron_rgm.checkpoint.state import (barrier, inner_module, match_norm_names, model_sharded_state_dict, rank,
                                           say, unwrapped)
from megatron_rgm.compat.mcore import (fully_reshardable_bucket_offsets, materialise_optimizer_state,
                                       write_legacy_common_state)

# The distributed optimizer's state per parameter in model space: reshardable over TP, PP and DP (0.19 refuses the
# flat ranges of "fully_sharded_model_space"). Its save is wrong with more than one bucket in megatron-core itself;
# compat.mcore.fully_reshardable_bucket_offsets puts that right before any save or load here.
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


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


def save_checkpoint(save_dir: str | os.PathLike, iteration: int, chunks, extra: dict | None = None,
                    keep_last: int | None = None, optimizer=None, data_generator: torch.Generator | None = None,
                    global_batch_size: int | None = None, megatron_lm_overrides: dict | None = None,
                    sharded_strategy=None, lr_schedule: dict | None = None) -> Path:
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
        lr_schedule: the learning-rate schedule in iterations (:func:`megatron_rgm.arguments.lr_schedule`), for
            Megatron-LM's scheduler state (default: constant).
        sharded_strategy: a megatron-core save strategy instead of the default ``torch_dist`` one
            (``hf-to-mcore`` passes one that makes each tensor as it is written).

    Returns:
        The published ``iter_XXXXXXX`` directory.
    """
    from megatron.core import dist_checkpointing

    save_dir = Path(save_dir)
    final = iteration_dir(save_dir, iteration)
    tmp = final.with_name(final.name + ".tmp")
    if rank() == 0:
        save_dir.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)  # left by a save that died
        tmp.mkdir()
    barrier()
    state = model_sharded_state_dict(chunks)
    global_batch_size = global_batch_size or current_global_batch_size()
    if optimizer is not None:
        fully_reshardable_bucket_offsets()
        state["optimizer"] = optimizer.sharded_state_dict(dict(state), metadata=OPTIMIZER_METADATA)
        megatron_lm_param_groups(state["optimizer"])
        state["opt_param_scheduler"] = scheduler_state(optimizer, iteration, global_batch_size, lr_schedule)
    state[RNG_KEY] = rng_object(data_generator, RNG_KEY)
    state["rgm_extra"] = dict(extra or {}, iteration=iteration, layout=layout(), rng_key=RNG_KEY)
    # What Megatron-LM's load_checkpoint reads from the common state.
    state["rng_state"] = megatron_lm_rng_object(megatron_lm_rng_states())
    state["iteration"] = iteration
    state["checkpoint_version"] = MEGATRON_LM_CHECKPOINT_VERSION
    state["args"] = megatron_lm_args(chunks, iteration, optimizer=optimizer, global_batch_size=global_batch_size,
                                     overrides=megatron_lm_overrides)
    state["num_floating_point_operations_so_far"] = 0
    dist_checkpointing.save(state, str(tmp), sharded_strategy=sharded_strategy,
                            content_metadata=dict(OPTIMIZER_METADATA))
    _shutdown_writer_manager()
    if rank() == 0:  # so that megatron-core 0.16 opens what 0.19 wrote (compat.mcore)
        write_legacy_common_state(tmp)
    faults.reach("checkpoint.before_publish", iteration=iteration, rank=rank())
    barrier()
    if rank() == 0:
        publish(tmp, final)
        pointer = save_dir / (LATEST + ".tmp")
        pointer.write_text(str(iteration))
        publish(pointer, save_dir / LATEST)
        if keep_last:
            saved = sorted(p for p in save_dir.glob("iter_???????") if p.is_dir())
            for old in saved[:-keep_last]:
                shutil.rmtree(old)
    barrier()
    say(f"saved iteration {iteration} to {final}")
    return final


@dataclass
class LoadResult:
    iteration: int
    extra: dict
    fresh_head: bool  # the checkpoint had no head; the model keeps its own
    ignored_head: bool  # the checkpoint had a head the model has no place for
    megatron_lm: bool = False  # written by Megatron-LM's save_checkpoint
    not_loaded: list = field(default_factory=list)  # parts of the checkpoint that did not carry over, named


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
    common = read_common_state(ckpt)
    foreign = is_megatron_lm(common)
    extra = common.get("rgm_extra", {})
    not_loaded: list[str] = []
    if foreign:
        iteration = int(common.get("iteration", iteration) or 0)
        check_megatron_lm_geometry(ckpt, common.get("args"), chunks)
    metadata = common.get("content_metadata") or OPTIMIZER_METADATA
    state = model_sharded_state_dict(chunks)
    names = set(read_tensor_names(ckpt))
    match_norm_names(state, names)
    has_optimizer = "optimizer" in common  # param groups live in the common part
    # An RGM model (a head on its last stage) from a checkpoint without one, or the other way: the param groups and
    # moments of the head are on one side only, and a partial optimizer state is not a resume. Decided alike on
    # every stage (the head's tensors are on the last one).
    model_head = hasattr(inner_module(chunks), "sprm_head")
    heads_differ = model_head != any(HEAD_PREFIX in n for n in names)
    if optimizer is not None and has_optimizer and not heads_differ:
        fully_reshardable_bucket_offsets()
        materialise_optimizer_state(optimizer)
        state["optimizer"] = optimizer.sharded_state_dict(dict(state), is_loading=True, metadata=dict(metadata))
    rng_key = extra.get("rng_key", "rng_state")
    own_rng = "layout" in extra and extra.get("layout") == layout()
    if own_rng:
        state[rng_key] = rng_object(data_generator, rng_key)
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
            state["rng_state"] = megatron_lm_rng_object(None)
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
    if any(k.endswith("_extra_state") for k in ckpt_only):  # ShardedObjects of Transformer Engine's modules
        ckpt_only = {k for k in ckpt_only if not k.endswith("_extra_state")}
        not_loaded.append("Transformer Engine's module state (_extra_state: FP8 scaling history), which the local "
                          "layers have no use for")
    head_ignored = any(HEAD_PREFIX in k for k in ckpt_only)
    other_ignored = sorted(k for k in ckpt_only if HEAD_PREFIX not in k)
    if other_ignored:
        not_loaded.append(f"{len(other_ignored)} tensors the model has no place for, e.g. {other_ignored[:3]}")
        if not foreign:
            say(f"{ckpt} holds {len(other_ignored)} tensors this model has no place for, ignored: "
                 f"e.g. {other_ignored[:3]} (was it saved with another architecture, e.g. untied embeddings?)")
    for key, chunk in zip(sorted(k for k in state if k.startswith("model")), unwrapped(chunks)):
        missing, unexpected = chunk.load_state_dict(loaded[key], strict=False)
        missing = [m for m in missing if not m.startswith(HEAD_PREFIX) and not m.endswith("_extra_state")]
        if missing:
            raise CheckpointError(f"checkpoint {ckpt} did not provide {missing[:3]} for {key}")
    if head_missing:
        say(f"{ckpt} has no SPRM head: the model keeps its fresh, seeded head")
    if head_ignored:
        say(f"{ckpt} carries an SPRM head this model has no place for: ignored")
    if "optimizer" in state:
        align_param_groups(optimizer, loaded["optimizer"], ckpt)
        optimizer.load_state_dict(loaded["optimizer"])
    elif optimizer is not None and has_optimizer:
        which = ("has no optimizer state for the SPRM head" if model_head else
                 "has optimizer state for an SPRM head this model lacks")
        say(f"{ckpt} {which}: the optimizer starts fresh (load with optimizer=None / --no-load-optim to fine-tune "
            "from its weights)")
    elif optimizer is not None:
        say(f"{ckpt} has no optimizer state: the optimizer starts fresh")
    if own_rng:
        set_rng_state(loaded[rng_key], data_generator)
    elif mlm_rng:
        set_megatron_lm_rng_state(loaded["rng_state"])
        if data_generator is not None:
            not_loaded.append("the data-order generator (Megatron-LM saves none)")
    elif "layout" in extra:
        say(f"{ckpt} was saved at layout {extra['layout']}, this run is {layout()}: RNG states start fresh")
    if foreign:
        not_loaded += not_carried_over(common, optimizer, has_optimizer)
        writer = "Megatron-Bridge" if (Path(ckpt) / RUN_CONFIG).is_file() else "Megatron-LM"
        say(f"{ckpt} is a {writer} checkpoint (iteration {iteration}): loaded weights"
             + (", optimizer" if "optimizer" in state and not head_missing else "")
             + (", RNG states" if mlm_rng else "")
             + (f"; not carried over: {'; '.join(not_loaded)}" if not_loaded else ""))
    return LoadResult(iteration, extra, bool(head_missing), head_ignored, foreign, not_loaded)
