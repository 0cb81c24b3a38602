"""Megatron-style command line -> TransformerConfig + RGMConfig + ParallelConfig + RunConfig.

Flag names follow Megatron-LM where Megatron has the flag; RGM's own flags
start with ``--sprm-`` or ``--grpo-``. ``--preset NAME`` sets defaults that
explicit flags override. Everything is validated once, in :func:`validate`,
with one message per invalid combination.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import torch

from megatron_rgm.config import AGGREGATIONS, SPRM_LOSSES, ConfigError, RGMConfig
from megatron_rgm.distributed import ParallelConfig
from megatron_rgm.model.presets import PRESETS, preset


@dataclass
class RunConfig:
    """What a run does, beside the model and its layout."""

    micro_batch_size: int = 1
    global_batch_size: int | None = None
    train_iters: int = 3
    lr: float = 1e-6
    save: str | None = None
    load: str | None = None
    save_interval: int | None = None
    transformer_impl: str = "local"
    use_distributed_optimizer: bool = False


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--preset", default="tiny", help=f"model geometry and defaults: {', '.join(PRESETS)}")
    g.add_argument("--num-layers", type=int)
    g.add_argument("--hidden-size", type=int)
    g.add_argument("--ffn-hidden-size", type=int)
    g.add_argument("--num-attention-heads", type=int)
    g.add_argument("--num-query-groups", type=int, help="KV heads (grouped-query attention)")
    g.add_argument("--kv-channels", type=int, help="head dim; default hidden/heads")
    g.add_argument("--vocab-size", type=int)
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    g.add_argument("--seq-length", type=int)
    g.add_argument("--max-position-embeddings", type=int)
    g.add_argument("--normalization", choices=["LayerNorm", "RMSNorm"])
    g.add_argument("--norm-epsilon", type=float)
    g.add_argument("--position-embedding-type", choices=["rope", "learned_absolute"])
    g.add_argument("--rotary-base", type=int)
    g.add_argument("--add-qkv-bias", action=argparse.BooleanOptionalAction, default=None)
    g.add_argument("--qk-layernorm", action=argparse.BooleanOptionalAction, default=None)
    g.add_argument("--swiglu", action=argparse.BooleanOptionalAction, default=None)
    g.add_argument("--disable-bias-linear", action=argparse.BooleanOptionalAction, default=None)
    g.add_argument("--untie-embeddings-and-output-weights", action=argparse.BooleanOptionalAction, default=None)
    g.add_argument("--hidden-dropout", type=float, default=0.0)
    g.add_argument("--attention-dropout", type=float, default=0.0)
    g.add_argument("--init-method-std", type=float, default=0.02)
    g.add_argument("--transformer-impl", choices=["local", "transformer_engine"], default="local")
    g.add_argument("--recompute-granularity", choices=["full", "selective"])
    g.add_argument("--recompute-method", choices=["uniform", "block"])
    g.add_argument("--recompute-num-layers", type=int)


def _add_precision_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("precision")
    g.add_argument("--bf16", action="store_true")
    g.add_argument("--fp16", action="store_true")
    g.add_argument("--fp8-format", choices=["e4m3", "hybrid"])
    g.add_argument("--fp8-recipe", choices=["delayed", "tensorwise", "mxfp8", "blockwise"], default="delayed")
    g.add_argument("--fp8-margin", type=int, default=0)
    g.add_argument("--fp8-amax-history-len", type=int, default=1)
    g.add_argument("--fp8-amax-compute-algo", choices=["most_recent", "max"], default="most_recent")
    g.add_argument("--fp8-param-gather", action="store_true")


def _add_parallel_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--virtual-pipeline-model-parallel-size", type=int)
    g.add_argument("--decoder-first-pipeline-num-layers", type=int)
    g.add_argument("--decoder-last-pipeline-num-layers", type=int)
    g.add_argument("--context-parallel-size", type=int, default=1)
    g.add_argument("--sequence-parallel", action="store_true")
    g.add_argument("--distributed-backend", choices=["nccl", "gloo"])
    g.add_argument("--distributed-timeout-minutes", type=int, default=10)
    g.add_argument("--seed", type=int, default=1234)


def _add_run_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("run")
    g.add_argument("--micro-batch-size", type=int, default=1)
    g.add_argument("--global-batch-size", type=int)
    g.add_argument("--train-iters", type=int, default=3)
    g.add_argument("--lr", type=float, default=1e-6)
    g.add_argument("--save")
    g.add_argument("--load")
    g.add_argument("--save-interval", type=int)
    g.add_argument("--use-distributed-optimizer", action="store_true")


def add_sprm_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Register the ``--sprm-*`` flags (usable on any argparse parser)."""
    d = RGMConfig()
    g = p.add_argument_group("SPRM head")
    g.add_argument("--sprm-layer", type=int, default=d.sprm_layer,
                   help="transformer layer feeding the head; negative counts from the end")
    g.add_argument("--sprm-hidden-mult", type=int, default=d.sprm_hidden_mult)
    g.add_argument("--sprm-dropout", type=float, default=d.sprm_dropout)
    g.add_argument("--sprm-backbone-grad-scale", type=float, default=d.sprm_backbone_grad_scale,
                   help="share of the SPR-loss gradient that reaches the backbone")
    g.add_argument("--sprm-step-tokens", nargs="+", default=d.sprm_step_tokens,
                   help="strings ending a reasoning step; escapes such as \\n are decoded")
    g.add_argument("--sprm-loss", choices=SPRM_LOSSES, default=d.sprm_loss)
    g.add_argument("--sprm-pos-weight", type=float, default=d.sprm_pos_weight)
    g.add_argument("--sprm-loss-weight", type=float, default=d.sprm_loss_weight)
    g.add_argument("--sprm-aggregation", choices=AGGREGATIONS, default=d.sprm_aggregation)
    return p


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="megatron_rgm.pretrain", description="Reflective Generative Model on megatron-core"
    )
    _add_model_args(p)
    _add_precision_args(p)
    _add_parallel_args(p)
    _add_run_args(p)
    add_sprm_args(p)
    return p


