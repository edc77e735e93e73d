"""Moving optimizer state between devices, for the train engine's offload (before rollout) and reload."""
from __future__ import annotations

import torch


def move_optimizer_state(optimizer: torch.optim.Optimizer, device: torch.device | str) -> None:
    """Move every state tensor to `device` (pinned host memory when that is the CPU of a CUDA run).

    Scalar bookkeeping (AdamW's step counters) stays put: it is tiny, and non-fused AdamW wants it on
    the CPU. Works for any torch optimizer; MuonClip's state is all per-parameter tensors.
    """
    device = torch.device(device)
    pin = device.type == "cpu" and torch.cuda.is_available()
    for state in optimizer.state.values():
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and value.ndim > 0 and value.device != device:
                target = torch.empty_like(value, device=device, pin_memory=pin)
                state[key] = target.copy_(value, non_blocking=True)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
