"""Stage 2, agents: each a tool subset (drawn from one application, topped up from its domain) and a
generated system prompt written for exactly those tools."""
from __future__ import annotations

import random
from collections import defaultdict

from pydantic import BaseModel

from k2rl.llm import LLMClient
from k2rl.synth.ask import ask, item_seed
from k2rl.synth.config import SynthConfig
from k2rl.synth.schemas import AgentSpec, Text, ToolSpec
from k2rl.synth.stage import Stage, StageResult

PROMPT = ("You write system prompts for tool-using assistants. Given the tools an assistant has, give it a "
          "short name and a system prompt: its role, who it serves, how it should use the tools, when to ask the "
          "user for missing details and when to refuse. Answer in JSON.")


class _GenAgent(BaseModel):
    name: Text(60)
    system_prompt: Text(400)


def pick_tools(config: SynthConfig, catalog: list[ToolSpec], index: int) -> list[ToolSpec]:
    """Agent `index`'s tools: its application's tools (applications taken in turn), topped up from the
    same domain to at least `min_tools`. Seeded per agent, so a rerun picks the same subset."""
    by_app, by_domain = defaultdict(list), defaultdict(list)
    for tool in catalog:
        by_app[(tool.domain, tool.application)].append(tool)
        by_domain[tool.domain].append(tool)
    apps = sorted(by_app)
    domain, app = apps[index % len(apps)]
    rng = random.Random(f"{config.seed}:agent:{index}")
    want = rng.randint(config.agents.min_tools, config.agents.max_tools)
    chosen = rng.sample(by_app[(domain, app)], min(want, len(by_app[(domain, app)])))
    others = [t for t in by_domain[domain] if t not in chosen]
    chosen += rng.sample(others, min(len(others), config.agents.min_tools - len(chosen))) if others else []
    return chosen


def generate_agents(config: SynthConfig, client: LLMClient, catalog: list[ToolSpec]) -> StageResult[AgentSpec]:
    def work(key: str, index: int) -> AgentSpec:
        tools = pick_tools(config, catalog, index)
        listing = "\n".join(f"- {t.name}: {t.description}" for t in tools)
        out = ask(client, PROMPT, f"Application: {tools[0].application or tools[0].domain}\nTools:\n{listing}",
                  _GenAgent, temperature=config.llm.temperature,
                  seed=item_seed(config, key))
        return AgentSpec(id=key, name=out.name, system_prompt=out.system_prompt, tools=[t.name for t in tools],
                         domain=tools[0].domain, application=tools[0].application)

    stage = Stage("agents", config.out_path, AgentSpec, workers=config.workers, progress=config.progress)
    return stage.run({f"agent-{i:05d}": i for i in range(config.agents.count)} if catalog else {}, work)
