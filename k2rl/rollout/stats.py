"""Aggregate episode numbers for eval tables and training metrics."""
from __future__ import annotations

from collections import Counter, defaultdict

from k2rl.rollout.trajectory import Trajectory


def summarize(trajectories: list[Trajectory]) -> dict:
    """success_rate, process_score, avg_turns, tool_call_validity, truncated/env-failure rates,
    errors by kind (totals), end reasons, and success rate per task tag when tasks carry tags."""
    n = max(1, len(trajectories))
    calls = sum(t.stats.tool_calls for t in trajectories)
    errors, reasons = Counter(), Counter()
    for t in trajectories:
        errors.update(t.stats.errors)
        reasons[t.stats.end_reason] += 1
    return {
        "episodes": len(trajectories),
        "success_rate": sum(t.success for t in trajectories) / n,
        "process_score": sum(t.score for t in trajectories) / n,
        "avg_turns": sum(t.stats.turns for t in trajectories) / n,
        "avg_generated_tokens": sum(t.stats.generated_tokens for t in trajectories) / n,
        "tool_calls": calls,
        "tool_call_validity": sum(t.stats.valid_calls for t in trajectories) / calls if calls else 0.0,
        "truncated_rate": sum(t.stats.truncated for t in trajectories) / n,
        "env_failures": sum(t.stats.env_error is not None for t in trajectories),
        "errors": dict(errors),
        "end_reasons": dict(reasons),
    }


def success_by_tag(trajectories: list[Trajectory], tags: dict[str, list[str]]) -> dict[str, float]:
    """Success rate per tag; `tags` maps task id -> the task's tags."""
    hits: dict[str, list[bool]] = defaultdict(list)
    for t in trajectories:
        for tag in tags.get(t.task_id, []):
            hits[tag].append(t.success)
    return {tag: sum(v) / len(v) for tag, v in sorted(hits.items())}
