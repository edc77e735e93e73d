"""The controller of `k2rl train`: tasks -> rollouts -> rewards -> update -> weight sync, with
checkpoints, resume, held-out evaluation, metrics and a live progress line.

The driver holds no model: generation, logprobs and updates run on the workers (`WorkerGroup`);
the driver runs the agent loop (environments are cheap Python) and the judge client.
"""
from __future__ import annotations

import math
import signal
import time
from dataclasses import asdict
from pathlib import Path

import torch

from k2rl.config import JobConfig
from k2rl.engines.types import ROUTED_EXPERTS, SamplingConfig, concat_batches
from k2rl.env.factory import EnvFactory
from k2rl.loop.ahead import Ahead
from k2rl.loop.data import load_sft_file, sft_batch, trajectory_batch
from k2rl.loop.metrics import MetricsLog
from k2rl.loop.objective import Objective
from k2rl.loop.priority import TypePriority
from k2rl.loop.progress import RunProgress
from k2rl.loop.run_dir import RunDir, load_rng_state, save_rng_state
from k2rl.loop.scoring import advantages, informative_groups, score
from k2rl.loop.tasks import TaskStream, check_first_turn_fits, check_task_types, held_out_tasks
from k2rl.model.chat import ChatTokenizer
from k2rl.rewards.judge import make_judge, rubric_for
from k2rl.rollout import Limits, kind_metrics, oracle_trajectory, run_baseline, run_episodes, summarize, teacher_declines
from k2rl.rollout.baselines import baselines_for
from k2rl.validation import ValidationFailed
from k2rl.algo import temperature_at


