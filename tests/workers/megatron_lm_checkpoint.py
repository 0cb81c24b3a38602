"""Checkpoints between Megatron-LM's loop and megatron_rgm's, both ways, on the CPU, in the layout the flags give
(TP, PP, DP with or without the distributed optimizer).

    python -m torch.distributed.run --nproc-per-node N megatron_lm_checkpoint.py OUT MLM_HEAD_CKPT [megatron flags]

1. Megatron-LM's own ``pretrain()`` trains a plain GPTModel (no head) for one iteration and its
   ``save_checkpoint`` writes ``--save`` (OUT/plain_ckpt); the probe logits are recorded.
2. In the same process (Megatron-LM's args and parallel state), an RGM model (the script's
   ``model_provider``: GPTModel + ``attach_sprm_head``), megatron DDP and megatron-core's optimizer:
   a. megatron_rgm's ``load_checkpoint`` of the plain checkpoint with the optimizer: fresh head, backbone
      logits, the optimizer left fresh (no state: not even the one made to shape a load);
   b. megatron_rgm's ``load_checkpoint`` of MLM_HEAD_CKPT (Megatron-LM's pretrain with the head,
      written by the script run) with the optimizer: logits, Adam state, one training step;
   c. megatron_rgm's ``save_checkpoint`` to OUT/rgm_ckpt at iteration 5, probe logits recorded
      (the script run then resumes it with Megatron-LM's ``load_checkpoint``).
"""

import json
import os
import sys

import torch

import megatron_lm_pretrain as script  # the pretrain_gpt.py-style script; activates the CPU patches

from megatron.core import mpu
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.enums import ModelType
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer import get_standard_config_overrides
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.training import get_args, pretrain
from megatron.training.argument_utils import pretrain_cfg_container_from_args
from megatron.training.arguments import core_transformer_config_from_args, parse_and_validate_args

from megatron_rgm.integration import add_rgm_args, forward_step as rgm_forward_step
from megatron_rgm.integration import grpo_config_from_args, rgm_config_from_args, sprm_param_group
from megatron_rgm.steps import StepSegmenter
from megatron_rgm.checkpoint import load_checkpoint, save_checkpoint


def plain_model_provider(pre_process=True, post_process=True, vp_stage=None, **kwargs):
    args = get_args()
    model = GPTModel(config=core_transformer_config_from_args(args),
                     transformer_layer_spec=get_gpt_layer_local_spec(normalization=args.normalization),
                     vocab_size=args.padded_vocab_size, max_sequence_length=args.max_position_embeddings,
                     pre_process=pre_process, post_process=post_process, vp_stage=vp_stage,
                     position_embedding_type=args.position_embedding_type,
                     share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights)
    script.MODELS.append(model)
    return model


def plain_forward_step(data_iterator, model):
    args = get_args()
    batch = script.get_batch(data_iterator)
    batch.pop("step_mask"), batch.pop("correct")  # an LM batch
    return rgm_forward_step(iter([batch]), model, rgm_config=rgm_config_from_args(args),
                            grpo=grpo_config_from_args(args))


def adam_state_norm(optimizer) -> float:
    total = 0.0
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        for st in opt.optimizer.state.values():
            if "exp_avg" in st:
                total += float(st["exp_avg"].float().norm()) ** 2
    return total ** 0.5


def train_one_step(ddp, optimizer):
    ddp.zero_grad_buffer()
    optimizer.zero_grad()
    batch = script.get_batch(iter([{"text": script.FixedBatch(4).tokens, "correct": script.FixedBatch(4).correct}]))
    reports = get_forward_backward_func()(forward_step_func=lambda it, m: rgm_forward_step(
        it, m, rgm_config=rgm_config_from_args(get_args())), data_iterator=iter([batch]), model=[ddp],
        num_microbatches=1, seq_length=script.SEQ, micro_batch_size=script.MBS, forward_only=False)
    ok, grad_norm, _ = optimizer.step()
    losses = {k: (v[0] / v[1]).item() for k, v in reports[0].items()} if reports else {}  # the last stage's
    return losses | {"ok": bool(ok), "grad_norm": float(grad_norm)}


