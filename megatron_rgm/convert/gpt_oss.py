"""GPT-OSS (``GptOssForCausalLM``) <-> Megatron, and the attention features it brings: YaRN, windows, sinks.

What GPT-OSS adds to a Qwen3-MoE-like layer, and how each maps onto megatron-core:

* every linear has a bias (q, k, v, o, the router, each expert's two): ``add_bias_linear``;
* a learned sink logit per head (``self_attn.sinks``) joins each softmax and is dropped after it:
  ``softmax_type='learnable'``, the attention's ``core_attention.softmax_offset``;
* ``layer_types`` alternates ``sliding_attention`` and ``full_attention``: HF's ``sliding_window`` N lets a
  token see itself and the N - 1 before it, megatron-core's ``window_size=(N - 1, 0)`` on the layers
  ``window_attn_skip_freq=2`` leaves windowed (layer 1, 3, ... counted from 1);
* YaRN RoPE (``rope_type: yarn``, ``truncate: false``): megatron-core's ``YarnRotaryEmbedding`` with
  ``correction_range_round_to_int`` false; its attention factor scales cos and sin (of q and k), as in HF;
* the experts' gate and up projections are one ``[experts, hidden, 2 x ffn]`` tensor whose columns interleave
  gate and up (gate at even columns), ``x @ W`` rather than ``W @ x``; the activation is
  ``(clamp(up, -7, 7) + 1) * quick_gelu(clamp(gate, max=7))``: ``quick_geglu`` with ``glu_linear_offset=1`` and
  ``activation_func_clamp_value=7``;
* the router is ``mlp.router`` (weight and bias); top-k of its logits, softmax over those k (megatron's default);
* the hub's checkpoints keep the experts' two weights in MXFP4 (``quantization_config.quant_method: mxfp4``):
  ``{name}_blocks`` ``[experts, out, in / 32, 16]`` (two 4-bit E2M1 values a byte, the low nibble first) and
  ``{name}_scales`` ``[experts, out, in / 32]`` (a power of two per 32 values, biased by 127). They are read
  dequantized (exactly: every value is a small float times a power of two); the export writes the bf16 layout.
"""

from __future__ import annotations

import math
import re
from typing import Callable

import torch

from megatron_rgm.config import ConfigError

EXPERTS = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.(linear_fc1|linear_fc2)\.(weight|bias)$")
# HF's fused expert tensors: which Megatron tensor each comes from, and how (transposed, interleaved).
FUSED = {("linear_fc1", "weight"): "gate_up_proj", ("linear_fc1", "bias"): "gate_up_proj_bias",
         ("linear_fc2", "weight"): "down_proj", ("linear_fc2", "bias"): "down_proj_bias"}
# Megatron per-layer name -> HF per-layer name of GPT-OSS's tensors laid out alike.
SAME_LAYOUT = {"self_attention.core_attention.softmax_offset": "self_attn.sinks",
               "self_attention.linear_proj.bias": "self_attn.o_proj.bias",
               "mlp.router.weight": "mlp.router.weight", "mlp.router.bias": "mlp.router.bias"}
QUICK_GELU_ALPHA = 1.702  # megatron-core's quick_gelu: x * sigmoid(1.702 x)
# The 16 values of a 4-bit E2M1 code (its high bit the sign).
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def yarn_flags(rope: dict, cfg: dict, problems: list[str]) -> dict:
    """The :class:`ModelConfig` fields of an HF YaRN ``rope_parameters`` (any family); what they cannot carry is
    appended to ``problems``."""
    factor = rope.get("factor")
    # transformers' order: a top-level original_max_position_embeddings (Phi-3's), the RoPE dict's, the positions
    original = (cfg.get("original_max_position_embeddings") or rope.get("original_max_position_embeddings")
                or cfg.get("max_position_embeddings"))
    if original is None:
        problems.append("YaRN RoPE without original_max_position_embeddings or max_position_embeddings")
        return {}
    if factor is None:
        factor = (cfg.get("max_position_embeddings") or original) / original
    mscale, mscale_all_dim = rope.get("mscale"), rope.get("mscale_all_dim")
    if not (mscale and mscale_all_dim):  # HF then takes the attention factor from the factor alone
        mscale, mscale_all_dim = 1.0, 0.0
    flags = {"position_embedding_type": "yarn", "rotary_scaling_factor": float(factor),
             "yarn_original_max_position_embeddings": int(original),
             "yarn_beta_fast": float(rope.get("beta_fast") or 32), "yarn_beta_slow": float(rope.get("beta_slow") or 1),
             "yarn_correction_range_round_to_int": bool(rope.get("truncate", True)),
             "mscale": float(mscale), "mscale_all_dim": float(mscale_all_dim)}
    given = rope.get("attention_factor")
    if given is not None:
        def m(k: float) -> float:
            return 1.0 if factor <= 1 else 0.1 * k * math.log(factor) + 1.0

        if abs(given - m(mscale) / m(mscale_all_dim)) > 1e-6:
            problems.append(f"YaRN attention_factor={given} (converted: the one the factor and mscales give)")
    return flags


