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
    stage: str = "rgm"  # rgm (GRPO + SPR) | sft (language modelling on texts) | backbone-check
    sprm_lr: float | None = None  # None: 10 x lr
    weight_decay: float = 0.01
    sprm_weight_decay: float = 0.01
    clip_grad: float = 1.0
    sprm_clip_grad: float = 1.0
    lr_warmup_iters: int = 0
    pretrained_checkpoint: str | None = None
    no_load_optim: bool = False
    sprm_only: bool = False
    log_interval: int = 1
    tensorboard_dir: str | None = None
    wandb_project: str | None = None
    metrics_file: str | None = None
    sprm_calibrate: bool = True
    sprm_orient: bool = True
    max_consecutive_nonfinite: int = 5

    @property
    def head_lr(self) -> float:
        return self.sprm_lr if self.sprm_lr is not None else 10 * self.lr


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
    g.add_argument("--distributed-timeout-minutes", type=float, default=10,
                   help="a collective waiting longer than this (a rank died or hangs) fails the run")
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
    g.add_argument("--stage", choices=["rgm", "sft", "backbone-check"], default="rgm",
                   help="rgm: joint GRPO + SPR training; sft: language-model warm start on --sft-data texts; "
                        "backbone-check: a synthetic next-token task that only exercises model, layout and optimizer")
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--clip-grad", type=float, default=1.0, help="gradient-norm clip of the policy (0: off)")
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--pretrained-checkpoint",
                   help="weights to start from when --load holds no checkpoint (e.g. the SFT stage's); also the "
                        "frozen KL reference")
    g.add_argument("--no-load-optim", action="store_true", help="resume weights and iteration, not the optimizer")
    g.add_argument("--log-interval", type=int, default=1)
    g.add_argument("--max-consecutive-nonfinite", type=int, default=5,
                   help="stop after this many optimizer steps in a row skipped for a NaN/Inf gradient")
    g.add_argument("--tensorboard-dir")
    g.add_argument("--wandb-project", help="log to Weights & Biases (when wandb is installed)")
    g.add_argument("--metrics-file", help="append each iteration's metrics as a JSON line (last rank)")


def add_data_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Prompts, tokenizer, rollouts and SFT texts."""
    g = p.add_argument_group("data")
    g.add_argument("--tokenizer", help="sentencepiece .model file or HF tokenizer directory")
    g.add_argument("--prompts", help="prompts jsonl (id, problem, answer) for colocated rollouts")
    g.add_argument("--problem-key", help="prompt field of --prompts (default: problem / prompt / question)")
    g.add_argument("--answer-key", help="gold-answer field of --prompts (default: answer)")
    g.add_argument("--prompt-template", default="{problem}\n<think>\n",
                   help="how a problem becomes the model's prompt; escapes such as \\n are decoded")
    g.add_argument("--verifier", choices=["math", "exact"], default="math",
                   help="final-answer grading: math-verify equivalence or exact string match")
    g.add_argument("--rollouts", metavar="STORE",
                   help="train from a rollout store (tools/generate_rollouts.py) with its old log-probs instead of "
                        "sampling")
    g.add_argument("--prompts-per-iter", type=int, default=2, help="prompts per iteration over all data-parallel ranks")
    g.add_argument("--sft-data", help="jsonl of {text} or {prompt, response} for --stage sft")
    g.add_argument("--save-rollouts", metavar="STORE",
                   help="append every iteration's colocated rollouts (with their step scores) to this rollout store; "
                        "group id = iteration x 1e6 + prompt index")
    return p


def add_rollout_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Sampling of the colocated rollouts."""
    g = p.add_argument_group("rollout")
    g.add_argument("--grpo-group-size", type=int, default=8, help="k: samples per prompt")
    g.add_argument("--rollout-temperature", type=float, default=0.6)
    g.add_argument("--rollout-top-p", type=float, default=0.95)
    g.add_argument("--max-response-length", type=int, default=256, help="new tokens per rollout")
    return p


