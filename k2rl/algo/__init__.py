"""RL objectives on plain tensors: K2's policy-mirror-descent loss, GRPO, PPO-clip, SFT/PTX, schedules."""
from k2rl.algo.losses import k2_loss, pg_clip_loss, sft_loss, truncated_is_weights
from k2rl.algo.advantages import batch_normalized, group_centered, group_normalized
from k2rl.algo.schedules import temperature_at

__all__ = ["k2_loss", "pg_clip_loss", "sft_loss", "truncated_is_weights", "group_centered",
           "group_normalized", "batch_normalized", "temperature_at"]
