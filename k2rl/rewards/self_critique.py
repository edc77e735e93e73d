"""Self-critique (K2): the colocated policy is the judge. The judge conversation is rendered with the
policy's own chat template and generated through its RolloutEngine, with no HTTP in between.

The verdict's JSON Schema goes to the engine as a structured-output constraint (vLLM grammar), so
even a weak policy writes a verdict of the right shape; it is still read with the same lenient parse
and repair as the HTTP path, and what fails is resampled with a new seed (at temperature >= 0.7,
since greedy would repeat itself) up to `retries` times, then returned as a failure (the scorer's
default). Nothing is cached: the policy, hence its verdicts, changes every step.
"""
from __future__ import annotations

from typing import Protocol

from k2rl.llm import CallStats, ChatRequest, Completion, LLMFailure, ParseError, parse_model
from k2rl.model.chat import ChatTokenizer


class Generator(Protocol):
    def generate(self, prompts: list[list[int]], sampling): ...  # RolloutEngine.generate


class SelfCritiqueBackend:
    """A `ChatBackend` over anything with RolloutEngine's `generate(prompts, sampling)`."""

    def __init__(self, engine: Generator, tokenizer: ChatTokenizer, *, retries: int = 1, seed: int = 0):
        self.engine, self.tokenizer, self.retries, self.seed = engine, tokenizer, retries, seed
        self.stats = CallStats()

    def complete_many(self, requests: list[ChatRequest]) -> list[Completion | LLMFailure]:
        from k2rl.engines.types import SamplingConfig

        self.stats.add(requests=len(requests))
        prompts = [self.tokenizer.encode_conversation(r.messages, add_generation_prompt=True) for r in requests]
        results: list[Completion | LLMFailure | None] = [None] * len(requests)
        pending = list(range(len(requests)))
        for attempt in range(1, self.retries + 2):
            if attempt > 1:
                self.stats.add(retries=len(pending))
            self.stats.add(attempts=len(pending))
            # One call per distinct sampling setting and verdict schema; judge requests of a batch share one.
            outputs = {}
            for key in {(requests[i].max_tokens, requests[i].temperature, requests[i].schema) for i in pending}:
                idx = [i for i in pending if (requests[i].max_tokens, requests[i].temperature, requests[i].schema) == key]
                temperature = key[1] if attempt == 1 else max(key[1], 0.7)
                sampling = SamplingConfig(temperature=temperature, max_tokens=key[0], seed=self.seed + attempt,
                                          stop_token_ids=self.tokenizer.stop_ids,
                                          json_schema=requests[idx[0]].json_schema())
                for i, gens in zip(idx, self.engine.generate([prompts[i] for i in idx], sampling)):
                    outputs[i] = self.tokenizer.decode(gens[0].token_ids, keep_special=False)
            still = []
            for i in pending:
                results[i] = self._read(requests[i], outputs[i], attempt)
                if isinstance(results[i], LLMFailure):
                    still.append(i)
            pending = still
            if not pending:
                break
        self.stats.add(failures=len(pending))
        return results

    def _read(self, request: ChatRequest, text: str, attempt: int) -> Completion | LLMFailure:
        if request.schema is None:
            return Completion(text, attempts=attempt)
        try:
            value, repaired = parse_model(text, request.schema)
        except ParseError as err:
            self.stats.add(invalid=1)
            return LLMFailure("invalid", str(err), attempt)
        self.stats.add(repaired=int(repaired))
        return Completion(text, value, repaired=repaired, attempts=attempt)
