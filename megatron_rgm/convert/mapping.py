"""HF (Qwen2, Qwen3, Qwen3-MoE, Llama, Mistral, GPT-OSS: :mod:`.gpt_oss`) <-> Megatron tensor names and layouts,
one full tensor at a time.

Megatron-side names are RGMModel's full (TP=1, PP=1) parameter names, e.g.
``decoder.layers.3.self_attention.linear_qkv.weight``. Layouts that differ:

* ``linear_qkv`` stacks, for each KV group g: the group's query heads, then
  k_g, then v_g (HF keeps q, k and v apart);
* ``linear_fc1`` stacks [gate; up] (each expert's too: HF's ``mlp.experts.{e}.gate_proj`` and ``up_proj``
  become ``mlp.experts.local_experts.{e}.linear_fc1``; the router is HF's ``mlp.gate``);
* embeddings and the output layer are padded with zero rows to the TP-padded vocabulary.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import torch

from megatron_rgm.config import ConfigError, ModelConfig
from megatron_rgm.convert import gpt_oss

SUPPORTED = {"Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3", "Qwen3MoeForCausalLM": "qwen3_moe",
             "LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "GptOssForCausalLM": "gpt_oss"}


# megatron-core's Llama 3.x RoPE scaling takes the factor; these three it fixes (RotaryEmbedding._apply_scaling).
LLAMA3_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def _rope_config(cfg: dict) -> dict:
    """The RoPE parameters of an HF config: ``rope_scaling`` (transformers 4) or ``rope_parameters`` (5)."""
    return cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}


def rope_scaling(cfg: dict) -> dict | None:
    """``{"rope_type", "factor"}`` of a config's RoPE scaling, None when it has none (refusals:
    :func:`refuse_unconverted_features`)."""
    rope = _rope_config(cfg)
    kind = rope.get("rope_type", rope.get("type")) or "default"
    return None if kind in ("default", "yarn") else {"rope_type": kind, "factor": float(rope["factor"])}


def rope_flags(scaling: dict | None) -> dict:
    """The :class:`ModelConfig` fields of a RoPE scaling (megatron-core's names)."""
    if scaling is None:
        return {}
    if scaling["rope_type"] == "llama3":
        return {"use_rope_scaling": True, "rope_scaling_factor": scaling["factor"]}
    return {"rotary_seq_len_interpolation_factor": scaling["factor"]}


def attention_features(cfg: dict, problems: list[str]) -> dict:
    """The :class:`ModelConfig` fields of a config's YaRN RoPE and sliding windows (GPT-OSS's on some layers,
    Mistral's on all); what they cannot carry is appended to ``problems``."""
    rope = _rope_config(cfg)
    out = gpt_oss.yarn_flags(rope, cfg, problems) if rope.get("rope_type", rope.get("type")) == "yarn" else {}
    if "GptOssForCausalLM" in (cfg.get("architectures") or []):
        out.update(gpt_oss.window_flags(cfg, problems))
    elif _mistral_window(cfg):
        out["sliding_window"] = int(cfg["sliding_window"])
    return out


def _mistral_window(cfg: dict) -> bool:
    """A Mistral config whose window transformers applies to every layer (no per-layer types)."""
    return cfg.get("model_type") == "mistral" and bool(cfg.get("sliding_window")) and not cfg.get("layer_types")


def refuse_unconverted_features(cfg: dict, source: str) -> None:
    """Raise, naming each one, for the features of an HF config that change what the model computes and that the
    conversion does not carry over (converted: RoPE theta, Llama 3.x, linear and YaRN RoPE scaling, QKV bias, QK
    norm, tied embeddings, GPT-OSS's windows, sinks and biases; anything else is refused here, never dropped)."""
    oss = "GptOssForCausalLM" in (cfg.get("architectures") or [])
    problems = gpt_oss.gpt_oss_problems(cfg) if oss else []
    attention_features(cfg, problems)
    act = cfg.get("hidden_act", "silu")
    if act != "silu" and not oss:  # GPT-OSS's MLP is its own (swiglu_alpha, swiglu_limit), whatever hidden_act says
        problems.append(f"hidden_act={act!r} (the MLP converts as SwiGLU: silu)")
    rope = _rope_config(cfg)
    kind = rope.get("rope_type", rope.get("type")) or "default"
    if kind == "llama3":
        off = {k: rope.get(k) for k, v in LLAMA3_FIXED.items() if rope.get(k) != v}
        if off:
            problems.append(f"llama3 RoPE scaling with {off} (megatron-core's Llama 3.x scaling fixes {LLAMA3_FIXED})")
    elif kind not in ("default", "linear", "yarn"):
        problems.append(f"RoPE scaling rope_type={kind!r} (converted: linear, llama3 and yarn)")
    if kind not in ("default", "yarn") and "factor" not in rope:
        problems.append(f"RoPE scaling {kind!r} without a factor")
    if cfg.get("partial_rotary_factor", 1.0) != 1.0:
        problems.append(f"partial_rotary_factor={cfg['partial_rotary_factor']} (RoPE on part of each head)")
    # A sliding window: Qwen's use_sliding_window (from max_window_layers on); transformers 5's per-layer types.
    # GPT-OSS's and Mistral's convert (attention_features).
    windowed = [t for t in cfg.get("layer_types") or [] if t != "full_attention"]
    if oss or _mistral_window(cfg):
        pass
    elif windowed:
        problems.append(f"layer_types with {len(windowed)} {windowed[0]!r} layers (sliding-window attention)")
    elif cfg.get("use_sliding_window"):
        problems.append(f"sliding_window={cfg.get('sliding_window')} (sliding-window attention)")
    if cfg.get("mlp_bias"):
        problems.append("mlp_bias=true (the MLP converts without biases)")
    if cfg.get("decoder_sparse_step", 1) != 1 or cfg.get("mlp_only_layers"):
        problems.append(f"dense layers between the MoE layers (decoder_sparse_step={cfg.get('decoder_sparse_step')}, "
                        f"mlp_only_layers={cfg.get('mlp_only_layers')}; converted: experts in every layer)")
    if cfg.get("shared_expert_intermediate_size"):
        problems.append("a shared expert (shared_expert_intermediate_size)")
    if problems:
        raise ConfigError(f"{source}: the conversion does not carry over {'; '.join(problems)}: the converted model "
                          "would compute something else, so it is refused (convert a model without these features)")


@dataclass
class HFArch:
    """What the conversion needs from an HF ``config.json``."""

    kind: str  # qwen2 | qwen3 | llama
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rope_theta: float
    norm_eps: float
    qkv_bias: bool
    qk_norm: bool
    o_bias: bool  # Llama's attention_bias also biases o_proj: RGMModel has none, so it must be zero (checked)
    tied: bool
    max_position_embeddings: int
    dtype: str  # float32 | bfloat16 | float16: the Megatron model is built in the checkpoint's dtype
    rope_scaling: dict | None  # {"rope_type": "llama3" | "linear", "factor": f} (others are refused)
    config: dict
    num_experts: int | None = None  # MoE (qwen3_moe): experts per layer, each of moe_ffn_hidden_size
    moe_ffn_hidden_size: int | None = None
    moe_topk: int = 2
    moe_norm_topk: bool = True  # HF's norm_topk_prob: the top k weights renormalised (megatron: no pre-softmax)
    moe_aux_loss_coeff: float = 0.0
    linear_bias: bool = False  # every linear biased (GPT-OSS): o_proj, the router, the experts
    sinks: bool = False  # a learned sink logit per head (GPT-OSS's self_attn.sinks)
    swiglu_limit: float | None = None  # GPT-OSS's MLP: quick_geglu, linear offset 1, this clamp
    features: dict | None = None  # ModelConfig fields of YaRN and sliding windows (attention_features)
    mxfp4: bool = False  # GPT-OSS's experts stored in MXFP4 (the hub's files), read dequantized

    @classmethod
    def from_config(cls, cfg: dict, source: str = "config.json") -> "HFArch":
        archs = cfg.get("architectures") or []
        kind = next((SUPPORTED[a] for a in archs if a in SUPPORTED), None)
        if kind is None:
            raise ConfigError(f"{source}: architecture {archs or cfg.get('model_type')!r} is not supported; "
                              f"supported: {', '.join(SUPPORTED)}")
        refuse_unconverted_features(cfg, source)
        heads = cfg["num_attention_heads"]
        moe = _moe_fields(cfg) if kind == "qwen3_moe" else gpt_oss.gpt_oss_fields(cfg) if kind == "gpt_oss" else {}
        rope = cfg.get("rope_theta")
        if rope is None:  # transformers 5 keeps it under rope_parameters
            rope = (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0)
        return cls(
            kind=kind,
            num_layers=cfg["num_hidden_layers"],
            hidden_size=cfg["hidden_size"],
            ffn_hidden_size=cfg["intermediate_size"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            vocab_size=cfg["vocab_size"],
            rope_theta=float(rope),
            norm_eps=cfg.get("rms_norm_eps", 1e-6),
            qkv_bias=kind in ("qwen2", "gpt_oss") or bool(cfg.get("attention_bias", False)),
            qk_norm=kind in ("qwen3", "qwen3_moe"),
            o_bias=kind == "llama" and bool(cfg.get("attention_bias", False)),
            tied=bool(cfg.get("tie_word_embeddings", False)),
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32"),
            rope_scaling=rope_scaling(cfg),
            config=cfg, features=attention_features(cfg, []),
            **moe,
        )

    def model_config(self, divisible_by: int = 128) -> ModelConfig:
        """The geometry of the matching RGMModel."""
        return ModelConfig(
            num_layers=self.num_layers, hidden_size=self.hidden_size, ffn_hidden_size=self.ffn_hidden_size,
            num_attention_heads=self.num_heads, num_query_groups=self.num_kv_heads, kv_channels=self.head_dim,
            vocab_size=self.vocab_size, make_vocab_size_divisible_by=divisible_by,
            seq_length=min(self.max_position_embeddings, 4096), max_position_embeddings=self.max_position_embeddings,
            normalization="RMSNorm", norm_epsilon=self.norm_eps,
            rotary_base=int(self.rope_theta), disable_bias_linear=not self.linear_bias, add_qkv_bias=self.qkv_bias,
            qk_layernorm=self.qk_norm, untie_embeddings_and_output_weights=not self.tied, **self._gpt_oss_flags(),
            bf16=self.dtype == "bfloat16", fp16=self.dtype == "float16", **rope_flags(self.rope_scaling),
            num_experts=self.num_experts, moe_ffn_hidden_size=self.moe_ffn_hidden_size, moe_router_topk=self.moe_topk,
            moe_router_pre_softmax=not self.moe_norm_topk, moe_aux_loss_coeff=self.moe_aux_loss_coeff,
            **{"position_embedding_type": "rope", **(self.features or {})})

    def _gpt_oss_flags(self) -> dict:
        if self.swiglu_limit is None:
            return {"swiglu": True}
        return {"quick_geglu": True, "glu_linear_offset": 1.0, "activation_func_clamp_value": self.swiglu_limit,
                "softmax_type": "learnable" if self.sinks else "vanilla"}

    def hf_names(self) -> dict[str, tuple[int, ...]]:
        """Every tensor an HF checkpoint of this architecture holds, with its shape."""
        h, hd = self.hidden_size, self.head_dim
        names = {"model.embed_tokens.weight": (self.vocab_size, h), "model.norm.weight": (h,)}
        if not self.tied:
            names["lm_head.weight"] = (self.vocab_size, h)
        for i in range(self.num_layers):
            p = f"model.layers.{i}."
            names.update({
                p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                p + "self_attn.q_proj.weight": (self.num_heads * hd, h),
                p + "self_attn.k_proj.weight": (self.num_kv_heads * hd, h),
                p + "self_attn.v_proj.weight": (self.num_kv_heads * hd, h),
                p + "self_attn.o_proj.weight": (h, self.num_heads * hd),
            })
            if self.kind == "gpt_oss":
                names.update(gpt_oss.hf_names(self, p))
            elif self.num_experts:
                f = self.moe_ffn_hidden_size
                names[p + "mlp.gate.weight"] = (self.num_experts, h)
                for e in range(self.num_experts):
                    q = f"{p}mlp.experts.{e}."
                    names.update({q + "gate_proj.weight": (f, h), q + "up_proj.weight": (f, h),
                                  q + "down_proj.weight": (h, f)})
            else:
                names.update({p + "mlp.gate_proj.weight": (self.ffn_hidden_size, h),
                              p + "mlp.up_proj.weight": (self.ffn_hidden_size, h),
                              p + "mlp.down_proj.weight": (h, self.ffn_hidden_size)})
            if self.qkv_bias and self.kind != "gpt_oss":
                names.update({p + "self_attn.q_proj.bias": (self.num_heads * hd,),
                              p + "self_attn.k_proj.bias": (self.num_kv_heads * hd,),
                              p + "self_attn.v_proj.bias": (self.num_kv_heads * hd,)})
            if self.o_bias:
                names[p + "self_attn.o_proj.bias"] = (h,)
            if self.qk_norm:
                names.update({p + "self_attn.q_norm.weight": (hd,), p + "self_attn.k_norm.weight": (hd,)})
        return names


def _moe_fields(cfg: dict) -> dict:
    """A Qwen3-MoE config's experts (transformers 5 also writes ``num_experts`` as ``num_local_experts``)."""
    return {"num_experts": cfg.get("num_experts") or cfg["num_local_experts"],
            "moe_ffn_hidden_size": cfg["moe_intermediate_size"], "moe_topk": cfg.get("num_experts_per_tok", 8),
            "moe_norm_topk": bool(cfg.get("norm_topk_prob", False)),
            "moe_aux_loss_coeff": float(cfg.get("router_aux_loss_coef", 0.0))}


LAYER_NAME = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
EXPERT = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.(linear_fc1|linear_fc2)\.weight$")
STACKED_EXPERTS = re.compile(r"^mlp\.experts\.experts\.(linear_fc1|linear_fc2)\.(weight|bias)$")

# Megatron per-layer name -> HF per-layer name, where the layout is the same.
SAME_NAMES = {
    "input_layernorm.weight": "input_layernorm.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "self_attention.q_layernorm.weight": "self_attn.q_norm.weight",
    "self_attention.k_layernorm.weight": "self_attn.k_norm.weight",
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
}


def _hf_mlp(rest: str, p: str) -> tuple[str, str] | None:
    """For a layer's MLP weight that HF splits or names apart (the dense ``linear_fc1``, an expert's ``linear_fc1``
    and ``linear_fc2``): the HF prefix its ``gate_proj`` / ``up_proj`` / ``down_proj`` sit under, and which fc."""
    if rest == "mlp.linear_fc1.weight":
        return p + "mlp.", "linear_fc1"
    e = EXPERT.match(rest)
    return (f"{p}mlp.experts.{e.group(1)}.", e.group(2)) if e else None


def _qkv_merge(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, arch: HFArch) -> torch.Tensor:
    groups, hd = arch.num_kv_heads, arch.head_dim
    per = arch.num_heads // groups
    q = q.reshape(groups, per * hd, *q.shape[1:])
    k = k.reshape(groups, hd, *k.shape[1:])
    v = v.reshape(groups, hd, *v.shape[1:])
    return torch.cat([q, k, v], dim=1).reshape(-1, *q.shape[2:])


def _qkv_split(qkv: torch.Tensor, arch: HFArch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    groups, hd = arch.num_kv_heads, arch.head_dim
    per = arch.num_heads // groups
    x = qkv.reshape(groups, (per + 2) * hd, *qkv.shape[1:])
    q, k, v = x.split([per * hd, hd, hd], dim=1)
    return (q.reshape(-1, *qkv.shape[1:]).contiguous(), k.reshape(-1, *qkv.shape[1:]).contiguous(),
            v.reshape(-1, *qkv.shape[1:]).contiguous())


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    if t.shape[0] == rows:
        return t
    return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])])


