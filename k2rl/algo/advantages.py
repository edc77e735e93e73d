"""Baselines without a value network: every task is sampled K times, rewards shaped [tasks, K]."""
from __future__ import annotations

import torch


def group_centered(rewards: torch.Tensor) -> torch.Tensor:
    """K2 / k1.5: r - mean of the task's K samples."""
    return rewards - rewards.mean(dim=-1, keepdim=True)


def group_normalized(rewards: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """GRPO: (r - group mean) / (group std + eps); a group with equal rewards gives zeros."""
    return group_centered(rewards) / (rewards.std(dim=-1, keepdim=True, unbiased=False) + eps)


def batch_normalized(rewards: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """PPO-clip without a critic: the whole batch's mean and std as the baseline."""
    return (rewards - rewards.mean()) / (rewards.std(unbiased=False) + eps)
