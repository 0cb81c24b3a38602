"""The config tree and the command line generated from it: one default per option, Megatron's flag names."""

from __future__ import annotations

import argparse
from dataclasses import asdict, fields

import pytest

from megatron_rgm import cli, lazy
from megatron_rgm.arguments import (add_rgm_args, build_args, build_parser, check_stage, parse_args,
                                    rgm_config_from_args)
from megatron_rgm.config import (ConfigError, DataConfig, GRPOConfig, ModelConfig, OptimConfig, ParallelConfig,
                                 RGMConfig, RunConfig)
from megatron_rgm.model.presets import PRESETS

# Flags a Megatron-LM user already types; each must keep its name and meaning here.
MEGATRON_FLAGS = {
    "--num-layers": ("4", "model", "num_layers", 4), "--hidden-size": ("64", "model", "hidden_size", 64),
    "--num-query-groups": ("1", "model", "num_query_groups", 1), "--seq-length": ("32", "model", "seq_length", 32),
    "--tensor-model-parallel-size": ("2", "parallel", "tensor_model_parallel_size", 2),
    "--pipeline-model-parallel-size": ("2", "parallel", "pipeline_model_parallel_size", 2),
    "--micro-batch-size": ("2", "run", "micro_batch_size", 2), "--global-batch-size": ("8", "run", "global_batch_size", 8),
    "--train-iters": ("9", "run", "train_iters", 9), "--lr": ("0.5", "optim", "lr", 0.5),
    "--clip-grad": ("0.3", "optim", "clip_grad", 0.3), "--lr-warmup-iters": ("2", "optim", "lr_warmup_iters", 2),
    "--seed": ("7", "parallel", "seed", 7), "--save-interval": ("3", "run", "save_interval", 3),
    "--lr-decay-style": ("cosine", "optim", "lr_decay_style", "cosine"),
}


def test_megatron_lm_decay_flags_keep_their_names():
    optim = parse_args(["--lr", "0.5", "--lr-decay-style", "linear", "--lr-decay-iters", "7", "--min-lr", "0.25"]).optim
    assert (optim.lr_decay_style, optim.lr_decay_iters, optim.min_lr) == ("linear", 7, 0.25)


@pytest.mark.parametrize("flag", sorted(MEGATRON_FLAGS))
def test_megatron_lm_flags_keep_their_names(flag):
    value, group, name, want = MEGATRON_FLAGS[flag]
    base = ["--num-attention-heads", "4", "--num-layers", "4"] if group == "parallel" else []
    args = parse_args(base + [flag, value])
    assert getattr(getattr(args, group), name) == want


def test_defaults_are_the_dataclasses_own():
    # One place defines each default: what the parser leaves alone equals the dataclass's field default.
    args = parse_args([])
    assert args.optim == OptimConfig() and args.run == RunConfig() and args.data == DataConfig()
    assert args.rgm == RGMConfig() and args.parallel == ParallelConfig()
    assert args.grpo == GRPOConfig(temperature=DataConfig().temperature)  # logits divided as sampled
    preset_free = {f.name for f in fields(ModelConfig)} - set(PRESETS["tiny"])
    assert {n: getattr(args.model, n) for n in preset_free} == {n: getattr(ModelConfig(**PRESETS["tiny"]), n)
                                                                   for n in preset_free}


def test_each_field_is_one_flag_and_bools_turn_both_ways():
    parser = build_parser()
    flags = [s for a in parser._actions for s in a.option_strings]
    assert len(flags) == len(set(flags))
    assert "--no-swiglu" in flags and "--no-sprm-calibrate-head" in flags
    assert "--no-no-load-optim" not in flags  # a field named no_x is a plain switch
    # A preset turns SwiGLU on; the command line turns it off again.
    assert not parse_args(["--no-swiglu"]).transformer.gated_linear_unit


def test_a_model_record_rebuilds_the_same_transformer_config():
    args = parse_args(["--preset", "qwen3-32b", "--num-layers", "6", "--sprm-step-tokens", "\\n\\n", "--bf16"])
    record = args.model_record()
    model, sprm = ModelConfig(**record["model"]), RGMConfig(**record["sprm"])
    assert model == args.model and sprm == args.rgm and sprm.sprm_step_tokens == ["\n\n"]
    again = build_args(model, rgm=sprm)
    keys = ("num_layers", "hidden_size", "ffn_hidden_size", "num_query_groups", "kv_channels", "qk_layernorm",
            "add_qkv_bias", "gated_linear_unit", "layernorm_epsilon", "normalization", "params_dtype")
    assert {k: getattr(again.transformer, k) for k in keys} == {k: getattr(args.transformer, k) for k in keys}
    assert again.vocab_size == args.vocab_size and again.rotary_base == args.rotary_base == 1000000


def test_rgm_flags_alone_on_a_foreign_parser():
    # What a Megatron-LM script's extra_args_provider registers: the head's and GRPO's flags, no others.
    parser = add_rgm_args(argparse.ArgumentParser())
    flags = {s for a in parser._actions for s in a.option_strings} - {"-h", "--help"}
    assert flags and all(f.startswith(("--sprm-", "--no-sprm-", "--grpo-")) for f in flags)
    assert {"--sprm-lr", "--sprm-weight-decay", "--grpo-kl-coef"} <= flags
    # ... and not the flags only megatron_rgm.pretrain acts on: refused there rather than ignored.
    assert not {"--sprm-clip-grad", "--sprm-calibrate-head", "--sprm-orient-head", "--sprm-only",
                "--sprm-mask-warmup-iters"} & flags
    with pytest.raises(SystemExit):
        parser.parse_args(["--sprm-clip-grad", "0.5"])
    ns = parser.parse_args(["--sprm-step-tokens", "\\n\\n", "--sprm-layer", "-3"])
    assert rgm_config_from_args(ns) == RGMConfig(sprm_layer=-3, sprm_step_tokens=["\n\n"])


