"""hf-to-mcore, mcore-to-hf and verify.

hf-to-mcore runs one process per model-parallel rank (tp x pp; spawned when
not under torchrun): each builds its shard of RGMModel without filling it (the
layout of its checkpoint), and writes each tensor of its share as it reads it
from the HF safetensors, only the rank's slice (:mod:`.slices`,
:mod:`.stream_save`): a process holds about one tensor shard at a time, never
its whole share, let alone the model. The result is a ``torch_dist``
checkpoint, which any TP/PP layout can load.

mcore-to-hf runs in one process and reads the checkpoint one tensor at a time.
"""

from __future__ import annotations

import json
import resource
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm
from megatron.core import dist_checkpointing
from megatron.core import parallel_state as ps
from megatron.core.dist_checkpointing import ShardedTensor

from megatron_rgm import distributed
from megatron_rgm.arguments import rebuild_args
from megatron_rgm.checkpoint import ASSETS, TE_NORM_KEYS, publish, save_checkpoint
from megatron_rgm.config import PROMPT_TEMPLATE, ConfigError, RGMConfig, check_template
from megatron_rgm.convert.hf_io import HFCheckpoint, ShardWriter, copy_tokenizer_files
from megatron_rgm.convert.gpt_oss import ExpertStacker
from megatron_rgm.convert.hf_config import hf_config_from_args, served_config
from megatron_rgm.convert.mapping import HFArch, hf_tensors
from megatron_rgm.convert.serving import chat_template, complete_export
from megatron_rgm.convert.slices import megatron_shard
from megatron_rgm.convert.stream_save import (
    StreamingSaveStrategy,
    param_producer,
    return_freed_memory,
)
from megatron_rgm.head import HEAD_FIELDS, HEAD_KEYS, head_config, load_head, save_head
from megatron_rgm.launch import run_ranks
from megatron_rgm.model import build_model
from megatron_rgm.model.load import HEAD_TRAINED, CheckpointModel, describe_checkpoint
from megatron_rgm.model.state import global_name, partition
from megatron_rgm.tokenizer import is_sentencepiece_dir


def _say(msg: str) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(msg, flush=True)


def _hf_to_mcore_rank(hf_path: str, output: str, tp: int, pp: int, head_file: str | None, head: RGMConfig,
                      divisible_by: int, seed: int, ep: int = 1, etp: int | None = None) -> None:
    return_freed_memory()
    hf = HFCheckpoint(hf_path)
    arch = hf.arch
    args = rebuild_args(arch.model_config(divisible_by), tp, pp, head, seed=seed, ep=ep, etp=etp)
    distributed.initialize(args.parallel)

    # The model gives the checkpoint's layout (its sharded_state_dict); its backbone parameters are never
    # filled (perform_initialization=False leaves them untouched torch.empty memory, not resident): each
    # rank's slice of each tensor is read from the HF files when the writer reaches it, written, dropped.
    model = build_model(args)[0]
    # The head was initialised from the seeded generator; it is the one tensor written from the model.
    tp_rank, tp_size = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    if model.sprm_head is not None and head_file:
        with torch.no_grad():
            model.sprm_head.load_state_dict(load_head(head_file, arch.hidden_size))

    def make_shard(name: str, param: torch.Tensor) -> torch.Tensor:
        dim, gated = partition(model, name, param)
        return megatron_shard(global_name(model, name), hf, arch, args.vocab_size, dim, gated, tp_rank, tp_size)

    produce = param_producer(model, make_shard, keep=lambda name: name.startswith("sprm_head."))
    extra = {**args.model_record(), "padded_vocab_size": args.vocab_size,
             "hf_config": arch.config, "source": str(hf_path), "head": "file" if head_file else f"fresh (seed {seed})",
             HEAD_TRAINED: bool(head_file)}
    show = tp_rank == 0 and ps.get_data_parallel_rank() == 0
    _save_streaming(output, model, produce, extra, f"hf->mcore pp{ps.get_pipeline_model_parallel_rank()}" if show
                    else None)

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    print(f"[hf-to-mcore rank {torch.distributed.get_rank()}] peak RSS {peak:.3f} GiB", flush=True)
    distributed.shutdown()


def imported_head(head_file: str | None, hidden_size: int) -> RGMConfig:
    """The head config of ``head_file`` (its layer, step strings and rule: :func:`megatron_rgm.head.head_config`
    of its directory; its width from its shapes), or the defaults for a fresh head."""
    if not head_file:
        return RGMConfig()
    width = load_head(head_file, hidden_size)["0.weight"].shape[0] // hidden_size
    return RGMConfig(**head_config(Path(head_file).parent), sprm_hidden_mult=width)


