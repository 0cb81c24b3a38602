"""Rebuilding a model from a checkpoint (megatron_rgm.model.load): what it reads, what it refuses."""

from __future__ import annotations

import argparse
import re
from dataclasses import replace

import pytest
import torch

from helpers import convert
from megatron_rgm.arguments import GEOMETRY, build_args, parse_args
from megatron_rgm.config import ConfigError, ModelConfig
from megatron_rgm.convert.convert import export_config
from megatron_rgm.model import build_model
from megatron_rgm.model.load import describe_checkpoint, load_model, megatron_lm_model, recorded_geometry
from megatron_rgm.checkpoint import save_checkpoint


def _pretrain_gpt_args(**changes) -> argparse.Namespace:
    """The args Namespace Megatron-LM saves for a Qwen2-like pretrain_gpt.py run (the attributes read here)."""
    ns = argparse.Namespace(
        num_layers=4, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4, group_query_attention=True,
        num_query_groups=2, kv_channels=16, padded_vocab_size=384, vocab_size=300, seq_length=64,
        max_position_embeddings=128, normalization="RMSNorm", norm_epsilon=1e-6, position_embedding_type="rope",
        rotary_base=1000000, rotary_percent=1.0, add_qkv_bias=True, add_bias_linear=False, qk_layernorm=False,
        swiglu=True, untie_embeddings_and_output_weights=True, bf16=False, fp16=False, num_experts=None,
        multi_latent_attention=False, use_rope_scaling=False, window_size=None)
    for key, value in changes.items():
        setattr(ns, key, value)
    return ns


def test_megatron_lm_args_translate_into_the_same_transformer_config():
    model, sprm, notes = megatron_lm_model(_pretrain_gpt_args(sprm_layer=-3, sprm_step_tokens=["\\n\\n"]), "ckpt")
    assert notes == []
    assert sprm.sprm_layer == -3 and sprm.sprm_step_tokens == ["\n\n"]  # the flags' escapes decoded
    args = build_args(model)
    t = args.transformer
    assert (t.num_layers, t.hidden_size, t.ffn_hidden_size, t.num_attention_heads) == (4, 64, 96, 4)
    assert (t.num_query_groups, t.kv_channels, t.layernorm_epsilon) == (2, 16, 1e-6)
    assert t.normalization == "RMSNorm" and t.gated_linear_unit and not t.add_bias_linear and t.add_qkv_bias
    assert not t.qk_layernorm and not args.share_embeddings_and_output_weights
    assert args.rotary_base == 1000000 and args.position_embedding_type == "rope" and args.vocab_size == 384


def test_rope_scalings_translate_and_export_as_the_hf_config_transformers_reads():
    import transformers

    from megatron_rgm.convert.hf_config import hf_config_from_args

    for change, rope in ((dict(use_rope_scaling=True, rope_scaling_factor=32.0), ("llama3", 32.0)),
                         (dict(rotary_seq_len_interpolation_factor=4), ("linear", 4.0))):
        model, _, _ = megatron_lm_model(_pretrain_gpt_args(add_qkv_bias=False, **change), "ckpt")
        args = build_args(model)
        assert (model.use_rope_scaling, model.rope_scaling_factor if model.use_rope_scaling else
                model.rotary_seq_len_interpolation_factor) == (rope[0] == "llama3", rope[1])
        hf = transformers.LlamaConfig(**hf_config_from_args(args, 300))
        assert (hf.rope_parameters["rope_type"], hf.rope_parameters["factor"]) == rope
    with pytest.raises(ConfigError, match="does not record rope_scaling_factor"):
        megatron_lm_model(_pretrain_gpt_args(use_rope_scaling=True), "ckpt")


