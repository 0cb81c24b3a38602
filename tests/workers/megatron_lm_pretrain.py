"""A ``pretrain_gpt.py``-style script on Megatron-LM's own ``megatron.training.pretrain()`` loop
(megatron-core 0.19's wheel), with RGM added the way docs/INTEGRATION.md shows, on the CPU.

    python -m torch.distributed.run --nproc-per-node N megatron_lm_pretrain.py OUT [megatron flags]

Everything between the two ``----`` rulers is the script a Megatron-LM user has; lines marked
``# RGM`` are the diff. Below the second ruler: what the tests record (probe logits on a fixed
batch before the first and after the last step, the SPR loss per iteration), and the modes that
save and load checkpoints with megatron_rgm's own ``save_checkpoint`` / ``load_checkpoint``.
"""

import json
import os
import sys

import torch

from megatron_rgm.compat import megatron_lm

megatron_lm.activate()  # RGM on the CPU: megatron-core's and Megatron-LM's CUDA assumptions (no-op on a GPU)

# ---------------------------------------------------------------------------------- the script
from megatron.core import mpu, tensor_parallel  # noqa: E402
from megatron.core.enums import ModelType  # noqa: E402
from megatron.core.models.gpt import GPTModel  # noqa: E402
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec  # noqa: E402
from megatron.training import get_args, pretrain  # noqa: E402
from megatron.training.argument_utils import pretrain_cfg_container_from_args  # noqa: E402
from megatron.training.arguments import core_transformer_config_from_args, parse_and_validate_args  # noqa: E402

from megatron_rgm.integration import add_rgm_args, attach_sprm_head, forward_step as rgm_forward_step  # noqa: E402,E501 RGM
from megatron_rgm.integration import grpo_config_from_args, rgm_config_from_args  # noqa: E402 RGM
from megatron_rgm.steps import StepSegmenter  # noqa: E402 RGM

SEQ, MBS, STEP_ID = 32, 4, 7  # STEP_ID: the id of ".\n\n" in this synthetic vocabulary
SEGMENTER = None
MODELS = []  # test instrumentation: the chunks model_provider built


def model_provider(pre_process=True, post_process=True, vp_stage=None, **kwargs):
    args = get_args()
    config = core_transformer_config_from_args(args)
    model = GPTModel(config=config, transformer_layer_spec=get_gpt_layer_local_spec(normalization=args.normalization),
                     vocab_size=args.padded_vocab_size, max_sequence_length=args.max_position_embeddings,
                     pre_process=pre_process, post_process=post_process, vp_stage=vp_stage,
                     position_embedding_type=args.position_embedding_type,
                     share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights)
    attach_sprm_head(model, rgm_config_from_args(args))  # RGM
    MODELS.append(model)
    return model


class FixedBatch(torch.utils.data.Dataset):
    """The same 4 trajectories every micro-batch: random ids with step tokens, 2 correct, 2 not."""

    def __init__(self, num_samples):
        g = torch.Generator().manual_seed(7)
        self.num_samples = num_samples
        self.tokens = torch.randint(10, 200, (MBS, SEQ + 1), generator=g)
        self.tokens[:, 5::6] = STEP_ID  # a step ends every 6 tokens
        self.correct = torch.tensor([True, False, True, False])

    def __len__(self):
        return self.num_samples

    def __getitem__(self, i):
        j = i % MBS
        return {"text": self.tokens[j], "correct": self.correct[j]}


def train_valid_test_datasets_provider(num_samples):
    return FixedBatch(max(num_samples[0], MBS)), None, None


train_valid_test_datasets_provider.is_distributed = True  # every rank reads the same fixed batch


def get_batch(data_iterator, vp_stage=None):
    data = next(data_iterator)
    text = data["text"]
    tokens, labels = text[:, :-1].contiguous(), text[:, 1:].contiguous()
    loss_mask = torch.ones_like(tokens, dtype=torch.float)
    position_ids = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    batch = dict(tokens=tokens, labels=labels, loss_mask=loss_mask, attention_mask=None,  # RGM
                 position_ids=position_ids)  # RGM
    batch["step_mask"] = SEGMENTER(tokens, response_mask=loss_mask.bool()).mask  # RGM
    batch["correct"] = data["correct"]  # RGM: per-trajectory final-answer correctness
    return batch  # RGM


def forward_step(data_iterator, model):
    args = get_args()  # RGM
    batch = get_batch(data_iterator)  # RGM
    return rgm_forward_step(iter([batch]), model, rgm_config=rgm_config_from_args(args),  # RGM
                            grpo=grpo_config_from_args(args))  # RGM


