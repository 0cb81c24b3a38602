"""Worker: the KV-cache sampler against full recompute, a separate scoring pass, TP=2 vs TP=1,
and (mode "hf") transformers' greedy decoding on a converted checkpoint."""

import contextlib
import json
import os
import sys

import torch

from common import tiny_args

from megatron_rgm import distributed
from megatron_rgm.model import build_model
from megatron_rgm.model.state import full_state, load_full_state
from megatron_rgm.rollout.sampler import Sampler, SamplingParams
from megatron_rgm.steps import StepSegmenter

PROMPT = [11, 5, 42, 7, 300, 12]
HF_PROMPT = [11, 5, 42, 7, 120]  # inside the 300-token vocabulary of the HF model
STEP_IDS = list(range(3, 500, 20))  # 5% of the vocabulary: several steps in every sampled batch


def build(tp: int, full=None, pp: int = 1):
    args = tiny_args(tp=tp, pp=pp, extra=["--seq-length", "64", "--init-method-std", "0.4", "--sprm-dropout", "0"])
    distributed.initialize(args.parallel)
    model = build_model(args)[0]
    if full is not None:
        load_full_state(model, full)
    return model


@contextlib.contextmanager
def count_flash_decode_calls():
    """Counts decode steps of megatron-core's flash-decode attention (our torch kernel's one-token path)."""
    from megatron_rgm.rollout import decode_attention

    calls, inner = [0], decode_attention._decode_static

    def counted(*args, **kwargs):
        calls[0] += 1
        return inner(*args, **kwargs)

    decode_attention._decode_static = counted
    try:
        yield calls
    finally:
        decode_attention._decode_static = inner


def top2_gap(logits: torch.Tensor) -> float:
    """Smallest gap between the largest and the second-largest logit over ``logits [n, V]``."""
    top = logits.float().topk(2, dim=-1).values
    return (top[:, 0] - top[:, 1]).min().item()


@torch.no_grad()
def greedy_margin(model, tokens: torch.Tensor, prompt_len: int) -> float:
    """How far greedy decoding of ``tokens [b, s]`` was from a tie: the smallest top-1 minus top-2 logit
    over the generated positions (TP=1; a property of the model, not of the layout)."""
    model.eval()
    b, s = tokens.shape
    logits, _ = model(tokens, torch.arange(s).expand(b, s), None, step_mask=torch.zeros(b, s, dtype=torch.bool))
    return top2_gap(logits[:, prompt_len - 1:s - 1, :500].reshape(-1, 500))


# Continuous batching: prompts of different lengths and budgets, k=3 each, decoded in 5 slots (12 sequences:
# slots are refilled, prompt caches copied or prefilled again, the pool compacted at the tail). Frequent EOS ids
# end the sampled sequences at different steps.
BATCH_PROMPTS = [PROMPT, [31, 41, 59, 26], [13, 14, 15, 16, 17, 18, 19, 20, 21], [5]]
BATCH_EOS = [3, 23, 43, 63, 83]


def batch_params(temperature: float) -> list[SamplingParams]:
    return [SamplingParams(temperature=temperature, top_p=0.95, top_k=50, repetition_penalty=1.05,
                           max_new_tokens=16 + 4 * i, seed=20 + i, eos_token_ids=BATCH_EOS if temperature else [])
            for i in range(len(BATCH_PROMPTS))]


def batched(sampler) -> dict:
    """Each prompt alone (generate) and all of them in one pool (generate_batch): tokens, log-probs, scores."""
    out = {}
    for name, temperature in (("greedy", 0.0), ("sampled", 1.0)):
        params = batch_params(temperature)
        alone = [sampler.generate(p, 3, par) for p, par in zip(BATCH_PROMPTS, params)]
        pooled = sampler.generate_batch(BATCH_PROMPTS, 3, params, max_batch=5)
        out[name] = {kind: [{"tokens": r.tokens.tolist(), "lengths": r.lengths.tolist(),
                             "log_probs": r.log_probs.tolist(), "step_logits": r.step_logits.tolist()} for r in rs]
                     for kind, rs in (("alone", alone), ("pooled", pooled))}
    return out


