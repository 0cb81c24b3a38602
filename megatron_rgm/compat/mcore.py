"""megatron-core APIs that changed between 0.16 and 0.19, one function each.

Every function here is detected by the API itself (a signature, an attribute), so a release in
between, or a patched build, takes the path its own API asks for.
"""

from __future__ import annotations

import contextlib
import inspect
import os

import torch


def inference_mode():
    """The context in which megatron-core's modules take their inference paths.

    Up to 0.17 passing an ``inference_context`` was enough for attention to take
    its KV-cache decode branch (flash decode included). From 0.18 the model,
    its attention and its output layer also ask ``InferenceMode.is_active()``
    (``megatron.core.inference.utils``): without it a decode step skips that
    branch, and the sampler's greedy tokens left a full recompute's at the
    first generated token (measured on 0.19.2).
    Returns ``InferenceMode.active()`` where it exists, else a no-op context.
    """
    try:
        from megatron.core.inference.utils import InferenceMode
    except ImportError:
        return contextlib.nullcontext()
    return InferenceMode.active()


def save_callbacks(strategy, writer, save_ret):
    """``TorchDistSaveShardedStrategy._get_save_and_finalize_callbacks`` for megatron's own async machinery.

    0.19 takes a third argument naming the async implementation ("mcore" or "nvrx"); 0.16 had one only.
    """
    method = strategy._get_save_and_finalize_callbacks
    if "async_strategy" in inspect.signature(method).parameters:
        return method(writer, save_ret, "mcore")
    return method(writer, save_ret)


LEGACY_COMMON_FILE = "common.pt"


def write_legacy_common_state(checkpoint_dir) -> bool:
    """Write the checkpoint's common (non-tensor) state to ``common.pt`` if the save kept it elsewhere.

    0.16 writes the common state to ``common.pt`` and reads it from there only.
    0.19 keeps it in the ``torch_dist`` files as one ``common_state`` object and
    reads ``common.pt`` first where one exists. Writing the same state to both
    places lets either version open a checkpoint the other wrote. Rank 0 only;
    returns whether it wrote the file.
    """
    from megatron.core import dist_checkpointing

    path = os.path.join(str(checkpoint_dir), LEGACY_COMMON_FILE)
    if os.path.exists(path):
        return False
    common = dist_checkpointing.load_common_state_dict(str(checkpoint_dir))
    tmp = path + ".tmp"
    torch.save(common, tmp)
    os.replace(tmp, path)
    return True


def router_without_transformer_engine() -> None:
    """megatron-core 0.16's MoE router gating asks whether ``te_general_gemm`` is None, a name its module binds
    only when Transformer Engine imports (a NameError at the first MoE forward without it, on a GPU too);
    0.19 binds it to None. Bind it to None where it is missing: the router then uses torch's matmul."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def take_moe_router_losses() -> dict[str, torch.Tensor]:
    """The router losses megatron-core tracked since the last call (name -> ``[num_layers]`` values, unscaled by
    their coefficient), and the tracker cleared. 0.19 keeps them in a metrics tracker object, 0.16 in a dict."""
    from megatron.core.transformer.moe import moe_utils

    if hasattr(moe_utils, "get_moe_metrics_tracker"):
        entries = moe_utils.get_moe_metrics_tracker().metrics
        out = {name: entry.values.detach().clone() for name, entry in entries.items()}
        for entry in entries.values():
            entry.values.zero_()
        return out
    tracker = moe_utils.get_moe_layer_wise_logging_tracker()
    out = {name: v["values"].detach().clone() for name, v in tracker.items()}
    moe_utils.clear_aux_losses_tracker()
    return out
