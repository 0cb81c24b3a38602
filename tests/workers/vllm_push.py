"""Worker: a trained Megatron model's weights pushed into a vLLM engine (started with random weights), at this
launch's TP; the engine's greedy tokens against the native sampler's, before and after a push, and again after the
model changed and was pushed once more.

    torchrun --nproc-per-node TP vllm_push.py CHECKPOINT PROMPTS.jsonl OUT.json VLLM_PYTHON
"""

import json
import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

from megatron_rgm import distributed
from megatron_rgm.config import PROMPT_TEMPLATE
from megatron_rgm.convert.mapping import HFArch
from megatron_rgm.model.load import describe_checkpoint, load_model
from megatron_rgm.model.state import full_state, load_full_state
from megatron_rgm.rollout.sampler import Sampler, SamplingParams
from megatron_rgm.rollout.vllm_engine import VLLMEngine
from megatron_rgm.rollout.weight_sync import engine_dir, hf_config, hf_state
from megatron_rgm.steps import StepSegmenter
from megatron_rgm.tokenizer import SentencePieceTokenizer, load_tokenizer, prompt_ids

NEW = 40


@torch.no_grad()
def margins(model, sequences: list[list[int]], prompt_lengths: list[int]) -> list[list[float]]:
    """Top-1 minus top-2 logit at each greedy step of each sequence (full vocabulary, gathered over TP)."""
    out = []
    for seq, p in zip(sequences, prompt_lengths):
        tokens = torch.tensor([seq])
        logits = model(tokens, torch.arange(len(seq))[None], None)
        full = gather_from_tensor_model_parallel_region(logits)[0, p - 1:len(seq) - 1].float()
        top = full.topk(2, dim=-1).values
        out.append((top[:, 0] - top[:, 1]).tolist())
    return out


def native(sampler, prompts, params) -> list[list[int]]:
    rollouts = sampler.generate_batch(prompts, 1, [params] * len(prompts))
    return [r.tokens[0, len(p):int(r.lengths[0])].tolist() for p, r in zip(prompts, rollouts)]


def main() -> None:
    ckpt, prompts_file, out, python = sys.argv[1:5]
    tp = int(os.environ["WORLD_SIZE"])
    checkpoint = describe_checkpoint(ckpt)
    tokenizer = load_tokenizer(checkpoint.tokenizer_path(None))
    loaded = load_model(ckpt, tp, 1, checkpoint=checkpoint)
    model, args = loaded.model, loaded.args
    vocab = checkpoint.sampling_vocab(tokenizer)
    sampler = Sampler(model, vocab, StepSegmenter.from_config(tokenizer, args.rgm), tokenizer)
    problems = [json.loads(line)["problem"] for line in Path(prompts_file).read_text().splitlines()[:6]]
    prompts = [prompt_ids(tokenizer, PROMPT_TEMPLATE, p) for p in problems]
    params = SamplingParams(temperature=0, max_new_tokens=NEW, eos_token_ids=[tokenizer.eos_token_id])
    config = hf_config(args, vocab, isinstance(tokenizer, SentencePieceTokenizer))
    arch = HFArch.from_config(config)
    result = {"tp": ps.get_tensor_model_parallel_world_size()}

    engine = None
    tmp = tempfile.TemporaryDirectory()
    if dist.get_rank() == 0:
        engine = VLLMEngine(str(engine_dir(Path(tmp.name), config, tokenizer, PROMPT_TEMPLATE)), python=python,
                            threads=1, kv_cache_bytes=256 << 20, max_model_len=args.max_position_embeddings,
                            dummy=True)
        result["dummy"] = [t for t, _ in (g[0] for g in engine.generate(prompts, 1, [params] * len(prompts),
                                                                        [NEW] * len(prompts)))]
    for phase in ("trained", "changed"):
        if phase == "changed":  # the weights move, as an optimizer step moves them; the engine must follow
            full = full_state(model)  # changed whole, then re-split: replicated weights stay equal on all ranks
            gen = torch.Generator().manual_seed(1)
            for name in sorted(full):
                if not name.startswith("sprm_head."):
                    t = full[name]
                    t.add_(torch.randn(t.shape, generator=gen) * 0.02 * t.abs().mean())
            load_full_state(model, full)
        mine = native(sampler, prompts, params)
        state = hf_state(model, arch)
        result[phase] = {"native": mine,
                         "margins": margins(model, [p + t for p, t in zip(prompts, mine)], [len(p) for p in prompts])}
        if engine is not None:
            result[phase]["pushed"] = engine.load_weights(state.items())
            result[phase]["vllm"] = [g[0][0] for g in engine.generate(prompts, 1, [params] * len(prompts),
                                                                      [NEW] * len(prompts))]
    if engine is not None:
        engine.close()
        result["hf_names"], result["expected_names"] = sorted(state), sorted(arch.hf_names())
        Path(out).write_text(json.dumps(result))
    dist.barrier()
    distributed.shutdown()


if __name__ == "__main__":
    main()
