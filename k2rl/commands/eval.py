"""k2rl eval --env NAME --model DIR_OR_URL [--tasks N]: roll out an environment's tasks and score them."""
from __future__ import annotations

import json
import time
from pathlib import Path

NAME = "eval"
HELP = "run an environment's tasks with a model (local dir or OpenAI-compatible URL) and report success"


def add_arguments(parser) -> None:
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="model directory (in-process vLLM) or http(s):// URL of an OpenAI-compatible "
                                     "server (vLLM's /v1/completions with token-id prompts)")
    src.add_argument("--oracle", action="store_true", help="replay the tasks' reference solutions instead of a model")
    parser.add_argument("--env", help="built-in name, package.module:Class, path/to/file.py:Class or entry point "
                                      "(default: env.name of --config)")
    parser.add_argument("--config", help="job YAML: its env section and rollout settings are the defaults")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, e.g. --set env.max_turns=4")
    parser.add_argument("--tasks", type=int, help="number of tasks (default env.eval_tasks)")
    parser.add_argument("--task-file", help="JSONL/YAML tasks instead of the environment's own")
    parser.add_argument("--seed", type=int, help="task seed (default env.eval_seed)")
    parser.add_argument("--samples", type=int, default=1, help="episodes per task")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", type=int, help="per turn (default algorithm.max_new_tokens)")
    parser.add_argument("--tokenizer", help="model directory with the tokenizer (URL mode; default: the served "
                                            "model name, if it is a local directory)")
    parser.add_argument("--out", help="episodes JSONL (default runs/eval/ENV-TIME.jsonl)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args) -> int:
    from k2rl.config import load_config
    from k2rl.env import EnvFactory
    from k2rl.validation import ValidationFailed

    config = load_config(args.config, [*_flag_overrides(args), *args.overrides])
    env_cfg = config.env
    try:
        factory = EnvFactory(env_cfg)
    except ValueError as err:
        raise ValidationFailed(f"--env: {err}") from None
    tasks = factory.tasks(args.tasks if args.tasks is not None else env_cfg.eval_tasks,
                          args.seed if args.seed is not None else env_cfg.eval_seed)
    out = Path(args.out or Path(config.run.output_dir) / "eval" /
               f"{factory.env_cls.name}-{time.strftime('%Y%m%d-%H%M%S')}.jsonl")
    trajectories = _rollout(args, config, factory, tasks)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as fh:
        for trajectory in trajectories:
            fh.write(json.dumps(trajectory.to_dict(), ensure_ascii=False) + "\n")
    _report(factory.env_cls.name, trajectories, tasks, out)
    return 0


def _flag_overrides(args) -> list[str]:
    sets = []
    if args.env:
        sets.append(f"env.name={args.env}")
    if args.task_file:
        sets.append(f"env.task_file={args.task_file}")
    if args.max_new_tokens:
        sets.append(f"algorithm.max_new_tokens={args.max_new_tokens}")
    return sets


def _rollout(args, config, factory, tasks):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from k2rl.engines.types import SamplingConfig
    from k2rl.model.chat import ChatTokenizer
    from k2rl.rollout import Limits, oracle_trajectory, run_episodes

    limits = Limits.from_config(config.env, config.algorithm.max_new_tokens, config.rollout.max_model_len)
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("ok {task.fields[ok]}"),
               TimeElapsedColumn()]
    with Progress(*columns, disable=args.quiet) as progress:
        bar = progress.add_task(f"eval {factory.env_cls.name}", total=len(tasks) * args.samples, ok=0)

        def done(trajectory):
            progress.update(bar, advance=1, ok=progress.tasks[bar].fields["ok"] + trajectory.success)

        if args.oracle:
            chat = ChatTokenizer(args.tokenizer or _default_tokenizer_dir(config))
            trajectories = []
            for task in tasks:
                for _ in range(args.samples):
                    trajectories.append(oracle_trajectory(factory(), task, chat, limits))
                    done(trajectories[-1])
            return trajectories
        policy, chat = _policy(args, config)
        # no per-request seed: it would make every sample of a task the same (the engine is seeded instead)
        sampling = SamplingConfig(temperature=args.temperature, top_p=args.top_p)
        return run_episodes(policy, chat, factory, tasks, sampling=sampling, limits=limits,
                            samples_per_task=args.samples, on_done=done)


def _policy(args, config):
    from k2rl.model.chat import ChatTokenizer

    if args.model.startswith(("http://", "https://")):
        import openai

        from k2rl.rollout import EndpointPolicy

        model = openai.OpenAI(base_url=args.model, api_key="EMPTY").models.list().data[0].id
        tokenizer = args.tokenizer or model
        if not Path(tokenizer, "tokenizer_config.json").exists():
            raise SystemExit(f"--tokenizer: the endpoint serves {model!r}, not a local directory; "
                             f"pass --tokenizer DIR with the model's tokenizer files")
        chat = ChatTokenizer(tokenizer)
        return EndpointPolicy(args.model, chat, model=model), chat
    from k2rl.engines.rollout import RolloutEngine

    chat = ChatTokenizer(args.model)
    engine = RolloutEngine.from_config(args.model, config.rollout, dtype=config.model.dtype, seed=config.run.seed)
    return engine, chat


def _default_tokenizer_dir(config) -> str:
    if config.model.path:
        return config.model.path
    raise SystemExit("--oracle needs --tokenizer DIR (a model directory) or model.path in --config")


def _report(env_name, trajectories, tasks, out) -> None:
    from rich.console import Console
    from rich.table import Table

    from k2rl.rollout import success_by_tag, summarize

    summary = summarize(trajectories)
    table = Table(title=f"k2rl eval: {env_name} ({summary['episodes']} episodes)")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in ("success_rate", "process_score", "avg_turns", "avg_generated_tokens", "tool_call_validity",
                "truncated_rate"):
        table.add_row(key, f"{summary[key]:.3f}")
    table.add_row("tool_calls", str(summary["tool_calls"]))
    table.add_row("env_failures", str(summary["env_failures"]))
    for kind, count in sorted(summary["errors"].items()):
        table.add_row(f"errors/{kind}", str(count))
    for reason, count in sorted(summary["end_reasons"].items()):
        table.add_row(f"end/{reason}", str(count))
    for tag, rate in success_by_tag(trajectories, {t.id: t.tags for t in tasks}).items():
        table.add_row(f"success/{tag}", f"{rate:.3f}")
    console = Console()
    console.print(table)
    console.print(f"episodes written to {out}")
