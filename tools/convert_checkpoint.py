"""HF <-> Megatron checkpoints with the SPRM head.

    python tools/convert_checkpoint.py hf-to-mcore --hf-path DIR --output DIR --tp N --pp M [--ep E] [--etp T]
        [--sprm-head FILE]
    python tools/convert_checkpoint.py mcore-to-hf --mcore-path DIR --output DIR [--dtype bfloat16]
    python tools/convert_checkpoint.py verify --hf-path DIR --mcore-path DIR --tp N --pp M [--ep E] [--etp T]
"""

import argparse
import sys

from megatron_rgm.config import decode_escapes, run_tool

EP_HELP = ("expert-parallel ranks of a mixture-of-experts model: each holds num_experts / EP experts (tp x pp x ep "
           "ranks in all); the checkpoint loads at any EP")
ETP_HELP = ("tensor-parallel ranks each expert is split over: 1 or --tp (default: --tp, or 1 for experts with biases, "
            "GPT-OSS's); the checkpoint loads at either")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("hf-to-mcore", help="HF directory -> Megatron torch_dist checkpoint")
    a.add_argument("--hf-path", required=True)
    a.add_argument("--output", required=True)
    a.add_argument("--tp", type=int, default=1)
    a.add_argument("--pp", type=int, default=1)
    a.add_argument("--ep", type=int, default=1, help=EP_HELP)
    a.add_argument("--etp", type=int, help=ETP_HELP)
    a.add_argument("--sprm-head", help="score_module.pt or sprm_head.safetensors; default: a fresh, seeded head")
    a.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    a.add_argument("--seed", type=int, default=1234)
    b = sub.add_parser("mcore-to-hf", help="Megatron checkpoint -> HF directory + score_module.pt")
    b.add_argument("--mcore-path", required=True)
    b.add_argument("--output", required=True)
    b.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    b.add_argument("--vocab-size", type=int, help="the tokenizer's vocabulary, for a checkpoint that records only "
                   "the padded one (Megatron-LM's, with an HF tokenizer)")
    b.add_argument("--prompt-template", type=decode_escapes,
                   help="for a sentencepiece tokenizer: the template the export's chat template renders (escapes "
                   "such as \\n decoded; default: the one the run recorded)")
    c = sub.add_parser("verify", help="run both on the same random batches, report the max abs differences of the "
                       "logits and head logits, and exit 1 when one is above the tolerance (relative to the largest "
                       "HF logit, per checkpoint dtype: megatron_rgm.convert.verify.TOLERANCE)")
    c.add_argument("--hf-path", required=True)
    c.add_argument("--mcore-path", required=True)
    c.add_argument("--tp", type=int, default=1)
    c.add_argument("--pp", type=int, default=1)
    c.add_argument("--ep", type=int, default=1, help=EP_HELP)
    c.add_argument("--etp", type=int, help=ETP_HELP)
    c.add_argument("--batches", type=int, default=2)
    c.add_argument("--json", help="also write the report here")
    args = p.parse_args(argv)
    from megatron_rgm.convert import convert
    from megatron_rgm.convert.verify import VerifyFailed, verify

    def body():
        if args.cmd == "hf-to-mcore":
            convert.hf_to_mcore(args.hf_path, args.output, args.tp, args.pp, args.sprm_head,
                                args.make_vocab_size_divisible_by, args.seed, args.ep, args.etp)
        elif args.cmd == "mcore-to-hf":
            convert.mcore_to_hf(args.mcore_path, args.output, args.dtype, args.vocab_size, args.prompt_template)
        else:
            verify(args.hf_path, args.mcore_path, args.tp, args.pp, args.batches, args.json, args.ep, args.etp)

    try:
        return run_tool(body)
    except VerifyFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    from megatron_rgm.launch import exit_now

    exit_now(main())  # skips the interpreter's teardown of torch and megatron-core (~0.12 GiB more RSS)
