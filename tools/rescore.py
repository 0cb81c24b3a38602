"""Score the candidates of a Best-of-N draw with an RGM export's head and pick again (heads compared on one draw).

    python tools/best_of_n.py ... --k 32 --complete-all --output DRAW.jsonl      # one draw, any policy
    python tools/rescore.py DRAW.jsonl --hf-path RUN_A/hf --output A.jsonl     # each head scores the same
    python tools/rescore.py DRAW.jsonl --hf-path RUN_B/hf --output B.jsonl     #   candidates
    python tools/evaluate.py A.jsonl --k 1 2 8 32

The output is a samples file like best_of_n's: each candidate's step scores and aggregate from the new head,
the pick and its answer again (megatron_rgm/inference/rescore.py).
"""

import argparse
import sys

from megatron_rgm.config import AGGREGATIONS, PROMPT_TEMPLATE, run_tool
from megatron_rgm.config.options import decode_escapes


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("samples", help="a tools/best_of_n.py output drawn with --complete-all")
    p.add_argument("--hf-path", required=True, help="the RGM export whose head scores (mcore-to-hf)")
    p.add_argument("--output", required=True, help="jsonl written here, all at once when every record is scored")
    p.add_argument("--prompt-template", type=decode_escapes, default=None,
                   help="how the draw's problems became prompts, for a draw whose records do not name it (default: "
                        f"{PROMPT_TEMPLATE!r}; 'chat': the tokenizer's chat template)")
    p.add_argument("--aggregation", default="geometric", help=f"one of {', '.join(AGGREGATIONS)}")
    a = p.parse_args(argv)

    def body():
        from megatron_rgm.inference.rescore import rescore

        s = rescore(a.samples, a.hf_path, a.output, a.prompt_template, a.aggregation)
        acc = f", best-of-k accuracy {s['correct']}/{s['graded']}" if s["graded"] else ""
        print(f"{s['problems']} problems, {s['candidates']} candidates rescored{acc}; {s['picks_changed']} picks "
              f"changed; {s['steps_changed']} candidates scored on another number of steps (re-tokenised); "
              f"wrote {a.output}", flush=True)

    return run_tool(body)


if __name__ == "__main__":
    sys.exit(main())
