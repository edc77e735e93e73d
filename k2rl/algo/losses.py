"""Per-batch losses. Inputs are padded [sequences, tokens] tensors with a 0/1 `mask` of the tokens the
policy generated; `logp` is under the current policy, `old_logp` under the policy that sampled (the
trainer's recomputation), `rollout_logp` what vLLM reported while sampling."""
from __future__ import annotations

import torch


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def truncated_is_weights(old_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor,
                         cap: float) -> torch.Tensor:
    """Truncated importance weights min(pi_train_old / pi_vllm, cap) per token: corrects for the gap
    between the engine that sampled and the trainer's own numbers (no gradient)."""
    return (torch.exp((old_logp - rollout_logp) * mask).clamp(max=cap) * mask).detach()


def k2_loss(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor, centered_rewards: torch.Tensor,
            tau: float, is_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """K2 (3.2.3): mean over samples of (r - r_bar - tau * log(pi(y|x) / pi_old(y|x)))^2.

    `centered_rewards` is r - r_bar per sequence [sequences]. The log ratio of a response is the sum
    of its token log ratios. With truncated IS, each sequence's squared error is weighted by the mean
    of its tokens' weights.
    """
    log_ratio = ((logp - old_logp) * mask).sum(dim=-1)
    per_seq = (centered_rewards - tau * log_ratio) ** 2
    if is_weights is not None:
        per_seq = per_seq * (is_weights.sum(-1) / mask.sum(-1).clamp(min=1))
    return per_seq.mean(), {"loss/log_ratio_abs": log_ratio.abs().mean().item()}


def pg_clip_loss(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor, advantages: torch.Tensor,
                 clip_eps: float, aggregation: str = "token", is_weights: torch.Tensor | None = None,
                 kl_coef: float = 0.0, ref_logp: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """PPO's clipped surrogate (GRPO and critic-free PPO differ only in their advantages).

    aggregation "token": mean over all generated tokens of the batch; "sequence": mean over each
    sequence's tokens, then over sequences. Optional k3 KL to a reference policy.
    """
    ratio = torch.exp((logp - old_logp) * mask)
    adv = advantages[:, None]
    per_token = -torch.minimum(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)
    if is_weights is not None:
        per_token = per_token * is_weights
    stats = {"loss/clip_frac": _masked_mean(((ratio - 1).abs() > clip_eps).float(), mask).item()}
    if kl_coef > 0:
        if ref_logp is None:
            raise ValueError("kl_coef > 0 needs reference logprobs")
        d = (ref_logp - logp) * mask
        kl = torch.exp(d) - d - 1  # k3 estimator: unbiased, always >= 0
        per_token = per_token + kl_coef * kl
        stats["loss/kl"] = _masked_mean(kl, mask).item()
    if aggregation == "token":
        loss = _masked_mean(per_token, mask)
    elif aggregation == "sequence":
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()
    else:
        raise ValueError(f"aggregation must be 'token' or 'sequence', got {aggregation!r}")
    return loss, stats


def sft_loss(logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Next-token negative log-likelihood over masked tokens (SFT, and K2's PTX auxiliary loss)."""
    return -_masked_mean(logp, mask)
