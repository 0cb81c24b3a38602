"""A training checkpoint that every tool can use as it is.

Beside the weights, optimizer and RNG state (:func:`megatron_rgm.checkpoint.save_checkpoint`): the
model and head configs, the vocabulary sizes, the HF architecture (when one matches) and, once per
save directory, the tokenizer under ``hf_assets/``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch.distributed as dist

from megatron_rgm.arguments import lr_schedule
from megatron_rgm.checkpoint import ASSETS, publish, save_checkpoint
from megatron_rgm.convert.hf_config import hf_config_from_args
from megatron_rgm.model.load import HEAD_TRAINED, PROMPT_KEY


def save_run(args, iteration: int, model: list, optimizer, tokenizer, vocab: int, samples_per_iteration: int,
             head_trained: bool) -> None:
    """Save ``model`` and ``optimizer`` at ``iteration`` under ``--save``. Collective."""
    hf_config = hf_config_from_args(args, vocab)
    extra = {**args.model_record(), "stage": args.run.stage, "padded_vocab_size": args.vocab_size,
             "vocab_size": vocab, HEAD_TRAINED: head_trained, PROMPT_KEY: args.data.prompt_template}
    if hf_config is not None:
        extra["hf_config"] = hf_config
    # Megatron-LM counts consumed samples (and its scheduler's steps) as iteration x global batch.
    save_checkpoint(args.run.save, iteration, model, optimizer=optimizer, extra=extra,
                    global_batch_size=samples_per_iteration, lr_schedule=lr_schedule(args.optim, args.run.train_iters))
    assets = Path(args.run.save) / ASSETS
    if dist.get_rank() == 0 and tokenizer is not None and not assets.exists():
        tmp = assets.with_name(ASSETS + ".tmp")
        tokenizer.save_pretrained(tmp)
        if hf_config is not None:
            (tmp / "config.json").write_text(json.dumps(hf_config, indent=2))
        publish(tmp, assets)
    dist.barrier()