def window_flags(cfg: dict, problems: list[str]) -> dict:
    """``sliding_window`` and ``window_attn_skip_freq`` of a config whose ``layer_types`` mix windowed and full
    layers; a pattern megatron-core's skip frequency cannot express is appended to ``problems``."""
    types = cfg.get("layer_types") or []
    windowed = [t == "sliding_attention" for t in types]
    if not any(windowed):
        return {}
    others = sorted({t for t in types if t not in ("sliding_attention", "full_attention")})
    if others:
        problems.append(f"layer_types {others}")
    window = cfg.get("sliding_window")
    if not window:
        problems.append("sliding_attention layers without a sliding_window")
        return {}
    if all(windowed):
        return {"sliding_window": int(window)}
    for freq in range(2, len(types) + 1):  # megatron-core: layer n (from 1) is full where n % freq == 0
        if windowed == [(i + 1) % freq != 0 for i in range(len(types))]:
            return {"sliding_window": int(window), "window_attn_skip_freq": freq}
    problems.append(f"layer_types {types} (converted: every layer windowed, or every K-th layer full)")
    return {}


def gpt_oss_problems(cfg: dict) -> list[str]:
    """What a GPT-OSS config holds that the conversion does not carry."""
    # transformers fills these in when config.json leaves them out (YaRN x32, alternating windows): written out,
    # what the file says is what converts.
    problems = [f"no {name} in the config (transformers would take GPT-OSS's defaults): write it out"
                for name, keys in (("layer_types", ("layer_types",)),
                                   ("rope_parameters", ("rope_parameters", "rope_scaling")),
                                   ("num_local_experts", ("num_local_experts",)))
                if not any(cfg.get(k) for k in keys)]
    if cfg.get("swiglu_alpha", QUICK_GELU_ALPHA) != QUICK_GELU_ALPHA:
        problems.append(f"swiglu_alpha={cfg['swiglu_alpha']} (megatron-core's quick_gelu has {QUICK_GELU_ALPHA})")
    method = (cfg.get("quantization_config") or {}).get("quant_method")
    if cfg.get("quantization_config") and method != "mxfp4":
        problems.append(f"quantization_config {method!r} (converted: the hub's mxfp4 experts, or none)")
    if method == "mxfp4" and (cfg.get("hidden_size", 0) % 32 or cfg.get("intermediate_size", 0) % 32):
        problems.append("mxfp4 experts whose widths are not multiples of its 32-value blocks")
    if not cfg.get("attention_bias", True):
        problems.append("attention_bias=false (GPT-OSS converts with biased attention)")
    return problems


def gpt_oss_fields(cfg: dict) -> dict:
    """HFArch fields of a GPT-OSS config beyond the common ones."""
    return {"num_experts": cfg["num_local_experts"], "moe_ffn_hidden_size": cfg["intermediate_size"],
            "moe_topk": cfg.get("num_experts_per_tok", 4), "moe_norm_topk": True,
            "moe_aux_loss_coeff": float(cfg.get("router_aux_loss_coef", 0.0)), "linear_bias": True, "sinks": True,
            "swiglu_limit": float(cfg.get("swiglu_limit", 7.0)),
            "mxfp4": (cfg.get("quantization_config") or {}).get("quant_method") == "mxfp4"}


