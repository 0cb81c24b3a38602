"""Step-level evaluation on ProcessBench files with an HF export and its SPRM head.

    python tools/processbench.py --hf-path export/ --data ../shared/data/processbench/gsm8k.json [--threshold 0.5]
        [--limit 200] [--json out.json]

Without --threshold, half of each file calibrates the threshold (best F1) and the other half is reported.
"""

import argparse
import json
import sys

from megatron_rgm.config import run_tool


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hf-path", required=True)
    p.add_argument("--data", nargs="+", required=True)
    p.add_argument("--threshold", type=float)
    p.add_argument("--limit", type=int, help="first N records of each file")
    p.add_argument("--json")
    a = p.parse_args(argv)
    from megatron_rgm.evaluation.processbench import evaluate_processbench, load_processbench
    from megatron_rgm.hf import RGMScorer

    def body():
        scorer = RGMScorer.from_pretrained(a.hf_path)
        report = {}
        for path in a.data:
            records = load_processbench(path)[: a.limit]
            report[path] = r = evaluate_processbench(scorer, records, a.threshold)
            print(f"{path}: error acc {100 * r['error_acc']:.1f}  correct acc {100 * r['correct_acc']:.1f}  "
                  f"F1 {100 * r['f1']:.1f}  (threshold {r['threshold']:.3f}, n={r['n']})")
        if a.json:
            with open(a.json, "w") as f:
                json.dump(report, f, indent=2)

    return run_tool(body)


if __name__ == "__main__":
    sys.exit(main())
