"""Rebuild a model from any checkpoint: what the checkpoint says of its architecture, then build and load.

Two writers are understood:

* megatron-rgm (our ``save_checkpoint``, training or ``hf-to-mcore``): the common state's
  ``rgm_extra`` records the model and head configs (``model``, ``sprm``: dicts), the padded and
  the real vocabulary and, where an HF class matches, the HF ``config.json``;
* Megatron-LM's ``save_checkpoint`` (``pretrain_gpt.py`` and friends): its ``args``
  Namespace is translated into a ModelConfig. A feature of that model that RGMModel does not
  build (MoE, multi-latent attention, RoPE scaling, sliding windows, ...) is refused with
  its name, never dropped; a checkpoint without an SPRM head loads with a fresh head and
  the load says so.

Every tool that rebuilds a model (rollouts, Best-of-N, verify, export, benchmarks)
goes through :func:`load_model` or :func:`describe_checkpoint`.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field, replace
from pathlib import Path

from megatron_rgm import cli, distributed
from megatron_rgm.arguments import at_layout, parse_args, rebuild_args
from megatron_rgm.checkpoint.state import say
from megatron_rgm.checkpoint import (
    ASSETS,
    HEAD_PREFIX,
    RUN_CONFIG,
    LoadResult,
    load_checkpoint,
    read_common_state,
    read_tensor_names,
    read_tensor_shapes,
    resolve_checkpoint,
)
from megatron_rgm.config import ConfigError, ModelConfig, RGMConfig
from megatron_rgm.head import UNRECORDED_RULE
from megatron_rgm.model import build_model
from megatron_rgm.model.bridge import TOKENIZER_DIR, bridge_model, read_run_config

# Megatron-LM args attributes that name a model feature RGMModel does not build: (attribute, refused when).
_UNSUPPORTED = {
    "multi_latent_attention": bool,
    "rotary_percent": lambda v: v not in (None, 1.0),
    "rotary_interleaved": bool,
    "window_size": lambda v: v is not None and (len(v) != 2 or v[1] != 0),  # (left, 0) converts
    "window_attn_skip_freq": lambda v: isinstance(v, (list, tuple)) and set(v) != {1},
    "mtp_num_layers": lambda v: v not in (None, 0),
    "apply_layernorm_1p": bool,
    "squared_relu": bool,
    "apply_residual_connection_post_layernorm": bool,
    "qk_l2_norm": bool,
    "attention_output_gate": bool,
    "heterogeneous_layers_config_path": lambda v: v is not None,
}
# What RGM's MoE layers (megatron-core's, as Qwen3-MoE converts: every layer routed by softmax, no shared
# expert) do not compute, for a Megatron-LM args with --num-experts > 1; a value that changes nothing passes.
_MOE_UNSUPPORTED = {
    "moe_layer_freq": lambda v: not (v in (None, 1) or (isinstance(v, (list, tuple)) and set(v) == {1})),
    "moe_shared_expert_intermediate_size": lambda v: v not in (None, 0),
    "moe_router_score_function": lambda v: v not in (None, "softmax"),
    "moe_router_num_groups": lambda v: v not in (None, 1),
    "moe_router_topk_scaling_factor": lambda v: v not in (None, 1.0),
    "moe_router_enable_expert_bias": bool,
    "moe_expert_capacity_factor": lambda v: v is not None,
    "moe_expert_rank_capacity_factor": lambda v: v is not None,
    "moe_first_k_dense_replace": lambda v: v not in (None, 0),
    "moe_router_load_balancing_type": lambda v: _single(v) not in (None, "aux_loss", "seq_aux_loss",
                                                                    "global_aux_loss", "none"),
    "moe_router_force_load_balancing": bool,
    "moe_router_force_biased": lambda v: v not in (None, False, 0),
    "moe_apply_probs_on_input": bool,
    "moe_mlp_glu_interleave_size": lambda v: v not in (None, 0, 1),
    "moe_aux_loss_coeff": lambda v: isinstance(v, (list, tuple)) and len(v) > 1,
}


def _single(value):
    """A Megatron-LM MoE arg given once: it keeps ``--moe-router-load-balancing-type`` and ``--moe-aux-loss-coeff``
    as lists (one entry per balancing type)."""
    return value[0] if isinstance(value, (list, tuple)) and len(value) == 1 else value


# Megatron-LM's MoE args that are ModelConfig fields of the same name.
_MOE_VALUES = ("num_experts", "moe_ffn_hidden_size", "moe_router_topk", "moe_aux_loss_coeff")
_EMBEDDINGS = ("rope", "yarn", "learned_absolute")
_NORMS = ("LayerNorm", "RMSNorm")
# Megatron-LM args attributes that are ModelConfig fields of the same name and meaning.
_VALUES = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "kv_channels", "seq_length",
           "max_position_embeddings", "normalization", "norm_epsilon", "position_embedding_type", "rotary_base",
           "rope_scaling_factor", "rotary_seq_len_interpolation_factor", "rotary_scaling_factor",
           "yarn_original_max_position_embeddings", "yarn_beta_fast", "yarn_beta_slow",
           "yarn_correction_range_round_to_int", "mscale", "mscale_all_dim", "softmax_type", "glu_linear_offset",
           "activation_func_clamp_value")
_BOOLS = ("add_qkv_bias", "qk_layernorm", "swiglu", "quick_geglu", "untie_embeddings_and_output_weights",
          "use_rope_scaling")
# The common-state key that says whether the head in a checkpoint was trained (a trained head is never calibrated
# again unless asked: ``--sprm-recalibrate-head``).
HEAD_TRAINED = "sprm_head_trained"
# The common-state key of the prompt template the run rendered problems with (the export's chat template).
PROMPT_KEY = "prompt_template"
_UNRECORDED_RULE = {"sprm_step_rule": UNRECORDED_RULE}


@dataclass(frozen=True)
class CheckpointModel:
    """What a checkpoint records of the model it holds (read from its common state; no ranks needed)."""

    directory: Path  # the iter_XXXXXXX directory
    root: Path  # the path given (a save directory, or the checkpoint directory itself)
    iteration: int
    source: str  # "megatron-rgm", "megatron-lm" or "megatron-bridge"
    model: ModelConfig  # the geometry as recorded (its vocabulary is replaced by the padded rows on a rebuild)
    sprm: RGMConfig  # the head
    padded_vocab_size: int
    vocab_size: int | None  # rows a tokenizer produces; None when the writer did not record it
    hf_config: dict | None  # the HF config.json the model exports as, when recorded
    has_head: bool
    notes: tuple[str, ...] = field(default=())  # what the translation of a foreign checkpoint left out, named
    head_trained: bool = False  # the head was trained (or imported trained), not freshly initialised
    prompt_template: str | None = None  # how the run rendered a problem, when recorded

    def args(self, tp: int = 1, pp: int = 1, ep: int = 1, etp: int | None = None):
        """:class:`megatron_rgm.arguments.Args` that rebuild the model at ``tp`` x ``pp`` (x ``ep`` for the experts;
        the same padded rows)."""
        return rebuild_args(at_layout(self.model, self.padded_vocab_size), tp, pp,
                            replace(self.sprm, sprm_dropout=0.0), ep=ep, etp=etp)

    def sampling_vocab(self, tokenizer) -> int:
        """The vocabulary rows sampling may draw: the recorded size, else the tokenizer's."""
        if self.vocab_size is not None:
            return self.vocab_size
        size = len(tokenizer)
        if size > self.padded_vocab_size:
            raise ConfigError(f"the tokenizer has {size} tokens but checkpoint {self.directory} only "
                              f"{self.padded_vocab_size} vocabulary rows: pass the tokenizer the model was trained with")
        return size

    def tokenizer_dir(self) -> Path | None:
        """The tokenizer saved with the checkpoint: ``hf_assets/`` beside the iterations (ours), or the
        iteration's ``tokenizer/`` (Megatron-Bridge's); None when there is none (Megatron-LM saves none)."""
        for candidate in (self.root / ASSETS, self.directory.parent / ASSETS, self.directory / TOKENIZER_DIR):
            if candidate.is_dir():
                return candidate
        return None

    def tokenizer_path(self, given: str | Path | None) -> Path:
        """``given``, else the tokenizer saved with the checkpoint (:meth:`tokenizer_dir`)."""
        if given:
            return Path(given)
        if self.tokenizer_dir() is not None:
            return self.tokenizer_dir()
        raise ConfigError(f"checkpoint {self.root} carries no tokenizer ({ASSETS}/ is absent"
                          f"{', as in every Megatron-LM checkpoint' if self.source == 'megatron-lm' else ''}"
                          f"{f', nor {TOKENIZER_DIR}/ beside {RUN_CONFIG}' if self.source == 'megatron-bridge' else ''}): "
                          "pass --tokenizer with the model's tokenizer directory")

    def with_vocab_size(self, vocab_size: int | None) -> CheckpointModel:
        """The same description with the real vocabulary given by the user (a Megatron-LM checkpoint lacks it)."""
        if vocab_size is None:
            return self
        if not 0 < vocab_size <= self.padded_vocab_size:
            raise ConfigError(f"--vocab-size {vocab_size} is not between 1 and the checkpoint's "
                              f"{self.padded_vocab_size} rows")
        return replace(self, vocab_size=vocab_size)


