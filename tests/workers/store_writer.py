"""Worker: append batches to a rollout store as one rank (optionally dying before the last commit)."""

import sys

import numpy as np

from megatron_rgm.data.store import RolloutStore, Trajectory


def batch(rank: int, b: int, n: int = 3):
    out = []
    for i in range(n):
        L = 5 + i + rank
        out.append(Trajectory(tokens=np.arange(L) + 100 * rank + 10 * b, response_mask=np.arange(L) >= 2,
                              log_probs=-np.ones(L) * (i + 1), step_positions=np.array([2, 3][: 1 + i % 2]),
                              step_scores=np.array([0.5, 0.25][: 1 + i % 2]), reward=float(i % 2),
                              correct=bool(i % 2), prompt_id=1000 * rank + b, group_id=b))
    return out


if __name__ == "__main__":
    path, rank, batches = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    store = RolloutStore(path, "a", tokenizer="tok-A", attrs={"model": "tiny"})
    for b in range(batches):
        store.append(rank, batch(rank, b))
