"""megatron-core APIs that changed between 0.16 and 0.19, and megatron-core faults put right, one function each.

Every version difference here is detected by the API itself (a signature, an attribute), so a release in
between, or a patched build, takes the path its own API asks for. The faults (the router without Transformer
Engine, the distributed optimizer's checkpoints on torch's Adam and with several buckets, the mask of windowed
attention, the backward of biased experts) are in both versions; each function says what goes wrong without it
and is idempotent.
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


def windows_keep_the_mask() -> None:
    """megatron-core's unfused softmax, on a windowed layer, *replaces* the attention mask it is given with the
    sliding-window mask (``FusedScaleMaskSoftmax.forward_torch_softmax``), built on ``"cuda"``; and its fused
    kernel, where it runs, ignores the window. A packed row's samples would then see each other, a padded
    batch its padding, and a GPU run with the fused kernel no window at all. Windowed layers here take the
    unfused softmax with both masks (either one masks a score), built on the scores' device."""
    from megatron.core.fusions.fused_softmax import FusedScaleMaskSoftmax

    if getattr(FusedScaleMaskSoftmax, "_rgm_windows_keep_the_mask", False):
        return
    original = FusedScaleMaskSoftmax.forward

    def forward(self, input, mask, softmax_offset=None):
        window = self.window_size
        if window is None:
            return original(self, input, mask, softmax_offset)
        sq, sk = input.shape[-2:]
        query = torch.arange(sk - sq, sk, device=input.device)[:, None]
        key = torch.arange(sk, device=input.device)[None, :]
        masked = (key < query - window[0]) | (key > query + window[1])
        if mask is not None:
            masked = masked | mask.to(torch.bool)
        self.window_size = None  # the unfused path: our mask as given
        try:
            return self.forward_torch_softmax(input, masked, softmax_offset)
        finally:
            self.window_size = window

    FusedScaleMaskSoftmax.forward = forward
    FusedScaleMaskSoftmax._rgm_windows_keep_the_mask = True


def biased_experts_train() -> None:
    """An expert's MLP with biases adds the probability-weighted fc2 bias in place (``output += ...`` in
    ``MLP.forward``) to what ``RowParallelLinear`` returns. Over a tensor-parallel group of one (experts with
    biases run at expert tensor parallelism 1) that is the matmul's output passed through a custom autograd
    Function as is (the all-reduce, or the reduce-scatter under sequence parallelism), which autograd refuses to
    modify in place: the first backward of such a model failed. Over a group of one either is the identity both
    ways; here it returns its input without the Function."""
    from megatron.core.tensor_parallel import layers, mappings

    for name in ("reduce_from_tensor_model_parallel_region", "reduce_scatter_to_sequence_parallel_region"):
        original = getattr(layers, name)
        if getattr(original, "_rgm_identity_over_one", False):
            continue

        def over_one_is_identity(input_, group=None, *args, _original=original, **kwargs):
            group = mappings.get_tensor_model_parallel_group_if_none(group)
            if group.size() == 1:
                return input_
            return _original(input_, group, *args, **kwargs)

        over_one_is_identity._rgm_identity_over_one = True
        setattr(layers, name, over_one_is_identity)


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