def _window_and_yarn(args: argparse.Namespace) -> dict:
    """ModelConfig fields of Megatron-LM's ``--window-size (left, 0)`` (HF's window: left + 1 tokens) with its
    ``--window-attn-skip-freq``, and of ``--position-embedding-type yarn`` where a flag was left at Megatron-LM's
    default (it builds 4096 original positions then)."""
    out = {}
    window, freq = getattr(args, "window_size", None), getattr(args, "window_attn_skip_freq", None)
    if window is not None:
        out["sliding_window"] = int(window[0]) + 1
        out["window_attn_skip_freq"] = freq if isinstance(freq, int) else None  # a list of ones: every layer
    if getattr(args, "position_embedding_type", None) == "yarn":
        out.setdefault("yarn_original_max_position_embeddings",
                       getattr(args, "yarn_original_max_position_embeddings", None) or 4096)
    return out


def megatron_lm_model(args: argparse.Namespace, where: str) -> tuple[ModelConfig, RGMConfig, list[str]]:
    """The model (and head) a Megatron-LM ``args`` Namespace describes, and what was left out (named).

    Raises:
        ConfigError: the model has a feature RGMModel does not build (naming it).
    """
    moe = (getattr(args, "num_experts", None) or 0) > 1
    refused = [f"{name}={getattr(args, name)!r}" for name, bad in
               ({**_UNSUPPORTED, **_MOE_UNSUPPORTED} if moe else _UNSUPPORTED).items()
               if hasattr(args, name) and bad(getattr(args, name))]
    if getattr(args, "position_embedding_type", "rope") not in _EMBEDDINGS:
        refused.append(f"position_embedding_type={args.position_embedding_type!r}")
    if getattr(args, "normalization", "LayerNorm") not in _NORMS:
        refused.append(f"normalization={args.normalization!r}")
    if refused:
        raise ConfigError(f"Megatron-LM checkpoint {where} was trained with {', '.join(refused)}, which megatron-rgm "
                          "does not build: it cannot be loaded here (convert the model to a supported family first)")
    missing = [name for name in ("num_layers", "hidden_size", "num_attention_heads", "padded_vocab_size")
               if getattr(args, name, None) is None]
    if getattr(args, "use_rope_scaling", False) and getattr(args, "rope_scaling_factor", None) is None:
        missing.append("rope_scaling_factor (its RoPE is scaled)")
    if missing:
        raise ConfigError(f"Megatron-LM checkpoint {where} does not record {', '.join(missing)} in its args: "
                          "it cannot be rebuilt; save it with a current Megatron-LM")
    values = {name: getattr(args, name) for name in _VALUES if getattr(args, name, None) is not None}
    values.update({name: bool(getattr(args, name, False)) for name in _BOOLS})
    values.update(_window_and_yarn(args))
    if moe:
        values.update({name: _single(getattr(args, name)) for name in _MOE_VALUES
                       if getattr(args, name, None) is not None})
        values["moe_router_pre_softmax"] = bool(getattr(args, "moe_router_pre_softmax", False))
    # The training sequence length shapes no weight; a writer that kept only the positions gives those.
    values.setdefault("seq_length", values.get("max_position_embeddings"))
    # Megatron-LM keeps num_query_groups at its default (1) unless --group-query-attention is given.
    gqa = getattr(args, "group_query_attention", True)
    groups = getattr(args, "num_query_groups", None) if gqa else None
    bf16 = bool(getattr(args, "bf16", False))
    model = ModelConfig(**values, num_query_groups=groups or args.num_attention_heads,
                        disable_bias_linear=not getattr(args, "add_bias_linear", True), bf16=bf16,
                        fp16=not bf16 and bool(getattr(args, "fp16", False)),
                        vocab_size=int(args.padded_vocab_size), make_vocab_size_divisible_by=1)
    sprm = cli.from_namespace(RGMConfig, args)  # the --sprm-* flags add_rgm_args registered, or the defaults
    if hasattr(args, "sprm_layer") and not hasattr(args, "sprm_step_rule"):
        sprm = replace(sprm, **_UNRECORDED_RULE)  # our flags, written before the rule was one of them
    notes = []
    if getattr(args, "num_experts", None) in (0, 1):
        notes.append(f"num_experts={args.num_experts} (a dense MLP)")
    if moe and getattr(args, "moe_z_loss_coeff", None):
        notes.append(f"moe_z_loss_coeff={args.moe_z_loss_coeff} (a training loss of the router; RGM's MoE training "
                     "has the load-balancing loss only)")
    balancing = _single(getattr(args, "moe_router_load_balancing_type", None))
    if moe and balancing in ("seq_aux_loss", "global_aux_loss"):
        notes.append(f"moe_router_load_balancing_type={balancing!r} (RGM's training balances per micro-batch, "
                     "'aux_loss')")
    if moe and getattr(args, "moe_input_jitter_eps", None):
        notes.append(f"moe_input_jitter_eps={args.moe_input_jitter_eps} (training-time noise on the router input)")
    return model, sprm, notes


