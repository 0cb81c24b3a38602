"""Benchmark: peak memory of hf-to-mcore against the size of the model on disk, one run.

    python tools/bench_convert.py --workdir /tmp/bench_convert [--layers 20 --hidden 2048] [--tp 2 --pp 2]

Builds a random Qwen2 model of about 1B parameters (bf16) with transformers,
converts it with tools/convert_checkpoint.py hf-to-mcore in a child process,
and prints the peak RSS of the converting processes (the largest one, and the
sum over them) as a ratio to the safetensors bytes on disk (goal: <= 0.6).
It also measures the fixed part of a rank's peak: a process that only imports
what a rank imports (torch, megatron-core, the model and conversion code).
"""

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def build(out: Path, layers: int, hidden: int) -> int:
    import transformers

    cfg = transformers.Qwen2Config(vocab_size=32000, hidden_size=hidden, intermediate_size=int(hidden * 2.75),
                                   num_hidden_layers=layers, num_attention_heads=16, num_key_value_heads=4,
                                   max_position_embeddings=4096, tie_word_embeddings=False, torch_dtype="bfloat16")
    torch.manual_seed(0)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    model.save_pretrained(out, max_shard_size="1GB")
    n = sum(p.numel() for p in model.parameters())
    del model
    return n


def import_cost(modules: str) -> int:
    """Peak RSS in bytes of a fresh process that imports ``modules`` (measured before its teardown).

    Read from VmHWM, the peak of the process's own memory: its ru_maxrss would start at the peak of this
    process (which built the model), inherited through the exec.
    """
    code = (f"import {modules}; print([l.split()[1] for l in open('/proc/self/status') "
            "if l.startswith('VmHWM:')][0])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    return int(out.stdout.strip().splitlines()[-1]) * 1024


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--layers", type=int, default=20)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--pp", type=int, default=2)
    a = p.parse_args()
    work = Path(a.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    params = build(work / "hf", a.layers, a.hidden)
    disk = sum(f.stat().st_size for f in (work / "hf").glob("*.safetensors"))
    start = time.time()
    # A child whose own children are the converting ranks: its RUSAGE_CHILDREN is theirs alone.
    code = ("import resource, subprocess, sys, json; "
            f"r = subprocess.run([sys.executable, {str(REPO / 'tools' / 'convert_checkpoint.py')!r}, 'hf-to-mcore', "
            f"'--hf-path', {str(work / 'hf')!r}, '--output', {str(work / 'mcore')!r}, '--tp', '{a.tp}', "
            f"'--pp', '{a.pp}']); "
            "print(json.dumps({'rc': r.returncode, 'maxrss_kb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    # Ranks print concurrently: one line may hold the ends of two, so match anywhere, once per rank.
    per_rank = {int(r): float(g) * 2**30 for r, g in
                re.findall(r"\[hf-to-mcore rank (\d+)\] peak RSS ([0-9.]+) GiB", out.stdout)}
    per_rank = [per_rank[r] for r in sorted(per_rank)]
    if report["rc"] != 0:
        raise SystemExit(f"conversion failed:\n{out.stderr[-4000:]}")
    # ru_maxrss of the children is the largest single process (the tool's parent or one rank).
    peak = report["maxrss_kb"] * 1024
    ranks = a.tp * a.pp
    print(f"model: {params / 1e9:.2f}B parameters, {disk / 2**30:.2f} GiB of bf16 safetensors")
    print(f"hf-to-mcore --tp {a.tp} --pp {a.pp}: {time.time() - start:.0f} s")
    print(f"peak RSS of the largest converting process: {peak / 2**30:.2f} GiB = {peak / disk:.2f} x model size "
          f"(goal <= 0.6)")
    print(f"per-rank peak RSS ({len(per_rank)} of {ranks} reported), by rank: " +
          ", ".join(f"{r / 2**30:.2f} GiB" for r in per_rank))
    print(f"sum over the {ranks} ranks' peaks: {sum(per_rank) / 2**30:.2f} GiB = {sum(per_rank) / disk:.2f} x "
          "model size (what all ranks of the tool hold at most, together)")
    steps = [("torch", "torch"), ("+ megatron-core", "torch, megatron.core.dist_checkpointing"),
             ("+ model and conversion code", "torch, megatron.core.dist_checkpointing, megatron_rgm.model, "
                                             "megatron_rgm.convert.convert, megatron_rgm.convert.stream_save")]
    costs = [(label, import_cost(mods)) for label, mods in steps]
    fixed = costs[-1][1]
    print("fixed part (peak RSS of a process that only imports): " +
          ", ".join(f"{label} {c / 2**30:.3f} GiB" for label, c in costs) +
          f" = {fixed / disk:.2f} x model size")
    print(f"variable part of the largest process: {(peak - fixed) / 2**30:.3f} GiB = {(peak - fixed) / disk:.3f} x "
          "model size")


if __name__ == "__main__":
    main()