def main():
    global SEGMENTER
    args = parse_and_validate_args(extra_args_provider=add_rgm_args)  # RGM: add_rgm_args
    # A real tokenizer: StepSegmenter.from_tokenizer(build_tokenizer(args)); this vocabulary is synthetic.
    SEGMENTER = StepSegmenter([STEP_ID])  # RGM
    cfg = pretrain_cfg_container_from_args(args)
    pretrain(cfg, train_valid_test_datasets_provider, ModelType.encoder_or_decoder, instrumented(forward_step),
             model_provider=model_provider)
# ---------------------------------------------------------------------------------- the tests' part


RECORD = {"spr": [], "iterations": 0}
OPTIMIZERS = []  # the optimizer Megatron-LM's setup_model_and_optimizer built


def _capture():
    """Keep the optimizer Megatron-LM's setup builds; record the probe logits as its train() starts (after any
    --load), outside any pipeline schedule."""
    from megatron.training import training

    build, train = training.get_megatron_optimizer, training.train

    def captured(*args, **kwargs):
        OPTIMIZERS.append(build(*args, **kwargs))
        return OPTIMIZERS[-1]

    def probed(*args, **kwargs):
        RECORD["before"] = probe_logits()
        return train(*args, **kwargs)

    training.get_megatron_optimizer, training.train = captured, probed


def param_groups():
    """(holds head parameters, lr, weight decay) of each non-empty param group of the loop's optimizer."""
    sprm = MODELS[-1].sprm_head  # None off the last pipeline stage
    head = {id(p) for p in sprm.parameters()} if sprm is not None else set()
    out = []
    for opt in getattr(OPTIMIZERS[-1], "chained_optimizers", [OPTIMIZERS[-1]]):
        for i, group in enumerate(opt.optimizer.param_groups):
            # The distributed optimizer's groups hold this DP rank's shards (fp32 copies): their model parameters
            # are in its model_*_groups. This run is fp32 throughout, so the plain optimizer's are the model's.
            params = (opt.model_float16_groups[i] + opt.model_fp32_groups[i] if hasattr(opt, "model_fp32_groups")
                      else group["params"])
            ids = {id(q) for q in params}
            if ids:
                out.append({"head": bool(ids & head), "mixed": bool(ids & head) and not ids <= head,
                            "lr": group["lr"], "weight_decay": group["weight_decay"], "dims": sorted(
                                {q.dim() for q in params})})
    return out


def probe_logits(model=None):
    """Full-vocabulary logits of the probe batch (the fixed batch) through the captured model, by megatron's
    pipeline schedule (forward only): a tensor on the last pipeline stage, None on the others."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    model = MODELS[-1] if model is None else model
    tokens = FixedBatch(MBS).tokens[:, :-1]
    pos = torch.arange(SEQ).unsqueeze(0).expand_as(tokens)

    def step(data_iterator, chunk):
        next(data_iterator)
        return chunk(tokens, pos, None), lambda out, non_loss_data=False: \
            tensor_parallel.gather_from_tensor_model_parallel_region(out)

    was_training = model.training
    model.eval()
    with torch.no_grad():
        got = get_forward_backward_func()(forward_step_func=step, data_iterator=iter([None]), model=[model],
                                          num_microbatches=1, seq_length=SEQ, micro_batch_size=MBS,
                                          forward_only=True, collect_non_loss_data=True)
    model.train(was_training)
    return got[0].clone() if mpu.is_pipeline_last_stage() else None


def instrumented(step):
    """Count the iterations; record the SPR loss per micro-batch (on the last pipeline stage)."""

    def wrapped(data_iterator, model):
        RECORD["iterations"] += 1
        output, loss_func = step(data_iterator, model)

        def recorded(output_tensor):
            loss, n, report = loss_func(output_tensor)
            if "spr loss" in report:
                v = report["spr loss"]
                RECORD["spr"].append((v[0] / v[1]).item())
            return loss, n, report

        return output, recorded

    return wrapped


def write(out):
    os.makedirs(out, exist_ok=True)
    RECORD["after"] = probe_logits()
    rank = torch.distributed.get_rank()
    if is_recorder():
        torch.save({k: v for k, v in RECORD.items() if isinstance(v, torch.Tensor)}, os.path.join(out, "logits.pt"))
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"spr": RECORD["spr"], "iterations": RECORD["iterations"], "last_stage":
                   mpu.is_pipeline_last_stage(), "tp": mpu.get_tensor_model_parallel_world_size(),
                   "pp": mpu.get_pipeline_model_parallel_world_size(), "dp": mpu.get_data_parallel_world_size(),
                   "param_groups": param_groups()}, f)


def is_recorder() -> bool:
    """The one rank that writes the probe logits: the last pipeline stage's first TP and DP rank."""
    return (mpu.is_pipeline_last_stage() and mpu.get_tensor_model_parallel_rank() == 0
            and mpu.get_data_parallel_rank() == 0)


if __name__ == "__main__":
    out = sys.argv.pop(1)
    torch.set_num_threads(1)
    _capture()
    main()
    write(out)
    torch.distributed.destroy_process_group()
