"""A minimal Megatron-LM ``pretrain_gpt.py``-style script, written with megatron-core alone plus
megatron_rgm.integration's pieces (model_provider, forward_step, add_rgm_args).

    train: TP=2 (2 ranks), 3 iterations (LM + SPR, then GRPO + SPR), megatron DDP + optimizer,
           saves a dist checkpoint of the RGM model and one of a plain GPTModel, writes the
           trained head's outputs on a probe batch.
    load:  TP=1 (1 rank): loads both checkpoints into an RGM model and into a plain GPTModel.
"""

import argparse
import json
import os
import sys
from functools import partial

import torch
import torch.distributed as dist

from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_rgm import cpu
from megatron_rgm.integration import add_rgm_args, attach_sprm_head, forward_step, model_provider, rgm_config_from_args
from megatron_rgm.integration import sprm_step_logits
from megatron_rgm.checkpoint import load_checkpoint

VOCAB, SEQ, MBS = 256, 32, 4


def transformer_config(tp: int) -> TransformerConfig:
    return TransformerConfig(
        num_layers=4, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128,
        normalization="RMSNorm", gated_linear_unit=True, activation_func=torch.nn.functional.silu,
        add_bias_linear=False, add_qkv_bias=True, hidden_dropout=0.0, attention_dropout=0.0,
        tensor_model_parallel_size=tp, pipeline_dtype=torch.float32, use_cpu_initialization=True,
        bias_activation_fusion=False, masked_softmax_fusion=False, bias_dropout_fusion=False,
        apply_rope_fusion=False, gradient_accumulation_fusion=False)


def initialize(tp: int):
    if not torch.cuda.is_available():
        cpu.activate()
    dist.init_process_group("gloo")
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    torch.manual_seed(1234)
    tensor_parallel.model_parallel_cuda_manual_seed(1234)


def rgm_args():
    return add_rgm_args(argparse.ArgumentParser()).parse_args(["--sprm-dropout", "0.1"])


def probe_batch():
    g = torch.Generator().manual_seed(99)
    tokens = torch.randint(0, VOCAB, (MBS, SEQ), generator=g)
    step_mask = torch.rand(MBS, SEQ, generator=g) < 0.2
    return tokens, step_mask


def batches(it: int):
    g = torch.Generator().manual_seed(it)
    tokens = torch.randint(0, VOCAB, (MBS, SEQ), generator=g)
    batch = {"tokens": tokens, "labels": torch.roll(tokens, -1, 1), "loss_mask": torch.ones(MBS, SEQ),
             "step_mask": torch.rand(MBS, SEQ, generator=g) < 0.2, "correct": torch.tensor([True, False, True, False])}
    if it > 1:  # GRPO micro-batches carry advantages and the sampler's log-probs
        batch.update(advantages=torch.tensor([1.0, -1.0, 0.5, -0.5]),
                     old_log_probs=torch.full((MBS, SEQ), -5.5))
    return batch


def head_outputs(model) -> list[float]:
    tokens, step_mask = probe_batch()
    model.eval()
    with torch.no_grad():
        model(tokens, torch.arange(SEQ).expand(MBS, SEQ), None)
        return sprm_step_logits(model, step_mask).tolist()


def train(out: str):
    initialize(tp=2)
    config = transformer_config(tp=2)
    args = rgm_args()
    provider = partial(model_provider, config=config, rgm_config=rgm_config_from_args(args), vocab_size=VOCAB,
                       max_sequence_length=SEQ, position_embedding_type="rope")
    model = provider(pre_process=True, post_process=True)
    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(), model)
    optimizer = get_megatron_optimizer(OptimizerConfig(lr=1e-3, optimizer="adam"), [ddp])
    config.finalize_model_grads_func = finalize_model_grads
    losses = []
    for it in range(1, 4):
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        reports = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter([batches(it)]), model=[ddp],
            num_microbatches=1, seq_length=SEQ, micro_batch_size=MBS, forward_only=False)
        ok, grad_norm, _ = optimizer.step()
        r = reports[0]
        losses.append({k: (v[0] / v[1]).item() for k, v in r.items()} | {"grad_norm": float(grad_norm)})
    sd = model.sharded_state_dict()
    assert "sprm_head.0.weight" in sd and "sprm_head.3.bias" in sd, sorted(sd)[-6:]
    for name in ("rgm_ckpt", "plain_ckpt"):
        os.makedirs(os.path.join(out, name), exist_ok=True)
    dist_checkpointing.save({"model": sd}, os.path.join(out, "rgm_ckpt"))
    plain = GPTModel(config, get_gpt_layer_local_spec(normalization="RMSNorm"), VOCAB, SEQ,
                     position_embedding_type="rope")
    dist_checkpointing.save({"model": plain.sharded_state_dict()}, os.path.join(out, "plain_ckpt"))
    result = {"losses": losses, "head": head_outputs(model)}
    if dist.get_rank() == 0:
        with open(os.path.join(out, "train.json"), "w") as f:
            json.dump(result, f)


def load(out: str):
    initialize(tp=1)
    config = transformer_config(tp=1)
    rgm = rgm_config_from_args(rgm_args())
    results = {}
    model = model_provider(config=config, rgm_config=rgm, vocab_size=VOCAB, max_sequence_length=SEQ,
                           position_embedding_type="rope")
    r = load_checkpoint(os.path.join(out, "rgm_ckpt"), [model])
    results["rgm_into_rgm"] = {"fresh_head": r.fresh_head, "ignored_head": r.ignored_head, "head": head_outputs(model)}

    fresh = model_provider(config=config, rgm_config=rgm, vocab_size=VOCAB, max_sequence_length=SEQ,
                           position_embedding_type="rope")
    head_before = [p.detach().clone() for p in fresh.sprm_head.parameters()]
    r = load_checkpoint(os.path.join(out, "plain_ckpt"), [fresh])
    results["plain_into_rgm"] = {
        "fresh_head": r.fresh_head, "ignored_head": r.ignored_head,
        "head_kept": all(torch.equal(a, b) for a, b in zip(head_before, fresh.sprm_head.parameters()))}

    plain = GPTModel(config, get_gpt_layer_local_spec(normalization="RMSNorm"), VOCAB, SEQ,
                     position_embedding_type="rope")
    r = load_checkpoint(os.path.join(out, "rgm_ckpt"), [plain])
    backbone_equal = all(torch.equal(plain.state_dict()[k], v) for k, v in model.state_dict().items()
                         if not k.startswith("sprm_head.") and not k.endswith("_extra_state"))
    results["rgm_into_plain"] = {"fresh_head": r.fresh_head, "ignored_head": r.ignored_head,
                                 "backbone_equal": backbone_equal}
    # attach_sprm_head on the plain model: the same feature and head as the RGM model.
    attach_sprm_head(plain, rgm)
    plain.sprm_head.load_state_dict(model.sprm_head.state_dict())
    results["attached_head"] = head_outputs(plain)
    with open(os.path.join(out, "load.json"), "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    mode, out = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    train(out) if mode == "train" else load(out)
    dist.destroy_process_group()
