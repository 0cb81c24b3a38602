"""Command line -> configs: presets, overrides, and one clear message per invalid combination."""

from __future__ import annotations

import pytest

from megatron_rgm.arguments import padded_vocab_size, parse_args
from megatron_rgm.config import ConfigError, RGMConfig
from megatron_rgm.model.presets import PRESETS


def test_preset_sets_geometry_and_flags_override_it():
    args = parse_args(["--preset", "qwen3-32b"])
    t = args.transformer
    assert (t.num_layers, t.hidden_size, t.num_attention_heads, t.num_query_groups) == (64, 5120, 64, 8)
    assert t.kv_channels == 128 and t.qk_layernorm and not t.add_qkv_bias
    args = parse_args(["--preset", "qwen3-32b", "--num-layers", "8", "--sprm-layer", "-3"])
    assert args.transformer.num_layers == 8 and args.rgm.sprm_layer == -3


def test_presets_set_the_papers_response_length():
    lengths = {name: parse_args(["--preset", name]).data.max_response_length
               for name in ("tiny", "r1-distill-qwen-7b", "qwq-32b")}
    assert lengths == {"tiny": 256, "r1-distill-qwen-7b": 8192, "qwq-32b": 32768}
    assert parse_args(["--preset", "qwq-32b", "--max-response-length", "100"]).data.max_response_length == 100


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_validates(name):
    args = parse_args(["--preset", name])
    assert args.vocab_size % 128 == 0 and args.vocab_size >= PRESETS[name]["vocab_size"]


def test_qwq_head_size_matches_paper():
    c = parse_args(["--preset", "qwq-32b"]).transformer.hidden_size
    assert round((2 * c * c + 4 * c + 1) / 1e6) == 52


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--tensor-model-parallel-size", "3"], "does not divide --num-attention-heads 4"),
        (["--tensor-model-parallel-size", "4"], "does not divide --num-query-groups 2"),
        (["--pipeline-model-parallel-size", "8"], "larger than --num-layers 4"),
        (["--sprm-layer", "4"], "--sprm-layer 4 is outside a model of 4 layers"),
        (["--sprm-layer", "-5"], "--sprm-layer -5 is outside"),
        (["--pipeline-model-parallel-size", "2", "--sprm-layer", "0"], "not on the last pipeline stage"),
        (["--sequence-parallel"], "--sequence-parallel needs --tensor-model-parallel-size > 1"),
        (["--bf16", "--fp16"], "exclusive"),
        (["--fp8-format", "hybrid"], "needs --transformer-impl transformer_engine"),
        (["--recompute-granularity", "full"], "needs --recompute-method"),
        (["--preset", "nope"], "unknown --preset 'nope'"),
        (["--sprm-dropout", "1.5"], "--sprm-dropout must be in [0, 1)"),
        (["--hidden-size", "130"], "not divisible by --num-attention-heads"),
    ],
)
def test_invalid_combinations_have_one_clear_message(argv, message):
    with pytest.raises(ConfigError) as err:
        parse_args(argv)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_last_stage_layers_move_the_head_boundary():
    # 4 layers, last stage holds 3: layer 0 is the last layer of stage 0 -> allowed.
    args = parse_args(["--pipeline-model-parallel-size", "2", "--decoder-last-pipeline-num-layers", "3",
                       "--sprm-layer", "0"])
    assert args.rgm.resolve_layer(4) == 0


def test_step_token_escapes_are_decoded():
    args = parse_args(["--sprm-step-tokens", "\\n\\n", "。"])
    assert args.rgm.sprm_step_tokens == ["\n\n", "。"]


def test_vocab_padding_follows_megatron():
    assert padded_vocab_size(151936, 128, 1) == 151936
    assert padded_vocab_size(151937, 128, 2) == 152064
    assert padded_vocab_size(500, 128, 2) == 512


def test_rgm_config_defaults_are_the_papers():
    c = RGMConfig()
    assert (c.sprm_layer, c.sprm_hidden_mult, c.sprm_dropout, c.sprm_backbone_grad_scale) == (-2, 2, 0.5, 1e-4)
    assert c.sprm_step_tokens == [".\n\n"] and c.sprm_aggregation == "geometric"


