"""The OpenAI-compatible client every LLM call in k2rl goes through (judge, user and tool simulators).

It adds what a training run needs around `openai.OpenAI`: a concurrency limit, a per-call timeout,
retries with exponential backoff (also for output that does not fit the schema), a content-hash
cache, and failure accounting. A failed call comes back as an `LLMFailure` value, so an outage
degrades a step instead of stopping the run.
"""
from __future__ import annotations

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai

from k2rl.llm.base import CallStats, ChatRequest, Completion, LLMFailure
from k2rl.llm.cache import ResponseCache, content_key
from k2rl.llm.parse import ParseError, parse_model

_RETRYABLE_STATUS = {408, 409, 429}


class LLMClient:
    """Chat completions against any OpenAI-compatible `base_url` (vLLM, SGLang, OpenAI, ...)."""

    def __init__(self, base_url: str, model: str | None = None, api_key: str = "EMPTY", *,
                 concurrency: int = 8, timeout_s: float = 60.0, retries: int = 3, backoff_s: float = 0.5,
                 structured_output: bool = True, cache: ResponseCache | None = None):
        self._client = openai.OpenAI(base_url=base_url, api_key=api_key, timeout=timeout_s, max_retries=0)
        self._model = self._configured_model = model
        self._model_lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(concurrency)
        self.concurrency, self.retries, self.backoff_s = concurrency, retries, backoff_s
        self.structured_output = structured_output
        self.cache = cache
        self.stats = CallStats()

    @property
    def model(self) -> str:
        """The configured model, or the endpoint's first served model (asked once)."""
        with self._model_lock:
            if self._model is None:
                self._model = self._client.models.list().data[0].id
            return self._model

    def complete_many(self, requests: list[ChatRequest]) -> list[Completion | LLMFailure]:
        """All requests, at most `concurrency` in flight; results in request order."""
        if not requests:
            return []
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(requests))) as pool:
            return list(pool.map(self._complete_or_failure, requests))

    def complete(self, request: ChatRequest) -> Completion:
        """One request; raises `LLMFailure` once retries are spent."""
        self.stats.add(requests=1)
        key = self._cache_key(request)
        cached = self.cache.get(key) if self.cache else None
        if cached is not None:
            try:
                value, _ = parse_model(cached, request.schema) if request.schema else (None, False)
                self.stats.add(cache_hits=1)
                return Completion(cached, value, cached=True)
            except ParseError:
                pass  # the schema changed since this entry was written: ask again
        last: LLMFailure | None = None
        for attempt in range(1, self.retries + 2):
            if attempt > 1:
                self.stats.add(retries=1)
                time.sleep(min(30.0, self.backoff_s * 2 ** (attempt - 2)) * random.uniform(0.5, 1.0))
            try:
                text = self._call(request)
                value, repaired = parse_model(text, request.schema) if request.schema else (None, False)
            except ParseError as err:
                self.stats.add(invalid=1)
                last = LLMFailure("invalid", str(err), attempt)
                continue
            except LLMFailure as err:
                last = LLMFailure(err.kind, err.message, attempt)
                if err.kind == "http":
                    break  # a 4xx (bad model name, prompt too long) will not fix itself
                continue
            self.stats.add(repaired=int(repaired))
            if self.cache:
                self.cache.put(key, text)
            return Completion(text, value, repaired=repaired, attempts=attempt)
        self.stats.add(failures=1)
        raise last

    def _complete_or_failure(self, request: ChatRequest) -> Completion | LLMFailure:
        try:
            return self.complete(request)
        except LLMFailure as err:
            return err

    def _call(self, request: ChatRequest) -> str:
        """One HTTP attempt; every error becomes an `LLMFailure` with a kind."""
        kwargs = {}
        if request.schema is not None and self.structured_output:
            kwargs["response_format"] = {"type": "json_schema", "json_schema": {
                "name": request.schema.__name__, "schema": request.json_schema()}}
        if request.seed is not None:
            kwargs["seed"] = request.seed
        with self._slots:
            self.stats.add(attempts=1, in_flight=1)
            try:
                response = self._client.chat.completions.create(
                    model=self.model, messages=request.messages, max_tokens=request.max_tokens,
                    temperature=request.temperature, **kwargs)
            except openai.APITimeoutError as err:
                self.stats.add(timeouts=1)
                raise LLMFailure("timeout", str(err)) from None
            except openai.APIConnectionError as err:
                raise LLMFailure("connection", str(err)) from None
            except openai.APIStatusError as err:
                retryable = err.status_code >= 500 or err.status_code in _RETRYABLE_STATUS
                raise LLMFailure("server" if retryable else "http", f"{err.status_code} {err.message}") from None
            except (openai.OpenAIError, ValueError) as err:  # unparseable body, missing fields
                raise LLMFailure("invalid", f"bad response: {err}") from None
            finally:
                self.stats.add(in_flight=-1)
        try:
            text = response.choices[0].message.content
        except (AttributeError, IndexError, TypeError):
            raise LLMFailure("invalid", "response has no choices[0].message") from None
        if text is None:
            raise LLMFailure("invalid", "response has no content")
        return text

    def _cache_key(self, request: ChatRequest) -> str:
        return content_key({"model": self._configured_model, "base_url": str(self._client.base_url), "messages": request.messages,
                            "schema": request.json_schema(), "max_tokens": request.max_tokens,
                            "temperature": request.temperature, "seed": request.seed})
