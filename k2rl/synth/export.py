"""The outputs: the RL task pool (what the synthetic environment serves) and the SFT dataset (kept
trajectories in K2 chat format, with token ids and loss mask when a tokenizer is configured)."""
from __future__ import annotations

import json
from pathlib import Path

from k2rl.env.task import Milestone, Task
from k2rl.synth.environment import PoolEntry
from k2rl.synth.schemas import AgentSpec, TaskSpec, ToolSpec, Trajectory, Verdict
from k2rl.synth.tasks import task_criteria


def pool_entry(task: TaskSpec, agent: AgentSpec, catalog: dict[str, ToolSpec]) -> PoolEntry:
    """A synthesized task as an environment task: user facts, initial state, milestones (process
    credit: each expected tool called) and its rubric criteria."""
    rubric = {"name": task.id, "criteria": [c.model_dump() for c in task_criteria(task)]}
    env_task = Task(id=task.id, goal=task.goal, persona=task.persona, user_info=task.required_info,
                    initial_state=task.initial_state, milestones=[Milestone(tool=m) for m in dict.fromkeys(task.milestones)],
                    rubric=rubric)
    return PoolEntry(task=env_task, agent_id=agent.id, system_prompt=agent.system_prompt,
                     tools=[catalog[name] for name in agent.tools])


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """Whole-file write through a temporary name, so a kill never leaves a half-written output."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    tmp.replace(path)


def write_pool(path: Path, entries: list[PoolEntry]) -> None:
    write_jsonl(path, [e.model_dump(mode="json") for e in entries])


def write_sft(path: Path, trajectories: list[Trajectory], tokenizer_dir: str | None = None) -> int:
    """One line per kept trajectory: {"id", "messages", "tools"} (+ "token_ids", "loss_mask"), the
    format `k2rl.loop.data.load_sft_file` reads."""
    rows = [{"id": t.id, "messages": t.messages, "tools": t.tools} for t in trajectories]
    if tokenizer_dir:
        from k2rl.loop.data import encode_sft_example
        from k2rl.model.chat import ChatTokenizer

        chat = ChatTokenizer(tokenizer_dir)
        for row in rows:
            ids, mask = encode_sft_example(row, chat)
            row.update(token_ids=ids, loss_mask=[int(m) for m in mask])
    write_jsonl(path, rows)
    return len(rows)


def kept(trajectories: list[Trajectory], verdicts: list[Verdict]) -> list[Trajectory]:
    passed = {v.id for v in verdicts if v.passed}
    return [t for t in trajectories if t.id in passed]
