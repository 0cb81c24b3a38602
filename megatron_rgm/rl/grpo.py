"""GRPO: group-normalised advantages, the clipped policy loss, the KL penalty and the entropy bonus.

All token-level terms are averaged over the response tokens of the batch
("token-mean").
"""

from __future__ import annotations

import torch

from megatron_rgm.config import GRPOConfig


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """``(r - mean_g) / (std_g + eps)`` over consecutive groups of ``group_size`` samples.

    Args:
        rewards: ``[n]`` with n a multiple of ``group_size`` (the k samples of a prompt are adjacent).

    Returns:
        ``[n]`` advantages; a group whose rewards are all equal gets zeros.
    """
    if group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size} samples per prompt")
    r = rewards.float().view(-1, group_size)
    mean = r.mean(dim=1, keepdim=True)
    std = r.std(dim=1, unbiased=True, keepdim=True) if group_size > 1 else torch.zeros_like(mean)
    centred = r - mean
    return torch.where(std > 0, centred / (std + eps), torch.zeros_like(centred)).view(-1)


def _token_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def policy_loss(log_probs: torch.Tensor, old_log_probs: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, clip_low: float = 0.2, clip_high: float = 0.2):
    """Clipped surrogate loss, token-mean.

    Args:
        log_probs: ``[b, s]`` current log-probs of the sampled tokens.
        old_log_probs: ``[b, s]`` log-probs under the sampling policy.
        advantages: ``[b]`` (one per trajectory) or ``[b, s]``.
        mask: ``[b, s]`` response tokens.

    Returns:
        (loss, clip fraction)
    """
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1).expand_as(log_probs)
    ratio = torch.exp(log_probs - old_log_probs)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high) * advantages
    loss = _token_mean(-torch.minimum(unclipped, clipped), mask)
    clip_frac = _token_mean((clipped < unclipped).float(), mask)
    return loss, clip_frac.detach()


def low_var_kl(log_probs: torch.Tensor, ref_log_probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """k3 estimator of KL(pi || ref): ``exp(ref - logp) - (ref - logp) - 1``, clamped to [-10, 10], token-mean."""
    d = ref_log_probs - log_probs
    kl = torch.clamp(torch.exp(d) - d - 1.0, min=-10.0, max=10.0)
    return _token_mean(kl, mask)


def entropy_bonus(entropy: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Token-mean entropy (subtracted from the loss, times its coefficient)."""
    return _token_mean(entropy, mask)


def grpo_loss(log_probs, old_log_probs, advantages, mask, cfg: GRPOConfig, ref_log_probs=None, entropy=None):
    """``pg + kl_coef * kl - entropy_coef * entropy``; returns (loss, metrics dict of detached tensors)."""
    pg, clip_frac = policy_loss(log_probs, old_log_probs, advantages, mask, cfg.clip_low, cfg.clip_high)
    loss = pg
    # How far the trained policy is from the one that sampled (0 on the first step of on-policy data).
    ppo_kl = _token_mean((old_log_probs - log_probs).detach(), mask)
    metrics = {"pg loss": pg.detach(), "clip fraction": clip_frac, "ppo kl": ppo_kl}
    if ref_log_probs is not None and cfg.kl_coef:
        kl = low_var_kl(log_probs, ref_log_probs, mask)
        loss = loss + cfg.kl_coef * kl
        metrics["kl"] = kl.detach()
    if entropy is not None and cfg.entropy_coef:
        ent = entropy_bonus(entropy, mask)
        loss = loss - cfg.entropy_coef * ent
        metrics["entropy"] = ent.detach()
    return loss, metrics
