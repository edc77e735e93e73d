"""A live one-line view of the run (rich): step, phase, reward, success, tokens/s, ETA."""
from __future__ import annotations

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class RunProgress:
    def __init__(self, total_steps: int, start_step: int, enabled: bool = True):
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[phase]:<8} reward {task.fields[reward]:>6} success {task.fields[success]:>6} "
                       "{task.fields[tps]:>7} tok/s"),
            TimeElapsedColumn(), TimeRemainingColumn(), disable=not enabled)
        self.task = self.progress.add_task("step", total=total_steps, completed=start_step, phase="start",
                                           reward="-", success="-", tps="-")

    def __enter__(self):
        self.progress.start()
        return self

    def __exit__(self, *exc):
        self.progress.stop()

    def phase(self, name: str) -> None:
        self.progress.update(self.task, phase=name)

    def step_done(self, metrics: dict[str, float]) -> None:
        fmt = lambda key: f"{metrics[key]:.3f}" if key in metrics else "-"  # noqa: E731
        self.progress.update(self.task, advance=1, reward=fmt("reward/total"), success=fmt("rollout/success"),
                             tps=f"{metrics.get('perf/tokens_per_s', 0):.0f}")
