"""The RL controller and its run directory: metrics, plots, checkpoints, progress."""
