"""K2's chat and tool-call format: the Jinja chat template, the same rendering in Python, and the parser.

The Python renderer exists so the agent loop can render one message at a time and append its ids to a
trajectory; `tests/test_template.py` checks it byte-for-byte against the Jinja template that vLLM and
transformers use.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass

# Mirrors Kimi-K2-Instruct's template: tools declared first, every message framed by role tokens,
# assistant tool calls in a calls section, tool results as "## Return of functions.NAME:IDX".
CHAT_TEMPLATE = (
    "{%- if tools -%}<|im_system|>tool_declare<|im_middle|>{{ tools | tojson }}<|im_end|>{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}<|im_user|>user<|im_middle|>"
    "{%- elif message['role'] == 'assistant' -%}<|im_assistant|>assistant<|im_middle|>"
    "{%- else -%}<|im_system|>{{ message['role'] }}<|im_middle|>{%- endif -%}"
    "{%- if message['role'] == 'tool' -%}## Return of {{ message['tool_call_id'] }}{{ '\\n' }}{%- endif -%}"
    "{%- if message['content'] -%}{{ message['content'] }}{%- endif -%}"
    "{%- if message['role'] == 'assistant' and message.get('tool_calls') -%}"
    "<|tool_calls_section_begin|>"
    "{%- for call in message['tool_calls'] -%}"
    "<|tool_call_begin|>{{ call['id'] }}<|tool_call_argument_begin|>"
    "{%- if call['function']['arguments'] is string -%}{{ call['function']['arguments'] }}"
    "{%- else -%}{{ call['function']['arguments'] | tojson }}{%- endif -%}"
    "<|tool_call_end|>"
    "{%- endfor -%}"
    "<|tool_calls_section_end|>"
    "{%- endif -%}"
    "<|im_end|>"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|im_assistant|>assistant<|im_middle|>{%- endif -%}"
)

GENERATION_PROMPT = "<|im_assistant|>assistant<|im_middle|>"


def _tojson(value) -> str:
    return json.dumps(value, ensure_ascii=False)


def render_tools(tools: list[dict]) -> str:
    """The tool declaration block (empty without tools)."""
    return f"<|im_system|>tool_declare<|im_middle|>{_tojson(tools)}<|im_end|>" if tools else ""


def render_message(message: dict) -> str:
    """One message exactly as CHAT_TEMPLATE renders it."""
    role = message["role"]
    if role == "user":
        text = "<|im_user|>user<|im_middle|>"
    elif role == "assistant":
        text = GENERATION_PROMPT
    else:
        text = f"<|im_system|>{role}<|im_middle|>"
    if role == "tool":
        text += f"## Return of {message['tool_call_id']}\n"
    text += message.get("content") or ""
    if role == "assistant" and message.get("tool_calls"):
        text += "<|tool_calls_section_begin|>"
        for call in message["tool_calls"]:
            args = call["function"]["arguments"]
            args = args if isinstance(args, str) else _tojson(args)
            text += f"<|tool_call_begin|>{call['id']}<|tool_call_argument_begin|>{args}<|tool_call_end|>"
        text += "<|tool_calls_section_end|>"
    return text + "<|im_end|>"


def render(messages: list[dict], tools: list[dict] | None = None, add_generation_prompt: bool = False) -> str:
    """A whole conversation as text, identical to the Jinja template's output."""
    text = render_tools(tools or []) + "".join(render_message(m) for m in messages)
    return text + (GENERATION_PROMPT if add_generation_prompt else "")


@dataclass(frozen=True)
class ToolCall:
    """A parsed call: id is `functions.NAME:IDX`; arguments stay the raw JSON text the model wrote."""

    id: str
    name: str
    arguments: str

    def as_message_call(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(frozen=True)
class ParsedTurn:
    """An assistant turn split into its text, its well-formed calls and the malformed pieces."""

    content: str
    calls: list[ToolCall]
    errors: list[str]


_SECTION = re.compile(r"<\|tool_calls_section_begin\|>(.*?)(?:<\|tool_calls_section_end\|>|$)", re.S)
_CALL = re.compile(r"<\|tool_call_begin\|>(.*?)<\|tool_call_argument_begin\|>(.*?)<\|tool_call_end\|>", re.S)
_CALL_ID = re.compile(r"^\s*(?:functions\.)?([A-Za-z_][\w\-\.]*):(\d+)\s*$")


def parse_turn(text: str) -> ParsedTurn:
    """Parse an assistant turn (decoded with special tokens kept) in K2's tool-call format.

    Anything inside a calls section that is not a complete `<|tool_call_begin|>ID<|tool_call_argument_begin|>
    ARGS<|tool_call_end|>` block, or whose ID is not `functions.NAME:IDX`, is reported as an error
    instead of being dropped, so the environment can tell the model what was wrong.
    """
    text = text.removesuffix("<|im_end|>")
    calls: list[ToolCall] = []
    errors: list[str] = []
    content_parts = []
    pos = 0
    for section in _SECTION.finditer(text):
        content_parts.append(text[pos:section.start()])
        pos = section.end()
        body = section.group(1)
        if not section.group(0).endswith("<|tool_calls_section_end|>"):
            errors.append("tool calls section is not closed with <|tool_calls_section_end|>")
        leftover = _CALL.sub("", body).strip()
        for match in _CALL.finditer(body):
            id_match = _CALL_ID.match(match.group(1))
            if id_match is None:
                errors.append(f"malformed tool call id {match.group(1).strip()!r}; expected functions.NAME:IDX")
                continue
            calls.append(ToolCall(f"functions.{id_match.group(1)}:{id_match.group(2)}", id_match.group(1),
                                  match.group(2).strip()))
        if leftover:
            errors.append(f"unparseable text in tool calls section: {leftover[:200]!r}")
    content_parts.append(text[pos:])
    content = "".join(content_parts)
    stray = [t for t in ("<|tool_call_begin|>", "<|tool_call_end|>", "<|tool_call_argument_begin|>") if t in content]
    if stray:
        errors.append(f"tool call tokens outside a calls section: {', '.join(stray)}")
    return ParsedTurn(content.strip(), calls, errors)
