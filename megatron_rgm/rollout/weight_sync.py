"""The policy's weights, from the Megatron model as it trains to a vLLM engine, under HF names, without a checkpoint.

:func:`hf_state` gathers a model's tensor-parallel shards, pipeline stages and expert-parallel experts into
full tensors and names them as ``mcore-to-hf`` would (:func:`megatron_rgm.convert.mapping.hf_tensors`, the
converter's own mapping); :func:`engine_dir` writes the directory an engine starts from (config and tokenizer,
no weights: the first push brings them).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_rgm.checkpoint import TE_NORM_KEYS
from megatron_rgm.config import ConfigError
from megatron_rgm.convert.gpt_oss import ExpertStacker
from megatron_rgm.convert.hf_config import hf_config_from_args, served_config
from megatron_rgm.convert.mapping import HFArch, hf_tensors
from megatron_rgm.convert.serving import complete_export
from megatron_rgm.model.state import gather_full
from megatron_rgm.tokenizer import is_sentencepiece_dir

_LAYER = re.compile(r"^(decoder\.layers\.\d+\.)(.*)$")


def hf_config(args, vocab_size: int, sentencepiece: bool) -> dict:
    """The HF config of the model ``args`` builds (refused by name when no HF class matches)."""
    config = hf_config_from_args(args, vocab_size)
    if config is None:
        raise ConfigError("--rollout-backend vllm serves the policy as an HF model, and no HF class matches this "
                          "one (served: Qwen2, Qwen3, Qwen3-MoE, Llama, Mistral and GPT-OSS layers): use "
                          "--rollout-backend native")
    return served_config(config, sentencepiece)  # what mcore-to-hf would export it as


def engine_dir(out: Path, config: dict, tokenizer, prompt_template: str) -> Path:
    """Write ``config.json`` and the tokenizer's serving files to ``out`` (an engine started on it with random
    weights takes the real ones from the first push)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer.save_pretrained(str(out))
    if is_sentencepiece_dir(out):
        complete_export(out, prompt_template)
    return out


@torch.no_grad()
def hf_state(model, arch: HFArch) -> dict[str, torch.Tensor]:
    """Every weight of ``model`` (an unwrapped chunk) as full HF-named tensors on the host, on the replica's first
    model-parallel rank (TP rank 0 of the first stage); empty elsewhere. Collective over the tensor-parallel and
    expert-parallel groups, and the pipeline group of TP rank 0. The SPRM head stays out: the engine samples,
    the trainer scores."""
    full = {k: v.cpu() for k, v in gather_full(model).items()}
    if ps.get_expert_model_parallel_world_size() > 1:  # each rank holds its own experts: the others' too
        parts: list[dict | None] = [None] * ps.get_expert_model_parallel_world_size()
        experts = {k: v for k, v in full.items() if ".mlp.experts." in k}
        dist.all_gather_object(parts, experts, group=ps.get_expert_model_parallel_group())
        for part in parts:
            full.update(part)
    if ps.get_tensor_model_parallel_rank() != 0:
        return {}
    stages = ps.get_pipeline_model_parallel_world_size()
    if stages > 1:  # the first stage takes the others' layers
        group = ps.get_pipeline_model_parallel_group()
        first = ps.get_pipeline_model_parallel_rank() == 0
        parts = [None] * stages if first else None
        dist.gather_object(full, parts, dst=dist.get_global_rank(group, 0), group=group)
        if not first:
            return {}
        for part in parts:
            full.update(part)
    stacker = ExpertStacker(arch.num_experts or 0)  # GPT-OSS keeps a layer's experts in one tensor
    out = {}
    for name, tensor in full.items():
        if name.startswith("sprm_head."):
            continue
        m = _LAYER.match(name)
        if m:  # Transformer Engine keeps the pre-norms inside the linear layers
            name = m.group(1) + TE_NORM_KEYS.get(m.group(2), m.group(2))
        for hf_name, value in hf_tensors(name, tensor, arch).items():
            joined = stacker.add(hf_name, value)
            if joined is not None:
                out[hf_name] = joined
    stacker.close()
    return out
