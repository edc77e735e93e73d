"""K2's chat template: Jinja == Python renderer, and a tool-call round trip through the tokenizer."""
import json

import pytest
from transformers import AutoTokenizer

from k2rl.model.chat import ChatTokenizer
from k2rl.model.template import parse_turn, render

TOOLS = [
    {"type": "function", "function": {"name": "book_flight", "description": "Book a seat on a flight.",
                                      "parameters": {"type": "object", "properties": {"flight": {"type": "string"}, "seats": {"type": "integer"}},
                                                     "required": ["flight"]}}},
    {"type": "function", "function": {"name": "get_user", "description": "Look up a user.",
                                      "parameters": {"type": "object", "properties": {"id": {"type": "integer"}}}}},
]


def _call(name, idx, args):
    return {"id": f"functions.{name}:{idx}", "type": "function", "function": {"name": name, "arguments": args}}


CONVERSATIONS = [
    [{"role": "user", "content": "hi"}],
    [{"role": "system", "content": "You are a travel agent."}, {"role": "user", "content": "Book AA12 for 2, and who am I? I'm user 7."},
     {"role": "assistant", "content": "On it.", "tool_calls": [_call("book_flight", 0, {"flight": "AA12", "seats": 2}), _call("get_user", 1, '{"id": 7}')]},
     {"role": "tool", "tool_call_id": "functions.book_flight:0", "content": '{"status": "booked", "seat": "14C"}'},
     {"role": "tool", "tool_call_id": "functions.get_user:1", "content": "Ann Lee"},
     {"role": "assistant", "content": "Booked seat 14C, Ann."},
     {"role": "user", "content": "thanks — und ünïcode ✓"}],
    [{"role": "user", "content": "x"}, {"role": "assistant", "content": "", "tool_calls": [_call("get_user", 0, {})]},
     {"role": "tool", "tool_call_id": "functions.get_user:0", "content": "error: not found"}],
]


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("with_tools", [True, False])
@pytest.mark.parametrize("gen_prompt", [True, False])
def test_python_renderer_matches_jinja_template(tiny_model_dir, messages, with_tools, gen_prompt):
    hf = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    tools = TOOLS if with_tools else None
    expected = hf.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=gen_prompt)
    assert render(messages, tools, gen_prompt) == expected


def test_tool_calls_round_trip_through_tokens(tiny_model_dir):
    tok = ChatTokenizer(tiny_model_dir)
    ids = tok.encode_conversation(CONVERSATIONS[1][:3], TOOLS)
    # The assistant turn's generated part: everything after the last generation prompt.
    prompt = tok.encode_conversation(CONVERSATIONS[1][:2], TOOLS, add_generation_prompt=True)
    assert ids[:len(prompt)] == prompt
    parsed = tok.parse_turn(ids[len(prompt):])
    assert parsed.errors == [] and parsed.content == "On it."
    assert [(c.id, c.name, json.loads(c.arguments)) for c in parsed.calls] == [
        ("functions.book_flight:0", "book_flight", {"flight": "AA12", "seats": 2}),
        ("functions.get_user:1", "get_user", {"id": 7}),
    ]
    assert tok.decode(ids) == render(CONVERSATIONS[1][:3], TOOLS)


def test_messages_concatenate_to_the_conversation(tiny_model_dir):
    """Per-message encoding (what the agent loop appends) equals encoding the whole rendering."""
    tok = ChatTokenizer(tiny_model_dir)
    messages = CONVERSATIONS[1]
    pieces = tok.encode_tools(TOOLS) + [i for m in messages for i in tok.encode_message(m)] + tok.generation_prompt()
    assert pieces == tok.encode_conversation(messages, TOOLS, add_generation_prompt=True)


@pytest.mark.parametrize("text, error", [
    ("<|tool_calls_section_begin|><|tool_call_begin|>book:0<|tool_call_argument_begin|>{}", "not closed"),
    ("<|tool_calls_section_begin|><|tool_call_begin|>functions.book<|tool_call_argument_begin|>{}<|tool_call_end|><|tool_calls_section_end|>", "malformed tool call id"),
    ("<|tool_calls_section_begin|>garbage<|tool_calls_section_end|>", "unparseable"),
    ("hello <|tool_call_begin|>", "outside a calls section"),
])
def test_malformed_calls_are_reported(text, error):
    parsed = parse_turn(text)
    assert parsed.calls == [] and any(error in e for e in parsed.errors)
