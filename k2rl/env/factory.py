"""Environments and tasks from an `EnvConfig`: what the RL loop and `k2rl eval` both build from."""
from __future__ import annotations

from k2rl.config import EnvConfig
from k2rl.env.environment import Environment
from k2rl.env.registry import load_env
from k2rl.env.task import Task, load_tasks, sample_tasks
from k2rl.env.user import LLMUser, RuleUser
from k2rl.validation import ValidationFailed


class EnvFactory:
    """Call it for a fresh environment (one per episode); `env_cls` is the class it builds."""

    def __init__(self, config: EnvConfig):
        self.config = config
        try:
            self.env_cls = load_env(config.name)
        except ValidationFailed as err:
            raise ValidationFailed(f"env.name: {err}") from None
        self.backend = None
        if config.user == "llm":
            from k2rl.llm import LLMClient

            self.backend = LLMClient(config.user_base_url, model=config.user_model)

    def __call__(self) -> Environment:
        user = LLMUser(self.backend) if self.backend is not None else RuleUser()
        return self.env_cls(tool_timeout_s=self.config.tool_timeout_s, user=user, **self.config.options)

    def tasks(self, count: int, seed: int) -> list[Task]:
        """`count` tasks by `seed`: from `config.task_file` if set, else the environment's own."""
        if self.config.task_file:
            return sample_tasks(load_tasks(self.config.task_file), count, seed)
        return self.env_cls.tasks(count, seed)