def megatron_tensor(name: str, get: Callable[[str], torch.Tensor], arch: HFArch, padded_vocab: int,
                    expert: Callable[[str, int], torch.Tensor] | None = None) -> torch.Tensor:
    """The full Megatron tensor ``name`` built from HF tensors (``get(hf_name)``; ``expert(hf_name, e)``: expert
    e's slice of a fused expert tensor, default ``get(hf_name)[e]``)."""
    if name == "embedding.word_embeddings.weight":
        return _pad_rows(get("model.embed_tokens.weight"), padded_vocab)
    if name == "output_layer.weight":
        return _pad_rows(get("model.embed_tokens.weight" if arch.tied else "lm_head.weight"), padded_vocab)
    if name == "decoder.final_layernorm.weight":
        return get("model.norm.weight")
    m = LAYER_NAME.match(name)
    if not m:
        raise KeyError(f"no HF source for Megatron tensor {name}")
    p, rest = f"model.layers.{m.group(1)}.", m.group(2)
    if arch.kind == "gpt_oss":
        expert = expert or (lambda n, e: get(n)[e])
        if arch.mxfp4:
            expert = gpt_oss.mxfp4_expert(expert, {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(
                arch.dtype, torch.float32))
        t = gpt_oss.megatron_tensor(rest, p, get, expert)
        if t is not None:
            return t
    if rest in SAME_NAMES:
        return get(p + SAME_NAMES[rest])
    if rest in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"):
        kind = rest.rsplit(".", 1)[1]
        return _qkv_merge(*(get(f"{p}self_attn.{x}_proj.{kind}") for x in "qkv"), arch)
    if rest == "mlp.router.weight":
        return get(p + "mlp.gate.weight")
    mlp = _hf_mlp(rest, p)
    if mlp:
        q, fc = mlp
        if fc == "linear_fc2":
            return get(q + "down_proj.weight")
        return torch.cat([get(q + "gate_proj.weight"), get(q + "up_proj.weight")])
    raise KeyError(f"no HF source for Megatron tensor {name}")


def hf_tensors(name: str, tensor: torch.Tensor, arch: HFArch) -> dict[str, torch.Tensor]:
    """HF tensors of one full Megatron tensor (inverse of :func:`megatron_tensor`; vocab padding dropped)."""
    if name == "embedding.word_embeddings.weight":
        return {"model.embed_tokens.weight": tensor[: arch.vocab_size]}
    if name == "output_layer.weight":
        return {} if arch.tied else {"lm_head.weight": tensor[: arch.vocab_size]}
    if name == "decoder.final_layernorm.weight":
        return {"model.norm.weight": tensor}
    m = LAYER_NAME.match(name)
    if not m:
        raise KeyError(f"no HF name for Megatron tensor {name}")
    p, rest = f"model.layers.{m.group(1)}.", m.group(2)
    if arch.kind == "gpt_oss" and (out := gpt_oss.hf_tensors(rest, p, tensor)) is not None:
        return out  # an expert's pieces come as {name: (e, piece)}: convert's ExpertStacker joins them
    if rest == "self_attention.linear_proj.weight" and arch.o_bias:
        return {p + "self_attn.o_proj.weight": tensor, p + "self_attn.o_proj.bias": tensor.new_zeros(tensor.shape[0])}
    if rest in SAME_NAMES:
        return {p + SAME_NAMES[rest]: tensor}
    if rest in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"):
        kind = rest.rsplit(".", 1)[1]
        q, k, v = _qkv_split(tensor, arch)
        return {f"{p}self_attn.q_proj.{kind}": q, f"{p}self_attn.k_proj.{kind}": k, f"{p}self_attn.v_proj.{kind}": v}
    if rest == "mlp.router.weight":
        return {p + "mlp.gate.weight": tensor}
    stacked = STACKED_EXPERTS.match(rest)
    if stacked:  # a checkpoint keeps a layer's experts as one [experts, ...] tensor
        per = [hf_tensors(f"decoder.layers.{m.group(1)}.mlp.experts.local_experts.{e}.{stacked.group(1)}."
                          f"{stacked.group(2)}", tensor[e], arch) for e in range(tensor.shape[0])]
        if arch.kind == "gpt_oss":  # so does GPT-OSS: each expert's (e, piece) in place
            return {k: torch.stack([p[k][1] for p in per]).contiguous() for k in per[0]}
        return {k: v for p in per for k, v in p.items()}
    mlp = _hf_mlp(rest, p)
    if mlp:
        q, fc = mlp
        if fc == "linear_fc2":
            return {q + "down_proj.weight": tensor}
        gate, up = tensor.chunk(2)
        return {q + "gate_proj.weight": gate.contiguous(), q + "up_proj.weight": up.contiguous()}
    raise KeyError(f"no HF name for Megatron tensor {name}")
