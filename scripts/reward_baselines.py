"""Expected reward per task of the model-free baselines under the DEFAULT reward weights, per built-in
domain and task kind: does declining everything, or doing nothing, pay? (docs/rewards.md)

    python scripts/reward_baselines.py [--tasks 300] [--seed 0] [--tokenizer MODEL_DIR]

Without --tokenizer the project's own BPE tokenizer is built in a temporary directory (the figures do
not depend on the tokenizer: the baselines' turns are fixed text)."""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from k2rl.config import RewardWeights
from k2rl.env import load_env
from k2rl.model.chat import ChatTokenizer
from k2rl.rollout import BASELINES, run_baseline, summarize

DOMAINS = ("shop", "bank", "airline", "calendar")


def scratch_chat(directory: str) -> ChatTokenizer:
    from k2rl.model.presets import preset_config
    from k2rl.model.tokenizer import save_tokenizer, train_tokenizer

    config = preset_config("k2-tiny")
    save_tokenizer(train_tokenizer(config["vocab_size"]), Path(directory), config["max_position_embeddings"])
    return ChatTokenizer(directory)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=300, help="tasks per domain")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokenizer", help="model directory whose tokenizer to use")
    args = parser.parse_args()
    weights = RewardWeights()
    print(f"default weights: {weights.model_dump()}; {args.tasks} tasks per domain, seed {args.seed}")
    print("E[reward] per task (all / action tasks / refuse tasks); success on action tasks; wrong refusals")
    with tempfile.TemporaryDirectory() as tmp:
        chat = ChatTokenizer(args.tokenizer) if args.tokenizer else scratch_chat(tmp)
        for domain in DOMAINS:
            env_cls = load_env(domain)
            tasks = env_cls.tasks(args.tasks, seed=args.seed)
            refuse_share = sum(t.kind == "refuse" for t in tasks) / len(tasks)
            print(f"\n{domain}: {len(tasks)} tasks, {refuse_share:.0%} refuse tasks")
            print(f"  {'policy':8} {'E[r]':>7} {'action':>7} {'refuse':>7} {'ok_act':>7} {'wrong_ref':>9}")
            for name in BASELINES:
                trajectories = run_baseline(name, chat, env_cls, tasks)
                by_kind = {kind: summarize([t for t in trajectories if t.kind == kind], weights)["reward"]
                           for kind in ("action", "refuse")}
                s = summarize(trajectories, weights)
                print(f"  {name:8} {s['reward']:7.3f} {by_kind['action']:7.3f} {by_kind['refuse']:7.3f} "
                      f"{s.get('success_action', 0.0):7.1%} {s['wrong_refusal']:9.1%}")


if __name__ == "__main__":
    main()
