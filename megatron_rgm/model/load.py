"""Rebuild a model from any checkpoint: what the checkpoint says of its architecture, then build and load.

Two writers are understood:

* megatron-rgm (our ``save_checkpoint``, training or ``hf-to-mcore``): the common state's
  ``rgm_extra`` records the flags that built the model (``model_argv``), the padded and
  the real vocabulary and, where an HF class matches, the HF ``config.json``;
* Megatron-LM's ``save_checkpoint`` (``pretrain_gpt.py`` and friends): its ``args``
  Namespace is translated into our flags. A feature of that model that RGMModel does not
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

from megatron_rgm.checkpoint import (ASSETS, HEAD_PREFIX, LoadResult, load_checkpoint, read_common_state,
                                     read_tensor_names, resolve_checkpoint)
from megatron_rgm.config import ConfigError

# Megatron-LM args attributes that name a model feature RGMModel does not build: (attribute, refused when).
_UNSUPPORTED = {
    "num_experts": lambda v: v not in (None, 0, 1),
    "multi_latent_attention": bool,
    "use_rope_scaling": bool,
    "rotary_percent": lambda v: v not in (None, 1.0),
    "rotary_interleaved": bool,
    "window_size": lambda v: v is not None,
    "mtp_num_layers": lambda v: v not in (None, 0),
    "apply_layernorm_1p": bool,
    "squared_relu": bool,
    "apply_residual_connection_post_layernorm": bool,
    "qk_l2_norm": bool,
    "attention_output_gate": bool,
    "softmax_type": lambda v: v not in (None, "vanilla"),
    "heterogeneous_layers_config_path": lambda v: v is not None,
}
_EMBEDDINGS = ("rope", "learned_absolute")
_NORMS = ("LayerNorm", "RMSNorm")
# Megatron-LM args attribute -> our flag (values written as they are).
_VALUE_FLAGS = {
    "num_layers": "--num-layers", "hidden_size": "--hidden-size", "ffn_hidden_size": "--ffn-hidden-size",
    "num_attention_heads": "--num-attention-heads", "kv_channels": "--kv-channels",
    "seq_length": "--seq-length", "max_position_embeddings": "--max-position-embeddings",
    "normalization": "--normalization", "norm_epsilon": "--norm-epsilon",
    "position_embedding_type": "--position-embedding-type", "rotary_base": "--rotary-base",
    "sprm_hidden_mult": "--sprm-hidden-mult", "sprm_layer": "--sprm-layer",
}
_BOOL_FLAGS = {"add_qkv_bias": "add-qkv-bias", "qk_layernorm": "qk-layernorm", "swiglu": "swiglu",
               "untie_embeddings_and_output_weights": "untie-embeddings-and-output-weights"}


@dataclass(frozen=True)
class CheckpointModel:
    """What a checkpoint records of the model it holds (read from its common state; no ranks needed)."""

    directory: Path  # the iter_XXXXXXX directory
    root: Path  # the path given (a save directory, or the checkpoint directory itself)
    iteration: int
    source: str  # "megatron-rgm" or "megatron-lm"
    model_argv: tuple[str, ...]  # megatron_rgm flags that rebuild the model (any layout flags are replaced)
    padded_vocab_size: int
    vocab_size: int | None  # rows a tokenizer produces; None when the writer did not record it
    hf_config: dict | None  # the HF config.json the model exports as, when recorded
    has_head: bool
    notes: tuple[str, ...] = field(default=())  # what the translation of a foreign checkpoint left out, named

    def args(self, tp: int = 1, pp: int = 1, extra_argv: list[str] | tuple[str, ...] = ()):
        """:class:`megatron_rgm.arguments.Args` that rebuild the model at ``tp`` x ``pp`` (the same padded rows)."""
        from megatron_rgm.arguments import parse_args

        argv = at_layout(self.model_argv, tp, pp, self.padded_vocab_size)
        args = parse_args(argv + list(extra_argv) + ["--sprm-dropout", "0"])
        args.transformer.perform_initialization = False  # every weight is overwritten by the load
        return args

    def sampling_vocab(self, tokenizer) -> int:
        """The vocabulary rows sampling may draw: the recorded size, else the tokenizer's."""
        if self.vocab_size is not None:
            return self.vocab_size
        size = len(tokenizer)
        if size > self.padded_vocab_size:
            raise ConfigError(f"the tokenizer has {size} tokens but checkpoint {self.directory} only "
                              f"{self.padded_vocab_size} vocabulary rows: pass the tokenizer the model was trained with")
        return size

    def tokenizer_path(self, given: str | Path | None) -> Path:
        """``given``, else the tokenizer saved beside the checkpoint (``hf_assets``)."""
        if given:
            return Path(given)
        for candidate in (self.root / ASSETS, self.directory.parent / ASSETS):
            if candidate.is_dir():
                return candidate
        raise ConfigError(f"checkpoint {self.root} carries no tokenizer ({ASSETS}/ is absent"
                          f"{', as in every Megatron-LM checkpoint' if self.source == 'megatron-lm' else ''}): "
                          "pass --tokenizer with the model's tokenizer directory")

    def with_vocab_size(self, vocab_size: int | None) -> CheckpointModel:
        """The same description with the real vocabulary given by the user (a Megatron-LM checkpoint lacks it)."""
        if vocab_size is None:
            return self
        if not 0 < vocab_size <= self.padded_vocab_size:
            raise ConfigError(f"--vocab-size {vocab_size} is not between 1 and the checkpoint's "
                              f"{self.padded_vocab_size} rows")
        return replace(self, vocab_size=vocab_size)


