"""The typed config tree: every option of a run, its default, its flag and its own range checks, once.

A run is seven dataclasses: :class:`ModelConfig` (geometry and precision), :class:`ParallelConfig`
(layout), :class:`RGMConfig` (the SPRM head, its loss and aggregation), :class:`GRPOConfig` (policy
loss), :class:`OptimConfig`, :class:`DataConfig` (prompts, rollouts, sampling) and :class:`RunConfig`.
A field declared with :func:`option` carries its command-line flag (Megatron-LM's name where Megatron
has the flag; RGM's own start with ``--sprm-`` or ``--grpo-``) and help text, and
:mod:`megatron_rgm.cli` generates the parser from them. Checks that involve one config live in its
``__post_init__``; checks across configs (and the TransformerConfig) in :mod:`megatron_rgm.arguments`.
Checkpoints record ``model`` and ``sprm`` as plain dicts (:func:`dataclasses.asdict`).
"""

from __future__ import annotations

import sys
from dataclasses import MISSING, dataclass, field
from typing import Any, Callable

AGGREGATIONS = ("geometric", "arithmetic", "product", "min", "last")
SPRM_LOSSES = ("spr", "bce")
STEP_RULES = ("exact", "contains", "text")  # which tokens end a step (megatron_rgm.steps)
STAGES = ("rgm", "sft", "backbone-check")
VERIFIERS = ("math", "exact")  # final-answer grading (megatron_rgm.rollout.rewards.make_verifier)
PROMPT_TEMPLATE = "{problem}\n<think>\n"  # how a problem becomes the model's prompt (the reference's)
CHAT = "chat"  # --prompt-template chat: the tokenizer's own chat template, the problem as the user turn


class ConfigError(ValueError):
    """An invalid option or combination of options; the message names the fix."""


def run_tool(body: Callable[[], object]) -> int:
    """Run a command-line tool's body: a user's mistake (ConfigError) prints one line and exits 2."""
    try:
        body()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def decode_escapes(s: str) -> str:
    """``\\n`` and friends as typed on a command line -> the characters (a string without ``\\`` is kept)."""
    return s.encode("utf-8").decode("unicode_escape") if "\\" in s else s


def option(default: Any = MISSING, help: str | None = None, *, flag: str | None = None, choices=None,
           metavar: str | None = None, parse: Callable[[str], Any] | None = None, default_factory=MISSING,
           required: bool = False, cli: bool = True):
    """A config field with its command-line flag.

    Args:
        flag: the flag, when it is not ``--`` + the field name with dashes.
        parse: applied to each string the command line gives (e.g. :func:`decode_escapes`).
        required: the command line must give it (a tool's input).
        cli: False for a field the command line does not set (derived, or set by code).
    """
    meta = {"help": help, "flag": flag, "choices": choices, "metavar": metavar, "parse": parse, "cli": cli,
            "required": required}
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


def template_option():
    """The ``--prompt-template`` field (training data and the tools' prompts)."""
    return option(PROMPT_TEMPLATE, "how a problem becomes the model's prompt: a string with {problem} (escapes such "
                  "as \\n are decoded), or 'chat': the tokenizer's chat template with the problem as the user turn "
                  "and the generation prompt added", parse=decode_escapes)


def verifier_option():
    """The ``--verifier`` field: how final answers are graded."""
    return option("math", "final-answer grading: math-verify equivalence or exact string match", choices=VERIFIERS)


def check_template(template: str) -> None:
    if template != CHAT and "{problem}" not in template:
        raise ConfigError(f"--prompt-template {template!r} has no {{problem}} field: add one (or pass 'chat' for the "
                          "tokenizer's chat template)")


def _at_least(owner: object, names: tuple[str, ...], low: float) -> None:
    for name in names:
        value = getattr(owner, name)
        if value is not None and value < low:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= {low:g}, got {value}")


DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root")  # Megatron-LM's (WSD needs more flags)


