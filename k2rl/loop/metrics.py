"""Per-step metrics: metrics.jsonl (one line per step), TensorBoard events, and PNG plots."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

PLOTS = {
    "reward.png": ("reward", ["reward/total", "reward/verifiable", "reward/rubric", "eval/success"]),
    "success.png": ("success rate", ["rollout/success", "eval/success"]),
    "kinds.png": ("action-task success and wrong refusals (dashed: baselines)",
                  ["eval/success_action", "eval/wrong_refusal", "rollout/success_action", "rollout/wrong_refusal"]),
    "time.png": ("seconds per phase", ["time/rollout", "time/judge", "time/train", "time/sync",
                                        "time/offload", "time/reload", "time/wake", "time/step"]),
}

BASELINE_PLOTS = {"success.png", "kinds.png"}  # with the model-free baselines' eval figures as dashed lines

# Redrawing the PNGs takes ~0.25 s (a GPU demo's SFT log, 2 CPU cores), against a GPU SFT step of
# 0.57 s: per step it cost ~1.3 min of the GPU demo. So plots follow evaluations, at most a minute
# behind otherwise, and are drawn in full when the log closes.
PLOT_EVERY_S = 60.0


class MetricsLog:
    """Append-only step metrics. On resume, lines past the checkpoint's step are dropped so the curve
    continues without duplicates."""

    def __init__(self, run_dir: Path, tensorboard: bool = True, plots: bool = True, resume_step: int | None = None):
        self.path = run_dir / "metrics.jsonl"
        self.plot_dir = run_dir / "plots"
        self.rows: list[dict] = []
        if self.path.exists():
            self.rows = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
            if resume_step is not None:
                self.rows = [r for r in self.rows if r["step"] <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in self.rows))
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step + 1 if resume_step is not None else None)
        self.plots = plots
        self._plotted_at = -math.inf

    def log(self, step: int, metrics: dict[str, float]) -> None:
        row = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        self.rows.append(row)
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.writer is not None:
            for key, value in metrics.items():
                if math.isfinite(value):
                    self.writer.add_scalar(key, value, step)
            self.writer.flush()
        if self.plots and (any(k.startswith("eval/") for k in metrics)
                           or time.monotonic() - self._plotted_at >= PLOT_EVERY_S):
            self.plot()

    def plot(self) -> None:
        self._plotted_at = time.monotonic()
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        self.plot_dir.mkdir(parents=True, exist_ok=True)
        for filename, (title, keys) in PLOTS.items():
            fig, ax = plt.subplots(figsize=(7, 4))
            drawn = False
            for key in keys:
                points = [(r["step"], r[key]) for r in self.rows if key in r and math.isfinite(r[key])]
                if points:
                    ax.plot(*zip(*points), marker="o" if len(points) < 30 else None, label=key)
                    drawn = True
            if filename in BASELINE_PLOTS:
                drawn = self._baseline_lines(ax, keys) or drawn
            ax.set_title(title)
            ax.set_xlabel("step")
            if drawn:
                ax.legend(fontsize=8)
            fig.tight_layout()
            fig.savefig(self.plot_dir / filename, dpi=80)
            plt.close(fig)

    def _baseline_lines(self, ax, keys: list[str]) -> bool:
        """Horizontal lines for the baselines' eval figures (baseline/NAME/FIGURE, logged at step 0)."""
        figures = {k.split("/", 1)[1] for k in keys if k.startswith("eval/")}
        values = {k: v for r in self.rows for k, v in r.items()
                  if k.startswith("baseline/") and k.rsplit("/", 1)[1] in figures and math.isfinite(v)}
        for key, value in sorted(values.items()):
            ax.axhline(value, linestyle="--", linewidth=1, color=f"C{len(ax.lines) % 10}", label=key)
        return bool(values)

    def close(self) -> None:
        if self.plots and self.rows:
            self.plot()
        if self.writer is not None:
            self.writer.close()
