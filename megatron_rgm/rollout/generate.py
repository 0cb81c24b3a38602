"""Prompts jsonl -> rollout store, with the native sampler (Megatron checkpoint) or transformers (HF export).

Megatron backend: run under torchrun (or alone); each data-parallel replica
takes every dp-th prompt and writes its own subgroup of the store (its TP and
PP ranks end with the same samples; TP rank 0 of the last stage writes). HF backend: one process, transformers'
``generate``, then one forward for the old log-probs and the step scores
(:class:`megatron_rgm.hf.RGMScorer`). Either way prompts already in the store
are skipped, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, replace

import numpy as np
import torch
from tqdm import tqdm

from megatron_rgm import distributed
from megatron_rgm.config import PROMPT_TEMPLATE, ConfigError
from megatron_rgm.data.benchmarks import load_benchmark
from megatron_rgm.data.store import RolloutStore, Trajectory, tokenizer_fingerprint
from megatron_rgm.hf import RGMScorer
from megatron_rgm.rollout.rewards import CORRECT, make_verifier
from megatron_rgm.rollout.sampler import Sampler, SamplingParams
from megatron_rgm.steps import StepSegmenter
from megatron_rgm.tokenizer import load_tokenizer


def _trajectories(tokens, prompt_len, lengths, log_probs, step_mask, step_logits, cu, texts, answer, verifier,
                  prompt_id) -> list[Trajectory]:
    out = []
    for i in range(tokens.shape[0]):
        n = int(lengths[i])
        grade = verifier(texts[i], answer)
        steps = step_mask[i, :n].nonzero().flatten().numpy()
        scores = torch.sigmoid(step_logits[int(cu[i]):int(cu[i + 1])]).numpy()
        out.append(Trajectory(tokens=tokens[i, :n].numpy(), response_mask=np.arange(n) >= prompt_len,
                              log_probs=log_probs[i, :n].numpy(), step_positions=steps, step_scores=scores,
                              reward=1.0 if grade.outcome == CORRECT else 0.0, correct=grade.outcome == CORRECT,
                              prompt_id=prompt_id, group_id=prompt_id))
    return out


def check_prompt_lengths(tokenizer, prompts: list[dict], template: str, max_new_tokens: int, limit: int) -> None:
    """Raise, naming the first prompt that with ``max_new_tokens`` does not fit the model's ``limit`` positions.

    Run before the store is opened, so a run that would stop at a long prompt writes nothing.
    """
    for n, prompt in enumerate(prompts, 1):
        length = len(tokenizer.encode(template.format(problem=prompt["problem"]), add_special_tokens=False))
        if length + max_new_tokens > limit:
            raise ConfigError(f"prompt {prompt.get('id', n - 1)} (record {n}) has {length} tokens: with "
                              f"--max-new-tokens {max_new_tokens} it needs {length + max_new_tokens} positions, more "
                              f"than the model's {limit}: shorten or drop that prompt, or lower --max-new-tokens")


def generate_megatron(mcore_path: str, tokenizer_path: str | None, prompts: list[dict], output: str, k: int,
                      params: SamplingParams, verifier: str = "math", tp: int = 1,
                      template: str = PROMPT_TEMPLATE, pp: int = 1) -> None:
    from megatron.core import parallel_state as ps

    from megatron_rgm.model.load import describe_checkpoint, load_model

    checkpoint = describe_checkpoint(mcore_path)
    tokenizer = load_tokenizer(checkpoint.tokenizer_path(tokenizer_path))
    loaded = load_model(mcore_path, tp, pp, checkpoint=checkpoint)
    model, args = loaded.model, loaded.args
    sampler = Sampler(model, checkpoint.sampling_vocab(tokenizer),
                      StepSegmenter.from_tokenizer(tokenizer, args.rgm.sprm_step_tokens), tokenizer)
    if tokenizer.eos_token_id is not None and not params.eos_token_ids:
        params.eos_token_ids = [tokenizer.eos_token_id]
    check_prompt_lengths(tokenizer, prompts, template, params.max_new_tokens, model.max_sequence_length)
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    # Every rank of a model replica ends with the same samples; one of them writes.
    writer = ps.get_tensor_model_parallel_rank() == 0 and ps.is_pipeline_last_stage()
    fingerprint = tokenizer_fingerprint(tokenizer)
    attrs = {"model": str(mcore_path), "k": k, "sampling": asdict(params)}
    if torch.distributed.get_rank() == 0:  # one creator; the other writers open it afterwards
        RolloutStore(output, "a", tokenizer=fingerprint, attrs=attrs)
    torch.distributed.barrier()
    store = RolloutStore(output, "a" if writer else "r", tokenizer=fingerprint)
    done = store.prompt_ids()
    mine = [(i, p) for i, p in enumerate(prompts) if i % dp == dp_rank and i not in done]
    grade = make_verifier(verifier)
    for i, prompt in tqdm(mine, desc=f"rollouts dp{dp_rank}", disable=not writer, file=sys.stdout):
        ids = tokenizer.encode(template.format(problem=prompt["problem"]), add_special_tokens=False)
        # Seeded per prompt: the same draws whatever the layout or the point a run resumed from.
        r = sampler.generate(ids, k, replace(params, seed=params.seed * 1_000_003 + i))
        texts = [tokenizer.decode(r.tokens[j, len(ids):int(r.lengths[j])].tolist()) for j in range(k)]
        if writer:
            store.append(dp_rank, _trajectories(r.tokens, len(ids), r.lengths, r.log_probs, r.step_mask,
                                                r.step_logits, r.cu_steps, texts, prompt["answer"], grade, i))
    torch.distributed.barrier()
    distributed.shutdown()


@torch.no_grad()
def generate_hf(hf_path: str, prompts: list[dict], output: str, k: int, params: SamplingParams,
                verifier: str = "math", template: str = PROMPT_TEMPLATE) -> None:
    scorer = RGMScorer.from_pretrained(hf_path)
    tokenizer, model = scorer.tokenizer, scorer.model
    check_prompt_lengths(tokenizer, prompts, template, params.max_new_tokens, model.config.max_position_embeddings)
    store = RolloutStore(output, "a", tokenizer=tokenizer_fingerprint(tokenizer),
                         attrs={"model": str(hf_path), "k": k, "sampling": asdict(params), "backend": "hf"})
    done = store.prompt_ids()
    grade = make_verifier(verifier)
    eos = params.eos_token_ids or ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else None)
    for i, prompt in tqdm([(i, p) for i, p in enumerate(prompts) if i not in done], desc="rollouts (hf)",
                          file=sys.stdout):
        ids = tokenizer.encode(template.format(problem=prompt["problem"]), add_special_tokens=False)
        torch.manual_seed(params.seed * 1_000_003 + i)
        greedy = params.temperature == 0
        out = model.generate(torch.tensor([ids]), do_sample=not greedy, temperature=None if greedy else params.temperature,
                             top_p=None if greedy else params.top_p, top_k=params.top_k or None,
                             repetition_penalty=params.repetition_penalty, max_new_tokens=params.max_new_tokens,
                             num_return_sequences=k, eos_token_id=eos, pad_token_id=eos[0] if eos else 0)
        lengths = torch.full((k,), out.shape[1])
        if eos:
            for j in range(k):
                hits = torch.isin(out[j, len(ids):], torch.tensor(eos)).nonzero()
                if len(hits):
                    lengths[j] = len(ids) + int(hits[0]) + 1
        # One forward: old log-probs (temperature-scaled, as the sampler reports them) and the step scores.
        response = (torch.arange(out.shape[1]).unsqueeze(0) >= len(ids)) & (
            torch.arange(out.shape[1]).unsqueeze(0) < lengths.unsqueeze(1))
        layout = scorer.segmenter(out, response_mask=response)
        logits, step_logits = scorer.step_logits(out, layout.mask)
        scaled = logits[:, :-1].float() / (params.temperature or 1.0)
        lp = torch.log_softmax(scaled, -1).gather(-1, out[:, 1:, None]).squeeze(-1)
        log_probs = torch.zeros(out.shape, dtype=torch.float32)
        log_probs[:, 1:] = lp * response[:, 1:]
        texts = [tokenizer.decode(out[j, len(ids):int(lengths[j])].tolist()) for j in range(k)]
        store.append(0, _trajectories(out, len(ids), lengths, log_probs, layout.mask, step_logits, layout.cu_steps,
                                      texts, prompt["answer"], grade, i))


def load_prompts(path: str, problem_key: str | None, answer_key: str | None, limit: int | None) -> list[dict]:
    prompts = load_benchmark(path, problem_key, answer_key)
    if not prompts:
        raise ConfigError(f"{path} holds no prompts")
    return prompts[:limit] if limit else prompts
