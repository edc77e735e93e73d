"""K2's temperature decay: explore with a high sampling temperature early, exploit later."""
from __future__ import annotations

import math

from k2rl.config import TemperatureSchedule


def temperature_at(step: int, schedule: TemperatureSchedule) -> float:
    progress = min(max(step, 0) / schedule.decay_steps, 1.0)
    start, end = schedule.start, schedule.end
    if schedule.kind == "linear":
        return start + (end - start) * progress
    if schedule.kind == "cosine":
        return end + (start - end) * 0.5 * (1 + math.cos(math.pi * progress))
    if start <= 0 or end <= 0:
        return start + (end - start) * progress  # exponential needs positive ends; degrade to linear
    return start * (end / start) ** progress