@pytest.mark.parametrize("flags, named", [
    (["--expert-model-parallel-size", "2"], "this model is dense"),
    (["--num-experts", "4", "--expert-model-parallel-size", "3"], "does not divide the model's 4 experts"),
    (["--num-experts", "4", "--tensor-model-parallel-size", "2", "--expert-tensor-parallel-size", "3"],
     "--expert-tensor-parallel-size 3: use 1 or the tensor-parallel size 2"),
    (["--num-experts", "4", "--no-disable-bias-linear", "--tensor-model-parallel-size", "2",
      "--expert-tensor-parallel-size", "2"], "(1 for experts with biases)"),
    (["--sliding-window", "0"], "--sliding-window must be >= 1"),
    (["--window-attn-skip-freq", "2"], "needs --sliding-window"),
    (["--quick-geglu"], "--quick-geglu and --swiglu are two gated MLPs"),
    (["--no-swiglu", "--glu-linear-offset", "1"], "shape a gated MLP"),
    (["--position-embedding-type", "yarn"], "needs --yarn-original-max-position-embeddings"),
    (["--rotary-scaling-factor", "4"], "shapes YaRN RoPE: add --position-embedding-type yarn"),
])
def test_bad_expert_layouts_and_attention_flags_are_refused_by_name(flags, named):
    with pytest.raises(ConfigError, match=named):
        parse_args(["--preset", "tiny", *flags])


def _published(name: str) -> dict:
    """The config.json values of the hub's model behind a mixture-of-experts preset."""
    import transformers

    if name == "gpt-oss-20b":
        cfg = transformers.GptOssConfig(num_hidden_layers=24, num_local_experts=32, num_experts_per_tok=4,
                                        vocab_size=201088, router_aux_loss_coef=0.9, tie_word_embeddings=False)
        return {**cfg.to_dict(), "architectures": ["GptOssForCausalLM"]}
    cfg = transformers.Qwen3MoeConfig(num_hidden_layers=48, hidden_size=2048, intermediate_size=6144,
                                      moe_intermediate_size=768, num_attention_heads=32, num_key_value_heads=4,
                                      head_dim=128, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
                                      vocab_size=151936, max_position_embeddings=40960, rope_theta=1000000.0,
                                      rms_norm_eps=1e-6, router_aux_loss_coef=0.001, tie_word_embeddings=False,
                                      decoder_sparse_step=1, mlp_only_layers=[])
    return {**cfg.to_dict(), "architectures": ["Qwen3MoeForCausalLM"]}


@pytest.mark.parametrize("name", ["gpt-oss-20b", "qwen3-30b-a3b"])
def test_moe_presets_are_their_published_configs_converted(name):
    """Training from a preset builds what converting the hub's checkpoint builds (the context length aside)."""
    from dataclasses import fields

    from megatron_rgm.config import ModelConfig
    from megatron_rgm.convert.mapping import HFArch
    from megatron_rgm.model.presets import preset

    converted = HFArch.from_config(_published(name)).model_config()
    ours = parse_args(["--preset", name]).model
    differ = {f.name: (getattr(ours, f.name), getattr(converted, f.name)) for f in fields(ModelConfig)
              if f.name not in ("seq_length",) and getattr(ours, f.name) != getattr(converted, f.name)}
    assert differ == {}
    assert preset(name)["seq_length"] == 32768


def test_packing_with_yarn_is_refused_before_the_run():
    """A packed row rotates each sample by its own positions with plain RoPE only (refused, not dropped)."""
    from megatron_rgm.arguments import check_stage

    args = parse_args(["--preset", "tiny", "--position-embedding-type", "yarn",
                       "--yarn-original-max-position-embeddings", "64", "--max-tokens-per-microbatch", "1024",
                       "--pack-sequences"])
    with pytest.raises(ConfigError, match="with --position-embedding-type yarn drop --pack-sequences"):
        check_stage(args)
