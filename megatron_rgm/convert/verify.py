"""verify: the HF model and the Megatron checkpoint at a TP/PP layout on the same random batches.

Reports the max abs difference of the logits (over the real vocabulary; the
TP padding rows are dropped) and of the SPRM head logits at random step
positions, and fails (:class:`VerifyFailed`, a non-zero exit) when either is
above :data:`TOLERANCE` for the checkpoint's dtype, relative to the largest HF
logit (at least 1). The HF side's head is ``score_module.pt`` beside the HF weights
when present, else the checkpoint's own head (then only the feature is compared).
The sequences are :data:`SEQ_LENGTH` tokens long (the model's positions if fewer).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_rgm import distributed
from megatron_rgm.convert.hf_io import HFCheckpoint
from megatron_rgm.launch import run_ranks
from megatron_rgm.hf import HFFeature, head_logits, load_causal_lm
from megatron_rgm.model import SPRMHead
from megatron_rgm.head import load_head
from megatron_rgm.model.load import load_model


# The Megatron side runs in the checkpoint's dtype, the HF side in float32: float32 differs by op order alone
# (measured: 5e-7 on the random 4-layer test Llama at TP2 PP2); bf16 and fp16 by their rounding, grown over the
# layers. A converted model that drops a feature differs by more: the same Llama without its Llama 3.1 RoPE
# scaling, 1.2e-3 over 1024 positions (a scaling shows over long distances, hence SEQ_LENGTH).
TOLERANCE = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 5e-2}
SEQ_LENGTH = 1024


class VerifyFailed(Exception):
    """The converted model's logits or head scores differ from the HF model's by more than the tolerance."""


def check_report(report: dict) -> None:
    """Raise :class:`VerifyFailed` naming what is above the report's tolerance."""
    bound = report["tolerance"] * max(1.0, report["max_abs_hf_logit"])
    over = [f"{name} {report[key]:.3e}" for name, key in (("logits", "max_abs_logit_diff"),
                                                          ("head logits", "max_abs_head_diff")) if report[key] > bound]
    if over:
        raise VerifyFailed(f"verify tp={report['tp']} pp={report['pp']}: max |diff| of {' and '.join(over)} is above "
                           f"the {report['dtype']} tolerance {bound:.1e} ({report['tolerance']:.0e} x the largest HF "
                           f"logit, at least 1){_where(report)}: the converted model does not compute what the HF "
                           "model does")


def _where(report: dict) -> str:
    """Where the largest logit difference is, and from which position on the logits differ (a dropped sliding
    window shows from the window's length on; a dropped RoPE scaling grows with the position)."""
    at = report.get("where")
    if not at:
        return ""
    first = at["first_position_over"]
    return (f"; the largest at position {at['position']} of row {at['row']}"
            + (f", over the tolerance from position {first} on" if first is not None else ""))


def _verify_rank(hf_path: str, mcore_path: str, tp: int, pp: int, batches: int, report_file: str | None,
                 ep: int = 1, etp: int | None = None) -> None:
    verify_layout(hf_path, mcore_path, tp, pp, batches, report_file, ep, etp)
    distributed.shutdown()


