"""Builds the rubric judge that `rewards.judge` asks for: none, an HTTP endpoint, or the policy."""
from __future__ import annotations

from pathlib import Path

from k2rl.config import JudgeConfig
from k2rl.llm import LLMClient, ResponseCache
from k2rl.model.chat import ChatTokenizer
from k2rl.rewards.rubric import Rubric, load_rubric
from k2rl.rewards.scorer import RubricScorer
from k2rl.rewards.self_critique import SelfCritiqueBackend
from k2rl.validation import ValidationFailed


def rubric_for(config: JudgeConfig) -> Rubric | None:
    """A job's judge rubric, read and checked (None when the judge is off); a bad one names the field."""
    if config.mode == "off":
        return None
    try:
        return load_rubric(config.rubric)
    except ValidationFailed as err:
        raise ValidationFailed(f"rewards.judge.rubric: {err}") from None


def make_judge(config: JudgeConfig, rubric: Rubric | None = None, *, engine=None,
               model_dir: str | Path | None = None) -> RubricScorer | None:
    """mode off -> None; endpoint -> an `LLMClient` on `base_url`; self -> the policy's RolloutEngine
    (`engine`, with the tokenizer in `model_dir`) critiques its own responses. `rubric`: `rubric_for`'s,
    when read before (else read here)."""
    if config.mode == "off":
        return None
    if config.mode == "endpoint":
        cache = ResponseCache(config.cache_dir)
        backend = LLMClient(config.base_url, config.model, config.api_key, concurrency=config.concurrency,
                            timeout_s=config.timeout_s, retries=config.retries, backoff_s=config.backoff_s,
                            structured_output=config.structured_output, cache=cache)
    else:
        if engine is None or model_dir is None:
            raise ValueError("judge.mode 'self' needs the policy's RolloutEngine and its model directory")
        backend = SelfCritiqueBackend(engine, ChatTokenizer(model_dir), retries=config.retries)
    return RubricScorer(backend, rubric or load_rubric(config.rubric), pairwise=config.pairwise,
                        default_score=config.default_score, reason_chars=config.reason_chars,
                        temperature=config.temperature)