@dataclass
class ModelConfig:
    """The backbone's geometry and numerics (``--preset`` fills the geometry; flags override it)."""

    num_layers: int | None = option(None)
    hidden_size: int | None = option(None)
    ffn_hidden_size: int | None = option(None, "MLP width; default 4 x hidden")
    num_attention_heads: int | None = option(None)
    num_query_groups: int | None = option(None, "KV heads (grouped-query attention); default: the attention heads")
    kv_channels: int | None = option(None, "head dim; default hidden/heads")
    vocab_size: int | None = option(None, "the tokenizer's vocabulary (rows are padded for TP)")
    make_vocab_size_divisible_by: int = option(128)
    seq_length: int | None = option(None)
    max_position_embeddings: int | None = option(None, "default: --seq-length")
    normalization: str = option("LayerNorm", choices=("LayerNorm", "RMSNorm"))
    norm_epsilon: float = option(1e-5)
    position_embedding_type: str = option("rope", choices=("rope", "learned_absolute"))
    rotary_base: int = option(10000)
    # RoPE scaling as megatron-core builds it (Megatron-LM's flags): Llama 3.x's, or linear (positions / factor).
    use_rope_scaling: bool = option(False, "Llama 3.x RoPE scaling (frequency factors 1 and 4, 8192 positions)")
    rope_scaling_factor: float = option(8.0, "the Llama 3.x RoPE scaling factor (with --use-rope-scaling)")
    rotary_seq_len_interpolation_factor: float | None = option(None, "linear RoPE scaling: positions / factor")
    add_qkv_bias: bool = option(False)
    qk_layernorm: bool = option(False)
    swiglu: bool = option(False)
    disable_bias_linear: bool = option(False)
    untie_embeddings_and_output_weights: bool = option(False)
    hidden_dropout: float = option(0.0)
    attention_dropout: float = option(0.0)
    init_method_std: float = option(0.02)
    transformer_impl: str = option("local", choices=("local", "transformer_engine"))
    recompute_granularity: str | None = option(None, choices=("full", "selective"))
    recompute_method: str | None = option(None, choices=("uniform", "block"))
    recompute_num_layers: int | None = option(None)
    bf16: bool = option(False)
    fp16: bool = option(False)
    fp8_format: str | None = option(None, choices=("e4m3", "hybrid"))
    fp8_recipe: str = option("delayed", choices=("delayed", "tensorwise", "mxfp8", "blockwise"))
    fp8_margin: int = option(0)
    fp8_amax_history_len: int = option(1)
    fp8_amax_compute_algo: str = option("most_recent", choices=("most_recent", "max"))
    fp8_param_gather: bool = option(False)

    def __post_init__(self) -> None:
        for name in ("num_layers", "hidden_size", "num_attention_heads", "vocab_size", "seq_length"):
            if getattr(self, name) is None or getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer (or pick a --preset)")
        _at_least(self, ("ffn_hidden_size", "num_query_groups", "kv_channels", "make_vocab_size_divisible_by",
                         "max_position_embeddings"), 1)
        if self.bf16 and self.fp16:
            raise ConfigError("--bf16 and --fp16 are exclusive: pick one")
        if self.rope_scaling_factor <= 0 or (self.rotary_seq_len_interpolation_factor or 1) <= 0:
            raise ConfigError("--rope-scaling-factor and --rotary-seq-len-interpolation-factor must be > 0")
        if self.use_rope_scaling and self.rotary_seq_len_interpolation_factor not in (None, 1):
            raise ConfigError("--use-rope-scaling (Llama 3.x) and --rotary-seq-len-interpolation-factor (linear) "
                              "are two RoPE scalings: pick one")
        if (self.use_rope_scaling or self.rotary_seq_len_interpolation_factor) and \
                self.position_embedding_type != "rope":
            raise ConfigError("RoPE scaling needs --position-embedding-type rope")
        if self.fp8_format and self.transformer_impl != "transformer_engine":
            raise ConfigError("--fp8-format needs --transformer-impl transformer_engine (FP8 runs in Transformer Engine)")
        if self.recompute_granularity == "full" and self.recompute_method is None:
            raise ConfigError("--recompute-granularity full needs --recompute-method uniform or block")
        heads, groups = self.num_attention_heads, self.num_query_groups or self.num_attention_heads
        if heads % groups:
            raise ConfigError(f"--num-query-groups {groups} must divide --num-attention-heads {heads}")
        if self.kv_channels is None and self.hidden_size % heads:
            raise ConfigError(f"--hidden-size {self.hidden_size} is not divisible by --num-attention-heads {heads}: "
                              "set --kv-channels (the head dim) explicitly")


