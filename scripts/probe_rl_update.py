"""How RL updates move a checkpoint's own samples: the mean change in sequence logprob of the successful
and the failed samples of mixed groups, after each of a few updates on one batch.

    k2rl eval --config C --model M --samples 8 --temperature 0.7 --out eps.jsonl
    python scripts/probe_rl_update.py --config C --model M --episodes eps.jsonl [--set algorithm.tau=1.0 ...]

Why: a group baseline learns only from tasks whose samples disagree, and one update can lower the failed
samples far faster than it raises the successful ones (the freed mass goes to sequences no sample
showed). The run's Objective and optimizer on a TrainEngine in this process, as a worker would run
them; `--set` tries another lr, tau or epoch count without a run.
"""
import argparse
import collections
import json
from pathlib import Path

import torch

from k2rl.commands import add_set_argument
from k2rl.config import load_config
from k2rl.engines.train import TrainEngine
from k2rl.engines.world import single_rank_world
from k2rl.loop.data import trajectory_batch
from k2rl.loop.objective import Objective
from k2rl.loop.scoring import advantages
from k2rl.rewards.combine import combine
from k2rl.rollout import Trajectory


def mixed_groups(path: str, limit: int) -> list[list[Trajectory]]:
    groups = collections.defaultdict(list)
    for line in Path(path).read_text().splitlines():
        t = Trajectory.from_dict(json.loads(line))
        groups[t.task_id].append(t)
    mixed = [g for g in groups.values() if len({t.success for t in g}) > 1]
    if not mixed:
        raise SystemExit(f"{path}: no task whose samples disagree (write it with k2rl eval --samples K > 1 and a "
                         "temperature)")
    return mixed[:limit]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="the RL job's YAML (objective, optimizer, reward weights)")
    parser.add_argument("--model", required=True, help="the checkpoint the episodes were sampled from")
    parser.add_argument("--episodes", required=True, help="k2rl eval --samples K output of that checkpoint")
    parser.add_argument("--groups", type=int, default=16, help="mixed groups in the batch")
    add_set_argument(parser)
    args = parser.parse_args()
    single_rank_world()

    job = load_config(args.config, args.overrides)
    algo = job.algorithm
    groups = mixed_groups(args.episodes, args.groups)
    k = len(groups[0])
    if any(len(g) != k for g in groups):
        raise SystemExit(f"{args.episodes}: tasks carry different sample counts; one k2rl eval run has one K")
    trajectories = [t for g in groups for t in g]
    rewards = [combine(t.reward_parts(), job.rewards.weights) for t in trajectories]
    adv = torch.tensor(advantages(rewards, k, algo))
    success = torch.tensor([t.success for t in trajectories])
    masks = [torch.tensor(t.loss_mask, dtype=torch.float32) for t in trajectories]

    engine = TrainEngine(args.model, job)
    batch = trajectory_batch(trajectories, adv.tolist())
    objective = Objective(algo)

    def sequence_logprobs(token_logprobs: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack([(lp * m).sum() for lp, m in zip(token_logprobs, masks)])

    old = engine.logprobs(batch)
    before = sequence_logprobs(old)
    if algo.epochs_per_step > 1:  # as the trainer does: later epochs measure their ratio against these
        batch.token_data["old_logprobs"] = old
    print(f"{len(groups)} mixed groups x {k} samples, {int(success.sum())} successful; {job.optimizer.name} lr "
          f"{job.optimizer.lr}, {algo.name} tau {algo.tau}, {algo.epochs_per_step} update(s) on the batch")
    for epoch in range(1, algo.epochs_per_step + 1):
        engine.train_step(batch, objective)
        change = sequence_logprobs(engine.logprobs(batch)) - before
        corr = float(torch.corrcoef(torch.stack([adv, change]))[0, 1])
        print(f"update {epoch}: sequence logprob change, successful {float(change[success].mean()):+.3f}, "
              f"failed {float(change[~success].mean()):+.3f} nats; corr(advantage, change) {corr:+.3f}")


if __name__ == "__main__":
    main()
