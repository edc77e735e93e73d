"""Aggregate episode numbers for eval tables and training metrics, split by task kind (action / refuse:
k2rl.env.kinds) so that a policy which declines everything cannot pass for a good one."""
from __future__ import annotations

from collections import Counter, defaultdict

from k2rl.config import RewardWeights
from k2rl.rewards.combine import combine
from k2rl.rollout.trajectory import Trajectory


def summarize(trajectories: list[Trajectory], weights: RewardWeights | None = None) -> dict:
    """success_rate, process_score, avg_turns, tool_call_validity, truncated/env-failure rates, errors by
    kind (totals), end reasons, and per task kind: success_action / success_refuse (absent when no
    episode is of that kind) and wrong_refusal (share of action episodes left undone with a refusal);
    with `weights`, `reward`: the mean reward under them (no rubric part)."""
    n = max(1, len(trajectories))
    calls = sum(t.stats.tool_calls for t in trajectories)
    errors, reasons = Counter(), Counter()
    for t in trajectories:
        errors.update(t.stats.errors)
        reasons[t.stats.end_reason] += 1
    action = [t for t in trajectories if t.kind == "action"]
    refuse = [t for t in trajectories if t.kind == "refuse"]
    summary = {
        "episodes": len(trajectories),
        "action_episodes": len(action),
        "refuse_episodes": len(refuse),
        "success_rate": sum(t.success for t in trajectories) / n,
        "wrong_refusal": sum(t.wrong_refusal for t in action) / max(1, len(action)),
        "process_score": sum(t.score for t in trajectories) / n,
        "avg_turns": sum(t.stats.turns for t in trajectories) / n,
        "avg_generated_tokens": sum(t.stats.generated_tokens for t in trajectories) / n,
        "tool_calls": calls,
        "tool_calls_per_episode": calls / n,
        "tool_call_validity": sum(t.stats.valid_calls for t in trajectories) / calls if calls else 0.0,
        "truncated_rate": sum(t.stats.truncated for t in trajectories) / n,
        "env_failures": sum(t.stats.env_error is not None for t in trajectories),
        "errors": dict(errors),
        "end_reasons": dict(reasons),
    }
    for kind, episodes in (("action", action), ("refuse", refuse)):
        if episodes:
            summary[f"success_{kind}"] = sum(t.success for t in episodes) / len(episodes)
    if weights is not None:
        summary["reward"] = sum(combine(t.reward_parts(), weights).total for t in trajectories) / n
    return summary


def kind_metrics(summary: dict, prefix: str) -> dict[str, float]:
    """The per-kind figures of a summary as metrics under `prefix/` (what eval/, rollout/ and
    baseline/NAME/ log): success, success_action, success_refuse, wrong_refusal, tool_calls (per
    episode), tool_call_validity, reward (when the summary has it)."""
    names = {"success": "success_rate", "success_action": "success_action", "success_refuse": "success_refuse",
             "wrong_refusal": "wrong_refusal", "tool_calls": "tool_calls_per_episode",
             "tool_call_validity": "tool_call_validity", "reward": "reward"}
    return {f"{prefix}/{name}": float(summary[key]) for name, key in names.items() if key in summary}


def success_by_tag(trajectories: list[Trajectory]) -> dict[str, float]:
    """Success rate per task tag (the tags each trajectory carries)."""
    hits: dict[str, list[bool]] = defaultdict(list)
    for t in trajectories:
        for tag in t.tags:
            hits[tag].append(t.success)
    return {tag: sum(v) / len(v) for tag, v in sorted(hits.items())}


def sample_groups(trajectories: list[Trajectory]) -> dict:
    """With several samples of each task: pass@k (any of a task's samples succeeded) and `mixed`, the
    share of tasks whose samples disagree. Only a mixed task gives a group baseline a signal, so mixed is
    RL's headroom: where a task always fails, sampling never shows RL a success to reinforce. Per tag and
    over action tasks; {} with one sample per task."""
    groups: dict[str, list[Trajectory]] = defaultdict(list)
    for t in trajectories:
        groups[t.task_id].append(t)
    samples = max((len(g) for g in groups.values()), default=0)
    if samples < 2:
        return {}
    by_tag: dict[str, list[list[bool]]] = defaultdict(list)
    action: list[list[bool]] = []
    for group in groups.values():
        outcomes = [t.success for t in group]
        for tag in group[0].tags:
            by_tag[tag].append(outcomes)
        if group[0].kind == "action":
            action.append(outcomes)
    out = {"samples_per_task": samples,
           "pass_at_k_by_tag": {tag: _pass_at_k(rows) for tag, rows in sorted(by_tag.items())},
           "mixed_by_tag": {tag: _mixed(rows) for tag, rows in sorted(by_tag.items())}}
    if action:
        out.update(pass_at_k_action=_pass_at_k(action), mixed_action=_mixed(action))
    return out


def _pass_at_k(groups: list[list[bool]]) -> float:
    return sum(any(g) for g in groups) / len(groups)


def _mixed(groups: list[list[bool]]) -> float:
    return sum(any(g) and not all(g) for g in groups) / len(groups)
