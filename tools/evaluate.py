"""Evaluate sampled responses: pass@1, pass@k, maj@k, weighted maj@k, BoN@k per aggregation, oracle@k.

    python tools/evaluate.py SAMPLES.jsonl --k 1 2 8 --json eval.json [--table eval.md] [--plot eval.png]
"""

import argparse
import sys

from megatron_rgm.config import run_tool


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("samples", help="jsonl: {id, answer, responses, step_scores?} per line")
    p.add_argument("--k", type=int, nargs="+", default=[1, 2, 8])
    p.add_argument("--json", help="write the metrics here")
    p.add_argument("--table", help="write the markdown table here")
    p.add_argument("--plot", help="write accuracy vs k (PNG) here")
    p.add_argument("--verifier", choices=["math", "exact"], default="math")
    a = p.parse_args(argv)
    from megatron_rgm.evaluation.report import run

    return run_tool(lambda: run(a.samples, a.k, a.json, a.table, a.plot, a.verifier))


if __name__ == "__main__":
    sys.exit(main())