def test_megatron_lm_gpt_oss_args_translate():
    """Megatron-LM's GPT-OSS flags (the names our flags share): windows, sinks, YaRN, the clamped quick-GELU."""
    model, _, notes = megatron_lm_model(_pretrain_gpt_args(
        **MOE, add_bias_linear=True, swiglu=False, quick_geglu=True, glu_linear_offset=1.0,
        activation_func_clamp_value=7.0, softmax_type="learnable", window_size=(127, 0), window_attn_skip_freq=2,
        position_embedding_type="yarn", rotary_scaling_factor=32.0, yarn_original_max_position_embeddings=None,
        yarn_beta_fast=32.0, yarn_beta_slow=1.0, yarn_correction_range_round_to_int=False, mscale=1.0,
        mscale_all_dim=0.0), "ckpt")
    t = build_args(model).transformer
    assert (t.window_size, t.window_attn_skip_freq, t.softmax_type) == ((127, 0), 2, "learnable")
    assert (t.glu_linear_offset, t.activation_func_clamp_value, t.add_bias_linear) == (1.0, 7.0, True)
    assert t.activation_func.__name__ == "quick_gelu" and t.gated_linear_unit
    # Megatron-LM builds 4096 original positions where the flag was not given.
    assert (t.yarn_rotary_scaling_factor, t.yarn_original_max_position_embeddings,
            t.yarn_correction_range_round_to_int) == (32.0, 4096, False)


GPT_OSS_FLAGS = ["--num-experts", "4", "--moe-ffn-hidden-size", "96", "--no-swiglu", "--quick-geglu",
                 "--glu-linear-offset", "1", "--activation-func-clamp-value", "7", "--no-disable-bias-linear",
                 "--add-qkv-bias", "--softmax-type", "learnable", "--sliding-window", "8", "--window-attn-skip-freq",
                 "2", "--position-embedding-type", "yarn", "--rotary-scaling-factor", "4",
                 "--yarn-original-max-position-embeddings", "128", "--no-yarn-correction-range-round-to-int"]
MISTRAL_FLAGS = ["--no-add-qkv-bias", "--sliding-window", "8"]
YARN_QWEN3_FLAGS = ["--no-add-qkv-bias", "--qk-layernorm", "--position-embedding-type", "yarn",
                    "--rotary-scaling-factor", "4", "--yarn-original-max-position-embeddings", "128"]  # 512 / 128


GPT_OSS_PLAIN_ROPE = GPT_OSS_FLAGS[:GPT_OSS_FLAGS.index("--position-embedding-type")]


@pytest.mark.parametrize("flags, cls", [(GPT_OSS_FLAGS, "GptOssConfig"), (GPT_OSS_PLAIN_ROPE, "GptOssConfig"),
                                        (MISTRAL_FLAGS, "MistralConfig"), (YARN_QWEN3_FLAGS, "Qwen3Config")],
                         ids=["gpt-oss", "gpt-oss-plain-rope", "mistral", "yarn"])
def test_a_natively_trained_model_records_the_hf_config_it_converts_from(flags, cls):
    """What a training checkpoint records for mcore-to-hf, as transformers reads it (its defaults filled in, so
    GPT-OSS's default YaRN cannot sneak in), converts back to the model the flags built (every attention,
    positional and MLP feature)."""
    from dataclasses import fields

    import transformers

    from megatron_rgm.config import ModelConfig
    from megatron_rgm.convert.hf_config import hf_config_from_args
    from megatron_rgm.convert.mapping import HFArch

    args = parse_args(["--preset", "tiny", *flags])
    hf = hf_config_from_args(args, 500)
    assert hf is not None
    hf = {**getattr(transformers, cls)(**hf).to_dict(), "architectures": hf["architectures"]}  # as saved
    def resolved(m: ModelConfig) -> ModelConfig:  # the head dim as built; no dense MLP where every layer is MoE
        return replace(m, kv_channels=m.kv_channels or m.hidden_size // m.num_attention_heads,
                       ffn_hidden_size=None if m.num_experts else m.ffn_hidden_size)

    ours, back = resolved(args.model), resolved(HFArch.from_config(hf).model_config())
    skip = {"seq_length", "vocab_size", "make_vocab_size_divisible_by", "init_method_std"}
    differ = {f.name: (getattr(ours, f.name), getattr(back, f.name)) for f in fields(ModelConfig)
              if f.name not in skip and getattr(ours, f.name) != getattr(back, f.name)}
    assert differ == {}