class Trainer:
    def __init__(self, config: JobConfig, model_dir: str | Path, run_dir: RunDir, state: dict | None = None):
        """Reads and checks every input the run names (environment, tasks, task types, rubric, PTX data)
        before any worker starts, so bad input fails in seconds, not after the workers' start-up;
        `run(group)` then trains on the workers. `state`: a checkpoint's trainer state when resuming
        (step, task cursor, success per task type)."""
        self.config, self.run_dir = config, run_dir
        state = state or {}
        self.model_dir = Path(model_dir)
        self.chat = ChatTokenizer(model_dir)
        self.make_env = EnvFactory(config.env)
        self.step = state.get("step", 0)
        self.tasks = TaskStream(self.make_env, config.env.train_seed, state.get("cursor", 0), config.env.train_tasks)
        if config.algorithm.teacher_declines:
            check_task_types(self.make_env, config.env.train_seed, config.algorithm.teacher_declines,
                             "algorithm.teacher_declines")
        self.priority = (TypePriority(config.algorithm.samples_per_task, state.get("type_success"))
                         if config.algorithm.task_sampling == "prioritized" else None)
        self.eval_tasks = held_out_tasks(self.make_env, config.env.eval_tasks, config.env.eval_seed)
        check_first_turn_fits(self.make_env, config.env.train_seed, self.chat, config.algorithm.max_new_tokens,
                              config.rollout.max_model_len)
        self.objective = Objective(config.algorithm)
        self.limits = Limits.from_config(config.env, config.algorithm.max_new_tokens, config.rollout.max_model_len)
        self.rubric = rubric_for(config.rewards.judge)  # None when the judge is off
        algo = config.algorithm
        self.ptx = (load_sft_file(algo.ptx_dataset, self.chat, "algorithm.ptx_dataset")
                    if algo.ptx_coef > 0 and algo.ptx_dataset != "oracle" else [])
        self.stop_requested = False
        # bound by run(group): the workers, the judge (the policy itself may be it) and the run's logs
        self.group = self.judge = self.metrics = self.sft_data = None

    # ---- one step ----------------------------------------------------------------------------------
    def rollout(self, tasks, samples: int, temperature: float):
        # Seeded by run seed and step, so a resumed run samples exactly what the uninterrupted one did.
        seed = (self.config.run.seed * 1_000_003 + self.step * 7919) % 2**31
        self.group.to_rollout()  # no-op in rl_step; evaluations after an update switch here
        sampling = SamplingConfig(temperature=temperature, seed=seed, stop_token_ids=self.chat.stop_ids)
        return run_episodes(self.group, self.chat, self.make_env, tasks, sampling=sampling, limits=self.limits,
                            samples_per_task=samples)

    def rl_step(self) -> dict[str, float]:
        cfg = self.config
        algo = cfg.algorithm
        temperature = temperature_at(self.step, algo.temperature)
        tasks = self.tasks.next(math.ceil(algo.tasks_per_step * algo.oversample), self.priority)
        t0 = time.perf_counter()
        self.group.to_rollout()  # the last update's weights go to vLLM
        t_switch = time.perf_counter()
        trajectories = self.rollout(tasks, algo.samples_per_task, temperature)
        t_rollout = time.perf_counter()
        rewards, reward_metrics = score(trajectories, {t.id: t.goal for t in tasks}, algo.samples_per_task,
                                        cfg.rewards.weights, self.judge)
        t_judge = time.perf_counter()
        if self.priority is not None:
            self.priority.update(trajectories)
        informative = informative_groups(rewards, algo.samples_per_task, len(tasks))  # all a group baseline learns from
        train_stats = self._update(*self._groups_to_train(trajectories, rewards, informative))
        reward_metrics["rollout/groups_trained"] = float(train_stats.pop("groups", 0))
        reward_metrics["rollout/informative_groups"] = float(len(informative))
        t_end = time.perf_counter()
        self._save_rollouts(trajectories, rewards)
        summary = summarize(trajectories)
        generated = sum(t.stats.generated_tokens for t in trajectories)
        return {
            **reward_metrics, **kind_metrics(summary, "rollout"),  # success (per kind), wrong_refusal, tool calls
            "rollout/process_score": summary["process_score"],
            "rollout/avg_turns": summary["avg_turns"], "rollout/generated_tokens": summary["avg_generated_tokens"],
            "rollout/truncated_rate": summary["truncated_rate"],
            "rollout/env_failures": summary["env_failures"], "rollout/temperature": temperature,
            "rollout/length_tokens": sum(len(t.token_ids) for t in trajectories) / len(trajectories),
            **_prefixed(train_stats), **self._worker_stats(), **(self.priority.metrics() if self.priority else {}),
            "time/switch": t_switch - t0, "time/rollout": t_rollout - t_switch, "time/judge": t_judge - t_rollout,
            "time/step": t_end - t0, "perf/tokens_per_s": generated / max(t_rollout - t_switch, 1e-9),
        }

    def _groups_to_train(self, trajectories: list, rewards: list, informative: list[int]) -> tuple[list, list]:
        """All groups, or with `filter_groups` the first tasks_per_step of the `informative` ones (rewards
        differ)."""
        algo = self.config.algorithm
        if not algo.filter_groups:
            return trajectories, rewards
        k = algo.samples_per_task
        rows = [g * k + i for g in informative[:algo.tasks_per_step] for i in range(k)]
        return [trajectories[r] for r in rows], [rewards[r] for r in rows]

    def _update(self, trajectories: list, rewards: list) -> dict[str, float]:
        """One policy update on these groups (none when filtering left none: no step, no sync)."""
        algo = self.config.algorithm
        if not trajectories:
            return {}
        batch = trajectory_batch(trajectories, advantages(rewards, algo.samples_per_task, algo))
        if algo.ptx_coef > 0:
            batch = self._with_ptx(batch)
        self.group.to_train()
        if algo.epochs_per_step > 1:  # later epochs move the policy off the one that sampled
            batch.token_data["old_logprobs"] = self.group.logprobs(batch)
        if algo.kl_coef > 0:
            batch.token_data["ref_logprobs"] = self.group.reference_logprobs(batch)
        train_stats: dict[str, float] = {}
        for _ in range(algo.epochs_per_step):
            train_stats = self.group.train_step(batch, self.objective)
        return {**train_stats, "groups": len(trajectories) // algo.samples_per_task}

    def _worker_stats(self) -> dict[str, float]:
        """Timings at every engine boundary and the vLLM-trainer logprob gap, as the workers measured them
        (max over workers); the driver's own `time/rollout` (agent loop included) replaces theirs."""
        stats = self.group.stats()
        return {k: float(v) for k, v in stats.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "time/rollout"}

    def sft_step(self, examples) -> dict[str, float]:
        t0 = time.perf_counter()
        self.group.to_train()
        stats = self.group.train_step(sft_batch(examples), self.objective)
        tokens = sum(sum(mask) for _, mask in examples)
        elapsed = time.perf_counter() - t0
        return {**_prefixed(stats), **self._worker_stats(), "time/step": elapsed,
                "perf/tokens_per_s": tokens / max(elapsed, 1e-9)}

    def _with_ptx(self, batch):
        """Mix PTX sequences (as many as RL sequences) into the RL batch: the oracle's solutions of fresh
        training tasks, or the next ones of the dataset, cycling."""
        count = len(batch)
        if self.config.algorithm.ptx_dataset == "oracle":
            picked = self.oracle_examples(count)
        else:
            start = (self.step * count) % len(self.ptx)
            picked = [self.ptx[(start + i) % len(self.ptx)] for i in range(count)]
        extra = sft_batch(picked)
        for key, values in batch.token_data.items():  # PTX tokens: no logprobs, no vLLM routing (-1)
            fill = -1 if key == ROUTED_EXPERTS else 0
            extra.token_data[key] = [torch.full((len(ids), *values[0].shape[1:]), fill, dtype=values[0].dtype)
                                     for ids in extra.input_ids]
        extra.seq_data = {"advantages": torch.zeros(count), "ptx": torch.ones(count)}
        batch.seq_data["ptx"] = torch.zeros(count)
        return concat_batches([batch, extra])

    def oracle_examples(self, count: int):
        """SFT cold-start data: the scripted oracle's solved training tasks, as (ids, mask); with
        `algorithm.teacher_declines`, the imperfect teacher's declines too (its data is not checked)."""
        out = []
        while len(out) < count:
            for task in self.tasks.next(count - len(out)):
                decline = self.teacher_declines(task)
                t = oracle_trajectory(self.make_env(), task, self.chat, self.limits, decline)
                if t.success or decline:
                    out.append((t.token_ids, [bool(m) for m in t.loss_mask]))
        return out

    def teacher_declines(self, task) -> bool:
        """Whether the cold start's teacher (algorithm.teacher_declines) declines this task."""
        algo = self.config.algorithm
        return teacher_declines(task, algo.teacher_declines, algo.teacher_decline_rate)

    def evaluate(self) -> dict[str, float]:
        """Greedy rollouts on the held-out tasks: success overall and per task kind, wrong refusals, tool
        calls, validity and the mean reward under the run's weights (no rubric part). At step 0 also the
        model-free baselines on the same tasks (baseline/NAME/...), the bar a trained policy must clear."""
        if not self.eval_tasks:
            return {}
        t0 = time.perf_counter()
        trajectories = self.rollout(self.eval_tasks, 1, 0.0)
        self.run_dir.write_rollouts(f"eval_step_{self.step}", [_episode_record(t) for t in trajectories])
        summary = summarize(trajectories, self.config.rewards.weights)
        metrics = {**kind_metrics(summary, "eval"), "eval/process_score": summary["process_score"],
                   "time/eval": time.perf_counter() - t0}
        if self.step == 0:
            metrics.update(self.baseline_metrics())
        return metrics

    def baseline_metrics(self) -> dict[str, float]:
        """baseline/{refuse,nothing,oracle}/... on the held-out tasks (oracle when every task has a solution);
        with an imperfect teacher (algorithm.teacher_declines) also baseline/teacher/..., the bar RL must
        clear to have learned more than the cold start's data shows."""
        runs = {name: run_baseline(name, self.chat, self.make_env, self.eval_tasks, self.limits)
                for name in baselines_for(self.eval_tasks)}
        if self.config.algorithm.teacher_declines and "oracle" in runs:
            runs["teacher"] = run_baseline("oracle", self.chat, self.make_env, self.eval_tasks, self.limits,
                                           self.teacher_declines)
        return {k: v for name, trajectories in runs.items() for k, v in kind_metrics(
            summarize(trajectories, self.config.rewards.weights), f"baseline/{name}").items()}

    # ---- bookkeeping -------------------------------------------------------------------------------
    def _save_rollouts(self, trajectories, rewards) -> None:
        keep = self.config.logging.rollouts_per_step
        records = [{**_episode_record(t), "reward": r.total, "components": r.components}
                   for t, r in list(zip(trajectories, rewards))[:keep]]
        self.run_dir.write_rollouts(f"step_{self.step}", records)

    def checkpoint(self) -> Path:
        schedule = self.config.schedule
        training_state = schedule.final_training_state or self.step < schedule.steps
        tmp = self.run_dir.begin_checkpoint(self.step)
        self.group.to_train()  # the trainer holds the weights and optimizer state
        self.group.save_checkpoint(str(tmp / "model"), training_state)
        save_rng_state(tmp / "rng.pt")
        state = {"step": self.step, "cursor": self.sft_data.mark(), "training_state": training_state}
        if self.priority is not None:
            state["type_success"] = self.priority.success
        return self.run_dir.commit_checkpoint(self.step, tmp, state, schedule.keep_checkpoints)

    def _request_stop(self, signum, _frame) -> None:
        self.stop_requested = True
        print(f"\nk2rl: got {signal.Signals(signum).name}; checkpointing after this step", flush=True)

    def run(self, group) -> Path | None:
        """Train on `group` (a WorkerGroup) to schedule.steps; the last checkpoint written, if any."""
        cfg, config = self.config.schedule, self.config
        self.group = group
        self.judge = make_judge(config.rewards.judge, self.rubric, engine=group, model_dir=self.model_dir)
        self.metrics = MetricsLog(self.run_dir.path, config.logging.tensorboard, config.logging.plots,
                                  resume_step=self.step or None)
        self.sft_data = Ahead(lambda: self.oracle_examples(config.algorithm.tasks_per_step), lambda: self.tasks.cursor)
        previous = {s: signal.signal(s, self._request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
        last = None
        try:
            with RunProgress(cfg.steps, self.step, self.config.logging.progress) as progress:
                if self.step == 0 and cfg.eval_every:
                    progress.phase("eval")
                    self.metrics.log(0, self.evaluate())
                while self.step < cfg.steps:
                    if self.config.algorithm.name == "sft":
                        progress.phase("sft")
                        asked = time.perf_counter()
                        examples = self.sft_data.take(more=self.step + 1 < cfg.steps)
                        waited = time.perf_counter() - asked
                        metrics = {**self.sft_step(examples), "time/sft_data": waited}
                    else:
                        progress.phase("rl")
                        metrics = self.rl_step()
                    self.step += 1
                    if cfg.eval_every and (self.step % cfg.eval_every == 0 or self.step == cfg.steps):
                        progress.phase("eval")
                        self.sft_data.settle()  # the held-out rollouts use the tokenizer too
                        metrics.update(self.evaluate())
                    self.metrics.log(self.step, metrics)
                    progress.step_done(metrics)
                    if self.stop_requested or self.step == cfg.steps or (cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0):
                        progress.phase("ckpt")
                        last = self.checkpoint()
                    if self.stop_requested:  # SIGINT/SIGTERM: the checkpoint is written, leave cleanly
                        break
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            self.sft_data.close()
            self.metrics.close()
        return last


def _episode_record(t) -> dict:
    """What a reader needs to judge an episode: the task, its kind, the outcome and the dialog."""
    return {"task_id": t.task_id, "sample": t.sample, "tags": t.tags, "kind": t.kind, "success": t.success,
            "wrong_refusal": t.wrong_refusal, "messages": t.messages, "stats": asdict(t.stats)}


def _prefixed(train_stats: dict[str, float]) -> dict[str, float]:
    """Trainer stats under train/ unless they already carry a namespace (attn/..., loss/...)."""
    return {k if "/" in k else f"train/{k}": v for k, v in train_stats.items()}


def restore(run_dir: RunDir) -> tuple[dict, Path] | None:
    """(trainer state, checkpoint dir) of the latest complete checkpoint, RNG restored; None if none."""
    found = run_dir.latest_state()
    if found is None:
        return None
    latest, state = found
    if not state.get("training_state", True):
        raise ValidationFailed(f"{latest} holds the weights only (the run finished with schedule.final_training_state="
                               f"false), so the run cannot be continued; start a new run from them with "
                               f"--set model.path={latest / 'model'}")
    load_rng_state(latest / "rng.pt")
    return state, latest
