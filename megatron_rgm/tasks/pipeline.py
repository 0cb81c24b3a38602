"""The tiny preset end to end: task -> SFT warm start -> RGM (GRPO + SPR) -> Best-of-N -> evaluation.

    python -m megatron_rgm.tasks.pipeline --output runs/tiny [--nproc 2] [-- extra flags for the RGM stage]

(``bash examples/pretrain_rgm.sh`` runs this for ``PRESET=tiny``.) Every
artefact lands under ``--output``::

    task/            tokenizer, train / eval prompts, SFT texts
    sft/             warm-start checkpoint (--stage sft, data parallel over the ranks)
    rgm/             RGM checkpoint (--stage rgm at TP=2 by default)
    rollouts/        rollout store of every RGM iteration
    train_metrics.jsonl, tensorboard/
    hf/              HF export (safetensors + score_module.pt + tokenizer)
    samples.jsonl    Best-of-N on the eval prompts, every candidate answered
    eval.json, eval.md, accuracy_vs_k.png, score_divergence.png
    scorer.json      the head's pairwise accuracy, margin, step AUC and the supervised-probe bound

The evaluation table is printed last, then ``output: <dir>``. ``--sft-from RUN``
copies ``task/`` and ``sft/`` of an earlier run and starts at the RGM stage, so
ablations of the RGM stage share one warm start.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from megatron_rgm import lazy
from megatron_rgm.config import ConfigError, run_tool
from megatron_rgm.evaluation.report import run as evaluate
from megatron_rgm.inference.best_of_n import BestOfNConfig, load_problems, run_megatron
from megatron_rgm.launch import free_port, run_ranks
from megatron_rgm.rollout.sampler import SamplingParams
from megatron_rgm.tasks.knobs import LONG_RESPONSE, Knobs
from megatron_rgm.tasks.prepare import add_knob_args, knobs_from_args, prepare, task_paths
from megatron_rgm.tasks.probe import format_report as format_probe
from megatron_rgm.tasks.probe import report as probe_report

LONG_MICROBATCH_TOKENS = 1024  # 1.8x the tokens/s of padded SFT micro-batches on the long task (docs/PERFORMANCE.md)


@dataclass
class PipelineConfig:
    """Sizes and hyper-parameters of the tiny run (defaults: the run docs/RESULTS.md measures)."""

    output: str
    nproc: int = 2
    seed: int = 0
    n_train: int = 2000
    n_eval: int = 200
    n_sft: int = 4000
    max_value: int = 9
    max_terms: int = 6
    error_rate: float = 1.0
    fix_rate: float = 0.5
    order: str = "given"
    num_layers: int = 8
    sprm_layer: int = -1
    sft_iters: int = 2000
    sft_batch: int = 32
    sft_lr: float = 2e-3
    rgm_iters: int = 30
    rgm_layout: list[str] = field(default_factory=lambda: ["--tensor-model-parallel-size", "2"])
    prompts_per_iter: int = 8
    k: int = 8
    temperature: float = 0.8
    max_response: int | None = None  # tokens per response; None: 48, or knobs.LONG_RESPONSE with the long knob
    rgm_lr: float = 2e-5
    sprm_lr: float = 1e-3
    # plain BCE for the head on the RGM stage's first N iterations, then SPR (--sprm-mask-warmup-iters): a fresh
    # head meeting noisy step labels can lock SPR's mask on a head that does not read the steps (docs/RESULTS.md)
    mask_warmup_iters: int = 5
    eval_k: int = 8
    ks: tuple[int, ...] = (1, 2, 8)
    extra: list[str] = field(default_factory=list)
    sft_from: str | None = None
    knobs: Knobs | None = None  # the knobbed task (tasks/knobs.py) instead of the plain one
    vocab_size: int | None = None  # the tokenizer's upper bound; None: prepare's (512, or LONG_VOCAB for the long task)
    # micro-batches of SFT and RGM grouped by length under this many tokens (--max-tokens-per-microbatch); None:
    # LONG_MICROBATCH_TOKENS with the long knob (its texts are 35-255 tokens long), else --micro-batch-size samples
    max_tokens_per_microbatch: int | None = None


def _say(msg: str) -> None:
    print(f"[tiny] {msg}", flush=True)


def _torchrun(nproc: int, argv: list[str], log: Path) -> None:
    """``torchrun -m megatron_rgm.pretrain`` with ``argv``; its lines go to the terminal and to ``log``."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           f"--master-port={free_port()}", "-m", "megatron_rgm.pretrain", *argv]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), PYTHONWARNINGS="ignore")
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        for line in proc.stdout:
            f.write(line)
            if line.startswith((" iteration", "error", "[checkpoint]")):
                print("   " + line.rstrip(), flush=True)
        if proc.wait() != 0:
            raise ConfigError(f"{' '.join(cmd[3:6])} ... exited {proc.returncode}: see {log}")


