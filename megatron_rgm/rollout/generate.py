"""Prompts jsonl -> rollout store: the native sampler over a Megatron checkpoint or an HF export.

Megatron backend: run under torchrun (or alone); each data-parallel replica
takes every dp-th prompt and writes its own subgroup of the store (its TP and
PP ranks end with the same samples; TP rank 0 of the last stage writes). HF backend: one process, the same sampler over
the export's transformers model (:class:`~megatron_rgm.rollout.hf_sampler.HFSampler`), so the log-probs and
step scores come from the sampling passes as they do under Megatron. Either way prompts already in the store
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
from megatron_rgm.rollout.hf_sampler import HFSampler
from megatron_rgm.rollout.sampler import Sampler, SamplingParams
from megatron_rgm.rollout.sampling import derive_seed
from megatron_rgm.rollout.vllm_engine import VLLMEngine
from megatron_rgm.rollout.vllm_sampler import VLLMSampler
from megatron_rgm.steps import StepSegmenter
from megatron_rgm.tokenizer import load_tokenizer, prompt_ids

MAX_BATCH = 256  # sequences decoded at once by default (vLLM's max_num_seqs)


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


def check_prompt_lengths(tokenizer, prompts: list[dict], template: str, max_new_tokens: int | None,
                         limit: int) -> None:
    """Raise, naming the first prompt that with ``max_new_tokens`` (None: at least one) does not fit the model's
    ``limit`` positions.

    Run before the store is opened, so a run that would stop at a long prompt writes nothing.
    """
    new = max_new_tokens if max_new_tokens is not None else 1
    for n, prompt in enumerate(prompts, 1):
        length = len(prompt_ids(tokenizer, template, prompt["problem"]))
        if length + new > limit:
            asked = f"--max-new-tokens {new}" if max_new_tokens is not None else "a single new token"
            raise ConfigError(f"prompt {prompt.get('id', n - 1)} (record {n}) has {length} tokens: with "
                              f"{asked} it needs {length + new} positions, more than the model's {limit}: shorten "
                              "or drop that prompt, or lower --max-new-tokens")


def _sample_prompts(sampler, tokenizer, todo: list[tuple[int, dict]], k: int, params: SamplingParams,
                    template: str, verifier: str, write, progress: str, quiet: bool, max_batch: int) -> None:
    """k samples of each (index, prompt) in ``todo``, handed to ``write(trajectories)`` (None: sample only).

    Prompts go to the sampler in chunks whose samples fill ``max_batch`` slots four times over (continuous
    batching refills a finished sequence's slot within a chunk); each chunk's groups are written when it ends.
    """
    grade = make_verifier(verifier)
    chunk = max(1, 4 * max_batch // k)
    with tqdm(total=len(todo), desc=progress, disable=quiet, file=sys.stdout) as bar:
        for at in range(0, len(todo), chunk):
            part = todo[at:at + chunk]
            ids = [prompt_ids(tokenizer, template, prompt["problem"]) for _, prompt in part]
            # Seeded per prompt: the same draws whatever the layout, the chunking or the point a run resumed from.
            rollouts = sampler.generate_batch(ids, k, [replace(params, seed=derive_seed(params.seed, i))
                                                       for i, _ in part], max_batch=max_batch)
            for (i, prompt), p, r in zip(part, ids, rollouts):
                if write is not None:
                    texts = [tokenizer.decode(r.tokens[j, len(p):int(r.lengths[j])].tolist()) for j in range(k)]
                    write(_trajectories(r.tokens, len(p), r.lengths, r.log_probs, r.step_mask, r.step_logits,
                                        r.cu_steps, texts, prompt["answer"], grade, i))
            bar.update(len(part))


def _with_eos(params: SamplingParams, tokenizer) -> SamplingParams:
    """``params`` stopping at the tokenizer's eos unless the user named the stop ids."""
    if tokenizer.eos_token_id is None or params.eos_token_ids:
        return params
    return replace(params, eos_token_ids=[tokenizer.eos_token_id])


def generate_megatron(mcore_path: str, tokenizer_path: str | None, prompts: list[dict], output: str, k: int,
                      params: SamplingParams, verifier: str = "math", tp: int = 1,
                      template: str = PROMPT_TEMPLATE, pp: int = 1, max_batch: int = MAX_BATCH) -> None:
    from megatron.core import parallel_state as ps

    from megatron_rgm.model.load import describe_checkpoint, load_model

    checkpoint = describe_checkpoint(mcore_path)
    tokenizer = load_tokenizer(checkpoint.tokenizer_path(tokenizer_path))
    loaded = load_model(mcore_path, tp, pp, checkpoint=checkpoint)
    model, args = loaded.model, loaded.args
    sampler = Sampler(model, checkpoint.sampling_vocab(tokenizer),
                      StepSegmenter.from_config(tokenizer, args.rgm), tokenizer)
    params = _with_eos(params, tokenizer)
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
    _sample_prompts(sampler, tokenizer, mine, k, params, template, verifier,
                    (lambda group: store.append(dp_rank, group)) if writer else None, f"rollouts dp{dp_rank}",
                    quiet=not writer, max_batch=max_batch)
    torch.distributed.barrier()
    distributed.shutdown()


@torch.no_grad()
def generate_hf(hf_path: str, prompts: list[dict], output: str, k: int, params: SamplingParams,
                verifier: str = "math", template: str = PROMPT_TEMPLATE, max_batch: int = MAX_BATCH,
                vllm_python: str | None = None, vllm: bool = False, kv_cache_gb: float = 2.0) -> None:
    """The same rollouts from an HF export, in this process: the native sampler over transformers' forward, or
    (``vllm``) vLLM's samples scored by that forward."""
    scorer = RGMScorer.from_pretrained(hf_path)
    tokenizer = scorer.tokenizer
    params = _with_eos(params, tokenizer)
    if vllm and params.repetition_penalty != 1.0:
        raise ConfigError("--repetition-penalty with --backend vllm: the store's log-probs come from a forward of "
                          "the export, without the penalty vLLM sampled with; drop it, or use --backend hf")
    # Before the engine's slow start: a prompt that cannot fit is named now.
    check_prompt_lengths(tokenizer, prompts, template, params.max_new_tokens,
                         scorer.model.config.max_position_embeddings)
    sampler = open_sampler(hf_path, scorer, tokenizer, scorer.segmenter, vllm, vllm_python, max_batch, kv_cache_gb)
    try:
        store = RolloutStore(output, "a", tokenizer=tokenizer_fingerprint(tokenizer),
                             attrs={"model": str(hf_path), "k": k, "sampling": asdict(params),
                                    "backend": "vllm" if vllm else "hf"})
        done = store.prompt_ids()
        todo = [(i, p) for i, p in enumerate(prompts) if i not in done]
        _sample_prompts(sampler, tokenizer, todo, k, params, template, verifier, lambda group: store.append(0, group),
                        f"rollouts ({'vllm' if vllm else 'hf'})", quiet=False, max_batch=max_batch)
        if vllm:
            report_vllm_times(sampler)
    finally:
        if vllm:
            sampler.close()


def open_sampler(hf_path: str, scorer, tokenizer, segmenter: StepSegmenter, vllm: bool, vllm_python: str | None,
                 max_batch: int, kv_cache_gb: float = 2.0):
    """The sampler over an export: :class:`HFSampler`, or a :class:`VLLMSampler` with its engine started."""
    if not vllm:
        return HFSampler(scorer, tokenizer, segmenter)
    engine = VLLMEngine(str(hf_path), python=vllm_python, max_num_seqs=max_batch, threads=torch.get_num_threads(),
                        kv_cache_bytes=int(kv_cache_gb * 2**30))
    return VLLMSampler(scorer, segmenter, engine)


def report_vllm_times(sampler: VLLMSampler) -> None:
    """What vLLM's generation and the scoring pass of its samples took."""
    gen, score = sampler.times["generate"], sampler.times["score"]
    print(f"vLLM generated {sampler.tokens['generated']} tokens in {gen:.1f} s; scoring them took {score:.1f} s "
          f"({score / gen if gen else float('nan'):.2f}x the generation)", flush=True)


def load_prompts(path: str, problem_key: str | None, answer_key: str | None, limit: int | None) -> list[dict]:
    prompts = load_benchmark(path, problem_key, answer_key)
    if not prompts:
        raise ConfigError(f"{path} holds no prompts")
    return prompts[:limit] if limit else prompts