def test_our_megatron_lm_args_describe_a_gpt_oss_like_model(single_rank):
    """The ``args`` our saves write for Megatron-LM's loader rebuild the same model (they rebuild a checkpoint
    written from a Megatron-LM script, whose common state records no model config)."""
    from megatron_rgm.checkpoint import megatron_lm_args

    args = parse_args(["--preset", "tiny", *GPT_OSS_FLAGS])
    single_rank.initialize(args.parallel)
    model = build_model(args)[0]
    rebuilt, _, _ = megatron_lm_model(megatron_lm_args([model], 1), "ckpt")
    skip = {"vocab_size", "make_vocab_size_divisible_by", "ffn_hidden_size", "kv_channels"}  # the padded rows;
    assert {k: getattr(rebuilt, k) for k in GEOMETRY if k not in skip} == \
        {k: getattr(args.model, k) for k in GEOMETRY if k not in skip}  # no dense MLP; the head dim as built:
    assert rebuilt.kv_channels == args.transformer.kv_channels


def test_megatron_lm_without_group_query_attention_has_one_kv_head_per_head():
    # Megatron-LM leaves --num-query-groups at its default 1 when --group-query-attention is not given.
    model, _, _ = megatron_lm_model(_pretrain_gpt_args(group_query_attention=False, num_query_groups=1), "ckpt")
    assert build_args(model).transformer.num_query_groups == 4


MOE = dict(num_experts=4, moe_ffn_hidden_size=32, moe_router_topk=2, moe_router_pre_softmax=True,
           moe_aux_loss_coeff=0.01, moe_layer_freq=1, moe_router_score_function="softmax")


def test_megatron_lm_moe_args_translate_into_rgms_moe_layers():
    model, _, notes = megatron_lm_model(_pretrain_gpt_args(**dict(MOE, moe_aux_loss_coeff=[0.01]),
                                                           moe_z_loss_coeff=1e-3), "ckpt")
    assert (model.num_experts, model.moe_ffn_hidden_size, model.moe_router_topk, model.moe_router_pre_softmax,
            model.moe_aux_loss_coeff) == (4, 32, 2, True, 0.01)
    config = build_args(model).transformer
    assert (config.num_moe_experts, config.moe_ffn_hidden_size, config.moe_router_topk) == (4, 32, 2)
    assert any("moe_z_loss_coeff=0.001" in note for note in notes), notes  # not carried, and said so
    dense, _, _ = megatron_lm_model(_pretrain_gpt_args(num_experts=None, moe_router_topk=2), "ckpt")
    assert dense.num_experts is None  # MoE arguments at their defaults on a dense run change nothing


@pytest.mark.parametrize("change, named", [
    (dict(**MOE, moe_shared_expert_intermediate_size=64), "moe_shared_expert_intermediate_size=64"),
    (dict(MOE, moe_router_score_function="sigmoid"), "moe_router_score_function='sigmoid'"),
    (dict(**MOE, moe_expert_capacity_factor=1.0), "moe_expert_capacity_factor=1.0"),
    (dict(MOE, moe_layer_freq=[1, 0, 1, 0]), "moe_layer_freq=[1, 0, 1, 0]"),
    (dict(MOE, moe_router_load_balancing_type="sinkhorn"), "moe_router_load_balancing_type='sinkhorn'"),
    (dict(**MOE, moe_apply_probs_on_input=True), "moe_apply_probs_on_input=True"),
    (dict(MOE, moe_aux_loss_coeff=[0.01, 0.001]), "moe_aux_loss_coeff=[0.01, 0.001]"),
    (dict(multi_latent_attention=True), "multi_latent_attention=True"),
    (dict(window_size=(128, 64)), "window_size=(128, 64)"),
    (dict(window_size=(127, 0), window_attn_skip_freq=[1, 0, 0, 1]), "window_attn_skip_freq=[1, 0, 0, 1]"),
    (dict(position_embedding_type="mrope"), "position_embedding_type='mrope'"),
    (dict(normalization="L2Norm"), "normalization='L2Norm'"),
])
def test_a_feature_rgm_does_not_build_is_refused_by_name(change, named):
    with pytest.raises(ConfigError, match="does not build") as e:
        megatron_lm_model(_pretrain_gpt_args(**change), "ckpt_dir")
    assert named in str(e.value) and "ckpt_dir" in str(e.value)


