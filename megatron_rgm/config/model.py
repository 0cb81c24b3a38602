"""What a model is: its geometry and numerics, its parallel layout, its SPRM head."""

from __future__ import annotations

from dataclasses import dataclass

from megatron_rgm.config.options import (AGGREGATIONS, SPRM_LOSSES, STEP_RULES, ConfigError, at_least, decode_escapes,
                                         option)


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
    position_embedding_type: str = option("rope", choices=("rope", "yarn", "learned_absolute"))
    rotary_base: int = option(10000)
    # RoPE scaling as megatron-core builds it (Megatron-LM's flags): Llama 3.x's, or linear (positions / factor).
    use_rope_scaling: bool = option(False, "Llama 3.x RoPE scaling (frequency factors 1 and 4, 8192 positions)")
    rope_scaling_factor: float = option(8.0, "the Llama 3.x RoPE scaling factor (with --use-rope-scaling)")
    rotary_seq_len_interpolation_factor: float | None = option(None, "linear RoPE scaling: positions / factor")
    # YaRN (--position-embedding-type yarn): Megatron-LM's flags. Its attention factor (HF's attention_factor, the
    # scale of cos and sin) follows from the factor and the two mscales, as in HF and megatron-core.
    rotary_scaling_factor: float = option(1.0, "YaRN: the context extension factor")
    yarn_original_max_position_embeddings: int | None = option(None, "YaRN: the context length before extension")
    yarn_beta_fast: float = option(32.0, "YaRN: rotations where the frequencies start to be interpolated")
    yarn_beta_slow: float = option(1.0, "YaRN: rotations where the frequencies are fully interpolated")
    yarn_correction_range_round_to_int: bool = option(True, "YaRN: round the correction range to whole dims "
                                                      "(HF's truncate)")
    mscale: float = option(1.0, "YaRN: the attention factor's mscale (numerator)")
    mscale_all_dim: float = option(0.0, "YaRN: the attention factor's mscale_all_dim (denominator; 0: none)")
    # Attention beyond plain causal softmax (GPT-OSS): sliding windows on some layers, a learnable sink per head.
    sliding_window: int | None = option(None, "sliding-window attention: each token sees itself and the N - 1 "
                                        "tokens before it (HF's sliding_window; Megatron-LM's --window-size "
                                        "(N-1,0))")
    window_attn_skip_freq: int | None = option(None, "with --sliding-window: every K-th layer attends to the whole "
                                               "context (GPT-OSS: 2); default: every layer is windowed")
    softmax_type: str = option("vanilla", "learnable: each head's softmax has a learned sink logit (GPT-OSS); "
                               "off-by-one: a sink logit of 0", choices=("vanilla", "off-by-one", "learnable"))
    # GPT-OSS's gated MLP: quick_gelu(gate clamped) * (up clamped + offset).
    quick_geglu: bool = option(False, "gated MLP with quick-GELU (x * sigmoid(1.702 x)) instead of SiLU")
    glu_linear_offset: float = option(0.0, "added to the gated MLP's linear half (GPT-OSS: 1)")
    activation_func_clamp_value: float | None = option(None, "clamp the gate half from above and the linear half "
                                                       "to [-v, v] (GPT-OSS: 7)")
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
    # Mixture of experts (megatron-core's MoELayer, Megatron-LM's flags): every layer's MLP becomes the experts.
    num_experts: int | None = option(None, "experts in each layer's MoE MLP (default: a dense MLP)")
    moe_ffn_hidden_size: int | None = option(None, "each expert's hidden size (default: --ffn-hidden-size)")
    moe_router_topk: int = option(2, "experts each token is sent to")
    moe_router_pre_softmax: bool = option(False, "softmax over all experts, then the top k (weights not "
                                          "renormalised); default: softmax over the top k")
    moe_aux_loss_coeff: float = option(0.0, "the router's load-balancing loss weight (0: none)")

    def __post_init__(self) -> None:
        at_least(self, ("num_experts", "moe_ffn_hidden_size", "moe_router_topk"), 1)
        at_least(self, ("moe_aux_loss_coeff",), 0)
        if self.num_experts is not None and self.moe_router_topk > self.num_experts:
            raise ConfigError(f"--moe-router-topk {self.moe_router_topk} is more than --num-experts "
                              f"{self.num_experts}: lower it")
        for name in ("num_layers", "hidden_size", "num_attention_heads", "vocab_size", "seq_length"):
            if getattr(self, name) is None or getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer (or pick a --preset)")
        at_least(self, ("ffn_hidden_size", "num_query_groups", "kv_channels", "make_vocab_size_divisible_by",
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
        self._check_attention_features()
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

    def _check_attention_features(self) -> None:
        at_least(self, ("sliding_window", "yarn_original_max_position_embeddings"), 1)
        at_least(self, ("window_attn_skip_freq",), 2)
        if self.window_attn_skip_freq and not self.sliding_window:
            raise ConfigError("--window-attn-skip-freq picks the layers without a window: it needs --sliding-window")
        if self.quick_geglu and self.swiglu:
            raise ConfigError("--quick-geglu and --swiglu are two gated MLPs: pick one")
        if (self.glu_linear_offset or self.activation_func_clamp_value is not None) and not (
                self.swiglu or self.quick_geglu):
            raise ConfigError("--glu-linear-offset and --activation-func-clamp-value shape a gated MLP: add "
                              "--quick-geglu or --swiglu")
        if self.activation_func_clamp_value is not None and self.activation_func_clamp_value <= 0:
            raise ConfigError(f"--activation-func-clamp-value must be > 0, got {self.activation_func_clamp_value}")
        yarn_flags = {"rotary_scaling_factor": 1.0, "yarn_original_max_position_embeddings": None,
                      "yarn_beta_fast": 32.0, "yarn_beta_slow": 1.0, "yarn_correction_range_round_to_int": True,
                      "mscale": 1.0, "mscale_all_dim": 0.0}
        given = [name for name, default in yarn_flags.items() if getattr(self, name) != default]
        if given and self.position_embedding_type != "yarn":
            raise ConfigError(f"--{given[0].replace('_', '-')} shapes YaRN RoPE: add --position-embedding-type yarn "
                              "(or drop it)")
        if self.position_embedding_type == "yarn":
            if self.rotary_scaling_factor < 1:
                raise ConfigError(f"--rotary-scaling-factor {self.rotary_scaling_factor}: YaRN extends the context "
                                  "by a factor >= 1")
            if self.yarn_original_max_position_embeddings is None:
                raise ConfigError("--position-embedding-type yarn needs --yarn-original-max-position-embeddings "
                                  "(the context length before extension)")

    def yarn_fields(self) -> dict:
        """The attributes megatron-core reads off a TransformerConfig for YaRN (none without it)."""
        if self.position_embedding_type != "yarn":
            return {}
        return {"yarn_rotary_scaling_factor": self.rotary_scaling_factor, "yarn_mscale": self.mscale,
                "yarn_mscale_all_dim": self.mscale_all_dim,
                **{name: getattr(self, name) for name in ("yarn_original_max_position_embeddings", "yarn_beta_fast",
                                                          "yarn_beta_slow", "yarn_correction_range_round_to_int")}}


# What shapes the weights or what they compute: the fields --use-checkpoint-args takes from a checkpoint.
GEOMETRY = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
            "kv_channels", "vocab_size", "make_vocab_size_divisible_by", "max_position_embeddings", "normalization",
            "norm_epsilon", "position_embedding_type", "rotary_base", "use_rope_scaling", "rope_scaling_factor",
            "rotary_seq_len_interpolation_factor", "add_qkv_bias", "qk_layernorm", "swiglu",
            "disable_bias_linear", "untie_embeddings_and_output_weights", "num_experts", "moe_ffn_hidden_size",
            "moe_router_topk", "moe_router_pre_softmax", "sliding_window", "window_attn_skip_freq", "softmax_type",
            "quick_geglu", "glu_linear_offset", "activation_func_clamp_value", "rotary_scaling_factor",
            "yarn_original_max_position_embeddings", "yarn_beta_fast", "yarn_beta_slow",
            "yarn_correction_range_round_to_int", "mscale", "mscale_all_dim")


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
    expert_model_parallel_size: int = option(1, "ranks the experts of an MoE layer are spread over (within DP)")
    expert_tensor_parallel_size: int | None = option(None, "ranks each expert is split over: 1 or the "
                                                     "tensor-parallel size (default: that, or 1 for experts with "
                                                     "biases, GPT-OSS's, the only size megatron-core gives them)")

    def __post_init__(self) -> None:
        if self.tensor_model_parallel_size < 1 or self.pipeline_model_parallel_size < 1:
            raise ConfigError("--tensor-model-parallel-size and --pipeline-model-parallel-size must be >= 1")
        at_least(self, ("context_parallel_size", "virtual_pipeline_model_parallel_size", "ddp_bucket_size",
                        "expert_model_parallel_size", "expert_tensor_parallel_size"), 1)
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