def _recorded(extra: dict, directory: Path) -> tuple[ModelConfig, RGMConfig]:
    """The model and head our ``save_checkpoint`` recorded: config dicts, or (older checkpoints) the flags."""
    if "model_argv" in extra and "model" not in extra:
        args = parse_args(list(extra["model_argv"]))
        return args.model, replace(args.rgm, **_UNRECORDED_RULE)
    try:
        return ModelConfig(**extra["model"]), RGMConfig(**{**_UNRECORDED_RULE, **extra.get("sprm", {})})
    except TypeError as e:
        raise ConfigError(f"checkpoint {directory} records a model this megatron-rgm does not know ({e}): load it "
                          "with the megatron-rgm version that wrote it") from None


def _head_trained(extra: dict, has_head: bool) -> bool:
    """Whether the head our writer saved was trained: recorded since the key exists; before, read from the
    stage that wrote it (SFT and the backbone check never train the head) or hf-to-mcore's head source."""
    if not has_head:
        return False
    if HEAD_TRAINED in extra:
        return bool(extra[HEAD_TRAINED])
    if "head" in extra:  # hf-to-mcore: "file" or "fresh (seed N)"
        return extra["head"] == "file"
    return extra.get("stage", "rgm") == "rgm"


def describe_checkpoint(path: str | Path, iteration: int | None = None) -> CheckpointModel:
    """Read what a checkpoint records of its model.

    Args:
        path: a save directory (its latest iteration) or one ``iter_XXXXXXX`` directory.
        iteration: a specific iteration of a save directory.

    Raises:
        ConfigError: the path holds no checkpoint, or a model that cannot be rebuilt here (named).
    """
    root = Path(path)
    directory, it = resolve_checkpoint(root, iteration)
    common = read_common_state(directory)
    has_head = any(HEAD_PREFIX in name for name in read_tensor_names(directory))
    extra = common.get("rgm_extra") or {}
    hf_config = extra.get("hf_config")
    vocab = extra.get("vocab_size") or (hf_config or {}).get("vocab_size")
    if ("model" in extra or "model_argv" in extra) and "padded_vocab_size" in extra:  # ours: training, hf-to-mcore
        return CheckpointModel(directory, root, it, "megatron-rgm", *_recorded(extra, directory),
                               int(extra["padded_vocab_size"]), vocab, hf_config, has_head,
                               head_trained=_head_trained(extra, has_head), prompt_template=extra.get(PROMPT_KEY))
    # Megatron-LM's save_checkpoint, or ours called from a Megatron-LM script (its args describe the model).
    args = common.get("args")
    run_config = read_run_config(directory) if args is None else None
    if run_config is not None:  # Megatron-Bridge: the model in run_config.yaml
        padded = _embedding_rows(directory)
        model, real_vocab = bridge_model(run_config["model"], padded, str(directory))
        return CheckpointModel(directory, root, int(common.get("iteration", it) or 0), "megatron-bridge", model,
                               RGMConfig(), padded, real_vocab, None, has_head, head_trained=has_head)
    if args is None:
        raise ConfigError(f"checkpoint {directory} records neither rgm_extra.model (megatron-rgm), args "
                          "(Megatron-LM) nor a run_config.yaml (Megatron-Bridge): its model cannot be rebuilt; give a "
                          "checkpoint written by megatron-rgm's, Megatron-LM's or Megatron-Bridge's save_checkpoint")
    model, sprm, notes = megatron_lm_model(args, str(directory))
    it = int(common.get("iteration", it) or 0)
    vocab = vocab or getattr(args, "vocab_size", None)
    source = "megatron-rgm" if extra else "megatron-lm"
    # A head in a Megatron-LM checkpoint was trained by its loop with our loss (add_rgm_args), unless we wrote it.
    trained = _head_trained(extra, has_head) if extra else has_head
    return CheckpointModel(directory, root, it, source, model, sprm, int(args.padded_vocab_size),
                           int(vocab) if vocab else None, hf_config, has_head, tuple(notes), trained,
                           extra.get(PROMPT_KEY))


