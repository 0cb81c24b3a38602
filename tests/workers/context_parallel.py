"""Worker: context parallelism (CP = 2, with TP / SP / PP) against CP = 1 on the same weights and micro-batches.

Every rank first builds the CP = 1 model (data-parallel replicas, all the same) and runs the training step's
loss (GRPO + the SPR or BCE head term, :func:`megatron_rgm.integration.forward_step`) on whole micro-batches,
recording gradients, loss reports, step logits and reference log-probs. It then re-initialises megatron with the
layout, loads the same weights into its shards and runs the same micro-batches through megatron's pipeline
schedule, DDP and ``finalize_model_grads`` exactly as the trainer does: each CP rank takes its share of every
sequence. It writes the differences it sees to <out>/rank<r>.json. With a GPU (tools/gpu_check.sh) every rank
runs on it, over gloo.
"""

import argparse
import json
import os
import random

import numpy as np
import torch
from common import tiny_args

from megatron_rgm import distributed
from megatron_rgm.data.sources import collate, to_device
from megatron_rgm.data.store import Trajectory
from megatron_rgm.integration import forward_step, sprm_step_logits
from megatron_rgm.model import build_model
from megatron_rgm.model.state import full_state, gather_full, load_full_state
from megatron_rgm.rl import chunked_log_probs_and_entropy

# presplit: micro-batches split before forward_step, without the trainer's loss scales (a Megatron-LM loop's way)
LAYOUTS = {"cp2": dict(cp=2), "cp2_tp2_sp": dict(cp=2, tp=2, sp=True), "cp2_pp2": dict(cp=2, pp=2),
           "cp2_presplit": dict(cp=2, presplit=True)}
LENGTH = 32  # 2 x CP x TP chunks of whole tokens


def argv(layout: dict, loss: str) -> list[str]:
    extra = ["--context-parallel-size", str(layout.get("cp", 1)), "--sprm-dropout", "0", "--sprm-loss", loss,
             "--grpo-kl-coef", "0.05", "--grpo-entropy-coef", "0.01", "--seq-length", str(LENGTH)]
    if torch.cuda.is_available():  # tools/gpu_check.sh: both ranks on its one GPU, which NCCL refuses
        extra += ["--distributed-backend", "gloo"]
    return dict(tp=layout.get("tp", 1), pp=layout.get("pp", 1), sp=layout.get("sp", False), extra=extra)


def samples() -> list[Trajectory]:
    """Four trajectories of different lengths, prompts and steps; two correct."""
    rng = random.Random(3)
    out = []
    for i, (n, prompt) in enumerate([(33, 5), (20, 4), (29, 9), (12, 3)]):
        ids = np.array([rng.randrange(1, 400) for _ in range(n)])
        mask = np.arange(n) >= prompt
        steps = np.array(sorted(rng.sample(range(prompt, n - 1), k=4)), dtype=np.int64)
        out.append(Trajectory(tokens=ids, response_mask=mask, log_probs=np.array([-6.0 + rng.random() for _ in ids]),
                              step_positions=steps, reward=float(i % 2), correct=bool(i % 2), prompt_id=0,
                              group_id=0))
    return out


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def batches() -> list[dict]:
    s, adv = samples(), torch.tensor([0.7, -1.2, 0.4, 1.5])
    return [to_device(collate(s[:2], LENGTH, advantages=adv[:2]), device()),
            to_device(collate(s[2:], LENGTH, advantages=adv[2:]), device())]


def positions(batch: dict) -> torch.Tensor:
    return torch.arange(LENGTH, device=device()).expand(batch["tokens"].shape[0], -1)


def centre_head(model, full: dict) -> dict:
    """``full`` with the head's output bias shifted so the SPR mask keeps steps of both classes (a correct
    trajectory's step above 0, an incorrect one's below) and no step logit is within rounding of 0: the shift
    sits in the widest gap between the step logits that allow both."""
    with torch.no_grad():
        z, y = [], []
        for b in batches():
            model(b["tokens"], positions(b), None)
            z.append(sprm_step_logits(model, b["step_mask"]))
            y.append(b["correct"].repeat_interleave(b["step_mask"].sum(1)))
        z, y = torch.cat(z), torch.cat(y)
        lo, hi = z[~y].min(), z[y].max()
        if lo >= hi:
            raise RuntimeError("the random head ranks every correct step below every incorrect one: pick other data")
        inside = z[(z >= lo) & (z <= hi)].sort().values
        i = int((inside[1:] - inside[:-1]).argmax())
        shift = float(inside[i] + inside[i + 1]) / 2
    name = next(n for n in full if n.startswith("sprm_head.") and n.endswith(".bias") and full[n].numel() == 1)
    return {**full, name: full[name] - shift}


