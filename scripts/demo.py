"""The CPU demo: a small K2-architecture model learns the `shop` tools. SFT cold start on the scripted
oracle's dialogs, then RL with K2's objective on 2 colocated workers; greedy held-out evaluation split
by task kind, beside the model-free baselines on the same tasks.

    python scripts/demo.py [--seed N] [--sft-steps N] [--rl-steps N] [--eval-tasks N] [--out DIR]
    python scripts/demo.py --gpu   # k2-mini on one GPU: configs/gpu-demo-sft.yaml, configs/gpu-demo-rl.yaml
    python scripts/demo.py --resume   # after an interruption: finished stages kept, the other continued

Runs land in OUT/demo-sft-sSEED and OUT/demo-rl-sSEED (metrics.jsonl, plots/, rollouts/ with the
held-out dialogs as eval_step_N.jsonl, checkpoints/); the summary table and the per-task-type counts
go to OUT/demo-sSEED.json. With --gpu the RL stage's rollout engine is compiled beside the SFT stage
(`k2rl prewarm`, log in OUT/prewarm-sSEED.log; --no-prewarm leaves it to the RL stage).
"""
import argparse
import json
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from k2rl.commands import add_set_argument, set_arguments
from k2rl.config import load_config
from k2rl.env.kinds import task_type
from k2rl.loop.run_dir import RunDir

CONFIGS = {"cpu": ("configs/demo-sft.yaml", "configs/tiny-cpu.yaml"),
           "gpu": ("configs/gpu-demo-sft.yaml", "configs/gpu-demo-rl.yaml")}
ROWS = [("success on action tasks", "success_action"), ("wrong refusals (action tasks)", "wrong_refusal"),
        ("success on refuse tasks", "success_refuse"), ("success overall", "success"),
        ("tool calls per episode", "tool_calls"), ("valid tool calls", "tool_call_validity"),
        ("expected reward per task", "reward")]


def last_step(run: Path) -> int:
    """The step of the run's latest complete checkpoint (0 without one)."""
    found = RunDir(run).latest_state()
    return found[1]["step"] if found else 0


def k2rl(*argv: str, overrides) -> list[str]:
    """A `k2rl` command line with the config overrides as `--set` arguments."""
    return [sys.executable, "-m", "k2rl.cli", *argv, *set_arguments(overrides)]


def finished(run: Path, config: str, *overrides: str) -> bool:
    return last_step(run) >= load_config(config, list(overrides)).schedule.steps


def train(run: Path, config: str, *overrides: str, resume: bool = False) -> None:
    """One stage: `k2rl train`, or with `resume` the continuation of an interrupted one (a stage that
    finished is left as it is). A stage that stops early (SIGTERM checkpoints first) ends the demo."""
    if resume and finished(run, config, *overrides):
        print(f"{run.name}: finished earlier (step {last_step(run)}), kept", flush=True)
        return
    if resume and last_step(run):
        cmd = k2rl("train", "--resume", str(run), overrides=overrides)
    else:
        shutil.rmtree(run, ignore_errors=True)
        cmd = k2rl("train", config, overrides=overrides)
    print("$", " ".join(cmd[2:]), flush=True)
    subprocess.run(cmd, check=True)
    if not finished(run, config, *overrides):
        sys.exit(f"{run.name} stopped at step {last_step(run)}; continue with --resume")


