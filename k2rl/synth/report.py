"""The run summary: counts and failures per stage, filter pass rate and failure reasons, and
diversity figures (tools per agent, turns and tool calls per trajectory, injected failures)."""
from __future__ import annotations

import json
import statistics
from collections import Counter
from pathlib import Path

from k2rl.synth.schemas import AgentSpec, TaskSpec, Trajectory, Verdict
from k2rl.synth.stage import StageResult


def _spread(values: list[float]) -> dict[str, float]:
    if not values:
        return {"mean": 0.0, "min": 0.0, "max": 0.0}
    return {"mean": round(statistics.fmean(values), 3), "min": min(values), "max": max(values)}


def build_report(stages: dict[str, StageResult], *, catalog_size: int, dropped: Counter, sft: int, pool: int,
                 llm_stats: dict) -> dict:
    agents: list[AgentSpec] = stages["agents"].records
    tasks: list[TaskSpec] = stages["tasks"].records
    trajectories: list[Trajectory] = stages["trajectories"].records
    verdicts: list[Verdict] = stages["verdicts"].records
    reasons = Counter(r.split(":", 1)[0] for v in verdicts for r in v.reasons)
    injected = Counter()
    for t in trajectories:
        injected.update(t.injected)
    return {
        "stages": {name: {"records": len(r.records), "resumed": r.resumed, "failed": dict(r.errors)}
                   for name, r in stages.items()},
        "tools": {"catalog": catalog_size, "duplicates_dropped": dict(dropped)},
        "filter": {"judged": len(verdicts), "passed": sum(v.passed for v in verdicts),
                   "pass_rate": round(sum(v.passed for v in verdicts) / len(verdicts), 3) if verdicts else 0.0,
                   "failure_reasons": dict(reasons.most_common())},
        "diversity": {
            "tools_per_agent": _spread([len(set(a.tools)) for a in agents]),
            "distinct_tools_used": len({c["function"]["name"] for t in trajectories for m in t.messages
                                        for c in m.get("tool_calls") or []}),
            "tasks_by_difficulty": dict(Counter(t.difficulty for t in tasks)),
            "agent_turns_per_trajectory": _spread([t.agent_turns for t in trajectories]),
            "tool_calls_per_trajectory": _spread([t.tool_calls for t in trajectories]),
            "trajectory_ends": dict(Counter(t.end for t in trajectories)),
            "tool_outcomes": dict(injected),
        },
        "outputs": {"sft_examples": sft, "rl_tasks": pool},
        "llm": llm_stats,
    }


def write_report(path: Path, report: dict) -> None:
    path.write_text(json.dumps(report, indent=2) + "\n")


def summary_lines(report: dict) -> list[str]:
    """A short human summary for the terminal."""
    lines = [f"{name:>13}: {s['records']} done ({s['resumed']} from an earlier run)"
             + (f", failed {s['failed']}" if s["failed"] else "") for name, s in report["stages"].items()]
    f, d = report["filter"], report["diversity"]
    lines += [f"tools catalog: {report['tools']['catalog']} (duplicates dropped {report['tools']['duplicates_dropped']})",
              f"filter: {f['passed']}/{f['judged']} passed ({f['pass_rate']:.0%}); reasons {f['failure_reasons']}",
              f"tools per agent {d['tools_per_agent']}; turns per trajectory {d['agent_turns_per_trajectory']}",
              f"outputs: {report['outputs']['sft_examples']} SFT examples, {report['outputs']['rl_tasks']} RL tasks"]
    return lines
