"""Synthesis pieces that need no model: spec import and dedup, argument models, failure draws, resume
bookkeeping of a stage file, config errors."""
from __future__ import annotations

import json

import pytest

from k2rl.synth.arguments import args_model
from k2rl.synth.config import FailureRates, load_synth_config
from k2rl.synth.importers import dedup, import_specs
from k2rl.synth.schemas import AgentSpec, ToolSpec
from k2rl.synth.stage import Stage
from k2rl.synth.toolsim import draw_mode
from k2rl.validation import ValidationFailed

ORDER = {"type": "object", "properties": {"order_id": {"type": "string"}, "qty": {"type": "integer"}},
         "required": ["order_id"]}


def test_import_mcp_and_openai_specs_and_dedup(tmp_path):
    mcp = tmp_path / "mcp.json"
    mcp.write_text(json.dumps({"tools": [{"name": "get_order", "description": "Get an order.", "inputSchema": ORDER},
                                         {"name": "weather", "description": "Weather.", "inputSchema": {"type": "object"}}]}))
    oai = tmp_path / "oai.jsonl"
    oai.write_text("\n".join(json.dumps(x) for x in [
        {"type": "function", "function": {"name": "get_order", "description": "Other.", "parameters": ORDER}},
        {"name": "fetch_order", "description": "Get an order!", "parameters": ORDER},
        {"name": "cancel_order", "description": "Cancel an order.", "parameters": ORDER}]))
    specs = import_specs(mcp) + import_specs(oai)
    assert [s.source for s in specs] == ["mcp", "mcp", "openai", "openai", "openai"]
    kept, dropped = dedup(specs)
    assert [s.name for s in kept] == ["get_order", "weather", "cancel_order"]
    assert dropped == {"name": 1, "schema": 1}
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"description": "no name"}]))
    with pytest.raises(ValidationFailed, match="bad.json: tool #0"):
        import_specs(bad)


def test_args_model_validates_calls():
    model = args_model(ToolSpec(name="get_order", parameters=ORDER))
    assert model.model_validate({"order_id": "A1", "qty": 2}).qty == 2
    with pytest.raises(ValueError):
        model.model_validate({"qty": 2})
    with pytest.raises(ValueError):
        model.model_validate({"order_id": "A1", "extra": 1})


def test_failure_draws_follow_rates_and_repeat():
    rates = FailureRates(error=0.2, partial=0.1, edge_case=0.1)
    modes = [draw_mode(rates, f"t:{i}") for i in range(4000)]
    assert abs(modes.count("error") / 4000 - 0.2) < 0.03
    assert abs(modes.count("success") / 4000 - 0.6) < 0.03
    assert modes == [draw_mode(rates, f"t:{i}") for i in range(4000)]


def test_stage_skips_finished_items_and_cuts_a_torn_line(tmp_path):
    stage = Stage("agents", tmp_path, AgentSpec, workers=2, progress=False)
    make = lambda key, n: AgentSpec(id=key, name=str(n), system_prompt="", tools=[], domain="", application="")  # noqa: E731
    first = stage.run({"a": 1, "b": 2}, make)
    assert [r.id for r in first.records] == ["a", "b"] and first.resumed == 0
    with open(stage.path, "a") as fh:
        fh.write('{"id": "c", "na')  # killed mid-write
    calls = []
    second = stage.run({"a": 1, "b": 2, "c": 3}, lambda key, n: calls.append(key) or make(key, n))
    assert calls == ["c"] and second.resumed == 2
    lines = stage.path.read_text().splitlines()
    assert [json.loads(line)["id"] for line in lines] == ["a", "b", "c"]


def test_config_errors_name_file_line_and_key(tmp_path):
    path = tmp_path / "synth.yaml"
    path.write_text("llm: {base_url: http://x/v1}\ntools: {domains: []}\nagents:\n  cuont: 3\n")
    with pytest.raises(ValidationFailed, match=r"synth.yaml:4: agents.cuont: unknown key \(did you mean 'count'\?\)"):
        load_synth_config(path)