def _save_streaming(output: str, model, produce, extra: dict, progress: str | None = None) -> None:
    """``save_checkpoint(output, 0, [model], extra=extra)``, with the tensors made by ``produce`` as they are
    written (the same keys, common state and publish as a training save)."""
    save_checkpoint(output, 0, [model], extra=extra, sharded_strategy=StreamingSaveStrategy(produce, progress))


def hf_to_mcore(hf_path: str, output: str, tp: int = 1, pp: int = 1, head_file: str | None = None,
                divisible_by: int = 128, seed: int = 1234, ep: int = 1, etp: int | None = None) -> None:
    """Convert an HF directory to a Megatron dist checkpoint with the SPRM head, on ``tp x pp x ep`` ranks (``ep``
    spreads a mixture-of-experts model's experts: each rank reads and writes its own experts only; ``etp`` splits
    each expert over that many tensor-parallel ranks)."""
    hf = HFCheckpoint(hf_path)
    hf.validate()
    if hf.arch.o_bias:  # RGMModel biases q/k/v only: a Llama's o_proj bias converts when it is zero
        for i in range(hf.arch.num_layers):
            if torch.count_nonzero(hf.get(f"model.layers.{i}.self_attn.o_proj.bias")):
                raise ConfigError(f"{hf_path}: layer {i}'s self_attn.o_proj.bias is not zero (attention_bias: "
                                  "true): megatron-rgm's attention has biases on q, k and v only, so this model "
                                  "cannot be converted without changing it")
    head = imported_head(head_file, hf.arch.hidden_size)  # a bad head file is refused before anything is written
    out = Path(output)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"--output {out} exists and is not empty: choose a new directory")
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        rebuild_args(hf.arch.model_config(divisible_by), tp, pp, ep=ep, etp=etp)  # layout errors before any rank
        if not head_file:
            print(f"no --sprm-head given: the SPRM head is freshly initialised (seed {seed})", flush=True)
        else:
            print(f"SPRM head {head_file}: layer {head.sprm_layer}, step rule {head.sprm_step_rule} over "
                  f"{head.sprm_step_tokens}", flush=True)
        run_ranks(_hf_to_mcore_rank, tp * pp * ep, str(hf_path), str(out), tp, pp, head_file, head, divisible_by,
                  seed, ep, etp, skip_teardown=True)
        (out / ASSETS).mkdir()
        copied = copy_tokenizer_files(Path(hf_path), out / ASSETS)
        (out / ASSETS / "config.json").write_text(json.dumps(hf.arch.config, indent=2))
        print(f"wrote {out} (tp={tp}, pp={pp}, ep={ep}; tokenizer files: {', '.join(copied) or 'none'})", flush=True)
    except BaseException:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        else:
            for child in out.iterdir():
                shutil.rmtree(child) if child.is_dir() else child.unlink()
        raise


def head_flags(sprm: RGMConfig) -> dict:
    """The :data:`~megatron_rgm.head.HEAD_FIELDS` of a checkpoint's head, for ``sprm_config.json``.

    The layer, step strings and step rule travel with the export: a scorer of a model trained with
    ``--sprm-step-tokens`` or ``--sprm-step-rule`` must not fall back to the defaults (its tokenizer may have
    no ``".\\n\\n"`` token, and a head asked to score positions it never saw in training scores noise).
    """
    return {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in
            ((k, getattr(sprm, k)) for k in HEAD_FIELDS)}


def export_config(checkpoint: CheckpointModel) -> dict:
    """The HF ``config.json`` a checkpoint's model exports as: the recorded one, else one built from its flags."""
    if checkpoint.hf_config is not None:
        return checkpoint.hf_config
    if checkpoint.vocab_size is None:
        raise ConfigError(f"checkpoint {checkpoint.directory} does not record its real vocabulary size (Megatron-LM "
                          "saves only the padded one): pass --vocab-size with the tokenizer's size")
    config = hf_config_from_args(checkpoint.args(), checkpoint.vocab_size)
    if config is None:
        raise ConfigError(f"checkpoint {checkpoint.directory} holds a model no HF class matches (exported: Qwen2, "
                          "Qwen3, Qwen3-MoE, Llama, Mistral and GPT-OSS layers; megatron_rgm.convert.hf_config)")
    return config


