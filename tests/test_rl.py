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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_log_probs_and_entropy_equal_the_unchunked_ones_with_their_gradients(dtype):
    """Chunks of 3 positions (13 does not divide by 3), temperature 0.7, a padded vocabulary: values and the
    gradient of a loss of both equal the unchunked functions' within fp32 rounding; the input is not changed."""
    from megatron_rgm.rl import chunked_log_probs_and_entropy

    g = torch.Generator().manual_seed(2)
    base = (torch.randn(13, 1, 40, generator=g) * 4).to(dtype)
    targets = torch.randint(0, 37, (13, 1), generator=g)
    w1, w2 = torch.randn(13, 1, generator=g), torch.randn(13, 1, generator=g)
    # The reference divides by the temperature in fp32, as the chunked function does after its cast.
    a, b = base.clone().requires_grad_(True), base.float().requires_grad_(True)
    lp, ent = chunked_log_probs_and_entropy(a, targets, vocab_size=37, temperature=0.7, chunk_elements=3 * 40)
    (lp * w1 + ent * w2).sum().backward()
    ref_lp = vocab_parallel_log_probs(b / 0.7, targets, 37)
    ref_ent = vocab_parallel_entropy(b / 0.7, 37)
    (ref_lp * w1 + ref_ent * w2).sum().backward()
    torch.testing.assert_close(lp, ref_lp, rtol=0, atol=1e-5)
    torch.testing.assert_close(ent, ref_ent, rtol=0, atol=1e-5)
    # fp32 rounding (grads up to ~3 here); a bf16 input gets its gradient rounded to bf16
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-3)
    torch.testing.assert_close(a.grad.float(), b.grad, **tol)
    assert a.grad.dtype == dtype and torch.equal(a.detach(), base)
    assert float(a.grad[..., 37:].abs().max()) == 0.0  # padding ids get no gradient
    only_lp, none = chunked_log_probs_and_entropy(base, targets, 37, 0.7, entropy=False, chunk_elements=80)
    assert none is None and torch.allclose(only_lp, ref_lp.detach(), atol=1e-5)


@pytest.mark.multirank
def test_vocab_parallel_log_probs_tp2_equal_tp1(tmp_path):
    torchrun("vocab_parallel.py", 2, [str(tmp_path)])
    for r in read_rank_results(tmp_path):
        assert r["logp_diff"] < 1e-5 and r["entropy_diff"] < 1e-5 and r["grad_diff"] < 1e-6
        assert r["padded_logp_diff"] < 1e-5 and r["padded_entropy_diff"] < 1e-5
        assert r["chunked_diff"] < 1e-5 and r["chunked_grad_diff"] < 1e-5
