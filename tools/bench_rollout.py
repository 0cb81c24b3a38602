"""Benchmark: rollout generation on the CPU, side by side, same weights, prompts, k and lengths, one run.

    python tools/bench_rollout.py [--hidden 256 --layers 8 --vocab 2048 --k 8 --prompt 64 --new 64]

Prints three ratios:
  * native sampler tokens/s over transformers ``generate`` tokens/s (goal >= 1.0x);
  * sampling with step scoring on vs off (goal <= 3% slower);
  * what a separate same-size PRM forward over the finished sequences adds (goal >= 30% extra).
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def _bench(hf_dir: str, mcore_dir: str, k: int, prompt_len: int, new: int, repeats: int) -> None:
    from megatron_rgm import distributed
    from megatron_rgm.convert.verify import megatron_args
    from megatron_rgm.hf import load_causal_lm
    from megatron_rgm.model import build_model
    from megatron_rgm.rollout.sampler import Sampler, SamplingParams
    from megatron_rgm.steps import StepSegmenter
    from megatron_rgm.training.checkpointing import load_checkpoint

    args, extra = megatron_args(mcore_dir, 1, 1)
    distributed.initialize(args.parallel)
    model = build_model(args)[0]
    load_checkpoint(mcore_dir, [model])
    model.eval()
    vocab = extra["hf_config"]["vocab_size"]
    hf = load_causal_lm(hf_dir).eval()
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab, (prompt_len,), generator=g).tolist()
    params = SamplingParams(temperature=0.6, top_p=0.95, max_new_tokens=new, seed=1)
    steps = StepSegmenter(list(range(0, vocab, 50)))  # ~2% of tokens end a step
    scored, plain = Sampler(model, vocab, steps), Sampler(model, vocab, None, score_steps=False)

    def median(fn):
        fn()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    t_on = median(lambda: scored.generate(prompt, k, params))
    t_off = median(lambda: plain.generate(prompt, k, params))
    ids = torch.tensor([prompt])

    def hf_generate():
        with torch.no_grad():
            torch.manual_seed(1)
            hf.generate(ids, do_sample=True, temperature=0.6, top_p=0.95, max_new_tokens=new, min_new_tokens=new,
                        num_return_sequences=k, pad_token_id=0)

    t_hf = median(hf_generate)
    rollout = scored.generate(prompt, k, params)
    seq = rollout.tokens
    pos = torch.arange(seq.shape[1]).expand_as(seq)

    def prm_pass():  # a separate PRM of the same size re-reads every finished sequence
        with torch.no_grad():
            model(seq, pos, None, step_mask=rollout.step_mask)

    t_prm = median(prm_pass)
    tokens = k * new
    print(f"k={k}, prompt {prompt_len} + {new} new tokens, {sum(p.numel() for p in hf.parameters()) / 1e6:.1f}M params,"
          f" {torch.get_num_threads()} threads")
    print(f"native sampler (scoring on):  {tokens / t_on:8.1f} tokens/s")
    print(f"native sampler (scoring off): {tokens / t_off:8.1f} tokens/s")
    print(f"transformers generate:        {tokens / t_hf:8.1f} tokens/s")
    print(f"native / transformers tokens/s: {t_hf / t_on:.2f}x (goal >= 1.0x)")
    print(f"scoring on vs off: {100 * (t_on / t_off - 1):+.1f}% time (goal <= +3%)")
    print(f"separate same-size PRM pass: +{100 * t_prm / t_on:.1f}% on top of generation (goal >= 30%)")
    distributed.shutdown()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    import transformers

    from megatron_rgm.convert import hf_to_mcore
    from megatron_rgm.convert.launch import run_ranks

    work = Path(tempfile.mkdtemp(prefix="bench_rollout_"))
    cfg = transformers.Qwen2Config(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=int(2.75 * a.hidden),
                                   num_hidden_layers=a.layers, num_attention_heads=8, num_key_value_heads=2,
                                   max_position_embeddings=1024, initializer_range=0.2, tie_word_embeddings=False)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(work / "hf")
    hf_to_mcore(str(work / "hf"), str(work / "mcore"))
    run_ranks(_bench, 1, str(work / "hf"), str(work / "mcore"), a.k, a.prompt, a.new, a.repeats)


if __name__ == "__main__":
    sys.exit(main())
