"""The shared LLM layer: one client for every model call k2rl makes (judge, simulators, synthesis)."""
from k2rl.llm.base import CallStats, ChatBackend, ChatRequest, Completion, LLMFailure
from k2rl.llm.cache import ResponseCache, content_key
from k2rl.llm.client import LLMClient
from k2rl.llm.parse import ParseError, parse_json, parse_model

__all__ = ["CallStats", "ChatBackend", "ChatRequest", "Completion", "LLMClient", "LLMFailure", "ParseError",
           "ResponseCache", "content_key", "parse_json", "parse_model"]
