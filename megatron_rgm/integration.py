"""RGM for Megatron pipelines a lab already runs: the pieces in the shapes their code expects.

* :func:`attach_sprm_head` - add the head to an existing megatron-core ``GPTModel``;
* :func:`model_provider` - Megatron-LM's ``model_provider(pre_process, post_process, vp_stage)``;
* :func:`forward_step` - the pipeline-schedule contract ``forward_step(data_iterator, model)``;
* :func:`add_rgm_args` - an ``extra_args_provider`` registering ``--sprm-*`` / ``--grpo-*`` only, and giving
  the head its own param group in Megatron-LM's optimizer (:func:`sprm_param_group`);
* :func:`sprm_param_group` - that group as megatron-core ``config_overrides``, for a loop of your own.

See docs/INTEGRATION.md for the ~20-line change to a ``pretrain_gpt.py``-style script.
"""

from __future__ import annotations

from functools import partial, wraps

import torch
from megatron.core import parallel_state
from megatron.core.optimizer import ParamKey

from megatron_rgm import arguments, ops
from megatron_rgm.arguments import grpo_config_from_args, rgm_config_from_args
from megatron_rgm.checkpoint import HEAD_PREFIX
from megatron_rgm.config import ConfigError, GRPOConfig, OptimConfig, RGMConfig
from megatron_rgm.model.context_parallel import cp_size, split_batch
from megatron_rgm.model.rgm_model import (
    RGMModel,
    attach_sprm_head,
    sprm_step_logits,
    unwrap,
)
from megatron_rgm.model.specs import block_spec
from megatron_rgm.rl import chunked_log_probs_and_entropy, grpo_loss
from megatron_rgm.steps import StepLayout

__all__ = ["attach_sprm_head", "model_provider", "forward_step", "batch_inputs", "add_rgm_args", "rgm_config_from_args",
           "grpo_config_from_args", "rgm_loss_func", "sprm_step_logits", "sprm_param_group"]

TOTALS = ("spr positives", "spr negatives", "steps")  # reported as totals, not as token means
HEAD_PARAMS = f"*{HEAD_PREFIX}*"  # the head's parameter names, under any wrapper (module.sprm_head.0.weight)


def sprm_param_group(args) -> dict:
    """The head's param group as megatron-core ``config_overrides`` (``get_megatron_optimizer``).

    The head learns at ``--sprm-lr`` (default 10 x ``--lr``), on the policy's schedule scaled to it (its
    ``min_lr`` is ``--min-lr`` x the same factor), with weight decay ``--sprm-weight-decay`` (constant; 1-D
    parameters still take none, megatron's standard rule). Merge it into the overrides you already pass:
    ``{**get_standard_config_overrides(config), **sprm_param_group(args)}``.

    Args:
        args: a namespace with Megatron-LM's ``lr`` and ``min_lr`` and RGM's ``sprm_lr`` and
            ``sprm_weight_decay`` (:func:`add_rgm_args`).
    """
    lr = OptimConfig(lr=args.lr, sprm_lr=args.sprm_lr).head_lr  # the rule megatron_rgm.pretrain uses
    scale = lr / args.lr if args.lr else 1.0
    min_lr = (getattr(args, "min_lr", None) or 0.0) * scale
    # is_decoupled_lr keeps the head's groups apart from any other group of the same lr in a checkpoint.
    return {ParamKey(name=HEAD_PARAMS): {"max_lr": lr, "min_lr": min_lr, "start_wd": args.sprm_weight_decay,
                                          "end_wd": args.sprm_weight_decay, "is_decoupled_lr": True}}


def _optimizer_config_with_head(build):
    @wraps(build)  # __wrapped__: Megatron-LM's own function
    def get_megatron_optimizer_config(args):
        config, overrides = build(args)
        return config, {**(overrides or {}), **sprm_param_group(args)}

    get_megatron_optimizer_config.rgm_head_group = True
    return get_megatron_optimizer_config


