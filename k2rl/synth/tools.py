"""Stage 1, tools: category descriptions -> application domains -> tools (K2's hierarchical
evolution), joined with imported specs and deduplicated into the catalog the later stages draw on."""
from __future__ import annotations

import json
from collections import Counter
from functools import lru_cache
from typing import Literal

from pydantic import BaseModel, Field, create_model

from k2rl.llm import LLMClient
from k2rl.synth.ask import ask, item_seed
from k2rl.synth.config import Domain, SynthConfig
from k2rl.synth.importers import dedup, import_specs
from k2rl.synth.schemas import App, AppBatch, Ident, Items, Text, ToolBatch, ToolSpec
from k2rl.synth.stage import Stage, StageResult


class _GenApp(BaseModel):
    name: Text(48)
    description: Text(120)




class _GenParam(BaseModel):
    name: Ident
    type: Literal["string", "integer", "number", "boolean"]
    description: Text(60)
    required: bool


class _GenToolBase(BaseModel):
    name: Ident
    description: Text(120)
    effects: Text(80) = Field(description="how a call changes the application's state; empty if read-only")


@lru_cache(maxsize=32)
def _gen_apps(n: int) -> type[BaseModel]:
    return create_model("Applications", applications=(Items(_GenApp, n, 1), ...))


@lru_cache(maxsize=32)
def _gen_tools(n: int, params: int) -> type[BaseModel]:
    tool = create_model("Tool", __base__=_GenToolBase, parameters=(Items(_GenParam, params), ...))
    return create_model("Tools", tools=(Items(tool, n, 1), ...))


APPS_PROMPT = ("You design software applications for a tool-use dataset. Given a category of applications, "
               "propose {n} distinct applications in it, each with a one-sentence description. Answer in JSON.")
TOOLS_PROMPT = ("You design the API of an application for a tool-use dataset. Propose {n} distinct tools "
                "(functions) for it: a snake_case name, what it does, at most {p} parameters (name, type, "
                "description, required), and how a call changes the application's state (empty when it only "
                "reads). Answer in JSON.")


def _to_spec(tool: _GenToolBase, app: App) -> ToolSpec:
    params = {p.name: p for p in tool.parameters}  # a repeated name keeps its last definition
    schema = {"type": "object",
              "properties": {n: {"type": p.type, "description": p.description} for n, p in params.items()},
              "required": [n for n, p in params.items() if p.required]}
    return ToolSpec(name=tool.name, description=tool.description, parameters=schema, effects=tool.effects,
                    domain=app.domain, application=app.name)


def generate_apps(config: SynthConfig, client: LLMClient, domains: list[Domain]) -> StageResult[AppBatch]:
    n = config.tools.apps_per_domain

    def work(key: str, domain: Domain) -> AppBatch:
        out = ask(client, APPS_PROMPT.format(n=n), f"Category: {domain.name}\n{domain.description}", _gen_apps(n),
                  temperature=config.llm.temperature, seed=item_seed(config, key))
        apps = [App(id=f"{key}/{i}", domain=domain.name, name=a.name or f"{domain.name} app {i}",
                    description=a.description) for i, a in enumerate(out.applications)]
        return AppBatch(id=key, apps=apps)

    stage = Stage("apps", config.out_path, AppBatch, workers=config.workers, progress=config.progress)
    return stage.run({d.name: d for d in domains}, work)


def generate_tools(config: SynthConfig, client: LLMClient, apps: list[App]) -> StageResult[ToolBatch]:
    cfg = config.tools

    def work(key: str, app: App) -> ToolBatch:
        prompt = TOOLS_PROMPT.format(n=cfg.tools_per_app, p=cfg.max_params)
        out = ask(client, prompt, f"Category: {app.domain}\nApplication: {app.name}\n{app.description}", _gen_tools(cfg.tools_per_app, cfg.max_params),
                  temperature=config.llm.temperature, seed=item_seed(config, key))
        tools = [_to_spec(t, app) for t in out.tools]
        return ToolBatch(id=key, application=app.name, tools=tools)

    stage = Stage("tool_batches", config.out_path, ToolBatch, workers=config.workers, progress=config.progress)
    return stage.run({app.id: app for app in apps}, work)


def build_catalog(config: SynthConfig, batches: list[ToolBatch]) -> tuple[list[ToolSpec], Counter]:
    """Imported specs first (real APIs win a name clash), then generated ones; written to tools.jsonl."""
    imported = [spec for path in config.tools.imports for spec in import_specs(config.path(path))]
    catalog, dropped = dedup(imported + [t for batch in batches for t in batch.tools])
    path = config.out_path / "tools.jsonl"
    path.write_text("".join(json.dumps(t.model_dump(), ensure_ascii=False) + "\n" for t in catalog))
    return catalog, dropped
