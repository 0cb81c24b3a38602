"""Benchmark: the native sampler's decode tokens/s on a random model of a preset's geometry, on this machine's device.

    python tools/bench_generate.py                                          # tiny preset, CPU
    python tools/bench_generate.py --preset deepscaler-1.5b --bf16 --new 256  # a GPU

Builds the model as training does (random weights, this geometry), then decodes ``--prompts`` random prompts of
``--prompt`` tokens x ``--k`` samples of ``--new`` tokens each (T=0.6, top-p 0.95, no end token, so every
sample runs to its budget), with step scoring on, two ways, in turns over ``--repeats`` rounds:

* batched: every prompt's k samples in one continuously batched call (``Sampler.generate_batch``);
* one prompt: the same prompts one at a time (k samples each).

Prints each one's median tokens/s and the ratio ``batched/one-prompt``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch


def _bench(argv: list[str], a) -> None:
    from megatron_rgm import distributed
    from megatron_rgm.arguments import parse_args
    from megatron_rgm.model import build_model
    from megatron_rgm.rollout.sampler import Sampler
    from megatron_rgm.rollout.sampling import SamplingParams
    from megatron_rgm.steps import StepSegmenter

    args = parse_args(argv)
    distributed.initialize(args.parallel)
    model = build_model(args)[0]
    cfg = model.config
    sampler = Sampler(model, model.vocab_size, StepSegmenter([7]))
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, model.vocab_size, (a.prompt,), generator=g).tolist() for _ in range(a.prompts)]
    params = [SamplingParams(max_new_tokens=a.new, seed=i) for i in range(a.prompts)]
    cuda = torch.cuda.is_available()

    def timed(fn) -> float:
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t

    variants = {
        "batched": lambda: sampler.generate_batch(prompts, a.k, params),
        "one prompt": lambda: [sampler.generate(p, a.k, par) for p, par in zip(prompts, params)],
    }
    times = {name: [] for name in variants}
    for r in range(a.repeats + 1):  # the first round warms up
        order = list(variants) if r % 2 == 0 else list(reversed(variants))
        for name in order:
            t = timed(variants[name])
            if r:
                times[name].append(t)
    tokens = a.prompts * a.k * a.new
    params_m = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"model: {params_m:.1f}M parameters ({cfg.num_layers} layers, hidden {cfg.hidden_size}, vocab {model.vocab_size}), "
          f"{cfg.params_dtype}, on {'cuda' if cuda else 'cpu'}")
    print(f"{a.prompts} prompts of {a.prompt} tokens x k={a.k} x {a.new} new tokens = {tokens} decode tokens")
    rate = {}
    for name, ts in times.items():
        rate[name] = tokens / statistics.median(ts)
        print(f"{name:11s} {rate[name]:10,.0f} tokens/s (median of {a.repeats})")
    print(f"batched/one-prompt tokens/s: {rate['batched'] / rate['one prompt']:.2f}x")
    if cuda:
        print(f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    distributed.shutdown()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny", help="a named geometry (megatron_rgm/model/presets.py)")
    p.add_argument("--layers", type=int, help="fewer layers than the preset's (a shallower rehearsal)")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--prompt", type=int, default=64, help="prompt tokens")
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--new", type=int, default=64, help="new tokens per sample")
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    from megatron_rgm.launch import run_ranks

    argv = ["--preset", a.preset, "--seq-length", str(a.prompt + a.new)]
    argv += ["--num-layers", str(a.layers)] if a.layers else []
    argv += ["--bf16"] if a.bf16 else []
    run_ranks(_bench, 1, argv, a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