def reference(layout: dict, loss: str):
    args = tiny_args(**argv({}, loss))
    distributed.initialize(args.parallel)
    model = build_model(args)[0]
    full = centre_head(model, full_state(model))
    load_full_state(model, full)
    ref = build_model(args)[0]
    load_full_state(ref, {n: t * 0.9 for n, t in full.items()})  # a reference policy apart from the policy
    vocab = args.model.vocab_size
    total_tokens = sum(float(b["loss_mask"].sum()) for b in batches())
    reports, step_logits, ref_lp = [], [], []
    for batch in batches():
        with torch.no_grad():
            logits = ref(batch["tokens"], positions(batch), None)
            batch["ref_log_probs"] = chunked_log_probs_and_entropy(logits, batch["labels"], vocab, args.grpo.temperature,
                                                                   entropy=False)[0]
        ref_lp.append(batch["ref_log_probs"])
        out, loss_fn = forward_step(iter([batch]), model, rgm_config=args.rgm, grpo=args.grpo, vocab_size=vocab)
        step_logits.append(sprm_step_logits(model, batch["step_mask"]).detach())
        if not layout.get("presplit"):  # the trainer's scale: the micro-batch's share of the steps x the tokens
            batch["spr_scale"] = total_tokens * float(batch["step_mask"].sum()) / sum(
                float(b["step_mask"].sum()) for b in batches())
        total, _, report = loss_fn(out)
        (total / total_tokens).backward()
        reports.append(report)
    grads = gather_full(model, {n: p.grad for n, p in model.named_parameters()})
    return args, full, grads, metrics(reports), torch.cat(step_logits), ref_lp


def metrics(reports: list[dict]) -> dict:
    """What the trainer logs of these reports (summed over DP and CP), the step count per DP replica."""
    from megatron.core import parallel_state as ps

    from megatron_rgm.training.metrics import loss_metrics

    out = loss_metrics(ps, reports)
    for key in ("steps", "spr positives", "spr negatives"):  # totals over the DP replicas of the same batches
        if key in out:
            out[key] /= ps.get_data_parallel_world_size()
    return out


def run_layout(layout: dict, loss: str, full: dict):
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads

    from megatron_rgm.model.context_parallel import split_batch
    from megatron_rgm.training.batching import add_loss_scales
    from megatron_rgm.training.step import add_reference_log_probs, forward_backward, policy_log_probs_and_step_logits

    args = tiny_args(**argv(layout, loss))
    distributed.initialize(args.parallel)
    args.transformer.calculate_per_token_loss = True
    args.transformer.finalize_model_grads_func = finalize_model_grads
    chunk = build_model(args)[0]
    load_full_state(chunk, full)
    ref = build_model(args)[0]
    load_full_state(ref, {n: t * 0.9 for n, t in full.items()})
    ddp = DistributedDataParallel(args.transformer, DistributedDataParallelConfig(), chunk)
    ddp.zero_grad_buffer()
    vocab = args.model.vocab_size
    mbs = batches()
    if not layout.get("presplit"):
        add_loss_scales(mbs)
    add_reference_log_probs([ref], mbs, LENGTH, 2, args.grpo, vocab)
    seen = {"ref_log_probs": [b.get("ref_log_probs") for b in mbs]}
    if layout.get("presplit"):
        mbs = [{k: v for k, v in split_batch(b).items() if k != "cp_tokens"} for b in mbs]
    _, logits, _ = policy_log_probs_and_step_logits([ddp], batches(), LENGTH, 2, (), vocab)
    seen["step_logits"] = logits
    step = lambda it, m: forward_step(it, m, rgm_config=args.rgm, grpo=args.grpo, vocab_size=vocab)  # noqa: E731
    reports = forward_backward([ddp], mbs, LENGTH, 2, step)
    grads = gather_full(chunk, {n: p.main_grad for n, p in chunk.named_parameters()})
    return ps, seen, grads, reports


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--layouts", nargs="+", required=True)
    p.add_argument("--loss", default="spr", choices=["spr", "bce"])
    a = p.parse_args()
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    results = {}
    for name in a.layouts:
        layout = LAYOUTS[name]
        _, full, ref_grads, ref_reports, ref_steps, ref_lp = reference(layout, a.loss)
        ps, seen, grads, reports = run_layout(layout, a.loss, full)
        r = {"cp_rank": ps.get_context_parallel_rank(), "tp_rank": ps.get_tensor_model_parallel_rank(),
             "pp_rank": ps.get_pipeline_model_parallel_rank(), "grad_rel": {}, "grad_diff": {}, "grad_abs_max": {},
             "min_abs_step_logit": float(ref_steps.abs().min())}
        for n, g in grads.items():
            scale = max(ref_grads[n].abs().max().item(), 1e-12)
            r["grad_diff"][n] = (g.float() - ref_grads[n].float()).abs().max().item()
            r["grad_rel"][n] = r["grad_diff"][n] / scale
            r["grad_abs_max"][n] = g.abs().max().item()
        if ps.is_pipeline_last_stage():
            r["step_logits_diff"] = (seen["step_logits"].cpu() - ref_steps.float().cpu()).abs().max().item()
            r["num_steps"] = int(seen["step_logits"].numel())
            r["ref_log_probs_diff"] = max((x - y).abs().max().item() for x, y in zip(seen["ref_log_probs"], ref_lp))
            r["metrics"] = metrics(reports)
            r["ref_metrics"] = ref_reports
        results[name] = r
    distributed.shutdown()
    with open(os.path.join(a.out, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main()
