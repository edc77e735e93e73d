"""k2rl eval --env NAME --model DIR_OR_URL [--tasks N]: roll out an environment's tasks and score them,
beside the model-free baselines (refuse, nothing, oracle) on the same tasks, split by task kind.
`--baseline NAME` runs one baseline alone; `--episodes FILE` summarises an episode file written before."""
from __future__ import annotations

import json
import time
from pathlib import Path

from k2rl.commands import add_set_argument
from k2rl.rollout.baselines import BASELINES
from k2rl.validation import ValidationFailed

NAME = "eval"
HELP = ("run an environment's tasks with a model (local dir or OpenAI-compatible URL) and report success per task "
        "kind beside the model-free baselines (refuse, nothing, oracle)")


def add_arguments(parser) -> None:
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="model directory (in-process vLLM) or http(s):// URL of an OpenAI-compatible "
                                     "server (vLLM's /v1/completions with token-id prompts)")
    src.add_argument("--baseline", choices=BASELINES, help="a model-free policy instead of a model: refuse (declines "
                                                            "every turn), nothing (never acts) or oracle (the "
                                                            "reference solutions)")
    src.add_argument("--oracle", action="store_const", const="oracle", dest="baseline", help="= --baseline oracle")
    src.add_argument("--episodes", help="summarise this episode JSONL (written by k2rl eval) instead of running")
    parser.add_argument("--env", help="built-in name, package.module:Class, path/to/file.py:Class or entry point "
                                      "(default: env.name of --config)")
    parser.add_argument("--config", help="job YAML: its env section and rollout settings are the defaults")
    add_set_argument(parser, "env.max_turns=4")
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
    parser.add_argument("--summary", help="also write the summary table (model and baseline columns) as JSON here")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args) -> int:
    from k2rl.config import load_config
    from k2rl.env import EnvFactory

    config = load_config(args.config, [*_flag_overrides(args), *args.overrides])
    weights = config.rewards.weights
    if args.episodes:
        trajectories = _read_episodes(args.episodes)
        _report(trajectories[0].env, {Path(args.episodes).stem: trajectories}, weights, args.summary)
        return 0
    env_cfg = config.env
    factory = EnvFactory(env_cfg)  # a bad --env (env.name) is named there
    tasks = factory.tasks(args.tasks if args.tasks is not None else env_cfg.eval_tasks,
                          args.seed if args.seed is not None else env_cfg.eval_seed)
    out = Path(args.out or Path(config.run.output_dir) / "eval" /
               f"{factory.env_cls.name}-{time.strftime('%Y%m%d-%H%M%S')}.jsonl")
    trajectories, chat = _rollout(args, config, factory, tasks)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as fh:
        for trajectory in trajectories:
            fh.write(json.dumps(trajectory.to_dict(), ensure_ascii=False) + "\n")
    columns = {args.baseline or "model": trajectories}
    if args.model:
        columns.update(_baselines(config, factory, tasks, chat))
    _report(factory.env_cls.name, columns, weights, args.summary)
    print(f"episodes written to {out}")
    return 0


def _read_episodes(path: str):
    from k2rl.rollout import Trajectory

    if not Path(path).exists():
        raise ValidationFailed(f"--episodes {path}: file not found")
    trajectories = []
    for lineno, line in enumerate(Path(path).read_text().splitlines(), 1):
        if line.strip():
            try:
                trajectories.append(Trajectory.from_dict(json.loads(line)))
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise ValidationFailed(f"{path}:{lineno}: not an episode written by k2rl eval ({err}); each line "
                                       f"is Trajectory.to_dict()") from None
    if not trajectories:
        raise ValidationFailed(f"--episodes {path}: no episodes in the file")
    return trajectories