def add_grpo_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Register the ``--grpo-*`` loss coefficients."""
    from megatron_rgm.rl.grpo import GRPOConfig

    d = GRPOConfig()
    g = p.add_argument_group("GRPO")
    g.add_argument("--grpo-clip-low", type=float, default=d.clip_low)
    g.add_argument("--grpo-clip-high", type=float, default=d.clip_high)
    g.add_argument("--grpo-kl-coef", type=float, default=d.kl_coef, help="0 skips the reference model")
    g.add_argument("--grpo-entropy-coef", type=float, default=d.entropy_coef)
    return p


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
    g.add_argument("--sprm-lr", type=float, help="head learning rate (default 10 x --lr)")
    g.add_argument("--sprm-weight-decay", type=float, default=0.01)
    g.add_argument("--sprm-clip-grad", type=float, default=1.0, help="the head's own gradient-norm clip (0: off)")
    g.add_argument("--sprm-calibrate-head", action=argparse.BooleanOptionalAction, default=True,
                   help="on a run's first iteration, shift the head's output bias so the batch's step logits straddle 0 "
                        "(0 midway across the widest gap near the median, so no logit sits on the SPR mask's "
                        "boundary): the SPR loss needs steps on both sides of 0 (with every logit of one sign, P "
                        "or N is 0 and so is the loss)")
    g.add_argument("--sprm-orient-head", action=argparse.BooleanOptionalAction, default=True,
                   help="with --sprm-calibrate-head, also negate the head's output when its scores rank the first "
                        "batch's correct trajectories below the incorrect ones of the same prompt (within-prompt "
                        "pairwise accuracy < 0.5): the SPR loss trains only steps the head already agrees with, so a "
                        "head that starts reversed stays reversed")
    g.add_argument("--sprm-only", action="store_true",
                   help="freeze the policy and train only the head on rollouts (adding an SPRM to a policy)")
    return p


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="megatron_rgm.pretrain", description="Reflective Generative Model on megatron-core"
    )
    _add_model_args(p)
    _add_precision_args(p)
    _add_parallel_args(p)
    _add_run_args(p)
    add_data_args(p)
    add_rollout_args(p)
    add_sprm_args(p)
    add_grpo_args(p)
    return p


@dataclass
class DataConfig:
    """Where prompts, rollouts and SFT texts come from, and how rollouts are sampled."""

    tokenizer: str | None = None
    prompts: str | None = None
    problem_key: str | None = None
    answer_key: str | None = None
    prompt_template: str = "{problem}\n<think>\n"
    verifier: str = "math"
    rollouts: str | None = None
    prompts_per_iter: int = 2
    sft_data: str | None = None
    save_rollouts: str | None = None
    group_size: int = 8
    temperature: float = 0.6
    top_p: float = 0.95
    max_response_length: int = 256


@dataclass
class Args:
    """Everything a run needs, validated."""

    transformer: object  # megatron.core TransformerConfig
    rgm: RGMConfig
    parallel: ParallelConfig
    run: RunConfig
    data: DataConfig
    grpo: object  # megatron_rgm.rl.GRPOConfig
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


def decode_escapes(s: str) -> str:
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


def _validate_run(run: RunConfig, data: DataConfig, ns: argparse.Namespace) -> None:
    """The training-loop flags: what each stage needs, and values out of range."""
    positive = {"--micro-batch-size": run.micro_batch_size, "--train-iters": run.train_iters,
                "--prompts-per-iter": data.prompts_per_iter, "--grpo-group-size": data.group_size,
                "--max-response-length": data.max_response_length, "--log-interval": run.log_interval,
                "--max-consecutive-nonfinite": run.max_consecutive_nonfinite}
    for flag, value in positive.items():
        if value < 1:
            raise ConfigError(f"{flag} must be >= 1, got {value}")
    for flag, value in {"--lr": run.lr, "--sprm-lr": run.sprm_lr, "--weight-decay": run.weight_decay,
                        "--sprm-weight-decay": run.sprm_weight_decay, "--clip-grad": run.clip_grad,
                        "--sprm-clip-grad": run.sprm_clip_grad, "--lr-warmup-iters": run.lr_warmup_iters,
                        "--rollout-temperature": data.temperature, "--grpo-kl-coef": ns.grpo_kl_coef,
                        "--grpo-entropy-coef": ns.grpo_entropy_coef}.items():
        if value is not None and value < 0:
            raise ConfigError(f"{flag} must be >= 0, got {value}")
    if not 0 < data.top_p <= 1:
        raise ConfigError(f"--rollout-top-p must be in (0, 1], got {data.top_p}")


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
        sprm_step_tokens=[decode_escapes(t) for t in ns.sprm_step_tokens],
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
        stage=ns.stage,
        sprm_lr=ns.sprm_lr,
        weight_decay=ns.weight_decay,
        sprm_weight_decay=ns.sprm_weight_decay,
        clip_grad=ns.clip_grad,
        sprm_clip_grad=ns.sprm_clip_grad,
        lr_warmup_iters=ns.lr_warmup_iters,
        pretrained_checkpoint=ns.pretrained_checkpoint,
        no_load_optim=ns.no_load_optim,
        sprm_only=ns.sprm_only,
        log_interval=ns.log_interval,
        tensorboard_dir=ns.tensorboard_dir,
        wandb_project=ns.wandb_project,
        metrics_file=ns.metrics_file,
        sprm_calibrate=ns.sprm_calibrate_head,
        sprm_orient=ns.sprm_orient_head,
        max_consecutive_nonfinite=ns.max_consecutive_nonfinite,
    )
    data = DataConfig(
        tokenizer=ns.tokenizer, prompts=ns.prompts, problem_key=ns.problem_key, answer_key=ns.answer_key,
        prompt_template=decode_escapes(ns.prompt_template), verifier=ns.verifier, rollouts=ns.rollouts,
        prompts_per_iter=ns.prompts_per_iter, sft_data=ns.sft_data, save_rollouts=ns.save_rollouts,
        group_size=ns.grpo_group_size,
        temperature=ns.rollout_temperature, top_p=ns.rollout_top_p, max_response_length=ns.max_response_length,
    )
    _validate_run(run, data, ns)
    from megatron_rgm.rl.grpo import GRPOConfig

    grpo = GRPOConfig(clip_low=ns.grpo_clip_low, clip_high=ns.grpo_clip_high, kl_coef=ns.grpo_kl_coef,
                      entropy_coef=ns.grpo_entropy_coef, temperature=ns.rollout_temperature or 1.0)
    return Args(
        transformer=transformer,
        rgm=rgm,
        parallel=parallel,
        run=run,
        data=data,
        grpo=grpo,
        vocab_size=padded_vocab_size(ns.vocab_size, ns.make_vocab_size_divisible_by, tp),
        seq_length=ns.seq_length,
        max_position_embeddings=ns.max_position_embeddings or ns.seq_length,
        position_embedding_type=ns.position_embedding_type or "rope",
        rotary_base=ns.rotary_base or 10000,
        share_embeddings_and_output_weights=not ns.untie_embeddings_and_output_weights,
        namespace=ns,
    )


def check_stage(args: Args) -> None:
    """What ``--stage`` needs from the data flags (checked when a run starts, not when a model is rebuilt).

    Raises:
        ConfigError: the missing or conflicting flags and the fix.
    """
    if args.run.stage == "rgm":
        if args.data.rollouts and args.data.prompts:
            raise ConfigError("--rollouts and --prompts are exclusive: train from a store or sample from prompts")
        if not args.data.rollouts and not args.data.prompts:
            raise ConfigError("--stage rgm needs --prompts FILE (colocated rollouts, with --tokenizer) or "
                              "--rollouts STORE (written by tools/generate_rollouts.py)")
        if args.data.prompts and not args.data.tokenizer:
            raise ConfigError("--prompts needs --tokenizer (a sentencepiece .model or an HF tokenizer directory)")
        if args.data.prompts and args.parallel.virtual_pipeline_model_parallel_size:
            raise ConfigError("colocated rollouts do not support --virtual-pipeline-model-parallel-size: generate "
                              "them with tools/generate_rollouts.py and train with --rollouts")
    if args.data.save_rollouts and not (args.run.stage == "rgm" and args.data.prompts):
        raise ConfigError("--save-rollouts records colocated rollouts: use it with --stage rgm --prompts")
    if args.run.stage == "sft" and not (args.data.sft_data and args.data.tokenizer):
        raise ConfigError("--stage sft needs --sft-data FILE (jsonl of {text} or {prompt, response}) and --tokenizer")
    if args.run.sprm_only and args.run.stage != "rgm":
        raise ConfigError("--sprm-only trains the head on rollouts: use it with --stage rgm")
    if args.run.sprm_only and args.parallel.pipeline_model_parallel_size > 1:
        raise ConfigError("--sprm-only freezes the policy, and a frozen stage has nothing to send gradients to: use "
                          "--pipeline-model-parallel-size 1 (tensor parallelism is fine)")