def _embedding_rows(directory: Path) -> int:
    """The vocabulary rows of a checkpoint's embedding (or output layer), from its tensor metadata."""
    shapes = read_tensor_shapes(directory)
    for key in ("embedding.word_embeddings.weight", "output_layer.weight"):
        if key in shapes:
            return int(shapes[key][0])
    raise ConfigError(f"checkpoint {directory} has no embedding.word_embeddings.weight: it holds no GPT model")


def recorded_geometry(path: str | Path) -> tuple[ModelConfig, RGMConfig | None]:
    """The model a checkpoint holds and its head (None without one): ``arguments.parse_args``' ``recorded``."""
    checkpoint = describe_checkpoint(path)
    return checkpoint.model, checkpoint.sprm if checkpoint.has_head else None


@dataclass
class LoadedModel:
    model: object  # this rank's RGMModel (one chunk), in eval mode
    checkpoint: CheckpointModel
    args: object  # megatron_rgm.arguments.Args it was built from
    result: LoadResult


def load_model(path: str | Path, tp: int = 1, pp: int = 1, checkpoint: CheckpointModel | None = None,
               ep: int = 1, etp: int | None = None) -> LoadedModel:
    """Start the layout, build the checkpoint's model at ``tp`` x ``pp`` and load its weights. Collective.

    Args:
        path: what :func:`describe_checkpoint` takes.
        checkpoint: its description, when the caller has read it already.
        ep: expert-parallel ranks of a mixture-of-experts model (the world is ``tp x pp x ep``); ``etp``: the
            tensor-parallel ranks each expert is split over (default: ``tp``, 1 for biased experts).
    """
    checkpoint = checkpoint or describe_checkpoint(path)
    args = checkpoint.args(tp, pp, ep, etp)
    distributed.initialize(args.parallel)
    model = build_model(args)[0]
    result = load_checkpoint(checkpoint.directory, [model])
    if checkpoint.notes:
        say(f"{checkpoint.directory}: the model was rebuilt from Megatron-LM's args, reading "
            f"{'; '.join(checkpoint.notes)}")
    model.eval()
    return LoadedModel(model, checkpoint, args, result)
