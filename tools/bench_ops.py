"""Benchmark: megatron_rgm._C kernels vs the eager pure-torch reference, same inputs, one run.

    python tools/bench_ops.py                 # CPU (and CUDA when present)
    python tools/bench_ops.py --device cuda

The headline case is 64 trajectories x 32k tokens with ~1% step tokens (about
330 steps per trajectory); a sweep of sizes follows. Each row times the SPR
loss forward+backward and the geometric aggregate forward+backward, and prints
the speed-up of the extension over the reference. On a GPU it also prints the
kernels' achieved bandwidth against a device-to-device copy of the same bytes
measured in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from megatron_rgm import ops
from megatron_rgm.ops import reference

CASES = [
    # (name, trajectories, tokens per trajectory, step-token fraction)
    ("64 x 32k tokens, 1% steps", 64, 32768, 0.01),
    ("64 x 4k tokens, 1% steps", 64, 4096, 0.01),
    ("1024 x 32k tokens, 1% steps", 1024, 32768, 0.01),
    ("100k x 20 tokens, 10% steps", 100_000, 20, 0.1),
    ("64 x 32k tokens, all steps", 64, 32768, 1.0),
]


def make_case(trajectories: int, tokens: int, frac: float, device: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    mean = max(1, int(tokens * frac))
    lengths = torch.randint(max(0, mean // 2), mean + mean // 2 + 1, (trajectories,), generator=g)
    cu = torch.zeros(trajectories + 1, dtype=torch.int32)
    cu[1:] = lengths.cumsum(0)
    logits = torch.randn(int(lengths.sum()), generator=g) * 3
    correct = torch.rand(trajectories, generator=g) < 0.5
    return logits.to(device), cu.to(device), correct.to(device)


def timeit(fn, device: str, repeats: int) -> float:
    """Median seconds of ``fn`` over ``repeats`` runs after two warm-ups."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(2):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def spr_step(impl, logits, cu, correct):
    x = logits.detach().requires_grad_(True)
    loss = impl(x, cu, correct)
    loss.backward()
    return x.grad


def geo_step(impl, logits, cu):
    x = logits.detach().requires_grad_(True)
    impl(x, cu, "geometric").sum().backward()
    return x.grad


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default=None)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--cases", type=int, default=len(CASES), help="run only the first N cases")
    a = p.parse_args()
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    ext = ops.extension()
    if ext is None:
        raise SystemExit("megatron_rgm._C is not built: pip install --no-build-isolation -e .")
    if device == "cuda" and not ext.cuda_compiled():
        raise SystemExit("megatron_rgm._C was built without CUDA kernels")
    where = (torch.cuda.get_device_name() if device == "cuda"
             else f"{torch.get_num_threads()} threads, {ext.cpu_isa()} kernels")
    print(f"device: {device} ({where})")
    print(f"{'case':32s} {'steps':>9s} | {'SPR ref ms':>10s} {'SPR ext ms':>10s} {'x':>6s} | "
          f"{'geo ref ms':>10s} {'geo ext ms':>10s} {'x':>6s}" + (" | ext GB/s  copy GB/s  %copy" if device == "cuda" else ""))
    for name, trajectories, tokens, frac in CASES[: a.cases]:
        logits, cu, correct = make_case(trajectories, tokens, frac, device)
        t_spr_ref = timeit(lambda: spr_step(reference.spr_loss, logits, cu, correct), device, a.repeats)
        t_spr_ext = timeit(lambda: spr_step(ops.spr_loss, logits, cu, correct), device, a.repeats)
        t_geo_ref = timeit(lambda: geo_step(reference.segment_aggregate, logits, cu), device, a.repeats)
        t_geo_ext = timeit(lambda: geo_step(ops.segment_aggregate, logits, cu), device, a.repeats)
        line = (f"{name:32s} {logits.numel():9d} | {t_spr_ref * 1e3:10.3f} {t_spr_ext * 1e3:10.3f} "
                f"{t_spr_ref / t_spr_ext:6.1f} | {t_geo_ref * 1e3:10.3f} {t_geo_ext * 1e3:10.3f} "
                f"{t_geo_ref / t_geo_ext:6.1f}")
        if device == "cuda":
            # SPR fwd+bwd: read logits twice (stats, backward), write grad once, plus labels.
            moved = 3 * logits.numel() * logits.element_size()
            t_kernel = timeit(lambda: (ext.spr_stats(logits, cu, correct),
                                       ext.spr_backward(logits, cu, correct, 1.0, 1.0, 1.0)), device, a.repeats)
            src = torch.empty(moved // 2, dtype=torch.uint8, device=device)
            dst = torch.empty_like(src)
            t_copy = timeit(lambda: dst.copy_(src), device, a.repeats)  # reads + writes `moved` bytes
            gbs, copy_gbs = moved / t_kernel / 1e9, moved / t_copy / 1e9
            line += f" | {gbs:8.1f} {copy_gbs:10.1f} {100 * gbs / copy_gbs:6.1f}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