def add_rgm_args(parser):
    """Megatron-LM's ``extra_args_provider``: RGM's flags, honoured by Megatron-LM's own loop.

    Registers ``--sprm-*`` and ``--grpo-*`` (not the flags only ``megatron_rgm.pretrain`` acts on: the head's
    own gradient clip and its calibration, which Megatron-LM's loop would ignore, so argparse refuses them
    there). Where Megatron-LM's ``megatron.training`` is installed it also makes that loop's optimizer give
    the head :func:`sprm_param_group` (``get_megatron_optimizer_config``, where ``pretrain()`` builds its
    param-group overrides, returns them with the head's group added), so ``--sprm-lr`` and
    ``--sprm-weight-decay`` act there as they do in ``megatron_rgm.pretrain``.
    """
    arguments.add_rgm_args(parser)
    try:
        from megatron.training import training  # Megatron-LM's loop, not megatron-core
    except ImportError:
        return parser
    if not getattr(training.get_megatron_optimizer_config, "rgm_head_group", False):
        training.get_megatron_optimizer_config = _optimizer_config_with_head(training.get_megatron_optimizer_config)
    return parser


def model_provider(pre_process: bool = True, post_process: bool = True, vp_stage: int | None = None, *,
                   config=None, rgm_config: RGMConfig | None = None, transformer_layer_spec=None,
                   vocab_size: int | None = None, max_sequence_length: int | None = None,
                   **gpt_kwargs) -> RGMModel:
    """Megatron-LM's model-provider signature, returning an :class:`RGMModel`.

    Bind the model description with ``functools.partial`` (``config``,
    ``rgm_config``, ``vocab_size``, ``max_sequence_length``, GPTModel keyword
    arguments); Megatron then calls it with ``pre_process``, ``post_process``
    and ``vp_stage``. Without ``config``, it reads Megatron-LM's global args
    (``megatron.training.get_args()``, with :func:`add_rgm_args` as the extra
    args provider).
    """
    if config is None:
        from megatron.training import get_args  # Megatron-LM, not megatron-core
        from megatron.training.arguments import core_transformer_config_from_args

        args = get_args()
        config = core_transformer_config_from_args(args)
        rgm_config = rgm_config or rgm_config_from_args(args)
        vocab_size = vocab_size or args.padded_vocab_size
        max_sequence_length = max_sequence_length or args.max_position_embeddings
        gpt_kwargs.setdefault("share_embeddings_and_output_weights", not args.untie_embeddings_and_output_weights)
        gpt_kwargs.setdefault("position_embedding_type", args.position_embedding_type)
        gpt_kwargs.setdefault("rotary_base", args.rotary_base)
    if rgm_config is None or vocab_size is None or max_sequence_length is None:
        raise ValueError("model_provider needs rgm_config, vocab_size and max_sequence_length (bind them with "
                         "functools.partial) or Megatron-LM's global args")
    spec = transformer_layer_spec or block_spec(config, vp_stage=vp_stage)
    return RGMModel(config, rgm_config, spec, vocab_size, max_sequence_length, pre_process=pre_process,
                    post_process=post_process, vp_stage=vp_stage, **gpt_kwargs)