@dataclass
class ParallelConfig:
    """Model-parallel layout and the run's seed (Megatron flag names)."""

    tensor_model_parallel_size: int = option(1)
    pipeline_model_parallel_size: int = option(1)
    virtual_pipeline_model_parallel_size: int | None = option(None)
    decoder_first_pipeline_num_layers: int | None = option(None)
    decoder_last_pipeline_num_layers: int | None = option(None)
    context_parallel_size: int = option(1)
    sequence_parallel: bool = option(False)
    distributed_backend: str | None = option(None, "default: nccl with CUDA, gloo otherwise", choices=("nccl", "gloo"))
    distributed_timeout_minutes: float = option(10, "a collective waiting longer than this (a rank died or hangs) "
                                                    "fails the run")
    seed: int = option(1234)
    # Megatron-LM's data-parallel gradient reduction flags (megatron-core's DistributedDataParallelConfig).
    overlap_grad_reduce: bool = option(False, "reduce gradient buckets as the backward fills them")
    ddp_bucket_size: int | None = option(None, "parameters per gradient bucket (default: megatron-core's)")
    accumulate_allreduce_grads_in_fp32: bool = option(False, "keep and reduce gradients in fp32 (bf16/fp16 runs)")

    def __post_init__(self) -> None:
        if self.tensor_model_parallel_size < 1 or self.pipeline_model_parallel_size < 1:
            raise ConfigError("--tensor-model-parallel-size and --pipeline-model-parallel-size must be >= 1")
        _at_least(self, ("context_parallel_size", "virtual_pipeline_model_parallel_size", "ddp_bucket_size"), 1)
        if self.sequence_parallel and self.tensor_model_parallel_size == 1:
            raise ConfigError("--sequence-parallel needs --tensor-model-parallel-size > 1")

    def model_parallel_size(self) -> int:
        return self.tensor_model_parallel_size * self.pipeline_model_parallel_size * self.context_parallel_size


@dataclass
class RGMConfig:
    """Options of the Self-supervised Process Reward Model (SPRM) head.

    Attributes:
        sprm_layer: transformer layer whose output feeds the head; negative
            counts from the end (-2: the penultimate layer, as in the paper).
        sprm_hidden_mult: the head's hidden width is ``mult * hidden_size``.
        sprm_dropout: dropout between the head's two linears.
        sprm_backbone_grad_scale: s in ``f*s + f.detach()*(1-s)``: the share
            of the SPR-loss gradient that reaches the backbone.
        sprm_step_tokens: strings whose tokens end a reasoning step.
        sprm_step_rule: how those strings are found (:data:`STEP_RULES`, :mod:`megatron_rgm.steps`).
        sprm_loss: ``spr`` (masked, class-weighted) or ``bce`` (ablation).
        sprm_pos_weight: weight multiplier of positive masked steps.
        sprm_loss_weight: weight of the SPR loss in the total loss.
        sprm_aggregation: how step scores become a trajectory score.
    """

    sprm_layer: int = option(-2, "transformer layer feeding the head; negative counts from the end")
    sprm_hidden_mult: int = option(2)
    sprm_dropout: float = option(0.5)
    sprm_backbone_grad_scale: float = option(1e-4, "share of the SPR-loss gradient that reaches the backbone")
    sprm_step_tokens: list[str] = option(help="strings ending a reasoning step; escapes such as \\n are decoded",
                                         default_factory=lambda: [".\n\n"], parse=decode_escapes)
    sprm_step_rule: str = option("exact", "which tokens end a step: exact (a token whose text is a step string, "
                                 "the reference's), contains (a token whose text contains one), text (a step string "
                                 "in the text, across tokens); a head keeps the rule it was trained with",
                                 choices=STEP_RULES)
    sprm_loss: str = option("spr", choices=SPRM_LOSSES)
    sprm_pos_weight: float = option(1.5)
    sprm_loss_weight: float = option(1.0)
    sprm_aggregation: str = option("geometric", choices=AGGREGATIONS)

    def __post_init__(self) -> None:
        if self.sprm_hidden_mult < 1:
            raise ConfigError(f"--sprm-hidden-mult must be >= 1, got {self.sprm_hidden_mult}")
        if not 0.0 <= self.sprm_dropout < 1.0:
            raise ConfigError(f"--sprm-dropout must be in [0, 1), got {self.sprm_dropout}")
        if not 0.0 <= self.sprm_backbone_grad_scale <= 1.0:
            raise ConfigError(
                f"--sprm-backbone-grad-scale must be in [0, 1], got {self.sprm_backbone_grad_scale}"
            )
        if self.sprm_loss not in SPRM_LOSSES:
            raise ConfigError(f"--sprm-loss must be one of {SPRM_LOSSES}, got {self.sprm_loss!r}")
        if self.sprm_aggregation not in AGGREGATIONS:
            raise ConfigError(
                f"--sprm-aggregation must be one of {AGGREGATIONS}, got {self.sprm_aggregation!r}"
            )
        if not self.sprm_step_tokens or any(not t for t in self.sprm_step_tokens):
            raise ConfigError("--sprm-step-tokens needs at least one non-empty string")
        if self.sprm_step_rule not in STEP_RULES:
            raise ConfigError(f"--sprm-step-rule must be one of {', '.join(STEP_RULES)}, got {self.sprm_step_rule!r}")
        if self.sprm_pos_weight <= 0:
            raise ConfigError(f"--sprm-pos-weight must be > 0, got {self.sprm_pos_weight}")

    def resolve_layer(self, num_layers: int) -> int:
        """The 0-based index of the feature layer in a model of ``num_layers`` layers."""
        index = self.sprm_layer + num_layers if self.sprm_layer < 0 else self.sprm_layer
        if not 0 <= index < num_layers:
            raise ConfigError(
                f"--sprm-layer {self.sprm_layer} is outside a model of {num_layers} layers: "
                f"use a value in [{-num_layers}, {num_layers - 1}] (-2 is the penultimate layer)"
            )
        return index


