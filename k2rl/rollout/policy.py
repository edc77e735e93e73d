"""What the agent loop generates with: anything with `generate(prompts, sampling)`.

That is the in-process `RolloutEngine`, a Ray worker group fanning out to several engines, or
`EndpointPolicy` for an OpenAI-compatible server (vLLM's `/v1/completions` with token-id prompts).
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Protocol

import openai

from k2rl.engines.types import Generation, SamplingConfig
from k2rl.model.chat import ChatTokenizer
from k2rl.validation import ValidationFailed


class Policy(Protocol):
    def generate(self, prompts: list[list[int]], sampling: SamplingConfig) -> list[list[Generation]]:
        """Per prompt (in order), `sampling.n` generations."""


def served_model(client: openai.OpenAI) -> str:
    """The first model an OpenAI-compatible server lists; a server that does not answer is named."""
    try:
        return client.models.list().data[0].id
    except openai.APIConnectionError as err:
        raise ValidationFailed(f"{client.base_url}: no OpenAI-compatible server answers there ({err}); start one "
                               "(e.g. `vllm serve MODEL_DIR`) or fix the URL") from None


class EndpointPolicy:
    """Token ids in and out over HTTP: the completions API with a token-id prompt.

    With vLLM (`python -m vllm.entrypoints.openai.api_server`) the output ids and their logprobs come
    back exactly (`return_tokens_as_token_ids`), special tokens kept. An endpoint that only returns
    text gets it re-encoded with `chat` and logprobs of 0 (fine for eval, not for training).
    """

    def __init__(self, base_url: str, chat: ChatTokenizer, model: str | None = None, api_key: str = "EMPTY",
                 concurrency: int = 8, timeout_s: float = 120.0):
        self.client = openai.OpenAI(base_url=base_url, api_key=api_key, timeout=timeout_s, max_retries=2)
        self.model = model or served_model(self.client)
        self.chat, self.concurrency = chat, concurrency

    def generate(self, prompts: list[list[int]], sampling: SamplingConfig) -> list[list[Generation]]:
        budgets = sampling.max_tokens if isinstance(sampling.max_tokens, list) else [sampling.max_tokens] * len(prompts)
        jobs = [(prompt, replace(sampling, max_tokens=budget)) for prompt, budget in zip(prompts, budgets)]
        with ThreadPoolExecutor(max_workers=max(1, min(self.concurrency, len(jobs)))) as pool:
            return list(pool.map(lambda job: self._one(*job), jobs))

    def _one(self, prompt: list[int], sampling: SamplingConfig) -> list[Generation]:
        stop_ids = list(sampling.stop_token_ids) or self.chat.stop_ids
        response = self.client.completions.create(
            model=self.model, prompt=prompt, max_tokens=sampling.max_tokens, temperature=sampling.temperature,
            top_p=sampling.top_p, n=sampling.n, seed=sampling.seed, logprobs=0,
            extra_body={"stop_token_ids": stop_ids, "skip_special_tokens": False, "return_tokens_as_token_ids": True,
                        "include_stop_str_in_output": True})
        return [self._generation(choice, stop_ids) for choice in sorted(response.choices, key=lambda c: c.index)]

    def _generation(self, choice, stop_ids: list[int]) -> Generation:
        tokens = (choice.logprobs.tokens or []) if choice.logprobs else []
        if tokens and all(t.startswith("token_id:") for t in tokens):
            ids = [int(t.split(":", 1)[1]) for t in tokens]
            logprobs = [lp or 0.0 for lp in choice.logprobs.token_logprobs]
        else:
            ids = self.chat.encode(choice.text)
            logprobs = [0.0] * len(ids)
        reason = "stop" if choice.finish_reason == "stop" else "length"
        if reason == "stop" and (not ids or ids[-1] not in stop_ids):
            ids, logprobs = ids + [self.chat.im_end_id], logprobs + [0.0]
        return Generation(token_ids=ids, logprobs=logprobs, finish_reason=reason)
