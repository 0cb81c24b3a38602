"""Benchmark: one GRPO + SPR training step vs GRPO alone, same model, same batch, same run.

    python tools/bench_train.py                          # CPU, one rank
    python tools/bench_train.py --hidden 1024 --layers 8 --tokens 1024
    python tools/bench_train.py --preset deepscaler-1.5b --bf16 --tokens 2048 --micro-batch-size 2   # a GPU
    python tools/bench_train.py --mixed 1 --tokens 2048     # mixed lengths: padded vs token budget vs packing
    python tools/bench_train.py --offload                   # the KL reference on the GPU vs in host memory

Builds the trainer (megatron DDP, optimizer with the head's param group) on a
rollout store of synthetic trajectories (random tokens, a step every
``--step-every`` tokens, half of them correct), then times whole optimizer
steps (forward, backward, optimizer) alternately with and without the SPR loss
and prints the medians and their ratio. Without the SPR loss the batch carries
no step positions, so the head does not run. Also prints the trained tokens/s of
the GRPO + SPR step and, on a GPU, its model FLOPs utilisation: the policy's
forward and backward (3x the forward's 2N + 4 L h s FLOPs per token, N the
weights in matrix products, attention counted without the causal half) plus
the reference model's forward (1x), over the H200's dense bf16 peak (989
TFLOP/s, the datasheet's).
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


def write_store(path: Path, groups: int, k: int, tokens: int, prompt: int, vocab: int, step_every: int,
                long_per_group: int | None = None) -> None:
    """``long_per_group``: that many trajectories of each group have ``tokens`` tokens, the others an eighth."""
    from megatron_rgm.data.store import RolloutStore, Trajectory

    rng = np.random.default_rng(0)
    store = RolloutStore(path, "a", attrs={"k": k})
    full = tokens
    for g in range(groups):
        batch = []
        for j in range(k):
            if long_per_group is not None:
                tokens = full if j < long_per_group else max(prompt + 2, full // 8)
            mask = np.arange(tokens) >= prompt
            steps = np.arange(prompt + step_every - 1, tokens - 1, step_every)
            batch.append(Trajectory(tokens=rng.integers(0, vocab, tokens), response_mask=mask,
                                    log_probs=np.where(mask, -2.0, 0.0).astype(np.float32), step_positions=steps,
                                    step_scores=np.full(len(steps), 0.5, np.float32), reward=float(j % 2),
                                    correct=bool(j % 2), prompt_id=g, group_id=g))
        store.append(0, batch)


PEAK_BF16_FLOPS = 989e12  # H100/H200 SXM dense bf16, the datasheet's


def forward_flops_per_token(model, seq: int) -> float:
    """2 x the weights in matrix products (the SPRM head's included; norms and biases are not) + attention."""
    cfg = model.config
    matmul = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and "embedding" not in n)
    if "output_layer.weight" not in dict(model.named_parameters()):  # tied: the output layer reads the embedding
        matmul += sum(p.numel() for n, p in model.named_parameters() if "word_embeddings" in n)
    return 2 * matmul + 4 * cfg.num_layers * cfg.hidden_size * seq


def _timed(trainer, samples, adv, spr: bool = True) -> float:
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
    t = time.perf_counter()
    trainer.train_step(samples, adv, spr=spr)
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t


def _trainer(argv: list[str]):
    """The trainer of ``argv`` and its first iteration's samples with their GRPO advantages."""
    from megatron_rgm.arguments import parse_args
    from megatron_rgm.rl import group_advantages
    from megatron_rgm.training.loop import Trainer

    trainer = Trainer(parse_args(argv))
    groups = trainer.source.for_iteration(1, 0, 1)
    samples = [s for g in groups for s in g]
    adv = torch.cat([group_advantages(torch.tensor([s.reward for s in g]), len(g)) for g in groups])
    return trainer, samples, adv


