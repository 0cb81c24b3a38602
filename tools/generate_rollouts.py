"""Generate rollouts: k samples per prompt, graded, step-scored, written to a zarr rollout store.

    python tools/generate_rollouts.py --prompts PROMPTS.jsonl --output STORE --backend megatron \\
        --mcore-path CKPT [--tokenizer DIR] [--tp 2 --pp 1 --dp 1] --k 8 --temperature 0.6 --top-p 0.95
    python tools/generate_rollouts.py --prompts PROMPTS.jsonl --output STORE --backend hf --hf-path EXPORT --k 8
    python tools/generate_rollouts.py ... --backend vllm --hf-path EXPORT [--vllm-python VENV/bin/python]

Prompts: a known benchmark file or any jsonl with --problem-key/--answer-key. Re-running resumes.
"""

import argparse
import sys

from megatron_rgm import cli
from megatron_rgm.cli import ModelSource, PromptFileConfig
from megatron_rgm.config import ConfigError, run_tool


def main(argv=None) -> int:
    from megatron_rgm.rollout.sampling import SamplingParams

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_arguments(p, PromptFileConfig, "prompts")
    p.add_argument("--output", required=True, help="the rollout store (re-running resumes it)")
    cli.add_arguments(p, ModelSource, "model")
    p.add_argument("--dp", type=int, default=1, help="data-parallel replicas (megatron backend)")
    p.add_argument("--k", type=int, default=8, help="samples per prompt")
    p.add_argument("--max-batch", type=int, default=256, help="sequences decoded at once (KV-cache slots; a finished "
                   "one's slot is refilled by a waiting one)")
    cli.add_arguments(p, SamplingParams, "sampling")
    a = p.parse_args(argv)

    def body():
        from megatron_rgm.launch import run_ranks
        from megatron_rgm.rollout.generate import generate_hf, generate_megatron, load_prompts

        source, inputs = cli.from_namespace(ModelSource, a), cli.from_namespace(PromptFileConfig, a)
        params = cli.from_namespace(SamplingParams, a)
        for flag, value in (("--k", a.k), ("--max-batch", a.max_batch)):
            if value < 1:
                raise ConfigError(f"{flag} must be >= 1, got {value}")
        prompts = load_prompts(inputs.prompts, inputs.problem_key, inputs.answer_key, inputs.limit)
        if source.backend in ("hf", "vllm"):
            generate_hf(source.hf_path, prompts, a.output, a.k, params, inputs.verifier, inputs.prompt_template,
                        a.max_batch, source.vllm_python, vllm=source.backend == "vllm",
                        kv_cache_gb=source.vllm_kv_cache_gb)
        else:
            if a.dp < 1:
                raise ConfigError(f"--dp must be >= 1, got {a.dp}")
            from megatron_rgm.model.load import describe_checkpoint
            from megatron_rgm.tokenizer import load_tokenizer

            # Bad paths fail here, once, before any rank starts.
            checkpoint = describe_checkpoint(source.mcore_path)
            load_tokenizer(checkpoint.tokenizer_path(source.tokenizer))
            run_ranks(generate_megatron, source.tp * source.pp * a.dp, source.mcore_path, source.tokenizer, prompts,
                      a.output, a.k, params, inputs.verifier, source.tp, inputs.prompt_template, source.pp,
                      a.max_batch)
        print(f"output: {a.output}")

    return run_tool(body)


if __name__ == "__main__":
    sys.exit(main())
