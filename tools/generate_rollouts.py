"""Generate rollouts: k samples per prompt, graded, step-scored, written to a zarr rollout store.

    python tools/generate_rollouts.py --prompts PROMPTS.jsonl --output STORE --backend megatron \\
        --mcore-path CKPT [--tokenizer DIR] [--tp 2 --pp 1 --dp 1] --k 8 --temperature 0.6 --top-p 0.95
    python tools/generate_rollouts.py --prompts PROMPTS.jsonl --output STORE --backend hf --hf-path EXPORT --k 8

Prompts: a known benchmark file or any jsonl with --problem-key/--answer-key. Re-running resumes.
"""

import argparse
import sys

from megatron_rgm.config import ConfigError, run_tool


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", required=True)
    p.add_argument("--problem-key")
    p.add_argument("--answer-key")
    p.add_argument("--limit", type=int)
    p.add_argument("--output", required=True)
    p.add_argument("--backend", choices=["megatron", "hf"], default="megatron")
    p.add_argument("--mcore-path")
    p.add_argument("--hf-path")
    p.add_argument("--tokenizer", help="HF tokenizer directory (megatron backend; default: the checkpoint's)")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--dp", type=int, default=1)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--stop", nargs="*", default=[])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--verifier", choices=["math", "exact"], default="math")
    p.add_argument("--prompt-template", default="{problem}\n<think>\n")
    a = p.parse_args(argv)
    from megatron_rgm.launch import run_ranks
    from megatron_rgm.rollout.generate import generate_hf, generate_megatron, load_prompts
    from megatron_rgm.rollout.sampler import SamplingParams

    def body():
        if a.k < 1:
            raise ConfigError(f"--k must be >= 1, got {a.k}")
        prompts = load_prompts(a.prompts, a.problem_key, a.answer_key, a.limit)
        params = SamplingParams(temperature=a.temperature, top_p=a.top_p, top_k=a.top_k,
                                repetition_penalty=a.repetition_penalty, max_new_tokens=a.max_new_tokens,
                                stop_strings=a.stop, seed=a.seed)
        if a.backend == "hf":
            if not a.hf_path:
                raise ConfigError("--backend hf needs --hf-path (an export written by mcore-to-hf)")
            generate_hf(a.hf_path, prompts, a.output, a.k, params, a.verifier, a.prompt_template)
        else:
            if not a.mcore_path:
                raise ConfigError("--backend megatron needs --mcore-path (a checkpoint written by hf-to-mcore or --save)")
            if min(a.tp, a.pp, a.dp) < 1:
                raise ConfigError(f"--tp, --pp and --dp must be >= 1, got {a.tp}, {a.pp} and {a.dp}")
            from megatron_rgm.model.load import describe_checkpoint
            from megatron_rgm.tokenizer import load_tokenizer

            # Bad paths fail here, once, before any rank starts.
            checkpoint = describe_checkpoint(a.mcore_path)
            load_tokenizer(checkpoint.tokenizer_path(a.tokenizer))
            run_ranks(generate_megatron, a.tp * a.pp * a.dp, a.mcore_path, a.tokenizer, prompts, a.output, a.k,
                      params, a.verifier, a.tp, a.prompt_template, a.pp)
        print(f"output: {a.output}")

    return run_tool(body)


if __name__ == "__main__":
    sys.exit(main())
