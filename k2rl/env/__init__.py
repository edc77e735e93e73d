"""The environment plugin API: tools, tasks, simulated users, environments and their registry."""
from k2rl.env.environment import ERROR_KINDS, CheckResult, Environment, StepResult
from k2rl.env.factory import EnvFactory
from k2rl.env.registry import available, load_env
from k2rl.env.task import Milestone, SolutionCall, SolutionTurn, Task, load_tasks, sample_tasks
from k2rl.env.tool import Tool, ToolError, tool
from k2rl.env.user import LLMUser, RuleUser, User

__all__ = ["ERROR_KINDS", "CheckResult", "EnvFactory", "Environment", "LLMUser", "Milestone", "RuleUser", "SolutionCall",
           "SolutionTurn", "StepResult", "Task", "Tool", "ToolError", "User", "available", "load_env", "load_tasks",
           "sample_tasks", "tool"]