def _baselines(config, factory, tasks, chat) -> dict:
    """The model-free baselines on the same tasks (oracle only when every task has a reference solution)."""
    from k2rl.rollout import Limits, run_baseline
    from k2rl.rollout.baselines import baselines_for

    limits = Limits.from_config(config.env, config.algorithm.max_new_tokens, config.rollout.max_model_len)
    return {name: run_baseline(name, chat, factory, tasks, limits) for name in baselines_for(tasks)}


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
    """(trajectories, chat tokenizer) of the model, or of `--baseline` (one episode per task and sample)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from k2rl.engines.types import SamplingConfig
    from k2rl.model.chat import ChatTokenizer
    from k2rl.rollout import Limits, run_baseline, run_episodes

    limits = Limits.from_config(config.env, config.algorithm.max_new_tokens, config.rollout.max_model_len)
    if args.baseline:
        chat = ChatTokenizer(args.tokenizer or _default_tokenizer_dir(config))
        return run_baseline(args.baseline, chat, factory, [t for t in tasks for _ in range(args.samples)], limits), chat
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("ok {task.fields[ok]}"),
               TimeElapsedColumn()]
    with Progress(*columns, disable=args.quiet) as progress:
        bar = progress.add_task(f"eval {factory.env_cls.name}", total=len(tasks) * args.samples, ok=0)

        def done(trajectory):
            progress.update(bar, advance=1, ok=progress.tasks[bar].fields["ok"] + trajectory.success)

        policy, chat = _policy(args, config)
        # no per-request seed: it would make every sample of a task the same (the engine is seeded instead)
        sampling = SamplingConfig(temperature=args.temperature, top_p=args.top_p)
        return run_episodes(policy, chat, factory, tasks, sampling=sampling, limits=limits,
                            samples_per_task=args.samples, on_done=done), chat


def _policy(args, config):
    from k2rl.model.chat import ChatTokenizer

    if args.model.startswith(("http://", "https://")):
        import openai

        from k2rl.rollout.policy import EndpointPolicy, served_model

        model = served_model(openai.OpenAI(base_url=args.model, api_key="EMPTY"))
        tokenizer = args.tokenizer or model
        if not Path(tokenizer, "tokenizer_config.json").exists():
            raise ValidationFailed(f"--tokenizer: the endpoint serves {model!r}, not a local directory; "
                                   f"pass --tokenizer DIR with the model's tokenizer files")
        chat = ChatTokenizer(tokenizer)
        return EndpointPolicy(args.model, chat, model=model), chat
    from k2rl.engines.rollout import RolloutEngine

    chat = ChatTokenizer(args.model)
    engine = RolloutEngine.from_config(args.model, config.rollout, config.model, seed=config.run.seed)
    return engine, chat


def _default_tokenizer_dir(config) -> str:
    if config.model.path:
        return config.model.path
    raise ValidationFailed("--baseline/--oracle needs --tokenizer DIR (a model directory) or model.path in --config")


# (label, summary key, format): the per-kind figures first, then the rest
_ROWS = [("episodes", "episodes", "d"), ("success_rate", "success_rate", ".3f"),
         ("success_action", "success_action", ".3f"), ("success_refuse", "success_refuse", ".3f"),
         ("wrong_refusal", "wrong_refusal", ".3f"), ("tool_calls/episode", "tool_calls_per_episode", ".2f"),
         ("tool_call_validity", "tool_call_validity", ".3f"), ("reward", "reward", ".3f"),
         ("process_score", "process_score", ".3f"), ("avg_turns", "avg_turns", ".2f"),
         ("avg_generated_tokens", "avg_generated_tokens", ".1f"), ("truncated_rate", "truncated_rate", ".3f"),
         ("tool_calls", "tool_calls", "d"), ("env_failures", "env_failures", "d"),
         ("pass@k_action", "pass_at_k_action", ".3f"), ("mixed_action", "mixed_action", ".3f")]


def _report(env_name: str, columns: dict, weights, summary_path: str | None) -> None:
    """One table: a row per figure, a column per policy (the first is what was evaluated; then the
    baselines on the same tasks). `reward` is the mean under the config's reward weights, no rubric."""
    from rich.console import Console
    from rich.table import Table

    from k2rl.rollout import sample_groups, success_by_tag, summarize

    summaries = {name: summarize(trajectories, weights) for name, trajectories in columns.items()}
    for name, trajectories in columns.items():
        summaries[name]["success_by_tag"] = success_by_tag(trajectories)
        summaries[name].update(sample_groups(trajectories))  # --samples > 1: pass@k and RL's headroom
    rows = [(label, [_cell(s.get(key), fmt) for s in summaries.values()]) for label, key, fmt in _ROWS]
    for group, key in (("errors", "errors"), ("end", "end_reasons"), ("success", "success_by_tag"),
                       ("pass@k", "pass_at_k_by_tag"), ("mixed", "mixed_by_tag")):
        names = sorted({k for s in summaries.values() for k in s.get(key, {})})
        fmt = "d" if key in ("errors", "end_reasons") else ".3f"
        rows += [(f"{group}/{n}", [_cell(s.get(key, {}).get(n), fmt) for s in summaries.values()]) for n in names]
    first = next(iter(summaries.values()))
    table = Table(title=f"k2rl eval: {env_name}", caption=f"{first['episodes']} episodes: {first['action_episodes']} "
                                                          f"action, {first['refuse_episodes']} refuse tasks")
    table.add_column("metric")
    for name in summaries:
        table.add_column(name, justify="right")
    for label, cells in rows:
        table.add_row(label, *cells)
    Console(width=max(100, 24 + 12 * len(summaries))).print(table)
    if summary_path:
        Path(summary_path).parent.mkdir(parents=True, exist_ok=True)
        Path(summary_path).write_text(json.dumps(summaries, indent=2) + "\n")


def _cell(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)
