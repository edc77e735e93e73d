"""The "synthetic" environment: serves the RL task pool written by `k2rl synth` (OUT/task_pool.jsonl).
Tools are answered by the LLM tool simulator and, with `env.user: llm`, the user by the LLM user
simulator. Point it at the pool and the simulators' endpoint with K2RL_SYNTH_POOL and K2RL_SYNTH_URL
(or env.options: pool, base_url, model, failures, max_user_turns). See docs/synth.md."""
from k2rl.synth.environment import SyntheticEnv


class Synthetic(SyntheticEnv):
    name = "synthetic"
