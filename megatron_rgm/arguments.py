"""Megatron-style command line -> the config tree (:mod:`megatron_rgm.config`) -> :class:`Args`.

The parser is generated from the config dataclasses (:mod:`megatron_rgm.cli`); ``--preset NAME``
sets the model's defaults, which explicit flags override. Each config checks its own fields;
:func:`build_args` checks what spans several (layout against geometry, the head's layer against
the pipeline) and builds megatron-core's TransformerConfig, with one message per invalid combination.
"""

from __future__ import annotations

import argparse
import importlib.util
from dataclasses import asdict, dataclass, replace

import torch
from megatron.core.fusions.fused_bias_geglu import quick_gelu
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_rgm import cli, lazy
from megatron_rgm.checkpoint import latest_iteration
from megatron_rgm.head import HEAD_FIELDS
from megatron_rgm.config import (GEOMETRY, ConfigError, DataConfig, GRPOConfig, ModelConfig, OptimConfig,
                                 ParallelConfig, RGMConfig, RunConfig)
from megatron_rgm.model.presets import PRESETS, preset

# The parser's groups, in --help order.
GROUPS = (("model", ModelConfig), ("parallelism", ParallelConfig), ("optimizer", OptimConfig), ("run", RunConfig),
          ("data", DataConfig), ("SPRM head", RGMConfig), ("GRPO", GRPOConfig))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megatron_rgm.pretrain", description="Reflective Generative Model on megatron-core")
    p.add_argument("--preset", default="tiny", help=f"model geometry and defaults: {', '.join(PRESETS)}")
    for title, cls in GROUPS:
        cli.add_arguments(p, cls, title)
    return p


# The head's optimizer flags a loop other than megatron_rgm.pretrain can honour (integration.sprm_param_group):
# not the head's own gradient clip, which needs megatron_rgm.training.optimizer_step.
_FOREIGN_LOOP_OPTIM = ("sprm_lr", "sprm_weight_decay")


