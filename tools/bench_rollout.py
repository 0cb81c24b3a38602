"""Benchmark: rollout generation on the CPU, side by side, same weights, prompts, k and lengths, one run.

    python tools/bench_rollout.py                      # small: hidden 256, 8 layers, vocab 2048 (6.7M params)
    python tools/bench_rollout.py --size medium        # hidden 1024, 12 layers, vocab 32000 (201M params)
    python tools/bench_rollout.py --hidden 512 --layers 4 --k 8 --prompt 64 --new 64 --threads 1

Prints three ratios:
  * native sampler tokens/s over transformers ``generate`` tokens/s (goal >= 1.0x);
  * sampling with step scoring on vs off (goal <= 3% slower);
  * what a separate same-size PRM forward over the finished sequences adds (goal >= 30% extra).

The native sampler decodes through megatron-core's flash-decode KV path
(:mod:`megatron_rgm.rollout.decode_attention`); its default path is timed as
well, for reference. The variants run in turns within each round (their order rotating from round
to round), so that load from other jobs on the machine hits them alike. Each
ratio is given three ways: the median over rounds of the ratio within a round,
the same in CPU time (blind to time spent preempted), and the ratio of the best
rounds (interference only adds time); "scoring on vs on" times the same run
twice, the noise floor of the machine. The separate PRM
is the same backbone with the SPRM head and no LM head (a PRM has a value head
instead), run once over the k finished sequences.
"""

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]

# name: (hidden, layers, heads, kv heads, vocab, new tokens, rounds by default)
SIZES = {
    "small": (256, 8, 8, 2, 2048, 64, 15),
    "medium": (1024, 12, 16, 4, 32000, 32, 5),
}


