"""Layer specs: megatron-core's local modules (default) or Transformer Engine's.

The local spec is megatron-core's own, with two changes: its norms are
:class:`RGMNorm`, which, unlike ``WrappedTorchNorm``, accepts sequence
parallelism (megatron-core's local norm refuses it, and the TE/apex norms that
allow it need a GPU), and under context parallelism its attention is
:class:`~megatron_rgm.model.context_parallel.ContextParallelAttention`
(megatron-core's local attention refuses CP).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.models.gpt.gpt_layer_specs import (get_gpt_layer_local_spec,
                                                    get_gpt_layer_with_transformer_engine_spec)
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_rgm import lazy
from megatron_rgm.compat.mcore import (biased_experts_train, router_without_transformer_engine,
                                      windows_keep_the_mask)
from megatron_rgm.config import ConfigError
from megatron_rgm.model.context_parallel import ContextParallelAttention


class RGMNorm(torch.nn.Module):
    """LayerNorm or RMSNorm (``config.normalization``) that runs under sequence parallelism.

    Under sequence parallelism each tensor-parallel rank normalises its own
    slice of the sequence, so its weight gradient is partial; the weights carry
    ``sequence_parallel=True`` and megatron's ``finalize_model_grads`` sums them
    over the tensor-parallel group.
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_unused):
        super().__init__()
        if config.normalization not in ("LayerNorm", "RMSNorm"):
            raise ConfigError(f"normalization {config.normalization!r} is not supported: use LayerNorm or RMSNorm")
        self.rms = config.normalization == "RMSNorm"
        self.eps = eps
        self.hidden_size = hidden_size
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        self.bias = None if self.rms else torch.nn.Parameter(torch.zeros(hidden_size, dtype=config.params_dtype))
        for p in self.parameters():
            setattr(p, "sequence_parallel", config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rms:
            return F.rms_norm(x, (self.hidden_size,), self.weight, self.eps)
        return F.layer_norm(x, (self.hidden_size,), self.weight, self.bias, self.eps)


def layer_spec(config: TransformerConfig, transformer_impl: str = "local") -> ModuleSpec:
    """Spec of one transformer layer.

    Args:
        config: the model's TransformerConfig (normalization, qk_layernorm).
        transformer_impl: ``local`` (megatron-core modules, CPU and GPU) or
            ``transformer_engine`` (needed for FP8).
    """
    if transformer_impl == "transformer_engine":
        if not lazy.available("transformer_engine"):
            raise ConfigError(
                "--transformer-impl transformer_engine needs Transformer Engine, which does not import "
                "here: pip install 'megatron-rgm[te]' on a CUDA machine, or use --transformer-impl local"
            )

        return get_gpt_layer_with_transformer_engine_spec(num_experts=config.num_moe_experts, moe_grouped_gemm=False,
                                                          qk_layernorm=config.qk_layernorm)
    if transformer_impl != "local":
        raise ConfigError(f"--transformer-impl must be local or transformer_engine, got {transformer_impl!r}")
    if config.num_moe_experts:
        router_without_transformer_engine()
        if config.add_bias_linear:
            biased_experts_train()
    if config.window_size is not None:
        windows_keep_the_mask()
    spec = get_gpt_layer_local_spec(num_experts=config.num_moe_experts, moe_grouped_gemm=False,
                                    qk_layernorm=config.qk_layernorm, normalization=config.normalization)
    sub = spec.submodules
    sub.input_layernorm = RGMNorm
    sub.pre_mlp_layernorm = RGMNorm
    attn = sub.self_attention.submodules
    if config.context_parallel_size > 1:
        attn.core_attention = ContextParallelAttention
    if attn.q_layernorm is not IdentityOp:
        attn.q_layernorm = RGMNorm
        attn.k_layernorm = RGMNorm
    return spec


def block_spec(config: TransformerConfig, transformer_impl: str = "local", vp_stage: int | None = None):
    """Spec of this pipeline stage's transformer block (its layers and final norm)."""
    spec = layer_spec(config, transformer_impl)
    if transformer_impl == "transformer_engine":
        return spec  # megatron picks TENorm for the final norm itself
    return TransformerBlockSubmodules(
        layer_specs=[spec] * get_num_layers_to_build(config, vp_stage=vp_stage), layer_norm=RGMNorm
    )