def plot_divergence(metrics_file: Path, png: Path) -> None:
    """Mean trajectory score of correct vs incorrect rollouts over the RGM iterations (the "aha" divergence)."""
    plt = lazy.pyplot("the score-divergence plot")
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines()]
    it = [r["iteration"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, colour in (("score correct", "tab:green"), ("score incorrect", "tab:red")):
        ax.plot(it, [r.get(key, float("nan")) for r in rows], label=key, color=colour)
    ax.plot(it, [r.get("accuracy", float("nan")) for r in rows], label="rollout accuracy", color="tab:gray",
            linestyle="--")
    ax.set_xlabel("RGM iteration")
    ax.set_ylabel("geometric mean of step scores")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def response_budget(max_response: int | None, meta: dict) -> int:
    """Tokens per response: ``max_response`` if given, else 48, or ``LONG_RESPONSE`` for a task (its ``task.json``
    ``meta``, also an ``--sft-from`` run's) made with the long knob."""
    if max_response is not None:
        return max_response
    return LONG_RESPONSE if _is_long(meta) else 48


def _is_long(meta: dict) -> bool:
    """Whether a task (its ``task.json`` ``meta``) was made with the long knob."""
    return bool((meta.get("knobs") or {}).get("long"))


def task_flags(max_tokens_per_microbatch: int | None, meta: dict) -> list[str]:
    """Flags both training stages take from the task (its ``task.json`` ``meta``): ``--vocab-size`` where its
    tokenizer outgrows the tiny preset's 512 rows, and the micro-batches' token budget (``max_tokens_per_microbatch``
    if given, else ``LONG_MICROBATCH_TOKENS`` for a task made with the long knob, else none)."""
    flags = ["--vocab-size", str(meta["vocab_size"])] if meta["vocab_size"] > 512 else []
    budget = max_tokens_per_microbatch
    if budget is None and _is_long(meta):
        budget = LONG_MICROBATCH_TOKENS
    return flags + (["--max-tokens-per-microbatch", str(budget)] if budget else [])


def run(cfg: PipelineConfig) -> dict:
    """Run every stage; returns the evaluation metrics."""
    from megatron_rgm.convert import mcore_to_hf
    from megatron_rgm.model.presets import preset

    out = Path(cfg.output).resolve()
    positions = preset("tiny")["max_position_embeddings"]
    if cfg.max_tokens_per_microbatch is not None and cfg.max_tokens_per_microbatch < positions:
        raise ConfigError(f"--max-tokens-per-microbatch {cfg.max_tokens_per_microbatch} cannot hold one sequence of "
                          f"the tiny preset ({positions} positions): pass at least {positions}, or leave it out")
    warmup_flag = "--sprm-mask-warmup-iters"
    given = (a.split("=")[0] for a in cfg.extra)  # as the trainer's parser reads them: --flag=N, abbreviated
    if any(len(flag) > len("--sprm-mask") and warmup_flag.startswith(flag) for flag in given):
        raise ConfigError(f"{warmup_flag} after -- would override the pipeline's own: pass --mask-warmup-iters N "
                          "before -- (0: SPR from the first iteration)")
    if cfg.rgm_iters < 1:
        raise ConfigError(f"--rgm-iters must be >= 1, got {cfg.rgm_iters}")
    if not 0 <= cfg.mask_warmup_iters < cfg.rgm_iters:
        raise ConfigError(f"--mask-warmup-iters {cfg.mask_warmup_iters} must be >= 0 and below --rgm-iters "
                          f"{cfg.rgm_iters}, or the head never trains with SPR: pass fewer, or 0 for SPR from the "
                          "first iteration")
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"--output {out} exists and is not empty: choose a new directory (OUTDIR=...)")
    torch.set_num_threads(1)  # a 128-wide model: one thread per process beats contention on a small machine
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()

    if cfg.sft_from:
        src = Path(cfg.sft_from)
        done = (src / "task" / "task.json").is_file() and (src / "sft" / "latest_checkpointed_iteration.txt").is_file()
        if not done:
            raise ConfigError(f"--sft-from {src} is not a finished tiny run (no task/task.json or sft/ checkpoint): "
                              "pass the output directory of an earlier run")
        source_knobs = json.loads((src / "task" / "task.json").read_text()).get("knobs")
        if cfg.knobs is not None and vars(cfg.knobs) != source_knobs:
            raise ConfigError(f"--sft-from {src} was made with knobs {source_knobs}, not {vars(cfg.knobs)}: its task "
                              "is reused as it is, so drop --lucky/--long/--systematic or pass that run's values")
        _say(f"1-2/6 task and SFT warm start copied from {src}")
        shutil.copytree(src / "task", out / "task")
        shutil.copytree(src / "sft", out / "sft")
        task = task_paths(out / "task")
    else:
        _say(f"1/6 task: {cfg.n_train} train / {cfg.n_eval} eval problems, {cfg.n_sft} SFT traces, tokenizer")
        task = prepare(out / "task", seed=cfg.seed, n_train=cfg.n_train, n_eval=cfg.n_eval, n_sft=cfg.n_sft,
                       max_value=cfg.max_value, max_terms=cfg.max_terms, error_rate=cfg.error_rate,
                       fix_rate=cfg.fix_rate, order=cfg.order, vocab_size=cfg.vocab_size, knobs=cfg.knobs)
    meta = json.loads(task["meta"].read_text())
    max_response = response_budget(cfg.max_response, meta)
    common = ["--preset", "tiny", "--num-layers", str(cfg.num_layers), "--tokenizer", str(task["tokenizer"]),
              "--seed", str(cfg.seed)]
    common += task_flags(cfg.max_tokens_per_microbatch, meta)

    if not cfg.sft_from:
        _say(f"2/6 SFT warm start: {cfg.sft_iters} iterations x {cfg.sft_batch} texts on {cfg.nproc} "
             "data-parallel ranks")
        _torchrun(cfg.nproc, [*common, "--stage", "sft", "--sft-data", str(task["sft"]), "--train-iters",
                              str(cfg.sft_iters), "--global-batch-size", str(cfg.sft_batch), "--micro-batch-size",
                              str(cfg.sft_batch // cfg.nproc), "--lr", str(cfg.sft_lr), "--lr-warmup-iters", "20",
                              "--log-interval", str(max(1, cfg.sft_iters // 10)), "--save", str(out / "sft")],
                  out / "sft.log")

    warmup = f", the head on plain BCE for the first {cfg.mask_warmup_iters}" if cfg.mask_warmup_iters else ""
    _say(f"3/6 RGM (GRPO + SPR): {cfg.rgm_iters} iterations x {cfg.prompts_per_iter} prompts x k={cfg.k}, "
         f"{' '.join(cfg.rgm_layout)}{warmup}")
    _torchrun(cfg.nproc, [*common, *cfg.rgm_layout, "--prompts", str(task["train"]), "--verifier", "exact",
                          "--pretrained-checkpoint", str(out / "sft"), "--train-iters", str(cfg.rgm_iters),
                          "--prompts-per-iter", str(cfg.prompts_per_iter), "--grpo-group-size", str(cfg.k),
                          "--rollout-temperature", str(cfg.temperature), "--max-response-length",
                          str(max_response), "--micro-batch-size", str(cfg.prompts_per_iter * cfg.k // 4),
                          "--lr", str(cfg.rgm_lr), "--sprm-lr", str(cfg.sprm_lr), "--sprm-layer",
                          str(cfg.sprm_layer), "--save", str(out / "rgm"), "--save-rollouts", str(out / "rollouts"),
                          "--metrics-file", str(out / "train_metrics.jsonl"), "--tensorboard-dir",
                          str(out / "tensorboard"), "--sprm-mask-warmup-iters", str(cfg.mask_warmup_iters),
                          *cfg.extra], out / "rgm.log")

    _say(f"4/6 Best-of-N on {cfg.n_eval} eval problems: k={cfg.eval_k}, every candidate answered")
    problems = load_problems(str(task["eval"]), None, None, None)
    bon = BestOfNConfig(k=cfg.eval_k, sampling=SamplingParams(temperature=cfg.temperature, top_p=0.95,
                                                               max_new_tokens=max_response, seed=cfg.seed),
                        complete_all=True, verifier="exact", answer_max_new_tokens=16)
    run_ranks(run_megatron, 1, str(out / "rgm"), None, problems, str(out / "samples.jsonl"), bon, 1, 1)

    _say("5/6 HF export")
    mcore_to_hf(str(out / "rgm"), str(out / "hf"))

    plot_divergence(out / "train_metrics.jsonl", out / "score_divergence.png")
    scorer = probe_report(out, min(cfg.eval_k, max(cfg.ks)))
    (out / "scorer.json").write_text(json.dumps(scorer, indent=1) + "\n")
    print(format_probe(scorer, min(cfg.eval_k, max(cfg.ks))), flush=True)
    _say(f"6/6 evaluation ({time.time() - started:.0f} s so far): pass@1, maj@k, BoN@k per aggregation, oracle")
    metrics = evaluate(out / "samples.jsonl", list(cfg.ks), out / "eval.json", out / "eval.md",
                       out / "accuracy_vs_k.png", "exact")  # prints the table
    print(f"output: {out}", flush=True)
    return metrics


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    d = PipelineConfig(output="")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output", required=True)
    p.add_argument("--nproc", type=int, default=d.nproc)
    p.add_argument("--seed", type=int, default=d.seed)
    for name in ("n_train", "n_eval", "n_sft", "max_value", "max_terms", "num_layers", "sft_iters", "sft_batch",
                 "rgm_iters", "prompts_per_iter", "k", "max_response", "eval_k", "vocab_size",
                 "max_tokens_per_microbatch"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(d, name))
    p.add_argument("--mask-warmup-iters", type=int, default=d.mask_warmup_iters, metavar="N",
                   help="train the head with plain BCE on the RGM stage's first N iterations, then with SPR "
                        "(--sprm-mask-warmup-iters; 0: SPR from the first iteration, as the paper)")
    for name in ("error_rate", "fix_rate", "sft_lr", "rgm_lr", "sprm_lr", "temperature"):
        p.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(d, name))
    p.add_argument("--sprm-layer", type=int, default=d.sprm_layer,
                   help="decoder layer the SPRM head reads in the RGM stage (-1: the last; -2, the paper's "
                        "penultimate layer, is the ablation of docs/RESULTS.md)")
    p.add_argument("--order", choices=("shuffled", "given"), default=d.order,
                   help="SFT traces add the numbers in a random order or in the statement's order")
    p.add_argument("--sft-from", default=None, metavar="RUN",
                   help="reuse task/ and sft/ of an earlier run's output directory (ablations of the RGM stage)")
    p.add_argument("--ks", type=int, nargs="+", default=list(d.ks))
    p.add_argument("--rgm-layout", default="--tensor-model-parallel-size 2",
                   help="layout flags of the RGM stage, e.g. '--pipeline-model-parallel-size 2'")
    add_knob_args(p)
    a = p.parse_args(argv)
    skip = ("rgm_layout", "ks", "lucky", "long", "systematic")
    cfg = PipelineConfig(**{k: v for k, v in vars(a).items() if k not in skip}, knobs=knobs_from_args(a),
                         rgm_layout=a.rgm_layout.split(), ks=tuple(a.ks), extra=extra)
    return run_tool(lambda: run(cfg))


if __name__ == "__main__":
    sys.exit(main())