# A model no HF class matches (LayerNorm, learned positions, GELU MLP with biases): trained natively, it must
# still rebuild from its checkpoint for rollouts and Best-of-N; only the HF export is refused.
NATIVE = ["--preset", "tiny", "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
          "--ffn-hidden-size", "48", "--vocab-size", "100", "--seq-length", "16", "--max-position-embeddings", "16",
          "--normalization", "LayerNorm", "--position-embedding-type", "learned_absolute", "--no-swiglu",
          "--no-disable-bias-linear", "--seed", "5", "--sprm-dropout", "0"]


def test_a_native_model_without_an_hf_class_rebuilds_with_equal_logits(single_rank, tmp_path):
    args = parse_args(NATIVE)
    single_rank.initialize(args.parallel)
    model = build_model(args)[0].eval()
    save_checkpoint(tmp_path / "ckpt", 3, [model], extra={**args.model_record(), "padded_vocab_size": args.vocab_size,
                                                          "vocab_size": 100})
    # How checkpoints recorded the model before the config tree (its command line) still describes it the same.
    save_checkpoint(tmp_path / "old", 3, [model], extra={"model_argv": NATIVE, "padded_vocab_size": args.vocab_size})
    old = describe_checkpoint(tmp_path / "old")
    # ... except the step rule, which was not recorded then: a step token was any token containing a step string.
    assert (old.model, old.sprm) == (args.model, replace(args.rgm, sprm_step_rule="contains"))
    assert describe_checkpoint(tmp_path / "ckpt").sprm == args.rgm
    # --use-checkpoint-args: the tiny preset's flags, the geometry from the checkpoint.
    again = parse_args(["--preset", "tiny", "--use-checkpoint-args", "--pretrained-checkpoint", str(tmp_path / "ckpt"),
                        "--seq-length", "8", "--num-layers", "2"], recorded=recorded_geometry)
    assert {k: getattr(again.model, k) for k in GEOMETRY} == {k: getattr(args.model, k) for k in GEOMETRY}
    assert again.model.seq_length == 8 and again.rgm.sprm_layer == args.rgm.sprm_layer
    assert parse_args(["--preset", "tiny"]).model.normalization == "RMSNorm"  # what the checkpoint replaced
    with pytest.raises(ConfigError, match=r"--num-layers 3 contradicts checkpoint .*ckpt, whose model has 2: drop"):
        parse_args(["--use-checkpoint-args", "--pretrained-checkpoint", str(tmp_path / "ckpt"), "--num-layers", "3"],
                   recorded=recorded_geometry)
    with pytest.raises(ConfigError, match="--use-checkpoint-args needs a checkpoint to read"):
        parse_args(["--use-checkpoint-args", "--load", str(tmp_path / "empty")], recorded=recorded_geometry)
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(16).expand(2, 16)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[:, 5::5] = True
    with torch.no_grad():
        want, want_head = model(ids, pos, None, step_mask=mask)

    checkpoint = describe_checkpoint(tmp_path / "ckpt")
    assert (checkpoint.source, checkpoint.iteration, checkpoint.vocab_size) == ("megatron-rgm", 3, 100)
    assert checkpoint.has_head and checkpoint.padded_vocab_size == args.vocab_size
    with pytest.raises(ConfigError, match="no HF class matches"):
        export_config(checkpoint)
    with pytest.raises(ConfigError, match="pass --tokenizer"):
        checkpoint.tokenizer_path(None)
    assert checkpoint.model.normalization == "LayerNorm" and checkpoint.sprm == args.rgm
    loaded = load_model(tmp_path / "ckpt")
    assert not loaded.result.fresh_head and loaded.args.transformer.normalization == "LayerNorm"
    with torch.no_grad():
        got, got_head = loaded.model(ids, pos, None, step_mask=mask)
    assert torch.equal(got, want) and torch.equal(got_head, want_head)