def main(out, mlm_head_ckpt):
    # 1. Megatron-LM's loop and save_checkpoint: a plain GPT.
    args = parse_and_validate_args(extra_args_provider=add_rgm_args)
    script.SEGMENTER = StepSegmenter([script.STEP_ID])
    pretrain(pretrain_cfg_container_from_args(args), script.train_valid_test_datasets_provider,
             ModelType.encoder_or_decoder, plain_forward_step, model_provider=plain_model_provider)
    rec = {"plain_saved": script.probe_logits()}
    result = {}

    # 2. An RGM model (this rank's pipeline stage) with megatron-core's own optimizer (min_lr None, as
    # megatron_rgm builds it), distributed over DP when the flags say so.
    model = script.model_provider(pre_process=mpu.is_pipeline_first_stage(),
                                  post_process=mpu.is_pipeline_last_stage())
    model.config.finalize_model_grads_func = finalize_model_grads
    distributed = args.use_distributed_optimizer
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(use_distributed_optimizer=distributed),
                                  model)
    opt_config = OptimizerConfig(optimizer="adam", lr=args.lr, weight_decay=args.weight_decay, clip_grad=1.0,
                                 use_distributed_optimizer=distributed)
    # The param groups Megatron-LM's loop builds with add_rgm_args: its standard ones and the head's.
    optimizer = get_megatron_optimizer(opt_config, [ddp], config_overrides={
        **get_standard_config_overrides(opt_config), **sprm_param_group(args)})
    head = [p.detach().clone() for p in (model.sprm_head.parameters() if model.sprm_head is not None else [])]

    # a. Megatron-LM's plain checkpoint: its optimizer has no moments for the head, so ours starts fresh.
    r = load_checkpoint(args.save, [ddp], optimizer=optimizer)
    rec["plain_into_rgm"] = script.probe_logits()
    result["plain_into_rgm"] = {"iteration": r.iteration, "fresh_head": r.fresh_head, "megatron_lm": r.megatron_lm,
                                "head_kept": all(torch.equal(a, b) for a, b in zip(
                                    head, model.sprm_head.parameters() if model.sprm_head is not None else [])),
                                "not_loaded": r.not_loaded, "optimizer_states": sum(
                                    len(opt.optimizer.state) for opt in optimizer.chained_optimizers)}
    # b. Megatron-LM's checkpoint with the head and its optimizer: resume here.
    before = adam_state_norm(optimizer)
    r = load_checkpoint(mlm_head_ckpt, [ddp], iteration=4, optimizer=optimizer)
    rec["head_ckpt_into_rgm"] = script.probe_logits()
    result["head_ckpt_into_rgm"] = {"iteration": r.iteration, "fresh_head": r.fresh_head,
                                    "megatron_lm": r.megatron_lm, "not_loaded": r.not_loaded,
                                    "adam_before": before, "adam_after": adam_state_norm(optimizer)}
    result["resumed_step"] = train_one_step(ddp, optimizer)
    # c. megatron_rgm's save_checkpoint, for Megatron-LM's load_checkpoint.
    save_checkpoint(os.path.join(out, "rgm_ckpt"), 5, [ddp], optimizer=optimizer, global_batch_size=args.global_batch_size)
    rec["rgm_saved"] = script.probe_logits()
    if script.is_recorder():  # the rank that holds the logits and the losses
        torch.save(rec, os.path.join(out, "logits.pt"))
        with open(os.path.join(out, "result.json"), "w") as f:
            json.dump(result, f)


if __name__ == "__main__":
    out, mlm_head_ckpt = sys.argv.pop(1), sys.argv.pop(1)
    torch.set_num_threads(1)
    main(out, mlm_head_ckpt)
    torch.distributed.destroy_process_group()