def rgm_loss_func(model, batch: dict, rgm_config: RGMConfig, grpo: GRPOConfig, output_tensor: torch.Tensor, *,
                  vocab_size: int | None = None, policy_loss: bool = True):
    """Loss of one micro-batch, megatron-core's 3-tuple ``(loss_sum, num_tokens, report)``.

    ``loss_sum`` is (LM loss or GRPO loss) + ``sprm_loss_weight`` x SPR loss,
    each a mean over the micro-batch, times ``num_tokens`` so that megatron's
    per-token normalisation returns the means (the SPR term times
    ``batch["spr_scale"]`` instead, where the batch has it). GRPO log-probs are taken of
    ``logits / grpo.temperature`` over the first ``vocab_size`` ids (the
    sampler's distribution). ``policy_loss=False`` (``--sprm-only``) keeps the
    SPR loss alone.
    """
    loss_mask = batch["loss_mask"].float()
    # Unclamped: a micro-batch without response tokens (a rank's padding micro-batch) adds none to the step's count
    # under megatron's calculate_per_token_loss; megatron clamps it itself where it divides per micro-batch.
    num_tokens = loss_mask.sum()
    report = {}
    main = None
    if "advantages" in batch and policy_loss:
        # A chunk of positions at a time, forward and backward: no fp32 copy of the [b, s, V/tp] logits.
        logp, entropy = chunked_log_probs_and_entropy(output_tensor, batch["labels"], vocab_size, grpo.temperature,
                                                      entropy=bool(grpo.entropy_coef))
        main, metrics = grpo_loss(logp, batch["old_log_probs"], batch["advantages"], loss_mask, grpo,
                                  ref_log_probs=batch.get("ref_log_probs"), entropy=entropy)
        report.update(metrics)
        report["grpo loss"] = main.detach()
    elif "advantages" not in batch:
        main = (output_tensor.float() * loss_mask).sum() / num_tokens.clamp(min=1)
        report["lm loss"] = main.detach()
    total = None if main is None else main * num_tokens
    # Under context parallelism this rank holds a share of the micro-batch's steps: its SPR term is its share of
    # the micro-batch's loss (the denominators are the whole micro-batch's), so the CP ranks' terms add up.
    split = parallel_state.get_context_parallel_group() if cp_size() > 1 else None
    if split is not None and not unwrap(model).config.calculate_per_token_loss:
        raise ConfigError("context parallelism needs megatron's per-token loss normalisation: each rank's share of "
                          "a micro-batch then adds up to the whole one's loss. Add --calculate-per-token-loss "
                          "(Megatron-LM; TransformerConfig.calculate_per_token_loss in a loop of your own)")
    if "step_mask" in batch and "correct" in batch:
        step_logits = sprm_step_logits(model, batch["step_mask"])
        cu = batch.get("cu_steps")  # packed rows hold several trajectories
        cu = StepLayout.from_mask(batch["step_mask"]).cu_steps if cu is None else cu
        if rgm_config.sprm_loss == "bce":
            spr = ops.step_bce_loss(step_logits, cu, batch["correct"])
            if split is not None:
                steps = torch.tensor([float(step_logits.numel())], dtype=torch.float64, device=step_logits.device)
                torch.distributed.all_reduce(steps, group=split)
                spr = spr * (step_logits.numel() / max(float(steps), 1.0))
        else:
            group = (parallel_state.get_data_parallel_group(with_context_parallel=True)
                     if parallel_state.model_parallel_is_initialized() else None)
            spr, stats = ops.spr_loss(step_logits, cu, batch["correct"], pos_weight=rgm_config.sprm_pos_weight,
                                      group=group, split_group=split, return_stats=True)
            report["spr positives"] = stats.positives.float()
            report["spr negatives"] = stats.negatives.float()
        report["steps"] = torch.tensor(float(step_logits.numel()), device=step_logits.device)
        # Like the policy term, times num_tokens unless the batch says what (megatron_rgm's trainer: the share of the
        # optimizer step's steps this micro-batch holds, times the step's token count; see training/batching.py).
        whole = num_tokens if split is None else _whole_tokens(batch, num_tokens, split)
        scale = batch.get("spr_scale", whole.clamp(min=1))
        spr_term = rgm_config.sprm_loss_weight * spr * scale
        total = spr_term if total is None else total + spr_term
        report["spr loss"] = spr.detach()
    if total is None:
        raise ValueError("nothing to train on this micro-batch: policy_loss=False needs step_mask and correct")
    n = num_tokens.detach()
    # Megatron-LM's reporting convention: [sum over tokens, token count] per key; the SPR counts and the step count
    # are totals, not token means: [total, 1] (a context-parallel share without response tokens reports them too).
    one = torch.ones_like(n)
    report = {k: torch.stack([v.float(), one] if k in TOTALS else [v.float() * n, n]) for k, v in report.items()}
    if "spr loss" in report and split is not None:
        # This context-parallel rank's term is a share of the micro-batch's SPR loss: weighed by the micro-batch's
        # tokens over the CP size, the ranks' pairs add up to the micro-batch's [loss x tokens, tokens].
        whole = whole.detach().float()
        report["spr loss"] = torch.stack([spr.detach().float() * whole, whole / cp_size()])
    return total, num_tokens.int(), report