def at_layout(model_argv, tp: int, pp: int, padded_vocab_size: int) -> list[str]:
    """``model_argv`` with its layout set to ``tp`` x ``pp`` and its vocabulary fixed at the saved padded rows."""
    argv = list(model_argv)
    for flag, value in (("--tensor-model-parallel-size", tp), ("--pipeline-model-parallel-size", pp),
                        ("--vocab-size", padded_vocab_size), ("--make-vocab-size-divisible-by", 1)):
        if flag in argv:
            argv[argv.index(flag) + 1] = str(value)
        else:
            argv += [flag, str(value)]
    return argv


def megatron_lm_model_argv(args: argparse.Namespace, where: str) -> tuple[list[str], list[str]]:
    """Our flags for the model a Megatron-LM ``args`` Namespace describes, and what was left out (named).

    Raises:
        ConfigError: the model has a feature RGMModel does not build (naming it).
    """
    refused = [f"{name}={getattr(args, name)!r}" for name, bad in _UNSUPPORTED.items()
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
    if missing:
        raise ConfigError(f"Megatron-LM checkpoint {where} does not record {', '.join(missing)} in its args: "
                          "it cannot be rebuilt; save it with a current Megatron-LM")
    argv: list[str] = []
    for name, flag in _VALUE_FLAGS.items():
        value = getattr(args, name, None)
        if value is not None:
            argv += [flag, str(value)]
    # Megatron-LM keeps num_query_groups at its default (1) unless --group-query-attention is given.
    gqa = getattr(args, "group_query_attention", True)
    groups = getattr(args, "num_query_groups", None) if gqa else None
    argv += ["--num-query-groups", str(groups or args.num_attention_heads)]
    for name, flag in _BOOL_FLAGS.items():
        argv.append(f"--{flag}" if getattr(args, name, False) else f"--no-{flag}")
    argv.append("--no-disable-bias-linear" if getattr(args, "add_bias_linear", True) else "--disable-bias-linear")
    if getattr(args, "bf16", False):
        argv.append("--bf16")
    elif getattr(args, "fp16", False):
        argv.append("--fp16")
    step_tokens = getattr(args, "sprm_step_tokens", None)
    if step_tokens:
        argv += ["--sprm-step-tokens", *step_tokens]
    notes = []
    if getattr(args, "num_experts", None) in (0, 1):
        notes.append(f"num_experts={args.num_experts} (a dense MLP)")
    return argv, notes


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
    if "model_argv" in extra and "padded_vocab_size" in extra:  # our training loop and hf-to-mcore
        return CheckpointModel(directory, root, it, "megatron-rgm", tuple(extra["model_argv"]),
                               int(extra["padded_vocab_size"]), vocab, hf_config, has_head)
    # Megatron-LM's save_checkpoint, or ours called from a Megatron-LM script (its args describe the model).
    args = common.get("args")
    if args is None:
        raise ConfigError(f"checkpoint {directory} records neither rgm_extra.model_argv (megatron-rgm) nor args "
                          "(Megatron-LM): its model cannot be rebuilt; give a checkpoint written by megatron-rgm's "
                          "or Megatron-LM's save_checkpoint")
    argv, notes = megatron_lm_model_argv(args, str(directory))
    it = int(common.get("iteration", it) or 0)
    vocab = vocab or getattr(args, "vocab_size", None)
    source = "megatron-rgm" if extra else "megatron-lm"
    return CheckpointModel(directory, root, it, source, tuple(argv), int(args.padded_vocab_size),
                           int(vocab) if vocab else None, hf_config, has_head, tuple(notes))


@dataclass
class LoadedModel:
    model: object  # this rank's RGMModel (one chunk), in eval mode
    checkpoint: CheckpointModel
    args: object  # megatron_rgm.arguments.Args it was built from
    result: LoadResult


def load_model(path: str | Path, tp: int = 1, pp: int = 1, extra_argv: list[str] | tuple[str, ...] = (),
               checkpoint: CheckpointModel | None = None) -> LoadedModel:
    """Start the layout, build the checkpoint's model at ``tp`` x ``pp`` and load its weights. Collective.

    Args:
        path: what :func:`describe_checkpoint` takes.
        extra_argv: further flags for the model (e.g. ``--sprm-step-tokens``).
        checkpoint: its description, when the caller has read it already.
    """
    from megatron_rgm import distributed
    from megatron_rgm.model import build_model

    checkpoint = checkpoint or describe_checkpoint(path)
    args = checkpoint.args(tp, pp, extra_argv)
    distributed.initialize(args.parallel)
    model = build_model(args)[0]
    result = load_checkpoint(checkpoint.directory, [model])
    model.eval()
    return LoadedModel(model, checkpoint, args, result)
