"""The agent whose turns become the dataset. Either backend returns a `ParsedTurn` (text, tool calls
as `functions.NAME:IDX`, format errors), exactly what the environment steps on.

- `EndpointAgent`: any OpenAI-compatible endpoint through the shared `k2rl.llm` client. The turn is
  asked for as JSON under a schema built from the agent's tools (each call's arguments are that tool's
  argument schema), so any chat model works, with or without native tool calling.
- `EngineAgent`: an in-process vLLM engine on a model directory, prompted and parsed in K2's native
  tool-call tokens (the policy itself, as in RL rollouts).
"""
from __future__ import annotations

import json
import threading
from dataclasses import replace
from typing import Literal, Union

from pydantic import BaseModel, create_model

from k2rl.env.tool import Tool
from k2rl.llm import ChatRequest, LLMClient
from k2rl.model.template import ParsedTurn, ToolCall
from k2rl.synth.ask import token_budget
from k2rl.synth.schemas import Items, Text

FORMAT = ("\n\nYou can call these tools:\n{tools}\nAnswer every turn in JSON: `content` is your message to the user "
          "(empty while you only call tools), `tool_calls` the calls to make now (empty when you reply).")


def _turn_model(tools: list[Tool], max_calls: int) -> type[BaseModel]:
    calls = [create_model(f"Call_{i}", name=(Literal[t.name], ...), arguments=(t.args, ...)) for i, t in enumerate(tools)]
    call = Union[tuple(calls)] if calls else None
    # Calls first: should an answer be cut short, only the free text suffers.
    fields = {"tool_calls": (Items(call, max_calls), ...)} if call is not None else {}
    return create_model("AgentTurn", **fields, content=(Text(300), ...))


def _as_text(message: dict) -> dict:
    """A K2 message in the JSON protocol: calls and tool results become plain text any endpoint accepts."""
    if message["role"] == "assistant":
        calls = [{"name": c["function"]["name"], "arguments": json.loads(c["function"]["arguments"])}
                 for c in message.get("tool_calls") or []]
        return {"role": "assistant", "content": json.dumps({"content": message.get("content") or "",
                                                            "tool_calls": calls}, ensure_ascii=False)}
    if message["role"] == "tool":
        return {"role": "user", "content": f"Result of {message['tool_call_id']}:\n{message['content']}"}
    return {"role": message["role"], "content": message.get("content") or ""}


class EndpointAgent:
    def __init__(self, client: LLMClient, *, temperature: float = 0.7, max_calls: int = 3):
        self.client, self.temperature, self.max_calls = client, temperature, max_calls

    def turn(self, messages: list[dict], tools: list[Tool], seed: int) -> ParsedTurn:
        """Raises `LLMFailure` when the endpoint gives up."""
        listing = json.dumps([t.declaration()["function"] for t in tools], ensure_ascii=False)
        system, *rest = messages
        prompt = [{"role": "system", "content": system["content"] + FORMAT.format(tools=listing)},
                  *(_as_text(m) for m in rest)]
        schema = _turn_model(tools, self.max_calls)
        request = ChatRequest(prompt, schema, temperature=self.temperature, seed=seed)
        value = self.client.complete(replace(request, max_tokens=token_budget(request))).value
        start = sum(len(m.get("tool_calls") or []) for m in messages)  # K2 numbers calls across the dialog
        calls = [ToolCall(f"functions.{c.name}:{start + i}", c.name,
                          c.arguments.model_dump_json(by_alias=True, exclude_none=True))
                 for i, c in enumerate(getattr(value, "tool_calls", []))]
        return ParsedTurn(value.content, calls, [])


class EngineAgent:
    """Generates with `RolloutEngine` from K2-rendered token ids and parses K2's tool-call tokens."""

    def __init__(self, model_dir: str, *, max_tokens: int = 384, temperature: float = 0.7, max_model_len: int = 4096):
        from k2rl.engines.rollout import RolloutEngine
        from k2rl.model.chat import ChatTokenizer

        self.tokenizer = ChatTokenizer(model_dir)
        self.engine = RolloutEngine(model_dir, max_model_len=max_model_len)
        self.max_tokens, self.temperature, self.max_model_len = max_tokens, temperature, max_model_len
        self._lock = threading.Lock()  # one engine, called from the stage's worker threads

    def turn(self, messages: list[dict], tools: list[Tool], seed: int) -> ParsedTurn:
        from k2rl.engines.types import SamplingConfig

        prompt = self.tokenizer.encode_conversation(messages, [t.declaration() for t in tools],
                                                    add_generation_prompt=True)
        budget = min(self.max_tokens, self.max_model_len - len(prompt))
        if budget <= 0:
            raise ValueError(f"prompt of {len(prompt)} tokens leaves no room under max_model_len {self.max_model_len}")
        sampling = SamplingConfig(temperature=self.temperature, max_tokens=budget, seed=seed,
                                  stop_token_ids=self.tokenizer.stop_ids)
        with self._lock:
            generation = self.engine.generate([prompt], sampling)[0][0]
        return self.tokenizer.parse_turn(generation.token_ids)