def test_a_checkpoint_that_describes_no_model_is_refused(single_rank, tmp_path, capsys):
    args = parse_args(NATIVE)
    single_rank.initialize(args.parallel)
    model = build_model(args)[0]
    save_checkpoint(tmp_path / "ckpt", 1, [model], extra={"stage": "sft"})
    # Our save records Megatron-LM's args too: the model still rebuilds from them.
    described = describe_checkpoint(tmp_path / "ckpt")
    assert described.args().transformer.normalization == "LayerNorm"
    # What a translation read in a way the user should know is said when the model loads.
    load_model(tmp_path / "ckpt", checkpoint=replace(described, notes=("num_experts=1 (a dense MLP)",)))
    assert "rebuilt from Megatron-LM's args, reading num_experts=1 (a dense MLP)" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="does not exist"):
        describe_checkpoint(tmp_path / "nothing")


def _bridge_yaml(model: dict, shape: str) -> dict:
    """A run_config.yaml as Megatron-Bridge's ConfigContainer.to_yaml writes it: functions, dtypes, enums and partials
    as _target_ mappings; a model provider (every field at one level) or a builder-backed config."""
    silu = {"_target_": "torch.nn.functional.silu", "_call_": False}
    fields = dict(
        num_layers=model["num_layers"], hidden_size=64, ffn_hidden_size=96, num_attention_heads=4, num_query_groups=2,
        kv_channels=16, normalization="RMSNorm", layernorm_epsilon=1e-6, add_qkv_bias=True, add_bias_linear=False,
        qk_layernorm=False, gated_linear_unit=True, activation_func=silu, bf16=False, fp16=False,
        params_dtype={"_target_": "torch.float32", "_call_": False}, num_moe_experts=None, window_size=None,
        softmax_type="vanilla", multi_latent_attention=False, rotary_interleaved=False,
        attention_backend={"_target_": "megatron.core.transformer.enums.AttnBackend", "_call_": True, "_args_": [5],
                           "_name_": "auto"},
        init_method={"_target_": "torch.nn.init.normal_", "_partial_": True, "_args_": [], "mean": 0.0, "std": 0.02})
    gpt = dict(vocab_size=100, should_pad_vocab=False, make_vocab_size_divisible_by=128, seq_length=64,
               share_embeddings_and_output_weights=False, position_embedding_type="rope", rotary_base=10000.0,
               rotary_percent=1.0, rope_scaling=False, rope_scaling_factor=1.0, seq_len_interpolation_factor=None)
    if shape == "provider":
        section = {"_target_": "megatron.bridge.models.gpt_provider.GPTModelProvider", **fields, **gpt,
                   "hf_model_id": "local/qwen2", "transformer_layer_spec": {
                       "_target_": "megatron.bridge.models.gpt_provider.default_layer_spec", "_call_": False}}
    else:
        section = {"_target_": "megatron.bridge.models.gpt.model_config.BridgeGPTModelConfig",
                   "_builder_": "megatron.bridge.models.gpt.gpt_builder.GPTModelBuilder", **gpt,
                   "transformer": {"_target_": "megatron.bridge.models.transformer_config.TransformerConfig",
                                   **fields, "activation_func": "silu"}}
    return {"_target_": "megatron.bridge.training.config.ConfigContainer", "model": section, "train": None,
            "tokenizer": {"_target_": "megatron.bridge.training.tokenizers.config.TokenizerConfig",
                          "tokenizer_type": "HuggingFaceTokenizer", "tokenizer_model": "local/qwen2"}}