def _bench(hf_dir: str, mcore_dir: str, k: int, prompt_len: int, new: int, rounds: int, threads: int) -> None:
    from megatron_rgm import distributed
    from megatron_rgm.hf import load_causal_lm
    from megatron_rgm.model.load import load_model
    from megatron_rgm.rollout.sampler import Sampler, SamplingParams, _head_logits
    from megatron_rgm.steps import StepSegmenter

    if threads:
        torch.set_num_threads(threads)
    loaded = load_model(mcore_dir)
    model, vocab = loaded.model, loaded.checkpoint.vocab_size
    hf = load_causal_lm(hf_dir).eval()
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab, (prompt_len,), generator=g).tolist()
    params = SamplingParams(temperature=0.6, top_p=0.95, max_new_tokens=new, seed=1)
    steps = StepSegmenter(list(range(0, vocab, 50)))  # ~2% of tokens end a step
    scored, plain = Sampler(model, vocab, steps), Sampler(model, vocab, None, score_steps=False)
    default_path = Sampler(model, vocab, steps, fast_decode=False)  # megatron-core's default KV-cache path
    ids = torch.tensor([prompt])
    rollout = scored.generate(prompt, k, params)
    seq = rollout.tokens
    pos = torch.arange(seq.shape[1]).expand_as(seq)
    assert seq.shape[1] == prompt_len + new, "the benchmark needs every sample at full length (no EOS)"

    def hf_generate():
        with torch.no_grad():
            torch.manual_seed(1)
            hf.generate(ids, do_sample=True, temperature=0.6, top_p=0.95, max_new_tokens=new, min_new_tokens=new,
                        num_return_sequences=k, pad_token_id=0)

    def prm_pass():  # a separate PRM of the same size re-reads every finished sequence: backbone + head
        out = model.output_layer
        out.forward = lambda hidden, weight=None, runtime_gather_output=None: (hidden, None)  # no LM head
        try:
            with torch.no_grad():
                model(seq, pos, None, step_mask=rollout.step_mask)
        finally:
            del out.forward

    variants = {"on": lambda: scored.generate(prompt, k, params), "off": lambda: plain.generate(prompt, k, params),
                "hf": hf_generate, "prm": prm_pass, "default": lambda: default_path.generate(prompt, k, params),
                "on again": lambda: scored.generate(prompt, k, params)}  # the same run twice: the noise floor
    for fn in variants.values():  # warm-up
        fn()
    times = {name: [] for name in variants}  # wall-clock seconds
    cpu = {name: [] for name in variants}  # this process's CPU seconds (blind to time spent preempted)
    names = list(variants)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            t, c = time.perf_counter(), time.process_time()
            variants[name]()
            times[name].append(time.perf_counter() - t)
            cpu[name].append(time.process_time() - c)
    med = {name: statistics.median(v) for name, v in times.items()}
    best = {name: min(v) for name, v in times.items()}

    def ratios(a, b):
        """time a / time b: median over rounds of the ratio within a round, the same in CPU time, best/best."""
        return (statistics.median(x / y for x, y in zip(times[a], times[b])),
                statistics.median(x / y for x, y in zip(cpu[a], cpu[b])), best[a] / best[b])

    # The head's own cost: what scoring adds to each decode step (2c^2 multiply-adds a sequence).
    feature = torch.randn(k, model.config.hidden_size)
    with torch.no_grad():
        _head_logits(model.sprm_head, feature)
        t = time.perf_counter()
        for _ in range(200):
            _head_logits(model.sprm_head, feature)
        head_s = (time.perf_counter() - t) / 200

    tokens = k * new
    n_params = sum(p.numel() for p in hf.parameters())
    print(f"k={k}, prompt {prompt_len} + {new} new tokens, {n_params / 1e6:.1f}M params "
          f"(hidden {model.config.hidden_size}, {model.config.num_layers} layers, vocab {vocab}), "
          f"{torch.get_num_threads()} threads, {rounds} rounds")
    print(f"{'tokens/s':52s} {'median':>8s} {'best':>8s}")
    for name, label in [("on", "native sampler, scoring on"), ("off", "native sampler, scoring off"),
                        ("default", "native, scoring on, megatron-core's default KV path"),
                        ("hf", "transformers generate")]:
        print(f"{label:52s} {tokens / med[name]:8.1f} {tokens / best[name]:8.1f}")
    print(f"{'separate PRM pass (' + str(k) + ' x ' + str(prompt_len + new) + ' tokens), ms':52s} "
          f"{med['prm'] * 1e3:8.1f} {best['prm'] * 1e3:8.1f}")
    print(f"{'ratio':52s} {'median':>8s} {'CPU':>8s} {'best':>8s}  goal")

    def row(label, values, fmt, goal):
        print(f"{label:52s} " + " ".join(f"{fmt(v):>8s}" for v in values) + f"  {goal}")

    row("native / transformers tokens/s", [1 / x for x in ratios("on", "hf")], lambda v: f"{v:.2f}x", ">= 1.0x")
    row("scoring on vs off, time", ratios("on", "off"), lambda v: f"{100 * (v - 1):+.1f}%", "<= +3%")
    row("scoring on vs on (the same run: noise floor)", ratios("on again", "on"), lambda v: f"{100 * (v - 1):+.1f}%",
        "0")
    row("separate PRM pass / generation", ratios("prm", "on"), lambda v: f"+{100 * v:.1f}%", ">= +30%")
    row("flash-decode path speed-up over the default", ratios("default", "on"), lambda v: f"{v:.2f}x", "")
    per_step = best["on"] / (new + 1)
    head_params = sum(p.numel() for p in model.sprm_head.parameters())
    decode_params = n_params - hf.get_input_embeddings().weight.numel()  # what a decode step reads
    print(f"the head alone: {head_s * 1e6:.0f} us a decode step with its weights in cache, "
          f"{100 * head_s / per_step:.2f}% of a step ({per_step * 1e3:.1f} ms: best generation / forwards); "
          f"its {head_params / 1e6:.2f}M weights are {100 * head_params / decode_params:.2f}% of what a step reads")
    distributed.shutdown()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=sorted(SIZES), default="small", help="a named geometry (flags below override)")
    p.add_argument("--hidden", type=int)
    p.add_argument("--layers", type=int)
    p.add_argument("--heads", type=int)
    p.add_argument("--kv-heads", type=int)
    p.add_argument("--vocab", type=int)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--new", type=int, help="new tokens per sample (default: 64 small, 32 medium)")
    p.add_argument("--repeats", type=int, help="rounds of all the variants, medians over rounds (default: 15 small, "
                                              "5 medium)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    a = p.parse_args()
    hidden, layers, heads, kv_heads, vocab, new, rounds = SIZES[a.size]
    a.repeats = a.repeats or rounds
    hidden, layers, heads = a.hidden or hidden, a.layers or layers, a.heads or heads
    kv_heads, vocab, new = a.kv_heads or kv_heads, a.vocab or vocab, a.new or new
    work = Path(tempfile.mkdtemp(prefix="bench_rollout_"))
    try:
        _run(a, work, hidden, layers, heads, kv_heads, vocab, new)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run(a, work: Path, hidden: int, layers: int, heads: int, kv_heads: int, vocab: int, new: int) -> None:
    import transformers

    from megatron_rgm.convert import hf_to_mcore
    from megatron_rgm.launch import run_ranks

    cfg = transformers.Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=int(2.75 * hidden),
                                   num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                                   max_position_embeddings=max(1024, a.prompt + new), initializer_range=0.2,
                                   tie_word_embeddings=False)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(work / "hf")
    hf_to_mcore(str(work / "hf"), str(work / "mcore"))
    run_ranks(_bench, 1, str(work / "hf"), str(work / "mcore"), a.k, a.prompt, new, a.repeats, a.threads)


if __name__ == "__main__":
    sys.exit(main())
