"""Benchmark: one GRPO + SPR training step vs GRPO alone, same model, same batch, same run.

    python tools/bench_train.py                          # CPU, one rank
    python tools/bench_train.py --hidden 1024 --layers 8 --tokens 1024

Builds the trainer (megatron DDP, optimizer with the head's param group) on a
rollout store of synthetic trajectories (random tokens, a step every
``--step-every`` tokens, half of them correct), then times whole optimizer
steps (forward, backward, optimizer) alternately with and without the SPR loss
and prints the medians and their ratio. Without the SPR loss the batch carries
no step positions, so the head does not run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def write_store(path: Path, groups: int, k: int, tokens: int, prompt: int, vocab: int, step_every: int) -> None:
    from megatron_rgm.data.store import RolloutStore, Trajectory

    rng = np.random.default_rng(0)
    store = RolloutStore(path, "a", attrs={"k": k})
    for g in range(groups):
        batch = []
        for j in range(k):
            mask = np.arange(tokens) >= prompt
            steps = np.arange(prompt + step_every - 1, tokens - 1, step_every)
            batch.append(Trajectory(tokens=rng.integers(0, vocab, tokens), response_mask=mask,
                                    log_probs=np.where(mask, -2.0, 0.0).astype(np.float32), step_positions=steps,
                                    step_scores=np.full(len(steps), 0.5, np.float32), reward=float(j % 2),
                                    correct=bool(j % 2), prompt_id=g, group_id=g))
        store.append(0, batch)


def _bench(argv: list[str], repeats: int) -> None:
    from megatron_rgm import distributed
    from megatron_rgm.arguments import parse_args
    from megatron_rgm.rl import group_advantages
    from megatron_rgm.training.loop import Trainer

    trainer = Trainer(parse_args(argv))
    groups = trainer.source.for_iteration(1, 0, 1)
    samples = [s for g in groups for s in g]
    adv = torch.cat([group_advantages(torch.tensor([s.reward for s in g]), len(g)) for g in groups])
    steps = sum(len(s.step_positions) for s in samples)
    times = {True: [], False: []}
    for r in range(repeats + 1):  # the first round warms up
        for with_spr in (True, False) if r % 2 == 0 else (False, True):
            t = time.perf_counter()
            trainer.train_step(samples, adv, spr=with_spr)
            if r:
                times[with_spr].append(time.perf_counter() - t)
    grpo, both = statistics.median(times[False]), statistics.median(times[True])
    print(f"batch: {len(samples)} trajectories x {len(samples[0].tokens)} tokens, {steps} scored steps")
    print(f"GRPO only          {grpo * 1000:9.1f} ms / step (median of {repeats})")
    print(f"GRPO + SPR (head)  {both * 1000:9.1f} ms / step")
    print(f"overhead of the SPRM head and SPR loss: {100 * (both / grpo - 1):+.1f}% (ratio {both / grpo:.3f})")
    distributed.shutdown()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--tokens", type=int, default=512, help="prompt + response tokens per trajectory")
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--step-every", type=int, default=32, help="one step token every N response tokens")
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--groups", type=int, default=2)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--repeats", type=int, default=6)
    a = p.parse_args()
    from megatron_rgm.launch import run_ranks

    work = Path(tempfile.mkdtemp(prefix="bench_train_"))
    write_store(work / "store", a.groups, a.k, a.tokens, a.prompt, a.vocab, a.step_every)
    argv = ["--preset", "tiny", "--num-layers", str(a.layers), "--hidden-size", str(a.hidden),
            "--ffn-hidden-size", str(int(2.75 * a.hidden)), "--num-attention-heads", str(a.heads),
            "--num-query-groups", str(max(1, a.heads // 4)), "--vocab-size", str(a.vocab),
            "--seq-length", str(a.tokens), "--max-position-embeddings", str(a.tokens),
            "--rollouts", str(work / "store"), "--grpo-group-size", str(a.k), "--prompts-per-iter", str(a.groups),
            "--micro-batch-size", str(a.micro_batch_size), "--lr", "1e-6", "--no-sprm-calibrate-head"]
    run_ranks(_bench, 1, argv, a.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