def _save_like_bridge(model, root, run_config: dict) -> None:
    """What a Megatron-Bridge HF import leaves on disk (read in its source: training/checkpointing.py,
    model_load_save.py): iter_0000000/ with the dist checkpoint under Transformer Engine's tensor names (norms fused
    into the next linear, per-layer _extra_state objects), a common state of checkpoint_version and iteration only
    (no args), run_config.yaml and tokenizer/; the tracker file says 0."""
    import yaml
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    from helpers import save_tokenizer
    from megatron_rgm.checkpoint import TE_NORM_KEYS

    te = {v: k for k, v in TE_NORM_KEYS.items()}
    sd = {k: v for k, v in model.sharded_state_dict().items() if not k.startswith("sprm_head.")}
    for sh in nested_values(sd):
        prefix, _, suffix = sh.key.partition(".layers.")
        if suffix in te:
            sh.key = f"{prefix}.layers.{te[suffix]}"
    layers = model.config.num_layers
    for i in range(layers):  # Transformer Engine's attention keeps FP8 metadata, one object per layer
        sd[f"te_extra_{i}"] = ShardedObject("decoder.layers.self_attention.core_attention._extra_state",
                                            {"fp8": "history"}, (layers,), (i,), replica_id=0)
    iter_dir = root / "iter_0000000"
    iter_dir.mkdir(parents=True)
    dist_checkpointing.save({"model": sd, "checkpoint_version": 3.0, "iteration": 0}, str(iter_dir))
    (iter_dir / "run_config.yaml").write_text(yaml.safe_dump(run_config))
    save_tokenizer(iter_dir / "tokenizer")
    (root / "latest_checkpointed_iteration.txt").write_text("0")


