"""What Megatron-LM's ``load_checkpoint`` reads from a checkpoint, and what of its checkpoints carries over.

* what we save also carries what Megatron-LM's ``load_checkpoint`` reads from the
  common state: ``iteration``, ``checkpoint_version`` (3.0), ``args`` (a Namespace with
  the model geometry and layout its checks read, see :func:`megatron_lm_args`),
  ``rng_state`` in its layout (:mod:`.rng`) and, with an optimizer,
  ``opt_param_scheduler`` (the run's schedule at ``num_steps = iteration x global
  batch``) and param groups whose ``min_lr`` is a number (``None`` is written as 0.0,
  Megatron-LM's default ``--min-lr``);
* a checkpoint Megatron-LM saved (``torch_dist``) loads here: weights, its optimizer
  when the param groups match (``min_lr`` 0.0 and ``None`` count as equal), its RNG
  states when the TP/PP layout is the same; what does not carry over (its LR
  scheduler, rerun state machine, FLOP counter, args) is named by :func:`not_carried_over`.
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist

from megatron_rgm.checkpoint.files import CheckpointError
from megatron_rgm.checkpoint.state import inner_module


MEGATRON_LM_CHECKPOINT_VERSION = 3.0
_YARN_ARGS = {"rotary_scaling_factor": "yarn_rotary_scaling_factor", "mscale": "yarn_mscale",
              "mscale_all_dim": "yarn_mscale_all_dim", **{name: name for name in (
                  "yarn_original_max_position_embeddings", "yarn_beta_fast", "yarn_beta_slow",
                  "yarn_correction_range_round_to_int")}}


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

    model = inner_module(chunks)
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
        swiglu=bool(config.gated_linear_unit) and config.activation_func is torch.nn.functional.silu,
        quick_geglu=bool(config.gated_linear_unit) and config.activation_func.__name__ == "quick_gelu",
        glu_linear_offset=config.glu_linear_offset, activation_func_clamp_value=config.activation_func_clamp_value,
        softmax_type=config.softmax_type, window_size=config.window_size,
        window_attn_skip_freq=config.window_attn_skip_freq, add_bias_linear=bool(config.add_bias_linear),
        add_qkv_bias=bool(config.add_qkv_bias), qk_layernorm=bool(config.qk_layernorm),
        group_query_attention=config.num_query_groups not in (None, config.num_attention_heads),
        rotary_base=getattr(model, "rotary_base", None), rotary_percent=getattr(model, "rotary_percent", 1.0),
        use_rope_scaling=bool(getattr(model, "rotary_scaling", False)),
        rotary_seq_len_interpolation_factor=getattr(getattr(model, "rotary_pos_emb", None),
                                                    "seq_len_interpolation_factor", None),
        bf16=bool(config.bf16), fp16=bool(config.fp16), num_experts=config.num_moe_experts,
        moe_ffn_hidden_size=config.moe_ffn_hidden_size, moe_router_topk=config.moe_router_topk,
        moe_router_pre_softmax=config.moe_router_pre_softmax, moe_aux_loss_coeff=config.moe_aux_loss_coeff,
        # YaRN under Megatron-LM's flag names (megatron-core keeps them on the config as yarn_*)
        **{flag: getattr(config, attr) for flag, attr in _YARN_ARGS.items() if hasattr(config, attr)},
    )
    if hasattr(model, "rope_scaling_factor"):  # RGMModel's; a plain GPTModel does not keep it
        ns.rope_scaling_factor = model.rope_scaling_factor
    attachment = getattr(model, "sprm", None)
    if attachment is not None:
        rgm = attachment.rgm_config
        ns.sprm_layer, ns.sprm_hidden_mult = rgm.sprm_layer, rgm.sprm_hidden_mult
        ns.sprm_step_tokens = [t.encode("unicode_escape").decode() for t in rgm.sprm_step_tokens]
        ns.sprm_step_rule = rgm.sprm_step_rule
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


def megatron_lm_param_groups(optimizer_state) -> None:
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


def align_param_groups(optimizer, loaded_optimizer, ckpt) -> None:
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


def scheduler_state(optimizer, iteration: int, global_batch_size: int | None, schedule: dict | None = None) -> dict:
    """``opt_param_scheduler`` as Megatron-LM saves it: ``schedule`` (:func:`megatron_rgm.arguments.lr_schedule`,
    in iterations; default constant) with its steps in samples, as Megatron-LM counts them."""
    groups = [g for g in optimizer.param_groups if not g.get("sprm_head")] or list(optimizer.param_groups)
    group = groups[0]
    max_lr = group.get("max_lr", group.get("lr", 0.0))
    min_lr = group.get("min_lr")
    per_iter = global_batch_size or 1
    steps = iteration * per_iter
    schedule = schedule or {"lr_warmup_steps": 0, "lr_decay_steps": max(iteration, 1), "lr_decay_style": "constant"}
    wd = group.get("base_weight_decay", group.get("weight_decay", 0.0))
    return {"max_lr": float(max_lr), "lr_warmup_steps": schedule["lr_warmup_steps"] * per_iter, "num_steps": steps,
            "lr_decay_style": schedule["lr_decay_style"], "lr_decay_steps": schedule["lr_decay_steps"] * per_iter,
            "min_lr": float(min_lr if min_lr is not None else 0.0), "start_wd": float(wd), "end_wd": float(wd),
            "wd_incr_style": "constant", "wd_incr_steps": max(steps, 1)}


def current_global_batch_size() -> int | None:
    try:
        from megatron.core.num_microbatches_calculator import get_current_global_batch_size

        return get_current_global_batch_size()
    except Exception:  # the calculator is only set up by Megatron-LM's initialisation
        return None


def is_megatron_lm(common) -> bool:
    return "rgm_extra" not in common and ("args" in common or "iteration" in common)


def check_megatron_lm_geometry(ckpt, args, chunks) -> None:
    if args is None:
        return
    config = inner_module(chunks).config
    wrong = [(name, getattr(args, name), getattr(config, name)) for name in
             ("num_layers", "hidden_size", "num_attention_heads")
             if getattr(args, name, None) is not None and getattr(args, name) != getattr(config, name)]
    if wrong:
        diff = ", ".join(f"{n}: checkpoint {a}, model {b}" for n, a, b in wrong)
        raise CheckpointError(f"Megatron-LM checkpoint {ckpt} was saved from another architecture ({diff}): "
                              "build the model with the checkpoint's --num-layers/--hidden-size/--num-attention-heads")


def not_carried_over(common: dict, optimizer, has_optimizer: bool) -> list[str]:
    """The parts of a Megatron-LM checkpoint's common state that RGM does not restore, named."""
    out = []
    sched = common.get("opt_param_scheduler") or common.get("lr_scheduler")
    if sched:
        out.append(f"its learning-rate scheduler (num_steps {sched.get('num_steps')}, max_lr "
                   f"{sched.get('max_lr')}, {sched.get('lr_decay_style')}): RGM sets learning rates itself")
    if common.get("rerun_state_machine"):
        out.append("its rerun state machine")
    if common.get("num_floating_point_operations_so_far"):
        out.append("its FLOP counter (num_floating_point_operations_so_far)")
    if common.get("args") is not None:
        out.append("its args (only the geometry was checked against the model)")
    if optimizer is not None and not has_optimizer:
        out.append("the optimizer (saved with --no-save-optim)")
    return out
