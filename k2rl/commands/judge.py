"""k2rl judge --rubric NAME --input episodes.jsonl --endpoint URL [--out scores.jsonl]

Each input line is an episode: {"task": str, "messages": [chat messages], "id"?: str,
"criteria"?: [task-specific criteria], "group"?: str}. With --pairwise, episodes sharing a "group"
(default: the same task) are compared pairwise. Each output line: id, group, score, criteria,
reasons, failed.
"""
from __future__ import annotations

import json
from pathlib import Path

NAME = "judge"
HELP = "score episodes (JSONL) against a rubric with an OpenAI-compatible judge endpoint"


def add_arguments(parser) -> None:
    parser.add_argument("--rubric", required=True, help="rubric name in rubrics/ (core, prescriptive, tool_use) or a path")
    parser.add_argument("--input", required=True, help="episodes JSONL")
    parser.add_argument("--endpoint", required=True, help="base URL, e.g. http://127.0.0.1:8000/v1")
    parser.add_argument("--out", help="scores JSONL (default: INPUT with .scores.jsonl)")
    parser.add_argument("--model", help="model name (default: the endpoint's first model)")
    parser.add_argument("--api-key", default="EMPTY")
    parser.add_argument("--pairwise", action="store_true", help="compare episodes of a group pairwise")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per call")
    parser.add_argument("--retries", type=int, default=3)
    parser.add_argument("--default-score", type=float, default=0.0, help="score when the judge fails")
    parser.add_argument("--reason-chars", type=int, default=200)
    parser.add_argument("--cache-dir", help="on-disk response cache shared across runs")


def _read_episodes(path: Path):
    import pydantic

    from k2rl.rewards import Episode
    from k2rl.validation import ValidationFailed, describe_errors

    if not path.exists():
        raise ValidationFailed(f"--input {path}: file not found")
    episodes, groups = [], []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            episodes.append(Episode.model_validate({k: v for k, v in row.items() if k != "group"}))
        except pydantic.ValidationError as err:
            raise ValidationFailed(describe_errors(err, Episode, f"{path}:{n}")) from None
        except (ValueError, AttributeError) as err:  # not JSON, or not an object
            raise ValidationFailed(f"{path}:{n}: not a JSON object: {err}") from None
        groups.append(str(row.get("group", row.get("task"))))
        if episodes[-1].id is None:
            episodes[-1].id = str(n)
    return episodes, groups


def run(args) -> int:
    from k2rl.config import JudgeConfig
    from k2rl.rewards import make_judge

    source = Path(args.input)
    episodes, group_keys = _read_episodes(source)
    config = JudgeConfig(mode="endpoint", base_url=args.endpoint, model=args.model, api_key=args.api_key,
                         rubric=args.rubric, pairwise=args.pairwise, concurrency=args.concurrency,
                         timeout_s=args.timeout, retries=args.retries, default_score=args.default_score,
                         reason_chars=args.reason_chars, cache_dir=args.cache_dir)
    scorer = make_judge(config)
    order = list(dict.fromkeys(group_keys)) if args.pairwise else list(range(len(episodes)))
    members = ([[i for i, k in enumerate(group_keys) if k == key] for key in order] if args.pairwise
               else [[i] for i in order])
    batch = scorer.score_groups([[episodes[i] for i in m] for m in members])
    out = Path(args.out) if args.out else source.with_suffix(".scores.jsonl")
    with out.open("w") as f:
        for m, scores in zip(members, batch.scores):
            for i, s in zip(m, scores):
                f.write(json.dumps({"id": episodes[i].id, "group": group_keys[i], "score": s.score,
                                    "criteria": s.criteria, "reasons": s.reasons, "failed": s.failed}) + "\n")
    mean = sum(s.score for g in batch.scores for s in g) / max(1, len(episodes))
    print(f"scored {len(episodes)} episodes with rubric {scorer.rubric.name}: mean {mean:.3f}, "
          f"{batch.calls} judge calls, {batch.failures} failed, {batch.cache_hits} cached -> {out}")
    return 1 if batch.failures and batch.failures == batch.calls else 0
