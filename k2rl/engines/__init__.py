"""The two engines a colocated worker owns: `RolloutEngine` (vLLM) and `TrainEngine` (DeepSpeed).

Import from the submodules (`k2rl.engines.rollout`, `k2rl.engines.train`): each pulls in its heavy
library only when used.
"""