def _whole_tokens(batch: dict, num_tokens: torch.Tensor, split) -> torch.Tensor:
    """The response tokens of the whole micro-batch a context-parallel share belongs to."""
    if "cp_tokens" in batch:  # split_batch counted them
        return batch["cp_tokens"].to(num_tokens.dtype)
    whole = num_tokens.detach().clone()
    torch.distributed.all_reduce(whole, group=split)
    return whole


def batch_inputs(batch: dict) -> tuple:
    """``(tokens, position_ids, attention_mask, model kwargs)`` of a micro-batch dict.

    Without ``position_ids`` every row counts from 0; a packed row (``cu_seqlens``, see
    :func:`megatron_rgm.data.packing.collate_packed`) also has RoPE follow its ``position_ids``. A context-parallel
    share of a batch (:func:`megatron_rgm.model.context_parallel.split_batch`) carries its global positions; RoPE
    takes the same chunks of its table from megatron-core's own CP slicing.
    """
    tokens = batch["tokens"]
    positions = batch.get("position_ids")
    if positions is None and batch.get("cp_local"):
        raise ConfigError("a batch split for context parallelism (cp_local) needs its global position_ids: pass "
                          "them, or give forward_step the whole batch and let it split")
    if positions is None:
        b, s = tokens.shape
        positions = torch.arange(s, device=tokens.device).unsqueeze(0).expand(b, s)
    kwargs = {"rope_positions": True} if "cu_seqlens" in batch else {}
    return tokens, positions, batch.get("attention_mask"), kwargs


def forward_step(data_iterator, model, *, rgm_config: RGMConfig | None = None, grpo: GRPOConfig | None = None,
                 vocab_size: int | None = None, policy_loss: bool = True):
    """``forward_step(data_iterator, model) -> (output_tensor, loss_func)`` for megatron-core's schedules.

    The iterator yields dicts with ``tokens`` ``[b, s]`` and, as the pipeline
    already has them, ``position_ids``, ``attention_mask``, ``labels``,
    ``loss_mask``; RGM adds ``step_mask`` ``[b, s]`` (positions to score,
    see :class:`megatron_rgm.steps.StepSegmenter`) and ``correct`` ``[b]``
    (the SPR loss), and for GRPO ``advantages`` ``[b]`` and
    ``old_log_probs`` ``[b, s]`` (optionally ``ref_log_probs``). Without
    advantages the LM loss over ``loss_mask`` is kept. Works with an
    :class:`RGMModel` or any GPTModel given :func:`attach_sprm_head`.
    Bind ``rgm_config`` / ``grpo`` (and ``vocab_size``, ``policy_loss``; see
    :func:`rgm_loss_func`) with ``functools.partial``. Under context
    parallelism give whole micro-batches: each rank takes its share
    (:func:`megatron_rgm.model.context_parallel.split_batch`, megatron's
    load-balanced split; a batch already split carries ``cp_local``).
    """
    batch = split_batch(next(data_iterator))
    tokens, positions, attention_mask, kwargs = batch_inputs(batch)
    rgm_config = rgm_config or unwrap(model).sprm.rgm_config
    grpo = grpo or GRPOConfig()
    labels = None if "advantages" in batch else batch.get("labels")
    output = model(tokens, positions, attention_mask, labels=labels, **kwargs)
    return output, partial(rgm_loss_func, model, batch, rgm_config, grpo, vocab_size=vocab_size,
                           policy_loss=policy_loss)