def _mcore_to_hf_rank(mcore_path: str, output: str, dtype: str | None, vocab_size: int | None,
                      prompt_template: str | None) -> None:
    distributed.initialize(distributed.ParallelConfig())
    source = describe_checkpoint(mcore_path).with_vocab_size(vocab_size)
    ckpt = source.directory
    config = export_config(source)
    assets = source.tokenizer_dir()
    config = served_config(config, assets is not None and is_sentencepiece_dir(assets))
    arch = HFArch.from_config(config)
    meta = dist_checkpointing.load_tensors_metadata(str(ckpt))
    out = Path(output)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    to_dtype = getattr(torch, dtype) if dtype else None

    def load_full(key: str) -> torch.Tensor:
        st = ShardedTensor.from_rank_offsets(key, torch.empty(meta[key].global_shape, dtype=meta[key].dtype),
                                             replica_id=0)
        return dist_checkpointing.load({key: st}, str(ckpt))[key]

    stacker = ExpertStacker(arch.num_experts or 0)  # GPT-OSS keeps a layer's experts in one tensor

    def emit(name: str, t: torch.Tensor) -> None:
        for hf_name, value in hf_tensors(name, t, arch).items():
            tensor = stacker.add(hf_name, value)
            if tensor is not None:
                writer.add(hf_name, tensor.to(to_dtype) if to_dtype else tensor)

    # One checkpoint tensor at a time (a stacked layer tensor holds that weight for every
    # layer): peak memory is the largest such tensor plus one output shard, not the model.
    writer = ShardWriter(tmp)
    head = {}
    # A training checkpoint also holds optimizer moments and RNG states: only model tensors export.
    # Transformer Engine's _extra_state (FP8 scaling history) is no weight.
    model_keys = sorted(k for k in meta if not k.startswith(("optimizer.", "rng_state")) and
                        not k.endswith("_extra_state"))
    for key in tqdm(model_keys, desc="mcore->hf", file=sys.stdout):
        t = load_full(key)
        if key.startswith("sprm_head."):
            head[key[len("sprm_head."):]] = t
        elif key.startswith("decoder.layers."):
            suffix = key[len("decoder.layers."):]
            for layer in range(t.shape[0]):
                emit(f"decoder.layers.{layer}.{TE_NORM_KEYS.get(suffix, suffix)}", t[layer])
        else:
            emit(key, t)
        del t
    stacker.close()
    writer.close()
    cfg = dict(arch.config)
    cfg.pop("quantization_config", None)  # GPT-OSS's MXFP4 experts export dequantized (the bf16 layout)
    if to_dtype:
        cfg["torch_dtype"] = dtype
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    if assets is not None:
        copy_tokenizer_files(assets, tmp)
        complete_export(tmp, prompt_template or source.prompt_template or PROMPT_TEMPLATE)
    if set(head) == set(HEAD_KEYS):
        save_head(tmp, head, {**head_flags(source.sprm), "hidden_size": arch.hidden_size,
                              "hidden_mult": head["0.weight"].shape[0] // arch.hidden_size})
    publish(tmp, out)
    distributed.shutdown()
    print(f"wrote {out} ({len(writer.files)} safetensors shards{', SPRM head' if head else ''})", flush=True)


def mcore_to_hf(mcore_path: str, output: str, dtype: str | None = None, vocab_size: int | None = None,
                prompt_template: str | None = None) -> None:
    """Export a Megatron dist checkpoint (ours or Megatron-LM's) to an HF directory plus ``score_module.pt``,
    with the files serving needs (:mod:`.serving`).

    Args:
        vocab_size: the real vocabulary, for a checkpoint that records only the padded one (Megatron-LM's).
        prompt_template: the template the export's chat template reproduces, for a sentencepiece tokenizer
            (default: the one the run recorded, else the project's).
    """
    if not Path(mcore_path).exists():
        raise ConfigError(f"--mcore-path {mcore_path} does not exist")
    if dtype and dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"--dtype {dtype!r}: use float32, bfloat16 or float16")
    source = describe_checkpoint(mcore_path).with_vocab_size(vocab_size)
    export_config(source)  # refusals before a rank starts
    if prompt_template is not None:
        check_template(prompt_template)
    assets = source.tokenizer_dir()
    if assets is not None and is_sentencepiece_dir(assets):
        chat_template(prompt_template or source.prompt_template or PROMPT_TEMPLATE)
    run_ranks(_mcore_to_hf_rank, 1, str(mcore_path), str(output), dtype, vocab_size, prompt_template)
