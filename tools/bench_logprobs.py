"""Benchmark: GRPO's log-probs and entropy, chunked vs the whole-vocabulary functions: memory and time.

    python tools/bench_logprobs.py                                   # 4096 tokens x vocab 32000, bf16 logits
    python tools/bench_logprobs.py --tokens 16384 --vocab 152064 --dtype float32
    python tools/bench_logprobs.py --device cuda --batch 4 --tokens 8192 --vocab 152064   # on a GPU

Each variant runs in a fresh process (peak resident memory is per process; on a GPU, the allocator's peak):
the logits ``[batch, tokens, vocab]``
(requires grad, as the output layer's are), then forward and backward of ``logp * w1 + entropy * w2`` at
temperature 0.6, as ``rgm_loss_func`` takes them. Prints each variant's peak memory above the logits (the
gradient of the logits, which both variants produce, included), its time, and
``chunked/whole peak extra memory: N.NNx``.
"""

import argparse
import json
import resource
import subprocess
import sys
import time

import torch


def _peak_mib(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _child(mode: str, batch: int, tokens: int, vocab: int, dtype: str, repeats: int, device: str) -> dict:
    from megatron_rgm.rl import chunked_log_probs_and_entropy, vocab_parallel_entropy, vocab_parallel_log_probs

    torch.set_num_threads(1)
    g = torch.Generator(device=device).manual_seed(0)
    # Drawn in its own dtype, scaled in place: no full-size temporary raises the baseline peak.
    logits = torch.randn(batch, tokens, vocab, generator=g, device=device, dtype=getattr(torch, dtype)).mul_(3)
    logits.requires_grad_(True)
    targets = torch.randint(0, vocab, (batch, tokens), generator=g, device=device)
    w1 = torch.randn(batch, tokens, generator=g, device=device)
    w2 = torch.randn(batch, tokens, generator=g, device=device)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base = _peak_mib(device)
    times = []
    for _ in range(repeats):
        logits.grad = None
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        if mode == "chunked":
            lp, ent = chunked_log_probs_and_entropy(logits, targets, vocab, 0.6)
        else:
            scaled = logits / 0.6
            lp, ent = vocab_parallel_log_probs(scaled, targets, vocab), vocab_parallel_entropy(scaled, vocab)
        (lp * w1 + ent * w2).sum().backward()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return {"extra_mib": _peak_mib(device) - base, "seconds": min(times), "logits_mib": logits.numel() *
            logits.element_size() / 2**20}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--child", choices=("chunked", "whole"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        try:
            result = _child(a.child, a.batch, a.tokens, a.vocab, a.dtype, a.repeats, a.device)
        except torch.OutOfMemoryError:  # on a GPU the whole-vocabulary path may not fit at all: say so
            result = {"oom": True, "logits_mib": a.batch * a.tokens * a.vocab * (2 if a.dtype == "bfloat16" else 4)
                      / 2**20}
        print(json.dumps(result))
        return 0
    out = {}
    for mode in ("whole", "chunked"):
        proc = subprocess.run([sys.executable, __file__, "--child", mode, "--batch", str(a.batch), "--tokens",
                               str(a.tokens), "--vocab", str(a.vocab), "--dtype", a.dtype, "--repeats",
                               str(a.repeats), "--device", a.device],
                              capture_output=True, text=True)
        if proc.returncode:
            print(proc.stderr[-3000:], file=sys.stderr)
            return 1
        out[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"logits [{a.batch}, {a.tokens}, {a.vocab}] {a.dtype} on {a.device}: {out['whole']['logits_mib']:.0f} MiB "
          "(their gradient as much again)")
    for mode, r in out.items():
        if r.get("oom"):
            print(f"{mode:8s} out of memory on the {a.device}")
        else:
            print(f"{mode:8s} peak memory above the logits {r['extra_mib']:8.0f} MiB, "
                  f"forward+backward {r['seconds']:.2f} s")
    if any(r.get("oom") for r in out.values()):
        return 0 if not out["chunked"].get("oom") else 1
    print(f"chunked/whole peak extra memory: {out['chunked']['extra_mib'] / out['whole']['extra_mib']:.2f}x")
    print(f"chunked/whole time: {out['chunked']['seconds'] / out['whole']['seconds']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