def _alternate(modes: list, repeats: int, step) -> dict:
    """``step(mode)`` (seconds) for each mode, in alternating order round by round, so drift hits all alike;
    the first round warms up and is not kept. Returns each mode's times."""
    times = {m: [] for m in modes}
    for r in range(repeats + 1):
        for mode in modes if r % 2 == 0 else modes[::-1]:
            elapsed = step(mode)
            if r:
                times[mode].append(elapsed)
    return times


def _bench_mixed(argv: list[str], repeats: int) -> None:
    """Padded micro-batches vs the token budget (padded rows, then packed rows), alternating, on one trainer."""
    from megatron_rgm import distributed

    trainer, samples, adv = _trainer(argv)
    run = trainer.run
    budget = run.max_tokens_per_microbatch
    modes = {"padded": (None, False), "token budget": (budget, False), "budget + packing": (budget, True)}

    def step(mode):
        run.max_tokens_per_microbatch, run.pack_sequences = modes[mode]
        return _timed(trainer, samples, adv)

    times = _alternate(list(modes), repeats, step)
    lengths = sorted(len(s.tokens) for s in samples)
    tokens = sum(lengths)
    print(f"batch: {len(samples)} trajectories, {lengths[0]}..{lengths[-1]} tokens ({tokens} in all); "
          f"--micro-batch-size {run.micro_batch_size} vs --max-tokens-per-microbatch {budget}")
    base = statistics.median(times["padded"])
    for mode, ts in times.items():
        t = statistics.median(ts)
        print(f"{mode:18s} {t * 1000:9.1f} ms / step, {tokens / t:9,.0f} tokens/s, x{base / t:.2f} vs padded "
              f"(median of {repeats})")
    if torch.cuda.is_available():
        print(f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    distributed.shutdown()


def _bench_offload(argv: list[str], repeats: int) -> None:
    """The reference model's weights kept on the GPU vs offloaded to host memory between its forwards."""
    from megatron_rgm import distributed
    from megatron_rgm.training.step import offload_weights, onload_weights

    trainer, samples, adv = _trainer(argv)
    cuda = torch.cuda.is_available()
    seen = {False: [], True: []}  # each step's peak GiB; a mode's first is the warm-up's

    def step(offload):
        trainer.run.offload_reference = offload
        (offload_weights if offload else onload_weights)(trainer.ref)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        elapsed = _timed(trainer, samples, adv)
        seen[offload].append(torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0)
        return elapsed

    times = _alternate([False, True], repeats, step)
    peaks = {m: max(v[1:]) for m, v in seen.items()}
    ref_gib = sum(p.numel() * p.element_size() for m in trainer.ref for p in m.parameters()) / 2**30
    print(f"batch: {len(samples)} trajectories x {len(samples[0].tokens)} tokens; reference weights {ref_gib:.2f} GiB")
    for offload, label in ((False, "reference on the GPU"), (True, "reference offloaded")):
        print(f"{label:22s} {statistics.median(times[offload]) * 1000:9.1f} ms / step, peak memory "
              f"{peaks[offload]:.2f} GiB (median of {repeats})")
    if cuda:
        print(f"offloading: peak x{peaks[True] / peaks[False]:.3f} ({peaks[True] - peaks[False]:+.2f} GiB), time "
              f"x{statistics.median(times[True]) / statistics.median(times[False]):.3f}")
    else:
        print("no GPU: the weights already live in host memory, so offloading changes nothing here")
    distributed.shutdown()


def _bench(argv: list[str], repeats: int) -> None:
    from megatron_rgm import distributed
    from megatron_rgm.model import unwrap

    trainer, samples, adv = _trainer(argv)
    steps = sum(len(s.step_positions) for s in samples)
    cuda = torch.cuda.is_available()
    times = _alternate([True, False], repeats, lambda with_spr: _timed(trainer, samples, adv, with_spr))
    grpo, both = statistics.median(times[False]), statistics.median(times[True])
    tokens, seq = sum(len(s.tokens) for s in samples), len(samples[0].tokens)
    model = unwrap(trainer.model[0])
    params = sum(p.numel() for p in model.parameters())
    print(f"model: {params / 1e6:.1f}M parameters, {model.config.params_dtype}, on {'cuda' if cuda else 'cpu'}; "
          f"reference model: {'yes' if trainer.ref is not None else 'no'}")
    print(f"batch: {len(samples)} trajectories x {seq} tokens, {steps} scored steps")
    print(f"GRPO only          {grpo * 1000:9.1f} ms / step (median of {repeats})")
    print(f"GRPO + SPR (head)  {both * 1000:9.1f} ms / step, {tokens / both:,.0f} tokens/s")
    if cuda:
        passes = 3 + (trainer.ref is not None)
        flops = passes * forward_flops_per_token(model, seq) * tokens
        print(f"GRPO + SPR MFU: {100 * flops / both / PEAK_BF16_FLOPS:.1f}% ({flops / both / 1e12:.0f} TFLOP/s of "
              f"{PEAK_BF16_FLOPS / 1e12:.0f}); peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    print(f"overhead of the SPRM head and SPR loss: {100 * (both / grpo - 1):+.1f}% (ratio {both / grpo:.3f})")
    distributed.shutdown()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, help="default: 4, or the preset's")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--tokens", type=int, default=512, help="prompt + response tokens per trajectory")
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--step-every", type=int, default=32, help="one step token every N response tokens")
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--groups", type=int, default=2)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--repeats", type=int, default=6)
    p.add_argument("--preset", help="a named geometry (megatron_rgm/model/presets.py) instead of the flags above")
    p.add_argument("--bf16", action="store_true", help="bf16 weights and activations (fp32 master weights)")
    p.add_argument("--mixed", type=int, metavar="LONG", help="instead: LONG trajectories of each group have --tokens "
                   "tokens, the others an eighth; times padded micro-batches against --max-tokens-per-microbatch "
                   "(micro-batch size x --tokens) with padded and with packed rows")
    p.add_argument("--offload", action="store_true", help="instead: the reference model kept on the GPU vs offloaded "
                   "to host memory between its forwards (--offload-reference): time and peak memory")
    a = p.parse_args()
    from megatron_rgm.launch import run_ranks

    work = Path(tempfile.mkdtemp(prefix="bench_train_"))
    if a.preset:
        from megatron_rgm.model.presets import preset

        vocab = preset(a.preset)["vocab_size"]
        geometry = ["--preset", a.preset, "--seq-length", str(a.tokens)]
        geometry += ["--num-layers", str(a.layers)] if a.layers else []  # a shallower rehearsal of the preset
        geometry += ["--max-position-embeddings", str(a.tokens)] if a.mixed is not None else []  # <= the budget
    else:
        vocab = a.vocab
        geometry = ["--preset", "tiny", "--num-layers", str(a.layers or 4), "--hidden-size", str(a.hidden),
                    "--ffn-hidden-size", str(int(2.75 * a.hidden)), "--num-attention-heads", str(a.heads),
                    "--num-query-groups", str(max(1, a.heads // 4)), "--vocab-size", str(a.vocab),
                    "--seq-length", str(a.tokens), "--max-position-embeddings", str(a.tokens)]
    write_store(work / "store", a.groups, a.k, a.tokens, a.prompt, vocab, a.step_every, a.mixed)
    argv = geometry + ["--rollouts", str(work / "store"), "--grpo-group-size", str(a.k), "--prompts-per-iter",
                       str(a.groups), "--micro-batch-size", str(a.micro_batch_size), "--lr", "1e-6",
                       "--no-sprm-calibrate-head"] + (["--bf16"] if a.bf16 else [])
    if a.mixed is not None:
        argv += ["--max-tokens-per-microbatch", str(a.micro_batch_size * a.tokens), "--pack-sequences"]
    bench = _bench_mixed if a.mixed is not None else _bench_offload if a.offload else _bench
    run_ranks(bench, 1, argv, a.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
