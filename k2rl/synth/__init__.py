"""Agentic data synthesis (K2 3.1.1): domain descriptions -> tools -> agents -> tasks with rubrics ->
simulated multi-turn trajectories -> rubric-judge filtering -> an SFT dataset and an RL task pool."""