@dataclass
class Args:
    """Everything a run needs, validated."""

    transformer: object  # megatron.core TransformerConfig
    rgm: RGMConfig
    parallel: ParallelConfig
    run: RunConfig
    vocab_size: int  # padded for TP
    seq_length: int
    max_position_embeddings: int
    position_embedding_type: str
    rotary_base: int
    share_embeddings_and_output_weights: bool
    namespace: argparse.Namespace


def parse_args(argv: list[str] | None = None) -> Args:
    """Parse the command line (``--preset`` first, then everything else) and validate it."""
    parser = build_parser()
    known, _ = parser.parse_known_args(argv)
    parser.set_defaults(**preset(known.preset))
    ns = parser.parse_args(argv)
    # What rebuilds this model (checkpoints record it; layout flags are overridden on load).
    ns.model_argv = list(argv) if argv is not None else sys.argv[1:]
    return validate(ns)


def _decode_escapes(s: str) -> str:
    return s.encode("utf-8").decode("unicode_escape") if "\\" in s else s


def padded_vocab_size(vocab_size: int, divisible_by: int, tp: int) -> int:
    """Vocab rounded up to a multiple of ``divisible_by * tp`` (Megatron's rule)."""
    multiple = divisible_by * tp
    return ((vocab_size + multiple - 1) // multiple) * multiple


def _layers_on_last_stage(ns: argparse.Namespace) -> int:
    pp = ns.pipeline_model_parallel_size
    if pp == 1:
        return ns.num_layers
    if ns.decoder_last_pipeline_num_layers is not None:
        return ns.decoder_last_pipeline_num_layers
    rest = ns.num_layers - (ns.decoder_first_pipeline_num_layers or 0)
    middle = pp - (1 if ns.decoder_first_pipeline_num_layers is not None else 0)
    return rest // middle


def validate(ns: argparse.Namespace) -> Args:
    """Check every combination once and build the config dataclasses.

    Raises:
        ConfigError: one message naming the flag(s) and the fix.
    """
    from megatron.core.transformer.transformer_config import TransformerConfig

    for name in ("num_layers", "hidden_size", "num_attention_heads", "vocab_size", "seq_length"):
        if getattr(ns, name) is None or getattr(ns, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer (or pick a --preset)")
    tp, pp = ns.tensor_model_parallel_size, ns.pipeline_model_parallel_size
    heads = ns.num_attention_heads
    groups = ns.num_query_groups or heads
    if tp < 1 or pp < 1:
        raise ConfigError("--tensor-model-parallel-size and --pipeline-model-parallel-size must be >= 1")
    if heads % tp:
        raise ConfigError(
            f"--tensor-model-parallel-size {tp} does not divide --num-attention-heads {heads}: "
            "choose a tensor-parallel size that divides the number of attention heads"
        )
    if groups % tp:
        raise ConfigError(
            f"--tensor-model-parallel-size {tp} does not divide --num-query-groups {groups} (KV heads): "
            "choose a tensor-parallel size that divides the number of KV heads"
        )
    if heads % groups:
        raise ConfigError(f"--num-query-groups {groups} must divide --num-attention-heads {heads}")
    if ns.kv_channels is None and ns.hidden_size % heads:
        raise ConfigError(
            f"--hidden-size {ns.hidden_size} is not divisible by --num-attention-heads {heads}: "
            "set --kv-channels (the head dim) explicitly"
        )
    if pp > ns.num_layers:
        raise ConfigError(
            f"--pipeline-model-parallel-size {pp} is larger than --num-layers {ns.num_layers}: "
            "every pipeline stage needs at least one layer"
        )
    if ns.sequence_parallel and tp == 1:
        raise ConfigError("--sequence-parallel needs --tensor-model-parallel-size > 1")
    if ns.bf16 and ns.fp16:
        raise ConfigError("--bf16 and --fp16 are exclusive: pick one")
    if ns.fp8_format and ns.transformer_impl != "transformer_engine":
        raise ConfigError("--fp8-format needs --transformer-impl transformer_engine (FP8 runs in Transformer Engine)")
    if ns.recompute_granularity == "full" and ns.recompute_method is None:
        raise ConfigError("--recompute-granularity full needs --recompute-method uniform or block")

    rgm = RGMConfig(
        sprm_layer=ns.sprm_layer,
        sprm_hidden_mult=ns.sprm_hidden_mult,
        sprm_dropout=ns.sprm_dropout,
        sprm_backbone_grad_scale=ns.sprm_backbone_grad_scale,
        sprm_step_tokens=[_decode_escapes(t) for t in ns.sprm_step_tokens],
        sprm_loss=ns.sprm_loss,
        sprm_pos_weight=ns.sprm_pos_weight,
        sprm_loss_weight=ns.sprm_loss_weight,
        sprm_aggregation=ns.sprm_aggregation,
    )
    feature_layer = rgm.resolve_layer(ns.num_layers)
    last_stage_first = ns.num_layers - _layers_on_last_stage(ns)
    if pp > 1 and feature_layer < last_stage_first - 1:
        raise ConfigError(
            f"--sprm-layer {ns.sprm_layer} (layer {feature_layer}) is not on the last pipeline stage, which "
            f"starts at layer {last_stage_first}: the head reads a layer of the last stage or the last layer "
            "of the stage before it; change --sprm-layer or --decoder-last-pipeline-num-layers"
        )

    parallel = ParallelConfig(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=ns.virtual_pipeline_model_parallel_size,
        context_parallel_size=ns.context_parallel_size,
        sequence_parallel=ns.sequence_parallel,
        distributed_timeout_minutes=ns.distributed_timeout_minutes,
        distributed_backend=ns.distributed_backend,
        seed=ns.seed,
    )
    on_gpu = torch.cuda.is_available()
    params_dtype = torch.bfloat16 if ns.bf16 else torch.float16 if ns.fp16 else torch.float32
    fp8 = dict(
        fp8=ns.fp8_format,
        fp8_recipe=ns.fp8_recipe,
        fp8_margin=ns.fp8_margin,
        fp8_amax_history_len=ns.fp8_amax_history_len,
        fp8_amax_compute_algo=ns.fp8_amax_compute_algo,
        fp8_param=ns.fp8_param_gather,
    ) if ns.fp8_format else {}
    try:
        transformer = TransformerConfig(
            num_layers=ns.num_layers,
            hidden_size=ns.hidden_size,
            ffn_hidden_size=ns.ffn_hidden_size or 4 * ns.hidden_size,
            num_attention_heads=heads,
            num_query_groups=groups,
            kv_channels=ns.kv_channels,
            normalization=ns.normalization or "LayerNorm",
            layernorm_epsilon=ns.norm_epsilon or 1e-5,
            add_bias_linear=not ns.disable_bias_linear,
            add_qkv_bias=bool(ns.add_qkv_bias),
            qk_layernorm=bool(ns.qk_layernorm),
            gated_linear_unit=bool(ns.swiglu),
            activation_func=torch.nn.functional.silu if ns.swiglu else torch.nn.functional.gelu,
            hidden_dropout=ns.hidden_dropout,
            attention_dropout=ns.attention_dropout,
            init_method_std=ns.init_method_std,
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
            virtual_pipeline_model_parallel_size=ns.virtual_pipeline_model_parallel_size,
            num_layers_in_first_pipeline_stage=ns.decoder_first_pipeline_num_layers,
            num_layers_in_last_pipeline_stage=ns.decoder_last_pipeline_num_layers,
            context_parallel_size=ns.context_parallel_size,
            sequence_parallel=ns.sequence_parallel,
            recompute_granularity=ns.recompute_granularity,
            recompute_method=ns.recompute_method,
            recompute_num_layers=ns.recompute_num_layers,
            params_dtype=params_dtype,
            pipeline_dtype=params_dtype,
            bf16=ns.bf16,
            fp16=ns.fp16,
            use_cpu_initialization=not on_gpu,
            # Fused kernels are GPU-only; on the CPU the unfused paths are used.
            bias_activation_fusion=on_gpu and bool(ns.swiglu),
            masked_softmax_fusion=on_gpu,
            bias_dropout_fusion=on_gpu,
            apply_rope_fusion=False,
            gradient_accumulation_fusion=False,
            persist_layer_norm=False,
            **fp8,
        )
    except (AssertionError, ValueError) as e:
        raise ConfigError(f"invalid model configuration: {e}") from None

    run = RunConfig(
        micro_batch_size=ns.micro_batch_size,
        global_batch_size=ns.global_batch_size,
        train_iters=ns.train_iters,
        lr=ns.lr,
        save=ns.save,
        load=ns.load,
        save_interval=ns.save_interval,
        transformer_impl=ns.transformer_impl,
        use_distributed_optimizer=ns.use_distributed_optimizer,
    )
    return Args(
        transformer=transformer,
        rgm=rgm,
        parallel=parallel,
        run=run,
        vocab_size=padded_vocab_size(ns.vocab_size, ns.make_vocab_size_divisible_by, tp),
        seq_length=ns.seq_length,
        max_position_embeddings=ns.max_position_embeddings or ns.seq_length,
        position_embedding_type=ns.position_embedding_type or "rope",
        rotary_base=ns.rotary_base or 10000,
        share_embeddings_and_output_weights=not ns.untie_embeddings_and_output_weights,
        namespace=ns,
    )
