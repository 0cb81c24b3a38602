"""Reflective Best-of-N: k thinking trajectories per problem, scored by the SPRM head; the best is answered.

With --bon-mode complete (the reference's), the k candidates are whole responses, the best one's own answer graded.

    python tools/best_of_n.py --prompts PROMPTS.jsonl --output BON.jsonl --backend megatron --mcore-path CKPT \\
        [--tp 2 --pp 1] --k 8 [--aggregation geometric] [--complete-all]
    torchrun --nproc-per-node 4 tools/best_of_n.py ... --backend megatron --tp 2 --pp 2
    python tools/best_of_n.py --prompts PROMPTS.jsonl --output BON.jsonl --backend hf --hf-path EXPORT --k 8
    python tools/best_of_n.py ... --backend vllm --hf-path EXPORT [--vllm-python VENV/bin/python]
    python tools/evaluate.py BON.jsonl --k 1 2 8 --table eval.md --plot eval.png   # needs --complete-all

The output (one line per problem: candidates with step scores and aggregates, the choice, its answer and
correctness) is also an evaluate samples file (``responses``, ``step_scores``); with --complete-all every
candidate is answered and graded, so pass@1, maj@k and BoN@k cover all of them.
"""

import argparse
import sys
from pathlib import Path

from megatron_rgm import cli
from megatron_rgm.cli import ModelSource, PromptFileConfig
from megatron_rgm.config import ConfigError, run_tool


def main(argv=None) -> int:
    from megatron_rgm.inference.best_of_n import BestOfNConfig
    from megatron_rgm.rollout.sampling import BEST_OF_N_PENALTY, SamplingParams

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_arguments(p, PromptFileConfig, "prompts")
    p.add_argument("--output", required=True, help="jsonl written here (all at once, when the run ends)")
    cli.add_arguments(p, ModelSource, "model")
    cli.add_arguments(p, BestOfNConfig, "Best-of-N")
    # The thinking's sampling; its stop string is --think-end.
    cli.add_arguments(p, SamplingParams, "sampling", only=lambda name: name != "stop_strings")
    p.set_defaults(repetition_penalty=BEST_OF_N_PENALTY)  # the reference's Best-of-N sampling (training's is 1)
    a = p.parse_args(argv)

    def body():
        from megatron_rgm.inference.best_of_n import load_problems, run_hf, run_megatron

        source, inputs = cli.from_namespace(ModelSource, a), cli.from_namespace(PromptFileConfig, a)
        cfg = cli.from_namespace(BestOfNConfig, a, sampling=cli.from_namespace(SamplingParams, a),
                                 verifier=inputs.verifier, template=inputs.prompt_template)
        problems = load_problems(inputs.prompts, inputs.problem_key, inputs.answer_key, inputs.limit)
        if source.backend in ("hf", "vllm"):
            if not Path(source.hf_path).is_dir():
                raise ConfigError(f"--hf-path {source.hf_path} is not a directory: pass an export written by "
                                  "mcore-to-hf")
            run_hf(source.hf_path, source.tokenizer, problems, a.output, cfg, vllm=source.backend == "vllm",
                   vllm_python=source.vllm_python, kv_cache_gb=source.vllm_kv_cache_gb)
            return
        from megatron_rgm.launch import run_ranks
        from megatron_rgm.model.load import describe_checkpoint
        from megatron_rgm.tokenizer import load_tokenizer

        # Bad paths fail here, once, before any rank starts.
        checkpoint = describe_checkpoint(source.mcore_path)
        load_tokenizer(checkpoint.tokenizer_path(source.tokenizer))
        run_ranks(run_megatron, source.tp * source.pp, source.mcore_path, source.tokenizer, problems, a.output, cfg,
                  source.tp, source.pp)

    return run_tool(body)


if __name__ == "__main__":
    sys.exit(main())