@pytest.mark.parametrize("cls, change, message", [
    (OptimConfig, dict(lr=-1.0), "--lr must be >= 0"),
    (RunConfig, dict(train_iters=0), "--train-iters must be >= 1"),
    (RunConfig, dict(sprm_mask_warmup_iters=-1), "--sprm-mask-warmup-iters must be >= 0"),
    (RunConfig, dict(stage="sft", sprm_mask_warmup_iters=2), "use it with --stage rgm"),
    (DataConfig, dict(top_p=0.0), "--rollout-top-p must be in (0, 1]"),
    (DataConfig, dict(group_size=0), "--grpo-group-size must be >= 1"),
    (GRPOConfig, dict(kl_coef=-0.1), "--grpo-kl-coef must be >= 0"),
    (ParallelConfig, dict(sequence_parallel=True), "--sequence-parallel needs"),
])
def test_each_config_checks_its_own_fields_by_flag(cls, change, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("]", r"\]")):
        cls(**change)


def test_from_namespace_reads_only_what_a_parser_registered():
    ns = argparse.Namespace(lr=0.25)
    assert cli.from_namespace(OptimConfig, ns) == OptimConfig(lr=0.25)
    assert asdict(cli.from_namespace(OptimConfig, argparse.Namespace())) == asdict(OptimConfig())


def test_the_tools_share_one_prompt_model_and_sampling_group():
    from megatron_rgm.cli import ModelSource, PromptFileConfig
    from megatron_rgm.rollout.sampling import SamplingParams

    parser = argparse.ArgumentParser()
    for title, cls in (("prompts", PromptFileConfig), ("model", ModelSource), ("sampling", SamplingParams)):
        cli.add_arguments(parser, cls, title)
    with pytest.raises(SystemExit):  # --prompts is required
        parser.parse_args([])
    ns = parser.parse_args(["--prompts", "p.jsonl", "--prompt-template", "Q: {problem}\\nA:", "--mcore-path", "c",
                            "--stop", "\\n\\n", "--temperature", "0"])
    assert cli.from_namespace(PromptFileConfig, ns).prompt_template == "Q: {problem}\nA:"
    params = cli.from_namespace(SamplingParams, ns)
    assert params.stop_strings == ["\n\n"] and params.temperature == 0 and params.eos_token_ids == []
    assert cli.from_namespace(ModelSource, ns).tp == 1
    with pytest.raises(ConfigError, match="--backend hf needs --hf-path"):
        ModelSource(backend="hf")
    with pytest.raises(ConfigError, match="has no {problem} field"):
        PromptFileConfig(prompts="p.jsonl", prompt_template="no field")


def test_a_logger_that_cannot_start_is_refused_before_the_run():
    # --wandb-project without wandb used to train on with a warning; now every rank stops before the first step.
    if lazy.available("wandb"):
        pytest.skip("wandb is installed here: nothing to refuse")
    args = parse_args(["--preset", "tiny", "--stage", "sft", "--wandb-project", "rgm"])
    with pytest.raises(ConfigError, match=r"--wandb-project needs wandb, which does not import here .*pip install "
                                          r"wandb, or drop --wandb-project"):
        check_stage(args)


# ModelConfig's fields that are choices of a run, not of the model: --use-checkpoint-args leaves them to the flags.
RUN_CHOICES = {"seq_length", "hidden_dropout", "attention_dropout", "init_method_std", "transformer_impl",
               "recompute_granularity", "recompute_method", "recompute_num_layers", "bf16", "fp16", "fp8_format",
               "fp8_recipe", "fp8_margin", "fp8_amax_history_len", "fp8_amax_compute_algo", "fp8_param_gather",
               "moe_aux_loss_coeff"}


def test_every_model_field_is_geometry_or_a_run_choice():
    """A new ModelConfig field must be placed: in GEOMETRY (--use-checkpoint-args carries it; a checkpoint's
    model is rebuilt with it), or a run's choice. (Windows, sinks, YaRN and the quick-GELU gate were once left
    out, and a converted Mistral trained without its window.)"""
    from megatron_rgm.config import GEOMETRY

    assert {f.name for f in fields(ModelConfig)} == set(GEOMETRY) | RUN_CHOICES
    assert not set(GEOMETRY) & RUN_CHOICES


def test_mask_warmup_picks_the_head_loss_by_iteration():
    from megatron_rgm.training.step import training_step_func

    def loss(argv, iteration):
        return training_step_func(parse_args(argv), 512, iteration).keywords["rgm_config"].sprm_loss

    warm = ["--sprm-mask-warmup-iters", "2"]
    assert [loss(warm, it) for it in (1, 2, 3)] == ["bce", "bce", "spr"]
    # iteration 0 (a step outside a run's iterations, as tools/bench_train.py takes) and no warm-up: SPR
    assert loss(warm, 0) == loss([], 0) == loss([], 1) == loss(warm, None) == "spr"
    assert loss(["--sprm-loss", "bce"], 5) == "bce"
