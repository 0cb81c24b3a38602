"""Checkpoints: Megatron distributed checkpoints (``torch_dist``) of RGM models, both ways with Megatron-LM.

* :mod:`.files`: a save directory's layout, the current iteration, what one checkpoint holds;
* :mod:`.dist`: :func:`save_checkpoint` and :func:`load_checkpoint` (any TP/PP layout);
* :mod:`.rng`: random states, ours per rank and Megatron-LM's;
* :mod:`.megatron_lm`: what Megatron-LM's ``load_checkpoint`` reads, and what of its
  checkpoints carries over;
* :mod:`.state`: one rank's model chunks as sharded state.

Rebuilding a model from a checkpoint (reading its architecture) is
:mod:`megatron_rgm.model.load`.
"""

from megatron_rgm.checkpoint.dist import OPTIMIZER_METADATA, LoadResult, load_checkpoint, save_checkpoint
from megatron_rgm.checkpoint.files import (ASSETS, HEAD_PREFIX, LATEST, RUN_CONFIG, CheckpointError, iteration_dir,
                                           latest_iteration, publish, read_common_state, read_tensor_names,
                                           read_tensor_shapes, resolve_checkpoint)
from megatron_rgm.checkpoint.megatron_lm import megatron_lm_args
from megatron_rgm.checkpoint.rng import rng_state, set_rng_state
from megatron_rgm.checkpoint.state import TE_NORM_KEYS, model_sharded_state_dict

__all__ = ["ASSETS", "HEAD_PREFIX", "LATEST", "OPTIMIZER_METADATA", "RUN_CONFIG", "TE_NORM_KEYS", "CheckpointError", "LoadResult", "iteration_dir",
           "latest_iteration", "publish", "load_checkpoint", "megatron_lm_args", "model_sharded_state_dict",
           "read_common_state", "read_tensor_names", "read_tensor_shapes", "resolve_checkpoint", "rng_state", "save_checkpoint",
           "set_rng_state"]
