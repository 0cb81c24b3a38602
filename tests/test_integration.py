"""Drop-in pieces in a Megatron-LM-style script: train at TP=2, checkpoint with the head, load at TP=1."""

from __future__ import annotations

import argparse
import json
import math

import pytest

from helpers import torchrun
from megatron_rgm.integration import add_rgm_args, rgm_config_from_args


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("integration")
    torchrun("integration_pretrain.py", 2, ["train", str(out)])
    torchrun("integration_pretrain.py", 1, ["load", str(out)])
    return json.loads((out / "train.json").read_text()), json.loads((out / "load.json").read_text())


@pytest.mark.multirank
def test_three_iterations_at_tp2_have_finite_losses(run):
    train, _ = run
    assert len(train["losses"]) == 3
    assert "lm loss" in train["losses"][0] and "grpo loss" in train["losses"][1]
    for it in train["losses"]:
        assert "spr loss" in it
        assert all(math.isfinite(v) for v in it.values())


@pytest.mark.multirank
def test_checkpoint_with_head_loads_at_tp1_with_identical_head_outputs(run):
    train, load = run
    got = load["rgm_into_rgm"]
    assert not got["fresh_head"] and not got["ignored_head"]
    assert len(got["head"]) == len(train["head"]) > 0
    assert max(abs(a - b) for a, b in zip(got["head"], train["head"])) <= 1e-6


@pytest.mark.multirank
def test_plain_checkpoint_into_rgm_keeps_fresh_head_and_reverse_ignores_it(run):
    _, load = run
    assert load["plain_into_rgm"] == {"fresh_head": True, "ignored_head": False, "head_kept": True}
    assert load["rgm_into_plain"] == {"fresh_head": False, "ignored_head": True, "backbone_equal": True}


@pytest.mark.multirank
def test_attach_sprm_head_on_a_plain_gptmodel_scores_like_rgmmodel(run):
    train, load = run
    assert max(abs(a - b) for a, b in zip(load["attached_head"], train["head"])) <= 1e-6


def test_add_rgm_args_registers_only_rgm_flags():
    parser = add_rgm_args(argparse.ArgumentParser(add_help=False))
    flags = [s for a in parser._actions for s in a.option_strings if s.startswith("--")]
    assert flags and all(f.startswith(("--sprm-", "--no-sprm-", "--grpo-")) for f in flags)
    cfg = rgm_config_from_args(parser.parse_args(["--sprm-layer", "-3", "--sprm-step-tokens", "\\n\\n"]))
    assert cfg.sprm_layer == -3 and cfg.sprm_step_tokens == ["\n\n"]


def test_the_heads_param_group_takes_its_own_lr_and_weight_decay():
    import torch

    from megatron_rgm.integration import sprm_param_group

    ns = argparse.Namespace(lr=1e-3, min_lr=1e-4, sprm_lr=None, sprm_weight_decay=0.05)
    [(key, group)] = sprm_param_group(ns).items()
    assert group["max_lr"] == pytest.approx(1e-2) and group["min_lr"] == pytest.approx(1e-3)  # 10x, same shape
    assert group["start_wd"] == group["end_wd"] == 0.05 and group["is_decoupled_lr"]
    weight = torch.nn.Parameter(torch.zeros(2, 2))
    assert key.matches(weight, "module.sprm_head.0.weight") and key.matches(weight, "sprm_head.2.bias")
    assert not key.matches(weight, "module.decoder.layers.0.mlp.linear_fc1.weight")
    ns.sprm_lr = 3e-3
    assert sprm_param_group(ns)[key]["max_lr"] == 3e-3


def test_megatron_lm_optimizer_config_gains_the_head_group_once():
    from megatron_rgm.compat import megatron_lm

    if not megatron_lm.available():
        pytest.skip("megatron.training (Megatron-LM's loop) is not installed with this megatron-core")
    from megatron.training import training

    before = training.get_megatron_optimizer_config  # an earlier add_rgm_args in this process may have wrapped it
    original = getattr(before, "__wrapped__", before)
    training.get_megatron_optimizer_config = original
    try:
        add_rgm_args(argparse.ArgumentParser())
        patched = training.get_megatron_optimizer_config
        add_rgm_args(argparse.ArgumentParser())  # a second parse must not stack a second wrapper
        assert training.get_megatron_optimizer_config is patched is not original
        ns = argparse.Namespace(lr=1e-3, min_lr=0.0, weight_decay=0.1, sprm_lr=None, sprm_weight_decay=0.01)
        config, overrides = patched(ns)
        _, standard = original(ns)
        assert config.lr == 1e-3 and all(overrides[k] == v for k, v in standard.items())  # Megatron-LM's kept
        [head] = [v for k, v in overrides.items() if k not in standard]
        assert head["max_lr"] == pytest.approx(1e-2) and head["start_wd"] == 0.01
    finally:
        training.get_megatron_optimizer_config = before
