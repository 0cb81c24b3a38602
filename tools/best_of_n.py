"""Reflective Best-of-N: k thinking trajectories per problem, scored by the SPRM head; the best is answered.

    python tools/best_of_n.py --prompts PROMPTS.jsonl --output BON.jsonl --backend megatron --mcore-path CKPT \\
        [--tp 2 --pp 1] --k 8 [--aggregation geometric] [--complete-all]
    torchrun --nproc-per-node 4 tools/best_of_n.py ... --backend megatron --tp 2 --pp 2
    python tools/best_of_n.py --prompts PROMPTS.jsonl --output BON.jsonl --backend hf --hf-path EXPORT --k 8
    python tools/evaluate.py BON.jsonl --k 1 2 8 --table eval.md --plot eval.png   # needs --complete-all

The output (one line per problem: candidates with step scores and aggregates, the choice, its answer and
correctness) is also an evaluate samples file (``responses``, ``step_scores``); with --complete-all every
candidate is answered and graded, so pass@1, maj@k and BoN@k cover all of them.
"""

import argparse
import sys

from megatron_rgm.config import ConfigError, run_tool


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", required=True, help="a known benchmark file or any jsonl (--problem-key/--answer-key)")
    p.add_argument("--problem-key")
    p.add_argument("--answer-key", help="gold answers (omit with --problem-key for a file without them)")
    p.add_argument("--limit", type=int)
    p.add_argument("--output", required=True, help="jsonl written here (all at once, when the run ends)")
    p.add_argument("--backend", choices=["megatron", "hf"], default="megatron")
    p.add_argument("--mcore-path", help="Megatron checkpoint (hf-to-mcore or --save)")
    p.add_argument("--hf-path", help="HF export with score_module.pt (mcore-to-hf)")
    p.add_argument("--tokenizer", help="sentencepiece .model or HF tokenizer dir (default: the checkpoint's)")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--k", type=int, default=8, help="candidates per problem")
    p.add_argument("--aggregation", default="geometric", help="geometric | arithmetic | product | min | last")
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=256, help="token budget of the thinking")
    p.add_argument("--think-end", default="</think>", help="stop string that ends the thinking")
    p.add_argument("--answer-max-new-tokens", type=int, default=64)
    p.add_argument("--answer-temperature", type=float, default=0.0, help="0: greedy answer")
    p.add_argument("--complete-all", action="store_true", help="answer and grade every candidate, not only the chosen")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--verifier", default="math", help="math | exact")
    p.add_argument("--prompt-template", default="{problem}\n<think>\n")
    a = p.parse_args(argv)

    def body():
        from pathlib import Path

        from megatron_rgm.inference.best_of_n import BestOfNConfig, load_problems, run_hf, run_megatron
        from megatron_rgm.rollout.sampler import SamplingParams

        params = SamplingParams(temperature=a.temperature, top_p=a.top_p, top_k=a.top_k,
                                repetition_penalty=a.repetition_penalty, max_new_tokens=a.max_new_tokens, seed=a.seed)
        cfg = BestOfNConfig(k=a.k, aggregation=a.aggregation, sampling=params, think_end=a.think_end,
                            answer_max_new_tokens=a.answer_max_new_tokens, answer_temperature=a.answer_temperature,
                            complete_all=a.complete_all, verifier=a.verifier,
                            template=a.prompt_template.replace("\\n", "\n"))
        problems = load_problems(a.prompts, a.problem_key, a.answer_key, a.limit)
        if a.backend == "hf":
            if not a.hf_path:
                raise ConfigError("--backend hf needs --hf-path (an export written by mcore-to-hf)")
            if not Path(a.hf_path).is_dir():
                raise ConfigError(f"--hf-path {a.hf_path} is not a directory: pass an export written by mcore-to-hf")
            run_hf(a.hf_path, a.tokenizer, problems, a.output, cfg)
            return
        if not a.mcore_path:
            raise ConfigError("--backend megatron needs --mcore-path (a checkpoint written by hf-to-mcore or --save)")
        if a.tp < 1 or a.pp < 1:
            raise ConfigError(f"--tp and --pp must be >= 1, got {a.tp} and {a.pp}")
        from megatron_rgm.launch import run_ranks
        from megatron_rgm.tokenizer import load_tokenizer
        from megatron_rgm.model.load import describe_checkpoint

        # Bad paths fail here, once, before any rank starts.
        checkpoint = describe_checkpoint(a.mcore_path)
        load_tokenizer(checkpoint.tokenizer_path(a.tokenizer))
        run_ranks(run_megatron, a.tp * a.pp, a.mcore_path, a.tokenizer, problems, a.output, cfg, a.tp, a.pp)

    return run_tool(body)


if __name__ == "__main__":
    sys.exit(main())