@dataclass
class GRPOConfig:
    """GRPO coefficients (the reference's defaults)."""

    clip_low: float = option(0.2, flag="--grpo-clip-low")
    clip_high: float = option(0.2, flag="--grpo-clip-high")
    kl_coef: float = option(0.001, "0 skips the reference model", flag="--grpo-kl-coef")
    entropy_coef: float = option(0.001, flag="--grpo-entropy-coef")
    advantage_eps: float = option(1e-6, "added to a group's reward std", flag="--grpo-advantage-eps")
    # The sampling temperature: logits are divided by it, as the old log-probs were (set from the rollouts').
    temperature: float = option(1.0, cli=False)

    def __post_init__(self) -> None:
        for name in ("clip_low", "clip_high", "kl_coef", "entropy_coef", "advantage_eps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--grpo-{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")


@dataclass
class OptimConfig:
    """Adam, its schedule and gradient clipping; the SPRM head is a param group of its own."""

    lr: float = option(1e-6)
    sprm_lr: float | None = option(None, "head learning rate (default 10 x --lr)")
    weight_decay: float = option(0.01)
    sprm_weight_decay: float = option(0.01)
    clip_grad: float = option(1.0, "gradient-norm clip of the policy (0: off)")
    sprm_clip_grad: float = option(1.0, "the head's own gradient-norm clip (0: off)")
    lr_warmup_iters: int = option(0)
    lr_decay_style: str = option("constant", "after the warm-up (Megatron-LM's schedules)", choices=DECAY_STYLES)
    lr_decay_iters: int | None = option(None, "iterations from 0 to the end of the decay (default: --train-iters)")
    min_lr: float | None = option(None, "where the decay ends (default 0; the head's: x --sprm-lr / --lr)")
    use_distributed_optimizer: bool = option(False)

    def __post_init__(self) -> None:
        _at_least(self, ("lr", "sprm_lr", "weight_decay", "sprm_weight_decay", "clip_grad", "sprm_clip_grad",
                         "lr_warmup_iters", "min_lr"), 0)
        _at_least(self, ("lr_decay_iters",), 1)
        if self.lr_decay_style == "constant" and (self.min_lr is not None or self.lr_decay_iters is not None):
            raise ConfigError("--min-lr and --lr-decay-iters shape a decaying learning rate: add --lr-decay-style "
                              f"{'|'.join(DECAY_STYLES[1:])}, or drop them for the constant one")
        if self.min_lr is not None and self.min_lr > self.lr:
            raise ConfigError(f"--min-lr {self.min_lr:g} is above --lr {self.lr:g}: the decay would end above its "
                              "start; lower --min-lr")

    @property
    def head_lr(self) -> float:
        return self.sprm_lr if self.sprm_lr is not None else 10 * self.lr

    def floors(self) -> tuple[float, float]:
        """The policy's and the head's ``min_lr``: their lr when constant (as checkpoints have recorded it)."""
        low = self.min_lr or 0.0
        return (self.lr, self.head_lr) if self.lr_decay_style == "constant" else (low, low * self.head_lr / (
            self.lr or 1.0))


