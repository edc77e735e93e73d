"""The multi-turn agent loop: token-exact trajectories from batched generation and stepped envs."""
from k2rl.rollout.baselines import BASELINES, run_baseline
from k2rl.rollout.episode import Episode, Limits
from k2rl.rollout.loop import run_episodes
from k2rl.rollout.oracle import oracle_trajectory, teacher_declines
from k2rl.rollout.policy import EndpointPolicy, Policy
from k2rl.rollout.stats import kind_metrics, sample_groups, success_by_tag, summarize
from k2rl.rollout.trajectory import EpisodeStats, Trajectory

__all__ = ["BASELINES", "EndpointPolicy", "Episode", "EpisodeStats", "Limits", "Policy", "Trajectory", "kind_metrics",
           "oracle_trajectory", "teacher_declines", "run_baseline", "run_episodes", "sample_groups", "success_by_tag", "summarize"]