def add_rgm_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Register on any parser the RGM flags another training loop acts on: the head, the SPR loss, GRPO, and the
    head's lr and weight decay (``--sprm-*``, ``--grpo-*``). Not the ones only ``megatron_rgm.pretrain`` acts on
    (the head's own gradient clip, its calibration, ``--sprm-only``): there argparse refuses them."""
    cli.add_arguments(parser, RGMConfig, "SPRM head")
    cli.add_arguments(parser, OptimConfig, "SPRM head optimizer", only=lambda name: name in _FOREIGN_LOOP_OPTIM)
    return cli.add_arguments(parser, GRPOConfig, "GRPO")


def rgm_config_from_args(ns) -> RGMConfig:
    """RGMConfig from a namespace that went through :func:`add_rgm_args` (or our parser)."""
    return cli.from_namespace(RGMConfig, ns)


def grpo_config_from_args(ns) -> GRPOConfig:
    return cli.from_namespace(GRPOConfig, ns)


@dataclass
class Args:
    """Everything a run needs, validated."""

    transformer: object  # megatron.core TransformerConfig
    model: ModelConfig
    rgm: RGMConfig
    parallel: ParallelConfig
    optim: OptimConfig
    run: RunConfig
    data: DataConfig
    grpo: GRPOConfig
    vocab_size: int  # padded for TP

    @property
    def seq_length(self) -> int:
        return self.model.seq_length

    @property
    def max_position_embeddings(self) -> int:
        return self.model.max_position_embeddings or self.model.seq_length

    @property
    def position_embedding_type(self) -> str:
        return self.model.position_embedding_type

    @property
    def rotary_base(self) -> int:
        return self.model.rotary_base

    @property
    def share_embeddings_and_output_weights(self) -> bool:
        return not self.model.untie_embeddings_and_output_weights

    def model_record(self) -> dict:
        """What rebuilds this model (checkpoints record it): the geometry and the head, as plain dicts."""
        return {"model": asdict(self.model), "sprm": asdict(self.rgm)}

    def config_dict(self) -> dict:
        """Every option of the run, by group (for experiment trackers)."""
        return {name: asdict(getattr(self, name))
                for name in ("model", "parallel", "rgm", "grpo", "optim", "data", "run")}


# What a checkpoint's weights are shaped by and mean: --use-checkpoint-args takes these from the checkpoint.
# Everything else (sequence length, precision, recompute, dropout, FP8) stays the run's own choice.
HEAD_GEOMETRY = (*HEAD_FIELDS, "sprm_hidden_mult")  # its layer, width and step rule
_UNSET = object()


def parse_args(argv: list[str] | None = None, recorded=None) -> Args:
    """Parse the command line (``--preset`` first, then everything else) and validate it.

    Args:
        recorded: ``path -> (ModelConfig, RGMConfig or None)``, what a checkpoint records of its model
            (:func:`megatron_rgm.model.load.recorded_geometry`); read for ``--use-checkpoint-args``, whose
            GEOMETRY (and HEAD_GEOMETRY, when the checkpoint has a head) then replace the model flags' defaults.

    Raises:
        ConfigError: a bad flag; with ``--use-checkpoint-args``, no checkpoint to read, or a model flag given
            that contradicts the checkpoint.
    """
    parser = build_parser()
    known, _ = parser.parse_known_args(argv)
    parser.set_defaults(**preset(known.preset))
    if known.use_checkpoint_args:
        parser.set_defaults(**_checkpoint_geometry(known, argv, recorded))
    return args_from_namespace(parser.parse_args(argv))


def _checkpoint_geometry(known: argparse.Namespace, argv: list[str] | None, recorded) -> dict:
    if recorded is None:
        raise ConfigError("--use-checkpoint-args is read by megatron_rgm.pretrain: drop it here and give the model "
                          "flags")
    path = known.load if known.load and latest_iteration(known.load) is not None else known.pretrained_checkpoint
    if path is None:
        raise ConfigError("--use-checkpoint-args needs a checkpoint to read: --load with a saved iteration, or "
                          "--pretrained-checkpoint")
    model, head = recorded(path)
    geometry = {name: getattr(model, name) for name in GEOMETRY}
    geometry |= {name: getattr(head, name) for name in HEAD_GEOMETRY} if head is not None else {}
    # A model flag given explicitly must agree with the checkpoint (it would not load otherwise).
    probe = build_parser()
    probe.set_defaults(**dict.fromkeys(geometry, _UNSET))
    given = probe.parse_args(argv)
    for name, value in geometry.items():
        if getattr(given, name) is not _UNSET and getattr(given, name) != value:
            raise ConfigError(f"--{name.replace('_', '-')} {getattr(given, name)} contradicts checkpoint {path}, "
                              f"whose model has {value}: drop the flag (--use-checkpoint-args takes it from there)")
    return geometry


def args_from_namespace(ns: argparse.Namespace) -> Args:
    """:class:`Args` from a namespace of :func:`build_parser`'s flags."""
    data = cli.from_namespace(DataConfig, ns)
    return build_args(cli.from_namespace(ModelConfig, ns), cli.from_namespace(ParallelConfig, ns),
                      cli.from_namespace(RGMConfig, ns), optim=cli.from_namespace(OptimConfig, ns),
                      run=cli.from_namespace(RunConfig, ns), data=data,
                      grpo=cli.from_namespace(GRPOConfig, ns, temperature=data.temperature or 1.0))


def padded_vocab_size(vocab_size: int, divisible_by: int, tp: int) -> int:
    """Vocab rounded up to a multiple of ``divisible_by * tp`` (Megatron's rule)."""
    multiple = divisible_by * tp
    return ((vocab_size + multiple - 1) // multiple) * multiple


def at_layout(model: ModelConfig, padded_vocab_size: int) -> ModelConfig:
    """``model`` with its vocabulary fixed at ``padded_vocab_size`` rows at any tensor-parallel size."""
    return replace(model, vocab_size=padded_vocab_size, make_vocab_size_divisible_by=1)


def _layers_on_last_stage(model: ModelConfig, parallel: ParallelConfig) -> int:
    pp = parallel.pipeline_model_parallel_size
    if pp == 1:
        return model.num_layers
    if parallel.decoder_last_pipeline_num_layers is not None:
        return parallel.decoder_last_pipeline_num_layers
    rest = model.num_layers - (parallel.decoder_first_pipeline_num_layers or 0)
    middle = pp - (1 if parallel.decoder_first_pipeline_num_layers is not None else 0)
    return rest // middle


def _check_layout(model: ModelConfig, parallel: ParallelConfig, rgm: RGMConfig) -> None:
    tp, pp = parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size
    heads = model.num_attention_heads
    groups = model.num_query_groups or heads
    if heads % tp:
        raise ConfigError(f"--tensor-model-parallel-size {tp} does not divide --num-attention-heads {heads}: "
                          "choose a tensor-parallel size that divides the number of attention heads")
    if groups % tp:
        raise ConfigError(f"--tensor-model-parallel-size {tp} does not divide --num-query-groups {groups} (KV heads): "
                          "choose a tensor-parallel size that divides the number of KV heads")
    if pp > model.num_layers:
        raise ConfigError(f"--pipeline-model-parallel-size {pp} is larger than --num-layers {model.num_layers}: "
                          "every pipeline stage needs at least one layer")
    ep = parallel.expert_model_parallel_size
    if ep > 1 and not model.num_experts:
        raise ConfigError(f"--expert-model-parallel-size (--ep) {ep} spreads the experts of a mixture-of-experts "
                          "model over ranks; this model is dense (no experts): drop it")
    if ep > 1 and model.num_experts % ep:
        raise ConfigError(f"--expert-model-parallel-size (--ep) {ep} does not divide the model's {model.num_experts} "
                          "experts: choose a divisor")
    etp = parallel.expert_tensor_parallel_size
    if etp not in (None, 1, tp) or (etp not in (None, 1) and model.num_experts and not model.disable_bias_linear):
        raise ConfigError(f"--expert-tensor-parallel-size {etp}: use 1 or the tensor-parallel size {tp}"
                          + (" (1 for experts with biases)" if model.num_experts and not model.disable_bias_linear
                             else ""))
    feature_layer = rgm.resolve_layer(model.num_layers)
    last_stage_first = model.num_layers - _layers_on_last_stage(model, parallel)
    if pp > 1 and feature_layer < last_stage_first - 1:
        raise ConfigError(
            f"--sprm-layer {rgm.sprm_layer} (layer {feature_layer}) is not on the last pipeline stage, which "
            f"starts at layer {last_stage_first}: the head reads a layer of the last stage or the last layer "
            "of the stage before it; change --sprm-layer or --decoder-last-pipeline-num-layers")


def transformer_config(model: ModelConfig, parallel: ParallelConfig):
    """megatron-core's TransformerConfig of ``model`` laid out as ``parallel``."""
    on_gpu = torch.cuda.is_available()
    dtype = torch.bfloat16 if model.bf16 else torch.float16 if model.fp16 else torch.float32
    fp8 = dict(fp8=model.fp8_format, fp8_recipe=model.fp8_recipe, fp8_margin=model.fp8_margin,
               fp8_amax_history_len=model.fp8_amax_history_len, fp8_amax_compute_algo=model.fp8_amax_compute_algo,
               fp8_param=model.fp8_param_gather) if model.fp8_format else {}
    try:
        config = TransformerConfig(
            num_layers=model.num_layers, hidden_size=model.hidden_size,
            ffn_hidden_size=model.ffn_hidden_size or 4 * model.hidden_size,
            num_attention_heads=model.num_attention_heads,
            num_query_groups=model.num_query_groups or model.num_attention_heads, kv_channels=model.kv_channels,
            normalization=model.normalization, layernorm_epsilon=model.norm_epsilon,
            add_bias_linear=not model.disable_bias_linear, add_qkv_bias=model.add_qkv_bias,
            qk_layernorm=model.qk_layernorm, **_attention_and_mlp(model),
            hidden_dropout=model.hidden_dropout, attention_dropout=model.attention_dropout,
            init_method_std=model.init_method_std,
            tensor_model_parallel_size=parallel.tensor_model_parallel_size,
            pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
            virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_model_parallel_size,
            num_layers_in_first_pipeline_stage=parallel.decoder_first_pipeline_num_layers,
            num_layers_in_last_pipeline_stage=parallel.decoder_last_pipeline_num_layers,
            context_parallel_size=parallel.context_parallel_size, sequence_parallel=parallel.sequence_parallel,
            expert_model_parallel_size=parallel.expert_model_parallel_size,
            expert_tensor_parallel_size=parallel.expert_tensor_parallel_size, **_moe(model),
            recompute_granularity=model.recompute_granularity, recompute_method=model.recompute_method,
            recompute_num_layers=model.recompute_num_layers,
            params_dtype=dtype, pipeline_dtype=dtype, bf16=model.bf16, fp16=model.fp16,
            use_cpu_initialization=not on_gpu,
            # Fused kernels are GPU-only; on the CPU the unfused paths are used.
            # The fused masked softmax is Megatron-LM's scaled_masked_softmax_cuda (or apex's), not in the
            # megatron-core wheel: where it does not import, megatron-core would fail at the first forward.
            bias_activation_fusion=on_gpu and model.swiglu and not (model.activation_func_clamp_value
                                                                    or model.glu_linear_offset),
            masked_softmax_fusion=on_gpu and importlib.util.find_spec("scaled_masked_softmax_cuda") is not None,
            bias_dropout_fusion=on_gpu, apply_rope_fusion=False, gradient_accumulation_fusion=False,
            persist_layer_norm=False, **fp8)
    except (AssertionError, ValueError) as e:
        raise ConfigError(f"invalid model configuration: {e}") from None
    for name, value in model.yarn_fields().items():  # read by GPTModel and the attention; no 0.16 field holds them
        setattr(config, name, value)
    return config


def _attention_and_mlp(model: ModelConfig) -> dict:
    """TransformerConfig fields of the MLP's activation, the softmax and the windows."""
    gated = model.swiglu or model.quick_geglu
    act = quick_gelu if model.quick_geglu else torch.nn.functional.silu if model.swiglu else torch.nn.functional.gelu
    out = dict(gated_linear_unit=gated, activation_func=act, glu_linear_offset=model.glu_linear_offset,
               activation_func_clamp_value=model.activation_func_clamp_value, softmax_type=model.softmax_type)
    if model.sliding_window:
        out.update(window_size=(model.sliding_window - 1, 0), window_attn_skip_freq=model.window_attn_skip_freq)
    return out


def build_args(model: ModelConfig, parallel: ParallelConfig | None = None, rgm: RGMConfig | None = None, *,
               optim: OptimConfig | None = None, run: RunConfig | None = None, data: DataConfig | None = None,
               grpo: GRPOConfig | None = None) -> Args:
    """Check the configs against each other and build :class:`Args` (defaults for the groups not given).

    Raises:
        ConfigError: one message naming the flag(s) and the fix.
    """
    parallel, rgm = parallel or ParallelConfig(), rgm or RGMConfig()
    _check_layout(model, parallel, rgm)
    if parallel.expert_tensor_parallel_size is None and model.num_experts:  # biased experts: 1 (megatron-core's)
        biased = not model.disable_bias_linear
        parallel = replace(parallel, expert_tensor_parallel_size=1 if biased else parallel.tensor_model_parallel_size)
    return Args(transformer=transformer_config(model, parallel), model=model, rgm=rgm, parallel=parallel,
                optim=optim or OptimConfig(), run=run or RunConfig(), data=data or DataConfig(),
                grpo=grpo or GRPOConfig(),
                vocab_size=padded_vocab_size(model.vocab_size, model.make_vocab_size_divisible_by,
                                             parallel.tensor_model_parallel_size))


def rebuild_args(model: ModelConfig, tp: int = 1, pp: int = 1, rgm: RGMConfig | None = None,
                 seed: int = 1234, ep: int = 1, etp: int | None = None) -> Args:
    """Args of ``model`` at ``tp`` x ``pp`` (x ``ep`` for the experts, within as many data-parallel ranks; each
    expert over ``etp`` of the tensor-parallel ranks, default :func:`build_args`'s) whose weights a load or a
    conversion overwrites (no initialisation)."""
    parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, seed=seed,
                              expert_model_parallel_size=ep, expert_tensor_parallel_size=etp)
    args = build_args(model, parallel, rgm)
    args.transformer.perform_initialization = False
    return args


def _moe(model: ModelConfig) -> dict:
    """megatron-core's MoE fields (none for a dense model): tokens routed by softmax gating with the
    all-to-all dispatcher, experts as separate MLPs (no grouped GEMM: it needs a GPU kernel)."""
    if model.num_experts is None:
        return {}
    return dict(num_moe_experts=model.num_experts, moe_ffn_hidden_size=model.moe_ffn_hidden_size or
                model.ffn_hidden_size, moe_router_topk=model.moe_router_topk,
                moe_router_pre_softmax=model.moe_router_pre_softmax, moe_router_score_function="softmax",
                moe_aux_loss_coeff=model.moe_aux_loss_coeff,
                moe_router_load_balancing_type="aux_loss" if model.moe_aux_loss_coeff else "none",
                moe_token_dispatcher_type="alltoall", moe_grouped_gemm=False)


def lr_schedule(optim: OptimConfig, train_iters: int) -> dict:
    """The learning-rate schedule in Megatron-LM's scheduler terms, counted in iterations.

    Raises:
        ConfigError: a decaying schedule whose warm-up does not end before its decay does.
    """
    decay = optim.lr_decay_iters or train_iters
    if optim.lr_decay_style != "constant" and optim.lr_warmup_iters >= decay:
        raise ConfigError(f"--lr-warmup-iters {optim.lr_warmup_iters} leaves nothing of the {optim.lr_decay_style} "
                          f"decay, which ends at iteration {decay} (--lr-decay-iters, default --train-iters): "
                          "shorten the warm-up or lengthen the decay")
    return {"lr_warmup_steps": optim.lr_warmup_iters, "lr_decay_steps": max(decay, optim.lr_warmup_iters + 1),
            "lr_decay_style": optim.lr_decay_style}


def _check_token_budget(args: Args) -> None:
    run, par = args.run, args.parallel
    if run.pack_sequences and not run.max_tokens_per_microbatch:
        raise ConfigError("--pack-sequences packs up to a token budget: add --max-tokens-per-microbatch N "
                          f"(at least --max-position-embeddings {args.max_position_embeddings})")
    if not run.max_tokens_per_microbatch:
        return
    if run.max_tokens_per_microbatch < args.max_position_embeddings:
        raise ConfigError(f"--max-tokens-per-microbatch {run.max_tokens_per_microbatch} is below "
                          f"--max-position-embeddings {args.max_position_embeddings}, the longest sample a micro-batch "
                          "must hold: raise it (or lower --max-position-embeddings)")
    if par.virtual_pipeline_model_parallel_size:
        raise ConfigError("--max-tokens-per-microbatch gives micro-batches of different lengths, which the interleaved "
                          "schedule does not exchange: drop --virtual-pipeline-model-parallel-size")
    if run.pack_sequences and args.model.transformer_impl != "local":
        raise ConfigError("--pack-sequences confines attention with a mask on the local attention path; packing "
                          "with Transformer Engine's thd kernels is not built yet: use --transformer-impl local")
    if run.pack_sequences and par.context_parallel_size > 1:
        raise ConfigError("--pack-sequences does not run with context parallelism: drop one of them")
    if run.pack_sequences and args.model.position_embedding_type == "yarn":
        raise ConfigError("--pack-sequences rotates each sample by its own positions with plain RoPE only; with "
                          "--position-embedding-type yarn drop --pack-sequences")


def check_stage(args: Args) -> None:
    """What ``--stage`` needs from the data flags (checked when a run starts, not when a model is rebuilt).

    Raises:
        ConfigError: the missing or conflicting flags and the fix.
    """
    run, data = args.run, args.data
    lr_schedule(args.optim, run.train_iters)
    par = args.parallel
    if args.model.num_experts and par.tensor_model_parallel_size > 1 and not par.sequence_parallel:
        raise ConfigError("--num-experts with --tensor-model-parallel-size > 1 trains only with --sequence-parallel "
                          "(megatron-core's MoE layers require it): add --sequence-parallel")
    _check_token_budget(args)
    # Refused on every rank before the first step, rather than a run that trains without the logs it asked for.
    if run.wandb_project:
        lazy.load("wandb", "--wandb-project")
    if run.tensorboard_dir:
        lazy.load("torch.utils.tensorboard", "--tensorboard-dir")
    if run.stage == "rgm":
        if data.rollouts and data.prompts:
            raise ConfigError("--rollouts and --prompts are exclusive: train from a store or sample from prompts")
        if not data.rollouts and not data.prompts:
            raise ConfigError("--stage rgm needs --prompts FILE (colocated rollouts, with --tokenizer) or "
                              "--rollouts STORE (written by tools/generate_rollouts.py)")
        if data.prompts and not data.tokenizer:
            raise ConfigError("--prompts needs --tokenizer (a sentencepiece .model or an HF tokenizer directory)")
        if data.prompts and args.parallel.virtual_pipeline_model_parallel_size:
            raise ConfigError("colocated rollouts do not support --virtual-pipeline-model-parallel-size: generate "
                              "them with tools/generate_rollouts.py and train with --rollouts")
    for flag, used in (("--save-rollouts records", data.save_rollouts), ("--rollout-backend vllm samples",
                                                                         data.rollout_backend == "vllm")):
        if used and not (run.stage == "rgm" and data.prompts):
            raise ConfigError(f"{flag} colocated rollouts: use it with --stage rgm --prompts")
    if run.stage == "sft" and not (data.sft_data and data.tokenizer):
        raise ConfigError("--stage sft needs --sft-data FILE (jsonl of {text} or {prompt, response}) and --tokenizer")
    if run.sprm_only and run.stage != "rgm":
        raise ConfigError("--sprm-only trains the head on rollouts: use it with --stage rgm")
    if run.sprm_only and args.parallel.pipeline_model_parallel_size > 1:
        raise ConfigError("--sprm-only freezes the policy, and a frozen stage has nothing to send gradients to: use "
                          "--pipeline-model-parallel-size 1 (tensor parallelism is fine)")