@contextmanager
def prewarmed(config: str, log: Path, *overrides: str, enabled: bool):
    """`k2rl prewarm` of the RL stage's rollout engine while the block (the SFT stage) runs: the RL
    stage's vLLM then loads its compiled graphs and kernels instead of compiling them (~1 of a fresh
    H100's ~2 minutes of its start). On the GPU only: on a CPU the compile takes the SFT steps' cores.
    Waited for at the end, so that the RL stage does not compile into the same caches beside it."""
    if not enabled:
        yield
        return
    cmd = k2rl("prewarm", config, overrides=overrides)
    print("$", " ".join(cmd[2:]), f"> {log} &", flush=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        warm = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield
    except BaseException:
        warm.kill()
        raise
    code = warm.wait()
    last = (log.read_text().strip().splitlines() or [""])[-1]
    print(last if code == 0 else f"prewarm failed (exit {code}; {log}): the RL stage compiles its engine itself",
          flush=True)


def columns(metrics: list[dict]) -> dict[str, dict[str, float]]:
    """Per-kind figures of the SFT start (RL step 0), after RL (the last eval) and the baselines."""
    evals = [row for row in metrics if "eval/success" in row]
    pick = lambda row, prefix: {key: row[f"{prefix}/{key}"] for _, key in ROWS if f"{prefix}/{key}" in row}
    out = {"SFT start": pick(evals[0], "eval"), "after RL": pick(evals[-1], "eval")}
    for name in ("refuse", "nothing", "oracle", "teacher"):
        if f"baseline/{name}/success" in evals[0]:  # teacher: only with algorithm.teacher_declines
            out[f"baseline: {name}"] = pick(evals[0], f"baseline/{name}")
    return out


def print_table(table: dict[str, dict[str, float]], tasks: int) -> None:
    names = list(table)
    print(f"\nheld-out greedy evaluation, {tasks} shop tasks never trained on")
    print(f"{'':32}" + "".join(f"{n:>18}" for n in names))
    for label, key in ROWS:
        cells = [table[n].get(key) for n in names]
        fmt = (lambda v: f"{v:18.2f}") if key in ("tool_calls", "reward") else (lambda v: f"{v:18.1%}")
        print(f"{label:32}" + "".join(fmt(v) if v is not None else f"{'-':>18}" for v in cells))


def by_task_type(episodes_file: Path) -> dict[str, list[int]]:
    """Task type (a task's first tag) -> [solved, tasks, wrong refusals] in one held-out eval's dialogs."""
    counts: dict[str, list[int]] = {}
    for line in episodes_file.read_text().splitlines():
        episode = json.loads(line)
        row = counts.setdefault(task_type(episode["tags"]), [0, 0, 0])
        row[0] += bool(episode["success"])
        row[1] += 1
        row[2] += bool(episode["wrong_refusal"])
    return dict(sorted(counts.items()))


def print_task_types(run: Path) -> dict[str, dict[str, list[int]]]:
    """Solved / tasks per task type at the SFT start and after RL (wrong refusals in brackets): where the
    overall figures come from (the refuse baseline passes only the off-topic type)."""
    evals = sorted((run / "rollouts").glob("eval_step_*.jsonl"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
    start, end = by_task_type(evals[0]), by_task_type(evals[-1])
    print(f"\nper task type, solved / tasks (wrong refusals): {evals[0].stem} -> {evals[-1].stem}")
    for kind in start:
        (s, n, w), (e, _, v) = start[kind], end.get(kind, [0, 0, 0])
        print(f"  {kind:16} {s:3d}/{n:<3d} ({w:2d})  ->  {e:3d}/{n:<3d} ({v:2d})")
    return {"SFT start": start, "after RL": end}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seed", type=int, default=0, help="model init and sampling seed (the tasks stay the same)")
    parser.add_argument("--gpu", action="store_true", help="the GPU demo's configs (k2-mini, one GPU)")
    parser.add_argument("--sft-steps", type=int, default=None, help="default: the SFT config's")
    parser.add_argument("--rl-steps", type=int, default=None, help="default: the RL config's")
    parser.add_argument("--eval-tasks", type=int, default=200)
    parser.add_argument("--out", default="runs")
    add_set_argument(parser, "schedule.keep_checkpoints=1, for both stages")
    parser.add_argument("--resume", action="store_true",
                        help="continue interrupted stages from their last checkpoint; keep finished ones")
    parser.add_argument("--no-prewarm", dest="prewarm", action="store_false",
                        help="with --gpu: the RL stage compiles its own engine, nothing beside the SFT stage")
    args = parser.parse_args()
    start = time.time()
    sft, rl = f"demo-sft-s{args.seed}", f"demo-rl-s{args.seed}"
    sft_config, rl_config = CONFIGS["gpu" if args.gpu else "cpu"]
    common = [f"run.output_dir={args.out}", f"run.seed={args.seed}", f"model.init_seed={args.seed}", *args.overrides]
    sft_steps = [f"schedule.steps={args.sft_steps}"] if args.sft_steps else []
    sft_settings = [*common, f"run.name={sft}", *sft_steps]
    sft_to_run = not (args.resume and finished(Path(args.out) / sft, sft_config, *sft_settings))
    prewarm = args.gpu and args.prewarm and sft_to_run
    with prewarmed(rl_config, Path(args.out) / f"prewarm-s{args.seed}.log", *common, enabled=prewarm):
        train(Path(args.out) / sft, sft_config, *sft_settings, resume=args.resume)
    sft_model = RunDir(Path(args.out) / sft).latest() / "model"
    rl_steps = [f"schedule.steps={args.rl_steps}"] if args.rl_steps else []
    train(Path(args.out) / rl, rl_config, *common, f"run.name={rl}", f"model.path={sft_model}", *rl_steps,
          f"env.eval_tasks={args.eval_tasks}", resume=args.resume)

    metrics = [json.loads(line) for line in (Path(args.out) / rl / "metrics.jsonl").read_text().splitlines()]
    table = columns(metrics)
    print_table(table, args.eval_tasks)
    task_types = print_task_types(Path(args.out) / rl)
    minutes = (time.time() - start) / 60
    summary = {"seed": args.seed, "minutes": round(minutes, 1), "eval_tasks": args.eval_tasks, "table": table,
               "task_types": task_types}
    (Path(args.out) / f"demo-s{args.seed}.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\ndemo took {minutes:.1f} min; plots in {Path(args.out) / rl / 'plots'}; held-out dialogs in "
          f"{Path(args.out) / rl / 'rollouts'}/eval_step_*.jsonl")


if __name__ == "__main__":
    main()
