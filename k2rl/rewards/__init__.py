"""Rewards: rubric files, the rubric judge (HTTP endpoint or self-critique), and reward combination."""
from k2rl.rewards.combine import Reward, RewardParts, combine, reward_metrics
from k2rl.rewards.judge import make_judge
from k2rl.rewards.rubric import Criterion, Rubric, load_rubric
from k2rl.rewards.scorer import Episode, JudgeBatch, RubricScore, RubricScorer
from k2rl.rewards.self_critique import SelfCritiqueBackend

__all__ = ["Criterion", "Episode", "JudgeBatch", "Reward", "RewardParts", "Rubric", "RubricScore", "RubricScorer",
           "SelfCritiqueBackend", "combine", "load_rubric", "make_judge", "reward_metrics"]
