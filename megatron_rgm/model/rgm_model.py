"""RGMModel: a megatron-core GPTModel that is also its own process reward model.

The SPRM head lives on the last pipeline stage and reads the output of
transformer layer ``sprm_layer`` (default -2, the penultimate layer) at the
positions of a step mask. That layer's output is either produced on the last
stage (captured by a forward hook) or, when the last stage starts right after
it, is the stage's input tensor.

Full activation recomputation runs the captured layer under ``no_grad`` first
and again inside the backward pass. The feature captured in the first pass has
no graph, so the head's gradient w.r.t. the feature is handed over explicitly:
the decoder's output is routed through :class:`_Bridge`, whose backward runs
before the recomputation (the recomputation is upstream of the decoder output)
and leaves the head's feature gradient where the recomputed layer output picks
it up (:class:`_AddGrad`).
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_rgm.config import ConfigError, RGMConfig
from megatron_rgm.head import SPRMHead


class _Bridge(torch.autograd.Function):
    """Identity on the decoder output that also emits the feature as a graph leaf.

    Backward hands the feature gradient to ``capture.pending_grad`` and passes
    the decoder-output gradient through unchanged.
    """

    @staticmethod
    def forward(ctx, hidden, feature, capture):
        ctx.capture = capture
        return hidden.view_as(hidden), feature.detach().clone()

    @staticmethod
    def backward(ctx, grad_hidden, grad_feature):
        ctx.capture.pending_grad = grad_feature
        return grad_hidden, None, None


class _AddGrad(torch.autograd.Function):
    """Identity whose backward adds a stored gradient (the head's) to the incoming one."""

    @staticmethod
    def forward(ctx, x, extra):
        ctx.save_for_backward(extra)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        (extra,) = ctx.saved_tensors
        return grad + extra.to(grad.dtype), None


class _FeatureCapture:
    """Holds the feature of the current forward pass; see the module docstring."""

    def __init__(self):
        self.feature: torch.Tensor | None = None
        self.needs_bridge = False
        self.pending_grad: torch.Tensor | None = None

    def reset(self):
        self.feature = None
        self.needs_bridge = False

    def layer_hook(self, module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        if torch.is_grad_enabled() and self.pending_grad is not None:
            # Recomputation inside backward: attach the head's feature gradient.
            extra, self.pending_grad = self.pending_grad, None
            hidden = _AddGrad.apply(hidden, extra)
            return (hidden,) + tuple(output[1:]) if isinstance(output, tuple) else hidden
        self.feature = hidden
        self.needs_bridge = not torch.is_grad_enabled()
        return None

    def decoder_hook(self, module, args, output):
        if self.needs_bridge and torch.is_tensor(output) and output.requires_grad:
            output, self.feature = _Bridge.apply(output, self.feature, self)
            self.needs_bridge = False
            return output
        return None


class SPRMAttachment:
    """The SPRM head's wiring on one GPTModel chunk: where the feature comes from, and scoring.

    Created by :func:`attach_sprm_head`; kept on the model as ``model.sprm``.
    The head itself is registered as the submodule ``model.sprm_head`` so that
    ``state_dict`` and megatron's ``sharded_state_dict`` carry it.
    """

    def __init__(self, model: GPTModel, rgm_config: RGMConfig):
        config = model.config
        self.config = config
        self.rgm_config = rgm_config
        self.feature_layer = rgm_config.resolve_layer(config.num_layers)
        self.capture = _FeatureCapture()
        self.feature_from_input = False
        self.decoder = model.decoder
        if not model.post_process:
            return
        layers = model.decoder.layers
        first = layers[0].layer_number - 1 if len(layers) else config.num_layers
        if first <= self.feature_layer < first + len(layers):
            layers[self.feature_layer - first].register_forward_hook(self.capture.layer_hook)
            model.decoder.register_forward_hook(self.capture.decoder_hook)
        elif self.feature_layer == first - 1:
            self.feature_from_input = True
        else:
            raise ConfigError(
                f"--sprm-layer {rgm_config.sprm_layer} (layer {self.feature_layer}) is not on the last "
                f"pipeline stage, which holds layers {first}..{first + len(layers) - 1}; the head reads "
                "a layer of the last stage or the last layer of the stage before it: choose such a "
                "--sprm-layer or move layers with --decoder-last-pipeline-num-layers"
            )
        model.register_forward_pre_hook(lambda module, args: self.capture.reset())

    def feature(self) -> torch.Tensor:
        """The head's input of the last forward: ``[s, b, h]`` (``[s/tp, b, h]`` under SP)."""
        if self.feature_from_input:
            return self.decoder.input_tensor
        if self.capture.feature is None:
            raise RuntimeError("no SPRM feature captured: run the model's forward on the last pipeline stage first")
        return self.capture.feature

    def score(self, head: SPRMHead, feature: torch.Tensor, step_mask: torch.Tensor) -> torch.Tensor:
        """Head logits at the masked positions of a ``[s, b, h]`` feature.

        Args:
            feature: ``[s, b, h]``, sequence-sharded ``[s/tp, b, h]`` under sequence parallelism.
            step_mask: ``[b, s]`` bool.

        Returns:
            ``[S]`` float32 logits, S = ``step_mask.sum()``, row-major order.
        """
        if self.config.sequence_parallel:
            # Every TP rank runs the replicated head on the whole sequence; the
            # backward hands each rank the gradient of its own slice.
            feature = tensor_parallel.gather_from_sequence_parallel_region(
                feature, tensor_parallel_output_grad=False
            )
        if step_mask.shape != (feature.shape[1], feature.shape[0]):
            raise ValueError(
                f"step_mask has shape {tuple(step_mask.shape)} but the batch is "
                f"[b={feature.shape[1]}, s={feature.shape[0]}]: pass one flag per token"
            )
        selected = feature.transpose(0, 1)[step_mask.to(torch.bool)]  # [S, h]
        scale = self.rgm_config.sprm_backbone_grad_scale
        if scale != 1.0:
            selected = selected * scale + selected.detach() * (1.0 - scale)
        return head(selected.to(head[0].weight.dtype)).squeeze(-1).float()


class _rope_at:
    """While active, ``model.rotary_pos_emb`` returns its angles at ``positions`` ``[b, s]``: ``[s, b, 1, d]``.

    megatron's unfused RoPE broadcasts the angles over ``[s, b, heads, d]``, so a per-row angle table needs no
    other change. ``positions=None``: nothing changes.
    """

    def __init__(self, model: GPTModel, positions: torch.Tensor | None):
        self.rope = getattr(model, "rotary_pos_emb", None) if positions is not None else None
        self.positions = positions

    def __enter__(self):
        if self.rope is None:
            return
        cp = getattr(self.rope, "cp_group", None)
        if type(self.rope) is not RotaryEmbedding or (cp is not None and cp.size() > 1):
            raise ConfigError(f"packed rows need the plain RoPE without context parallelism, not "
                              f"{self.rope.__class__.__name__}: run without --pack-sequences")
        positions, original = self.positions, self.rope.forward

        def at_positions(max_seq_len, *args, **kwargs):
            table = original(int(positions.max()) + 1)  # [n, 1, 1, d]
            return table[:, 0][positions.t()]  # [s, b, 1, d]

        self.rope.forward = at_positions

    def __exit__(self, *exc):
        if self.rope is not None:
            del self.rope.forward  # back to the class's method
        return False


def _broadcast_over_tp(module: torch.nn.Module) -> None:
    # The head is replicated over tensor-parallel ranks; start them equal.
    if not torch.distributed.is_initialized() or parallel_state.get_tensor_model_parallel_world_size() == 1:
        return
    group = parallel_state.get_tensor_model_parallel_group()
    src = torch.distributed.get_global_rank(group, 0)
    for p in module.parameters():
        torch.distributed.broadcast(p.data, src, group=group)


def attach_sprm_head(model: GPTModel, rgm_config: RGMConfig) -> GPTModel:
    """Give an existing megatron-core GPTModel chunk an SPRM head, without rebuilding it.

    On the last pipeline stage this registers ``model.sprm_head`` (so Megatron
    checkpoints carry it) and the hooks that capture the ``--sprm-layer``
    feature; on other stages it only records the wiring. The model's forward
    is unchanged: call :func:`sprm_step_logits` after it.

    Args:
        model: a ``GPTModel`` (unwrapped, before DDP / Float16Module).
        rgm_config: head options.

    Returns:
        The same model.
    """
    if getattr(model, "sprm", None) is not None:
        raise ValueError("this model already has an SPRM head attached")
    model.sprm = SPRMAttachment(model, rgm_config)
    model.sprm_head = None
    if model.post_process:
        model.sprm_head = SPRMHead(model.config.hidden_size, rgm_config.sprm_hidden_mult,
                                   rgm_config.sprm_dropout, dtype=model.config.params_dtype)
        _broadcast_over_tp(model.sprm_head)
    return model


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The innermost module under DDP / Float16Module wrappers."""
    while not hasattr(model, "sprm") and hasattr(model, "module"):
        model = model.module
    return model


def sprm_step_logits(model: torch.nn.Module, step_mask: torch.Tensor) -> torch.Tensor:
    """Head logits ``[S]`` at ``step_mask`` for the model's last forward (last pipeline stage only)."""
    inner = unwrap(model)
    if getattr(inner, "sprm", None) is None or inner.sprm_head is None:
        raise ValueError("this model has no SPRM head on this pipeline stage: attach_sprm_head() it first")
    return inner.sprm.score(inner.sprm_head, inner.sprm.feature(), step_mask)


class RGMModel(GPTModel):
    """GPTModel + SPRM head on the last pipeline stage.

    Args:
        config: megatron TransformerConfig of the backbone.
        rgm_config: head options (:class:`RGMConfig`).
        transformer_layer_spec: layer or block spec (see :mod:`megatron_rgm.model.specs`).
        vocab_size, max_sequence_length, pre_process, post_process, **kwargs:
            as for megatron-core's ``GPTModel``.
    """

    def __init__(
        self,
        config: TransformerConfig,
        rgm_config: RGMConfig,
        transformer_layer_spec,
        vocab_size: int,
        max_sequence_length: int,
        pre_process: bool = True,
        post_process: bool = True,
        **kwargs,
    ):
        super().__init__(
            config,
            transformer_layer_spec,
            vocab_size,
            max_sequence_length,
            pre_process=pre_process,
            post_process=post_process,
            **kwargs,
        )
        self.rgm_config = rgm_config
        # GPTModel keeps whether RoPE is scaled (rotary_scaling), not by how much: checkpoints record both.
        self.rope_scaling_factor = kwargs.get("rope_scaling_factor", 8.0)
        attach_sprm_head(self, rgm_config)

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        decoder_input: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        step_mask: torch.Tensor | None = None,
        rope_positions: bool = False,
        **kwargs,
    ):
        """Backbone forward plus head logits at the step positions.

        Args:
            input_ids: ``[b, s]`` token ids (first stage).
            position_ids: ``[b, s]``.
            attention_mask: as for GPTModel (None: causal).
            labels: ``[b, s]``; when given the LM output is the per-token loss ``[b, s]``.
            step_mask: ``[b, s]`` bool, True at the positions whose hidden state
                is scored (the position *before* each step token).
            rope_positions: rotate by ``position_ids`` instead of 0..s-1 (packed rows, where every sample
                starts again at 0; GPTModel's RoPE reads only the sequence length).

        Returns:
            Not last stage: the hidden states to send on. Last stage, no
            ``step_mask``: the LM output (logits ``[b, s, v/tp]`` or loss
            ``[b, s]``). Last stage with ``step_mask``: ``(lm_output,
            step_logits)`` with ``step_logits`` ``[S]`` float32, in row-major
            order of ``step_mask`` (trajectory by trajectory: the packed layout).
        """
        with _rope_at(self, position_ids if rope_positions else None):
            lm_output = super().forward(
                input_ids, position_ids, attention_mask, decoder_input=decoder_input, labels=labels, **kwargs
            )
        if not self.post_process or step_mask is None:
            return lm_output
        return lm_output, sprm_step_logits(self, step_mask)

    def sprm_feature(self) -> torch.Tensor:
        """The head's input of the last forward: ``[s, b, h]`` (``[s/tp, b, h]`` under SP)."""
        return self.sprm.feature()