@dataclass
class DataConfig:
    """Where prompts, rollouts and SFT texts come from, and how colocated rollouts are sampled."""

    tokenizer: str | None = option(None, "sentencepiece .model file or HF tokenizer directory")
    prompts: str | None = option(None, "prompts jsonl (id, problem, answer) for colocated rollouts")
    problem_key: str | None = option(None, "prompt field of --prompts (default: problem / prompt / question)")
    answer_key: str | None = option(None, "gold-answer field of --prompts (default: answer)")
    prompt_template: str = template_option()
    verifier: str = verifier_option()
    rollouts: str | None = option(None, "train from a rollout store (tools/generate_rollouts.py) with its old "
                                  "log-probs instead of sampling", metavar="STORE")
    prompts_per_iter: int = option(2, "prompts per iteration over all data-parallel ranks")
    sft_data: str | None = option(None, "jsonl of {text} or {prompt, response} for --stage sft")
    save_rollouts: str | None = option(None, "append every iteration's colocated rollouts (with their step "
                                       "scores) to this rollout store; group id = iteration x 1e6 + prompt "
                                       "index", metavar="STORE")
    group_size: int = option(8, "k: samples per prompt", flag="--grpo-group-size")
    temperature: float = option(0.6, flag="--rollout-temperature")
    top_p: float = option(0.95, flag="--rollout-top-p")
    max_response_length: int = option(256, "new tokens per rollout")
    rollout_max_batch: int | None = option(None, "sequences a rank decodes at once in colocated rollouts (KV-cache "
                                           "slots; a finished one's slot is refilled); default: every sample of "
                                           "the rank's prompts")

    def __post_init__(self) -> None:
        check_template(self.prompt_template)
        for flag, value in {"--prompts-per-iter": self.prompts_per_iter, "--grpo-group-size": self.group_size,
                            "--max-response-length": self.max_response_length,
                            "--rollout-max-batch": self.rollout_max_batch or 1}.items():
            if value < 1:
                raise ConfigError(f"{flag} must be >= 1, got {value}")
        if self.temperature < 0:
            raise ConfigError(f"--rollout-temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"--rollout-top-p must be in (0, 1], got {self.top_p}")


@dataclass
class RunConfig:
    """What a run does, beside the model, its layout, its optimizer and its data."""

    stage: str = option("rgm", "rgm: joint GRPO + SPR training; sft: language-model warm start on --sft-data "
                        "texts; backbone-check: a synthetic next-token task that only exercises model, layout and "
                        "optimizer", choices=STAGES)
    micro_batch_size: int = option(1)
    global_batch_size: int | None = option(None)
    train_iters: int = option(3)
    save: str | None = option(None)
    load: str | None = option(None)
    save_interval: int | None = option(None)
    pretrained_checkpoint: str | None = option(None, "weights to start from when --load holds no checkpoint (e.g. "
                                               "the SFT stage's); also the frozen KL reference")
    no_load_optim: bool = option(False, "resume weights and iteration, not the optimizer")
    use_checkpoint_args: bool = option(False, "take the model's geometry (and the head's) from the checkpoint "
                                       "--load resumes, else --pretrained-checkpoint, instead of the model flags")
    log_interval: int = option(1)
    max_consecutive_nonfinite: int = option(5, "stop after this many optimizer steps in a row skipped for a "
                                            "NaN/Inf gradient")
    tensorboard_dir: str | None = option(None)
    wandb_project: str | None = option(None, "log to Weights & Biases (needs wandb installed)")
    metrics_file: str | None = option(None, "append each iteration's metrics as a JSON line (last rank)")
    sprm_calibrate_head: bool = option(
        True, "on a run's first iteration, shift the head's output bias so the batch's step logits straddle 0 "
        "(0 midway across the widest gap near the median, so no logit sits on the SPR mask's boundary): the SPR "
        "loss needs steps on both sides of 0 (with every logit of one sign, P or N is 0 and so is the loss)")
    sprm_orient_head: bool = option(
        True, "with --sprm-calibrate-head, also negate the head's output when its scores rank the first batch's "
        "correct trajectories below the incorrect ones of the same prompt (within-prompt pairwise accuracy < 0.5): "
        "the SPR loss trains only steps the head already agrees with, so a head that starts reversed stays reversed")
    sprm_recalibrate_head: bool = option(
        False, "also calibrate (and orient) a head that was trained, loaded with --pretrained-checkpoint: by default "
        "only a fresh head is calibrated and a trained one is left exactly as it is")
    sprm_only: bool = option(False, "freeze the policy and train only the head on rollouts (adding an SPRM to a "
                                    "policy)")

    def __post_init__(self) -> None:
        for name in ("micro_batch_size", "train_iters", "log_interval", "max_consecutive_nonfinite"):
            value = getattr(self, name)
            if value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        if self.stage not in STAGES:
            raise ConfigError(f"--stage must be one of {', '.join(STAGES)}, got {self.stage!r}")