def distributed_optimizer_with_torch_adam() -> None:
    """Let megatron-core's distributed optimizer load its state into torch's Adam (no apex or Transformer Engine:
    every CPU run), in 0.16 and 0.19 alike.

    Torch's Adam keeps a ``step`` tensor in each parameter's state; apex's and Transformer Engine's keep it in the
    param group. On load, ``DistributedOptimizer.load_state_dict`` gives every parameter's state the one ``step``
    tensor, the step of the checkpoint's param groups (shared: each parameter's update then adds 1 to all of
    them, and the resumed run's bias correction leaves the uninterrupted one's). Then
    ``_set_main_param_and_optimizer_states`` copies every state key from the loaded tensors: in the
    ``fully_reshardable`` format (ours) they hold no ``step``, a KeyError; in ``dp_reshardable`` (Megatron-LM's
    default) the checkpoint has none either and the ``step`` there is the loading optimizer's own (1 after
    :func:`materialise_optimizer_state`), which would overwrite the right one.
    Wrapped here: each parameter keeps the param groups' step, in a tensor of its own. The copy also runs under
    ``no_grad``: with fp32 parameters the main parameter is a view of the model's (a leaf that requires grad),
    and the ``dp_reshardable`` load path copies into it with autograd on, which torch refuses.
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer._set_main_param_and_optimizer_states
    if getattr(original, "rgm_keeps_step", False):
        return

    def keep_step(self, model_param, tensors):
        if not getattr(self.config, "use_precision_aware_optimizer_no_fp8_or_ds_fp8", False):
            group_index, group_order = self.model_param_group_index_map[model_param]
            state = self.optimizer.state.get(self.optimizer.param_groups[group_index]["params"][group_order])
            if state and isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].clone()  # its own copy of the param groups' step
                tensors = {**tensors, "step": state["step"]}
        with torch.no_grad():
            return original(self, model_param, tensors)

    keep_step.rgm_keeps_step = True
    DistributedOptimizer._set_main_param_and_optimizer_states = keep_step


def fully_reshardable_bucket_offsets() -> None:
    """Save the distributed optimizer's ``fully_reshardable`` state at the right offsets, in 0.16 and 0.19 alike.

    ``sharded_param_state_fully_reshardable`` gathers each buffer's state over DP with
    ``get_parameter_state_dp_zero``, which concatenates the buckets without the padding between them, and then
    cuts each parameter out at its offset in the padded buffer (``param_index_map``). With one bucket the two
    agree. With more (a tied embedding at PP > 1 gets a bucket of its own, as does every ``--ddp-bucket-size``
    worth of parameters under overlapped reduction) each parameter after the first bucket is saved with its
    neighbours' values, fp32 master weights included, and a resume loads them: measured at PP=2, DP=2 on
    Megatron-LM's own loop, whose resume left the uninterrupted run at the first iteration. Wrapped here: for
    the length of that method, the gathered state is laid out with the padding put back, each bucket at its
    offset in the buffer.
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer.sharded_param_state_fully_reshardable
    if getattr(original, "rgm_padded", False):
        return

    def padded(self, state):
        if state is None:
            return None
        for gbuf_idx, buffer in enumerate(self.buffers):
            for world in state[gbuf_idx].values():
                for key, flat in world.items():
                    if not isinstance(flat, torch.Tensor):
                        continue
                    out = torch.zeros(buffer.numel, dtype=flat.dtype, device=flat.device)
                    start = 0
                    for bucket in buffer.buckets:
                        out[bucket.offset:bucket.offset + bucket.numel_unpadded] = \
                            flat[start:start + bucket.numel_unpadded]
                        start += bucket.numel_unpadded
                    world[key] = out
        return state

    def fully_reshardable(self, *args, **kwargs):
        gather = self.get_parameter_state_dp_zero
        self.get_parameter_state_dp_zero = lambda *a, **k: padded(self, gather(*a, **k))
        try:
            return original(self, *args, **kwargs)
        finally:
            del self.get_parameter_state_dp_zero

    fully_reshardable.rgm_padded = True
    DistributedOptimizer.sharded_param_state_fully_reshardable = fully_reshardable


def materialise_optimizer_state(optimizer) -> list:
    """Give a fresh distributed optimizer the per-parameter state its ``state_dict()`` reads, before a load.

    Loading builds the optimizer's sharded state dict from its own ``state_dict()``. With torch's Adam (no apex
    or Transformer Engine: every CPU run) megatron-core's distributed optimizer reads the step count from each
    parameter's state, and before the first step there is none, so resuming fails on a bare assertion. One
    step on zero gradients at learning rate 0 (weight decay 0, epsilon 1, so nothing divides 0 by 0) creates
    zero moments and leaves every parameter as it was; a load replaces them. Also applies
    :func:`distributed_optimizer_with_torch_adam`.

    Returns:
        What :func:`forget_unloaded_state` needs to undo the step where no load followed (an optimizer that
        starts fresh must not start at step 1).
    """
    from megatron.core.optimizer import distrib_optimizer

    if distrib_optimizer.HAVE_APEX_OR_TE:
        return []
    distributed_optimizer_with_torch_adam()
    stepped = []
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if not isinstance(opt, distrib_optimizer.DistributedOptimizer) or inner is None or inner.state:
            continue
        saved = [{k: group[k] for k in ("lr", "weight_decay", "eps") if k in group} for group in inner.param_groups]
        for group in inner.param_groups:
            group.update({k: v for k, v in (("lr", 0.0), ("weight_decay", 0.0), ("eps", 1.0)) if k in group})
            for p in group["params"]:
                p.grad = torch.zeros_like(p)
        inner.step()
        for group, values in zip(inner.param_groups, saved):
            group.update(values)
            for p in group["params"]:
                p.grad = None
        stepped.append((inner, {id(st.get("step")) for st in inner.state.values()}))
    return stepped


def forget_unloaded_state(stepped: list) -> int:
    """Clear the state :func:`materialise_optimizer_state` made wherever no load replaced it (a load gives each
    parameter a step tensor of its own); returns how many optimizers were cleared."""
    cleared = 0
    for inner, made in stepped:
        if inner.state and all(id(st.get("step")) in made for st in inner.state.values()):
            inner.state.clear()
            cleared += 1
    return cleared
