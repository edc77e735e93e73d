"""Stage 3, tasks with rubrics: for each agent, user goals from a single call to long multi-step work,
each with a persona, the facts only the user knows, an initial world state, success criteria (judged)
and milestones (the expected tool-use pattern, drawn from the agent's own tools)."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, create_model

from k2rl.llm import LLMClient
from k2rl.rewards.rubric import Criterion
from k2rl.synth.ask import ask, item_seed
from k2rl.synth.config import SynthConfig
from k2rl.synth.schemas import AgentSpec, Ident, Items, TaskSpec, Text, ToolSpec
from k2rl.synth.stage import Stage, StageResult

LEVELS = {
    "single_call": (1, "a simple request one tool call settles"),
    "multi_step": (3, "a request that needs two to four tool calls, using earlier results"),
    "complex": (6, "a long task over several tools, with a detail the user only gives when asked"),
}
PROMPT = ("You write test tasks for a tool-using assistant. Given its system prompt and tools, write {what}: "
          "the user's goal in their words, a persona, facts only the user knows (key/value), the relevant initial "
          "state of the application (key/value), success criteria a grader can check in the transcript, and the "
          "tool calls a good assistant makes, in order. Answer in JSON.")


class _Fact(BaseModel):
    key: Ident
    value: Text(60)


def _task_model(tool_names: tuple[str, ...], milestones: int) -> type[BaseModel]:
    return create_model("Task", goal=(Text(200), ...), persona=(Text(100), ...), user_facts=(Items(_Fact, 3), ...),
                        initial_state=(Items(_Fact, 3), ...), success_criteria=(Items(Text(120), 3, 1), ...),
                        milestones=(Items(Literal[tool_names], milestones, 1), ...))


def generate_tasks(config: SynthConfig, client: LLMClient, agents: list[AgentSpec],
                   catalog: dict[str, ToolSpec]) -> StageResult[TaskSpec]:
    levels = config.tasks.difficulties

    def work(key: str, item: tuple[AgentSpec, int]) -> TaskSpec:
        agent, j = item
        level = levels[j % len(levels)]
        calls, what = LEVELS[level]
        tools = "\n".join(f"- {n}: {catalog[n].description}" for n in agent.tools)
        out = ask(client, PROMPT.format(what=what), f"System prompt: {agent.system_prompt}\nTools:\n{tools}",
                  _task_model(tuple(agent.tools), calls), temperature=config.llm.temperature, seed=item_seed(config, key))
        return TaskSpec(id=key, agent_id=agent.id, difficulty=level, goal=out.goal, persona=out.persona,
                        required_info={f.key: f.value for f in out.user_facts},
                        initial_state={f.key: f.value for f in out.initial_state},
                        success_criteria=out.success_criteria, milestones=out.milestones)

    stage = Stage("tasks", config.out_path, TaskSpec, workers=config.workers, progress=config.progress)
    items = {f"{a.id}/task-{j}": (a, j) for a in agents for j in range(config.tasks.per_agent)
             if all(n in catalog for n in a.tools)}
    return stage.run(items, work)


def task_criteria(task: TaskSpec) -> list[Criterion]:
    """The task's own rubric items: each success criterion, and the expected tool-use pattern."""
    out = [Criterion(id=f"success_{i}", description=c, kind="task") for i, c in enumerate(task.success_criteria)]
    if task.milestones:
        out.append(Criterion(id="tool_pattern", kind="task",
                             description="The assistant's tool use follows this pattern: " + " -> ".join(task.milestones)))
    return out