@pytest.mark.parametrize("shape", ["provider", "builder"])
def test_a_megatron_bridge_checkpoint_rebuilds_with_equal_logits_and_a_fresh_head(single_rank, tmp_path, shape):
    import yaml

    args = build_args(ModelConfig(
        num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4, num_query_groups=2, kv_channels=16,
        vocab_size=100, make_vocab_size_divisible_by=1, seq_length=64, max_position_embeddings=64,
        normalization="RMSNorm", norm_epsilon=1e-6,
        add_qkv_bias=True, swiglu=True, disable_bias_linear=True, untie_embeddings_and_output_weights=True))
    single_rank.initialize(args.parallel)
    model = build_model(args)[0].eval()
    run_config = _bridge_yaml({"num_layers": 2}, shape)
    _save_like_bridge(model, tmp_path / "ckpt", run_config)
    assert yaml.safe_load((tmp_path / "ckpt" / "iter_0000000" / "run_config.yaml").read_text()) == run_config

    checkpoint = describe_checkpoint(tmp_path / "ckpt")
    assert (checkpoint.source, checkpoint.iteration, checkpoint.vocab_size) == ("megatron-bridge", 0, 100)
    assert {k: getattr(checkpoint.model, k) for k in GEOMETRY if k != "make_vocab_size_divisible_by"} == \
        {k: getattr(args.model, k) for k in GEOMETRY if k != "make_vocab_size_divisible_by"}
    assert not checkpoint.has_head and checkpoint.tokenizer_path(None) == tmp_path / "ckpt" / "iter_0000000" / "tokenizer"
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(16).expand(2, 16)
    with torch.no_grad():
        want, _ = model(ids, pos, None, step_mask=torch.zeros(2, 16, dtype=torch.bool))
    loaded = load_model(tmp_path / "ckpt")
    assert loaded.result.fresh_head and loaded.result.megatron_lm
    assert any("_extra_state" in note for note in loaded.result.not_loaded), loaded.result.not_loaded
    with torch.no_grad():
        got, _ = loaded.model(ids, pos, None, step_mask=torch.zeros(2, 16, dtype=torch.bool))
    assert torch.equal(got, want)
    if shape == "provider":  # and it exports to HF with its tokenizer: transformers computes the same logits
        import transformers

        convert("mcore-to-hf", "--mcore-path", str(tmp_path / "ckpt"), "--output", str(tmp_path / "hf"))
        from megatron_rgm.hf import load_causal_lm  # rebuilds the rotary buffers (torch.distributed is up here)

        hf = load_causal_lm(str(tmp_path / "hf")).eval()
        assert transformers.AutoTokenizer.from_pretrained(tmp_path / "hf").encode("Add 3 and 4.") != []
        with torch.no_grad():
            torch.testing.assert_close(hf(input_ids=ids).logits, want[..., :100], rtol=0, atol=1e-5)


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_a_megatron_lm_checkpoint_in_this_versions_layout_rebuilds_with_equal_logits(single_rank, tmp_path, moe):
    """What Megatron-LM's save_checkpoint writes (tensors, ``args``, ``checkpoint_version``, ``iteration``) through
    this megatron-core's dist_checkpointing: 0.16 keeps the common state in ``common.pt``, 0.19 inside the
    torch_dist files. The Python 3.11 leg reads the first, the 3.12 leg the second (and test_megatron_lm.py a
    directory Megatron-LM's own loop wrote). Dense, and with 4 experts in every layer."""
    from megatron.core import dist_checkpointing

    experts = {name: MOE[name] for name in ("num_experts", "moe_ffn_hidden_size", "moe_router_topk",
                                            "moe_router_pre_softmax")} if moe else {}
    args = build_args(ModelConfig(
        num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4, num_query_groups=2, kv_channels=16,
        vocab_size=128, make_vocab_size_divisible_by=128, seq_length=64, max_position_embeddings=64,
        normalization="RMSNorm", norm_epsilon=1e-6, rotary_base=1000000,
        add_qkv_bias=True, swiglu=True, disable_bias_linear=True, untie_embeddings_and_output_weights=True,
        **experts))
    single_rank.initialize(args.parallel)
    model = build_model(args)[0].eval()
    sd = {k: v for k, v in model.sharded_state_dict().items() if not k.startswith("sprm_head.")}
    mlm_args = _pretrain_gpt_args(num_layers=2, ffn_hidden_size=96, padded_vocab_size=128, vocab_size=128,
                                  seq_length=64, max_position_embeddings=64, tensor_model_parallel_size=1,
                                  pipeline_model_parallel_size=1, **(MOE if moe else {}))
    iter_dir = tmp_path / "ckpt" / "iter_0000007"
    iter_dir.mkdir(parents=True)
    dist_checkpointing.save({"model": sd, "args": mlm_args, "checkpoint_version": 3.0, "iteration": 7}, str(iter_dir))
    (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").write_text("7")
    import megatron.core

    legacy = (iter_dir / "common.pt").exists()
    assert legacy == megatron.core.__version__.startswith("0.16"), megatron.core.__version__

    checkpoint = describe_checkpoint(tmp_path / "ckpt")
    assert (checkpoint.source, checkpoint.iteration) == ("megatron-lm", 7) and not checkpoint.has_head
    assert checkpoint.model.num_experts == (4 if moe else None)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(16).expand(2, 16)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    with torch.no_grad():
        want, _ = model(ids, pos, None, step_mask=mask)
    loaded = load_model(tmp_path / "ckpt")
    assert loaded.result.fresh_head and loaded.result.megatron_lm and loaded.result.iteration == 7
    with torch.no_grad():
        got, _ = loaded.model(ids, pos, None, step_mask=mask)
    assert torch.equal(got, want)


@pytest.mark.parametrize("change, named", [
    (dict(num_moe_experts=8), "num_moe_experts=8"),
    (dict(window_size=[128, 0]), "window_size=[128, 0]"),
    (dict(softmax_type="learnable"), "softmax_type='learnable'"),
    (dict(position_embedding_type="yarn"), "position_embedding_type='yarn'"),
    (dict(activation_func={"_target_": "torch.nn.functional.gelu", "_call_": False}),
     "activation_func='gelu' with gated_linear_unit=True"),
])
def test_a_megatron_bridge_feature_rgm_does_not_build_is_refused_by_name(change, named):
    from megatron_rgm.model.bridge import bridge_model

    model = {**_bridge_yaml({"num_layers": 2}, "provider")["model"], **change}
    with pytest.raises(ConfigError, match=re.escape(named)):
        bridge_model(model, 128, "ckpt")