def verify_layout(hf_path: str, mcore_path: str, tp: int, pp: int, batches: int = 2,
                  report_file: str | None = None, ep: int = 1, etp: int | None = None) -> dict | None:
    """Run the comparison at one layout on this rank (the process group may already be up).

    Returns:
        The report (with the Megatron logits of the first batch under
        ``"logits"``) on the rank that reports, else None.
    """
    loaded = load_model(mcore_path, tp, pp, ep=ep, etp=etp)
    model, args = loaded.model, loaded.args
    arch = HFCheckpoint(hf_path).arch  # what is compared: the HF side's own architecture
    last = ps.is_pipeline_last_stage()
    # Past any window (a dropped one shows from its length on), as far as the positions allow.
    seq, bsz = min(max(SEQ_LENGTH, (args.model.sliding_window or 0) + 256), arch.max_position_embeddings), 2
    report = {"max_abs_logit_diff": 0.0, "max_abs_head_diff": 0.0, "max_abs_hf_logit": 0.0, "steps": 0, "tp": tp,
              "pp": pp, "ep": ep, "etp": args.parallel.expert_tensor_parallel_size, "seq_length": seq, "sliding_window": args.model.sliding_window,
              "dtype": arch.dtype, "tolerance": TOLERANCE.get(arch.dtype, 1e-4)}
    first_logits = None
    if last:
        hf = load_causal_lm(hf_path, torch.float32).eval()
        feature = HFFeature(hf, args.rgm.sprm_layer)
        head_file = Path(hf_path) / "score_module.pt"
        hf_head = SPRMHead(arch.hidden_size, args.rgm.sprm_hidden_mult, 0.0).eval()
        if head_file.exists():
            hf_head.load_state_dict(load_head(head_file, arch.hidden_size))
        else:
            hf_head.load_state_dict(model.sprm_head.state_dict())
    g = torch.Generator().manual_seed(0)
    for _ in range(batches):
        ids = torch.randint(0, arch.vocab_size, (bsz, seq), generator=g)
        mask = torch.rand(bsz, seq, generator=g) < 0.25
        seen = {}

        def loss_func(output):
            logits, step_logits = output
            seen["logits"] = tensor_parallel.gather_from_tensor_model_parallel_region(logits)
            seen["head"] = step_logits
            return logits.sum() * 0.0, {}

        def step(data_iterator, m):
            x, msk = next(data_iterator)
            return m(x, torch.arange(seq).expand(bsz, seq), None, step_mask=msk), loss_func

        with torch.no_grad():
            get_forward_backward_func()(forward_step_func=step, data_iterator=iter([(ids, mask)]), model=[model],
                                        num_microbatches=1, seq_length=seq, micro_batch_size=bsz, forward_only=True)
            if last:
                ref = hf(input_ids=ids).logits
                ref_head = head_logits(hf_head, feature.value, mask)
                if first_logits is None:
                    first_logits = seen["logits"][..., : arch.vocab_size].clone()
                gap = (seen["logits"][..., : arch.vocab_size] - ref).abs().amax(-1)  # [b, s]
                report["max_abs_hf_logit"] = max(report["max_abs_hf_logit"], ref.abs().max().item())
                if gap.max().item() > report["max_abs_logit_diff"]:
                    report["max_abs_logit_diff"] = gap.max().item()
                    row, position = divmod(int(gap.argmax()), seq)
                    over = (gap > report["tolerance"] * max(1.0, report["max_abs_hf_logit"])).any(0).nonzero()
                    report["where"] = {"row": row, "position": position,
                                       "first_position_over": int(over[0]) if len(over) else None}
                report["max_abs_head_diff"] = max(report["max_abs_head_diff"],
                                                  (seen["head"] - ref_head).abs().max().item() if mask.any() else 0.0)
                report["steps"] += int(mask.sum())
    if last and ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0:
        print(f"verify tp={tp} pp={pp} ep={ep}: max |logit diff| {report['max_abs_logit_diff']:.3e}, "
              f"max |head logit diff| {report['max_abs_head_diff']:.3e} over {report['steps']} steps", flush=True)
        if report_file:
            Path(report_file).write_text(json.dumps(report))
        return dict(report, logits=first_logits)
    return None


def verify(hf_path: str, mcore_path: str, tp: int = 1, pp: int = 1, batches: int = 2,
           report_file: str | None = None, ep: int = 1, etp: int | None = None) -> dict:
    """Compare an HF directory with a Megatron checkpoint run at ``tp`` x ``pp`` (x ``ep``); returns the report.

    Raises:
        VerifyFailed: a difference above the tolerance (the report is written first).
    """
    HFCheckpoint(hf_path)  # path / config errors before any rank starts
    with tempfile.TemporaryDirectory() as tmp:
        out = report_file or str(Path(tmp) / "verify.json")
        run_ranks(_verify_rank, tp * pp * ep, str(hf_path), str(mcore_path), tp, pp, batches, out, ep, etp)
        report = json.loads(Path(out).read_text())
    check_report(report)
    return report
