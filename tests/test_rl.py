"""GRPO pieces against hand-computed values; vocab-parallel log-probs at TP=2 against TP=1."""

from __future__ import annotations

import math

import pytest
import torch

from helpers import read_rank_results, torchrun
from megatron_rgm.rl import (GRPOConfig, entropy_bonus, group_advantages, grpo_loss, low_var_kl, policy_loss,
                             vocab_parallel_entropy, vocab_parallel_log_probs)


def test_group_advantages_by_hand():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0])
    a = group_advantages(r, 3, eps=0.0)
    # group 1: mean 1/3, unbiased std sqrt(1/3); group 2: all equal -> 0.
    s = math.sqrt(1 / 3)
    torch.testing.assert_close(a, torch.tensor([(2 / 3) / s, (-1 / 3) / s, (-1 / 3) / s, 0.0, 0.0, 0.0]))
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages(r, 4)


def test_policy_loss_clipping_by_hand():
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.1]]))  # ratios vs old = 0 (old_logp = log 1)
    old = torch.zeros(1, 3)
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    loss, clip_frac = policy_loss(logp, old, torch.tensor([2.0]), mask, 0.2, 0.2)
    # A=2: token 1 ratio 1.5 -> min(3.0, 1.2*2=2.4) = 2.4; token 2 ratio 0.5 -> min(1.0, 0.8*2=1.6) = 1.0.
    torch.testing.assert_close(loss, torch.tensor(-(2.4 + 1.0) / 2))
    torch.testing.assert_close(clip_frac, torch.tensor(0.5))
    loss, _ = policy_loss(logp, old, torch.tensor([-1.0]), mask, 0.2, 0.2)
    # A=-1: token 1 -> min(-1.5, -1.2) = -1.5; token 2 -> min(-0.5, -0.8) = -0.8.
    torch.testing.assert_close(loss, torch.tensor((1.5 + 0.8) / 2))


def test_low_var_kl_and_entropy_by_hand():
    logp = torch.tensor([[-1.0, -2.0]])
    ref = torch.tensor([[-1.5, -2.0]])
    mask = torch.ones(1, 2)
    d = -0.5
    torch.testing.assert_close(low_var_kl(logp, ref, mask), torch.tensor((math.exp(d) - d - 1) / 2))
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25]]]))
    torch.testing.assert_close(vocab_parallel_entropy(logits), torch.tensor([[1.5 * math.log(2)]]))
    torch.testing.assert_close(entropy_bonus(torch.tensor([[1.0, 3.0]]), torch.tensor([[1.0, 0.0]])), torch.tensor(1.0))


def test_ppo_kl_is_zero_on_policy_and_the_mean_log_ratio_off_it():
    old = torch.tensor([[-1.0, -2.0, -3.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0]])
    _, m = grpo_loss(old.clone(), old, torch.tensor([1.0]), mask, GRPOConfig(kl_coef=0, entropy_coef=0))
    assert m["ppo kl"].item() == 0.0
    _, m = grpo_loss(old + torch.tensor([[9.0, 0.5, 0.1]]), old, torch.tensor([1.0]), mask,
                     GRPOConfig(kl_coef=0, entropy_coef=0))
    assert m["ppo kl"].item() == pytest.approx(-(0.5 + 0.1) / 2)


def test_grpo_loss_combines_terms():
    g = torch.Generator().manual_seed(0)
    logp, old, ref, ent = (torch.randn(2, 4, generator=g) for _ in range(4))
    adv, mask = torch.tensor([1.0, -1.0]), torch.ones(2, 4)
    cfg = GRPOConfig(kl_coef=0.1, entropy_coef=0.01)
    loss, m = grpo_loss(logp, old, adv, mask, cfg, ref_log_probs=ref, entropy=ent)
    pg, _ = policy_loss(logp, old, adv, mask)
    torch.testing.assert_close(loss, pg + 0.1 * low_var_kl(logp, ref, mask) - 0.01 * entropy_bonus(ent, mask))
    assert set(m) == {"pg loss", "clip fraction", "ppo kl", "kl", "entropy"}


def test_log_probs_match_log_softmax_without_touching_logits():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 5, 11, generator=g)
    keep = logits.clone()
    targets = torch.randint(0, 11, (2, 5), generator=g)
    expected = torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(vocab_parallel_log_probs(logits, targets), expected)
    assert torch.equal(logits, keep)


@pytest.mark.multirank
def test_vocab_parallel_log_probs_tp2_equal_tp1(tmp_path):
    torchrun("vocab_parallel.py", 2, [str(tmp_path)])
    for r in read_rank_results(tmp_path):
        assert r["logp_diff"] < 1e-5 and r["entropy_diff"] < 1e-5 and r["grad_diff"] < 1e-6
        assert r["padded_logp_diff"] < 1e-5 and r["padded_entropy_diff"] < 1e-5