def hf_names(arch, p: str) -> dict[str, tuple[int, ...]]:
    """GPT-OSS's per-layer tensors beyond the attention weights and norms (prefix ``p``), with shapes."""
    h, hd, e, f = arch.hidden_size, arch.head_dim, arch.num_experts, arch.moe_ffn_hidden_size
    names = {p + "self_attn.sinks": (arch.num_heads,), p + "self_attn.o_proj.bias": (h,),
             p + "self_attn.q_proj.bias": (arch.num_heads * hd,), p + "self_attn.k_proj.bias": (arch.num_kv_heads * hd,),
             p + "self_attn.v_proj.bias": (arch.num_kv_heads * hd,),
             p + "mlp.router.weight": (e, h), p + "mlp.router.bias": (e,),
             p + "mlp.experts.gate_up_proj_bias": (e, 2 * f), p + "mlp.experts.down_proj_bias": (e, h)}
    for name, (rows, cols) in (("gate_up_proj", (h, 2 * f)), ("down_proj", (f, h))):
        if arch.mxfp4:  # stored [out, in]: the values of a block run along the input
            names[f"{p}mlp.experts.{name}_blocks"] = (e, cols, rows // 32, 16)
            names[f"{p}mlp.experts.{name}_scales"] = (e, cols, rows // 32)
        else:
            names[f"{p}mlp.experts.{name}"] = (e, rows, cols)
    return names


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One expert's MXFP4 weight, ``blocks [out, in / 32, 16]`` and ``scales [out, in / 32]``, as the unquantized
    checkpoint holds it: ``[in, out]``."""
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32)
    values = torch.stack([lut[(blocks & 0x0F).long()], lut[(blocks >> 4).long()]], dim=-1)  # low nibble first
    values = torch.ldexp(values.reshape(*blocks.shape[:-1], 32), scales.to(torch.int32)[..., None] - 127)
    return values.reshape(blocks.shape[0], -1).t().to(dtype).contiguous()


def mxfp4_expert(expert: Callable[[str, int], torch.Tensor], dtype: torch.dtype) -> Callable[[str, int], torch.Tensor]:
    """``expert(hf_name, e)`` for a checkpoint whose expert weights are MXFP4 (their biases are not)."""
    def read(name: str, e: int) -> torch.Tensor:
        if name.endswith("_bias"):
            return expert(name, e)
        return dequantize_mxfp4(expert(f"{name}_blocks", e), expert(f"{name}_scales", e), dtype)

    return read


def megatron_tensor(rest: str, p: str, get: Callable[[str], torch.Tensor],
                    expert: Callable[[str, int], torch.Tensor]) -> torch.Tensor | None:
    """The full Megatron tensor ``decoder.layers.{i}.{rest}`` of a GPT-OSS layer (HF prefix ``p``) where its
    layout is GPT-OSS's own, else None. ``expert(hf_name, e)`` reads expert e's slice of a fused tensor."""
    if rest in SAME_LAYOUT:
        return get(p + SAME_LAYOUT[rest])
    m = EXPERTS.match(rest)
    if not m:
        return None
    e, fc, kind = int(m.group(1)), m.group(2), m.group(3)
    t = expert(f"{p}mlp.experts.{FUSED[fc, kind]}", e)
    if fc == "linear_fc2":
        return t.t().contiguous() if kind == "weight" else t
    t = t.t() if kind == "weight" else t  # [2 ffn, hidden]: gate rows at even indices, up at odd
    return torch.cat([t[0::2], t[1::2]]).contiguous()


def hf_tensors(rest: str, p: str, tensor: torch.Tensor) -> dict[str, torch.Tensor] | None:
    """Inverse of :func:`megatron_tensor`. An expert's tensor comes back as ``{name: (e, slice)}`` pieces of a
    fused HF tensor, for :class:`ExpertStacker`; None where the layout is not GPT-OSS's own."""
    if rest in SAME_LAYOUT:
        return {p + SAME_LAYOUT[rest]: tensor}
    m = EXPERTS.match(rest)
    if not m:
        return None
    e, fc, kind = int(m.group(1)), m.group(2), m.group(3)
    name = f"{p}mlp.experts.{FUSED[fc, kind]}"
    if fc == "linear_fc2":
        return {name: (e, tensor.t() if kind == "weight" else tensor)}
    gate, up = tensor.chunk(2)
    mixed = torch.empty_like(tensor)
    mixed[0::2], mixed[1::2] = gate, up
    return {name: (e, mixed.t() if kind == "weight" else mixed)}


class ExpertStacker:
    """Collects the experts' pieces of each fused HF tensor; a tensor is released once all its experts came."""

    def __init__(self, num_experts: int):
        self.num_experts = num_experts
        self.pending: dict[str, dict[int, torch.Tensor]] = {}

    def add(self, name: str, value) -> torch.Tensor | None:
        if not isinstance(value, tuple):
            return value
        e, piece = value
        parts = self.pending.setdefault(name, {})
        parts[e] = piece.contiguous()
        if len(parts) < self.num_experts:
            return None
        del self.pending[name]
        return torch.stack([parts[i] for i in range(self.num_experts)])

    def close(self) -> None:
        if self.pending:
            name, parts = next(iter(self.pending.items()))
            raise ConfigError(f"the checkpoint holds {len(parts)} of {self.num_experts} experts of {name}: it is "
                              "incomplete, re-save it")
