"""RGMModel, its layer specs and the builder used by training and tools."""

from __future__ import annotations

import torch
from megatron.core import parallel_state

from megatron_rgm.model.context_parallel import from_first_cp_rank
from megatron_rgm.model.rgm_model import RGMModel, SPRMHead, attach_sprm_head, sprm_step_logits, unwrap
from megatron_rgm.model.specs import RGMNorm, block_spec, layer_spec

__all__ = ["RGMModel", "SPRMHead", "RGMNorm", "attach_sprm_head", "sprm_step_logits", "unwrap", "block_spec",
           "layer_spec", "build_model", "from_first_cp_rank"]


def build_model(args) -> list[RGMModel]:
    """This rank's model chunks (one per virtual pipeline stage).

    Args:
        args: :class:`megatron_rgm.arguments.Args`; ``parallel_state`` must be
            initialised with the same layout.

    Returns:
        A list of :class:`RGMModel`, one per virtual stage (one without
        virtual pipelining).
    """
    vp = args.parallel.virtual_pipeline_model_parallel_size
    chunks = []
    for vp_stage in range(vp or 1):
        stage = vp_stage if vp else None
        chunks.append(
            RGMModel(
                config=args.transformer,
                rgm_config=args.rgm,
                transformer_layer_spec=block_spec(args.transformer, args.model.transformer_impl, vp_stage=stage),
                vocab_size=args.vocab_size,
                max_sequence_length=args.max_position_embeddings,
                pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
                post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
                share_embeddings_and_output_weights=args.share_embeddings_and_output_weights,
                position_embedding_type=args.position_embedding_type,
                rotary_base=args.rotary_base,
                rope_scaling=args.model.use_rope_scaling,
                rope_scaling_factor=args.model.rope_scaling_factor,
                seq_len_interpolation_factor=args.model.rotary_seq_len_interpolation_factor,
                vp_stage=stage,
            )
        )
    if torch.cuda.is_available():
        # megatron-core puts its parallel layers on the GPU itself (use_cpu_initialization=False); the norms of
        # our local spec and the SPRM head are plain torch modules: move the whole chunk, as Megatron-LM does.
        for chunk in chunks:
            chunk.cuda(torch.cuda.current_device())
    return chunks