def run(out: str):

    ref = build(1)
    full = full_state(ref)
    results = {}
    for tp in (1, 2):
        model = build(tp, full)
        sampler = Sampler(model, 500, StepSegmenter(STEP_IDS))
        with count_flash_decode_calls() as calls:
            greedy = sampler.generate(PROMPT, 2, SamplingParams(temperature=0, max_new_tokens=24))
        recompute = sampler.generate(PROMPT, 2, SamplingParams(temperature=0, max_new_tokens=24), use_cache=False)
        sampled = sampler.generate(PROMPT, 4, SamplingParams(temperature=1.0, top_p=0.95, top_k=50,
                                                             repetition_penalty=1.05, max_new_tokens=24, seed=9))
        # megatron-core's default KV-cache path (the sampler decodes through its flash-decode path).
        default = Sampler(model, 500, StepSegmenter(STEP_IDS), fast_decode=False)
        default_greedy = default.generate(PROMPT, 2, SamplingParams(temperature=0, max_new_tokens=24))
        default_sampled = default.generate(PROMPT, 4, SamplingParams(temperature=1.0, top_p=0.95, top_k=50,
                                                                     repetition_penalty=1.05, max_new_tokens=24,
                                                                     seed=9))
        # A separate forward over the finished sequences, scoring the same step positions.
        with torch.no_grad():
            model.eval()
            s = sampled.tokens.shape[1]
            _, separate = model(sampled.tokens, torch.arange(s).expand(4, s), None, step_mask=sampled.step_mask)
        results[f"tp{tp}"] = {
            "greedy": greedy.tokens.tolist(), "recompute": recompute.tokens.tolist(),
            "greedy_logit_diff": (greedy.position_logits - recompute.position_logits).abs().max().item(),
            "greedy_logit_max": greedy.position_logits.abs().max().item(),
            "sampled": sampled.tokens.tolist(), "steps": int(sampled.step_logits.numel()),
            "score_diff": (sampled.step_logits - separate).abs().max().item() if separate.numel() else 0.0,
            "score_max": sampled.step_logits.abs().max().item() if separate.numel() else 0.0,
            "log_probs": sampled.log_probs.tolist(),
            "default_greedy": default_greedy.tokens.tolist(), "default_sampled": default_sampled.tokens.tolist(),
            "default_logit_diff": max((greedy.position_logits - default_greedy.position_logits).abs().max().item(),
                                      (sampled.step_logits - default_sampled.step_logits).abs().max().item()
                                      if sampled.step_logits.numel() == default_sampled.step_logits.numel() > 0
                                      else 0.0 if sampled.step_logits.numel() == default_sampled.step_logits.numel()
                                      else float("inf")),
            "default_log_prob_diff": (sampled.log_probs - default_sampled.log_probs).abs().max().item(),
            "flash_decode_after": bool(model.config.flash_decode),
            "flash_decode_calls": calls[0], "decode_steps": greedy.tokens.shape[1] - len(PROMPT) - 1,
            "layers": model.config.num_layers,
        }
        results[f"tp{tp}"]["batched"] = batched(sampler)
        if tp == 1:
            results["_tp1_step_logits"] = sampled.step_logits.tolist()
            results["_tp1_greedy_margin"] = min(
                [greedy_margin(model, greedy.tokens, len(PROMPT))] +
                [greedy_margin(model, torch.tensor(r["tokens"]), len(p)) for p, r in
                 zip(BATCH_PROMPTS, results["tp1"]["batched"]["greedy"]["alone"])])
    # PP=2: each stage caches its own layers; tokens come back from the last stage.
    model = build(1, full, pp=2)
    sampler = Sampler(model, 500, StepSegmenter(STEP_IDS))
    greedy = sampler.generate(PROMPT, 2, SamplingParams(temperature=0, max_new_tokens=24))
    sampled = sampler.generate(PROMPT, 4, SamplingParams(temperature=1.0, top_p=0.95, top_k=50,
                                                         repetition_penalty=1.05, max_new_tokens=24, seed=9))
    results["pp2"] = {"greedy": greedy.tokens.tolist(), "sampled": sampled.tokens.tolist(),
                      "log_probs": sampled.log_probs.tolist(), "step_logits": sampled.step_logits.tolist(),
                      "batched": batched(sampler)}
    results["tp1"]["step_logits"] = results.pop("_tp1_step_logits")
    results["tp1"]["greedy_margin"] = results.pop("_tp1_greedy_margin")
    if int(os.environ["RANK"]) == 0:
        with open(os.path.join(out, "sampler.json"), "w") as f:
            json.dump(results, f)
    distributed.shutdown()


def run_hf(mcore: str, hf: str, out: str):
    from transformers import AutoModelForCausalLM  # noqa: F401

    from megatron_rgm.hf import load_causal_lm
    from megatron_rgm.model.load import load_model

    model = load_model(mcore).model
    ours = Sampler(model, 300).generate(HF_PROMPT, 1, SamplingParams(temperature=0, max_new_tokens=20))
    hf_model = load_causal_lm(hf).eval()
    with torch.no_grad():
        theirs = hf_model.generate(torch.tensor([HF_PROMPT]), max_new_tokens=20, do_sample=False,
                                   pad_token_id=0, eos_token_id=None)
        margin = top2_gap(hf_model(theirs).logits[0, len(HF_PROMPT) - 1:-1])
    with open(os.path.join(out, "hf.json"), "w") as f:
        json.dump({"ours": ours.tokens[0].tolist(), "theirs": theirs[0].tolist(), "greedy_margin": margin}, f)
    distributed.shutdown()


if __name__ == "__main__":
    torch.set_num_threads(1)
    if sys.argv[1] == "hf":
        run_hf(*sys.argv[2:5])
    else:
        run(sys.argv[2])
