"""A complete k2rl environment in one file: a to-do list the assistant manages with three tools.

Run it:  k2rl eval --env examples/todo_env.py:TodoEnv --model DIR   (tasks come from todo_tasks.yaml)
"""
from typing import Annotated

from pydantic import Field

from k2rl.env import Environment, ToolError, tool


class TodoEnv(Environment):
    name = "todo"
    system_prompt = "You manage the user's to-do list with the tools. Ask if something is unclear."
    task_file = "todo_tasks.yaml"  # next to this file; initial_state is {"todos": {id: {...}}, "next": n}

    @tool
    def list_todos(self) -> dict:
        """All to-dos with their status."""
        return self.state["todos"]

    @tool
    def add_todo(self, text: Annotated[str, Field(description="what to do", max_length=80)]) -> str:
        """Add a to-do; returns its id."""
        todo_id = f"t{self.state['next']}"
        self.state["next"] += 1
        self.state["todos"][todo_id] = {"text": text, "done": False}
        return todo_id

    @tool
    def complete(self, todo_id: str) -> str:
        """Mark a to-do as done."""
        if todo_id not in self.state["todos"]:
            raise ToolError(f"no to-do {todo_id}")  # the model sees "Error: no to-do t9"
        self.state["todos"][todo_id]["done"] = True
        return "ok"
