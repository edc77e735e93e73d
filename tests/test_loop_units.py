"""The loop's own arithmetic: budget penalty in the reward, PTX mixing in the loss, SFT data encoding,
the resumable task stream and the run directory's checkpoint bookkeeping."""
import json

import pytest
import torch

from k2rl.algo import k2_loss, sft_loss
from k2rl.config import AlgorithmConfig, EnvConfig, RewardWeights
from k2rl.engines.types import TokenBatch
from k2rl.env.environment import CheckResult
from k2rl.env.factory import EnvFactory
from k2rl.loop.ahead import Ahead
from k2rl.loop.data import encode_sft_example
from k2rl.loop.metrics import MetricsLog
from k2rl.loop.objective import Objective
from k2rl.loop.priority import DECAY, FLOOR, TypePriority
from k2rl.loop.run_dir import RunDir
from k2rl.loop.scoring import advantages, informative_groups, score
from k2rl.loop.tasks import TaskStream
from k2rl.model.chat import ChatTokenizer
from k2rl.rollout.trajectory import EpisodeStats, Trajectory
from k2rl.validation import ValidationFailed


def _trajectory(success: bool, end_reason: str = "done", process: float = 1.0, task="t1", sample=0):
    return Trajectory(task_id=task, env="shop", token_ids=[1, 2, 3], loss_mask=[0, 1, 1], logprobs=[0, -1, -1],
                      prompt_len=1, messages=[], tools=[], result=CheckResult(success=success, score=process),
                      stats=EpisodeStats(end_reason=end_reason, truncated=end_reason == "budget"), sample=sample)


def test_budget_penalty_and_weights():
    weights = RewardWeights(verifiable=1.0, process=0.5, budget=0.3, unsolved=0.0)
    trajectories = [_trajectory(True), _trajectory(False, "budget", process=0.5, sample=1)]
    rewards, metrics = score(trajectories, {"t1": "goal"}, 2, weights, judge=None)
    assert rewards[0].total == pytest.approx(1.0 + 0.5)
    assert rewards[1].total == pytest.approx(0.0 + 0.25 - 0.3)
    assert rewards[1].components["budget"] == -1.0
    assert metrics["reward/budget"] == pytest.approx(-0.5) and metrics["reward/judge_failures"] == 0
    assert advantages(rewards, 2, AlgorithmConfig(name="k2")) == pytest.approx([0.775, -0.775])


def test_group_filter_keeps_groups_whose_rewards_differ():
    weights = RewardWeights()
    outcomes = [(True, True), (True, False), (False, False), (False, True), (True, False)]  # 5 groups of 2
    trajectories = [_trajectory(ok, task=f"t{g}", sample=i) for g, pair in enumerate(outcomes) for i, ok in enumerate(pair)]
    rewards, _ = score(trajectories, {f"t{g}": "goal" for g in range(5)}, 2, weights, judge=None)
    assert informative_groups(rewards, 2, limit=8) == [1, 3, 4]
    assert informative_groups(rewards, 2, limit=2) == [1, 3]
    with pytest.raises(ValueError, match="filter_groups: true"):
        AlgorithmConfig(oversample=2)

    from k2rl.config import JobConfig
    from k2rl.loop.trainer import Trainer

    trainer = Trainer.__new__(Trainer)  # the selection needs only the config
    trainer.config = JobConfig(algorithm={"samples_per_task": 2, "tasks_per_step": 2, "filter_groups": True})
    kept, kept_rewards = trainer._groups_to_train(trajectories, rewards, informative_groups(rewards, 2, limit=8))
    assert [(t.task_id, t.sample) for t in kept] == [("t1", 0), ("t1", 1), ("t3", 0), ("t3", 1)]
    assert kept_rewards == rewards[2:4] + rewards[6:8]


def test_ptx_rows_add_weighted_next_token_loss():
    algo = AlgorithmConfig(name="k2", tau=0.1, ptx_coef=0.5, ptx_dataset="unused.jsonl")
    batch = TokenBatch.from_lists([[5, 6, 7], [5, 6, 7, 8]], [[False, True, True], [False, True, True, True]],
                                  old_logprobs=[[0, -1.0, -2.0], [0, 0, 0, 0]], rollout_logprobs=[[0, -1.0, -2.0], [0, 0, 0, 0]])
    batch.seq_data = {"advantages": torch.tensor([0.5, 0.0]), "ptx": torch.tensor([0.0, 1.0])}
    new = [torch.tensor([0, -0.5, -2.0]), torch.tensor([0, -0.1, -0.2, -0.3])]
    loss, stats = Objective(algo)(new, batch)
    mask = torch.tensor([[0.0, 1, 1]])
    rl, _ = k2_loss(new[0][None], batch.token_data["old_logprobs"][0][None], mask, torch.tensor([0.5]), 0.1)
    ptx = sft_loss(new[1][None], torch.tensor([[0.0, 1, 1, 1]]))
    assert loss.item() == pytest.approx((rl.item() * 2 + 0.5 * ptx.item() * 3) / 5)
    assert stats["loss/ptx"] == pytest.approx(ptx.item())


def test_sft_example_masks_only_assistant_text(tiny_model_dir):
    chat = ChatTokenizer(tiny_model_dir)
    example = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]}
    ids, mask = encode_sft_example(example, chat)
    assert ids == chat.encode_conversation(example["messages"])
    trained = [i for i, m in zip(ids, mask) if m]
    assert chat.decode(trained) == "hello there<|im_end|>"
    assert encode_sft_example({"token_ids": [1, 2], "loss_mask": [0, 1]}, chat) == ([1, 2], [False, True])


def test_task_stream_resumes_at_its_cursor():
    factory = EnvFactory(EnvConfig(name="shop"))
    first = TaskStream(factory, seed=7)
    seen = [t.id for t in first.next(5)] + [t.id for t in first.next(3)]
    resumed = TaskStream(factory, seed=7, cursor=5)
    assert [t.id for t in resumed.next(3)] == seen[5:]
    assert len(set(seen)) == 8


def test_a_task_pool_repeats_its_tasks_in_a_new_order_each_epoch(tmp_path):
    factory = EnvFactory(EnvConfig(name="shop"))
    stream = TaskStream(factory, seed=7, pool=10)
    epochs = [[t.id for t in stream.next(10)] for _ in range(3)]
    first_ten = [t.id for t in TaskStream(factory, seed=7).next(10)]
    assert all(sorted(epoch) == sorted(first_ten) for epoch in epochs)  # the stream's first ten, every epoch
    assert len({tuple(epoch) for epoch in epochs}) == 3  # each in its own order
    assert [t.id for t in TaskStream(factory, seed=7, cursor=15, pool=10).next(10)] == epochs[1][5:] + epochs[2][:5]
    task_file = tmp_path / "tasks.jsonl"
    task_file.write_text("".join(t.model_dump_json() + "\n" for t in factory.tasks(4, seed=0)))
    with pytest.raises(ValidationFailed, match="env.train_tasks is 5, but .* holds 4 tasks"):  # as it is made
        TaskStream(EnvFactory(EnvConfig(name="shop", task_file=str(task_file))), seed=0, pool=5)


def test_type_priority_weighs_task_types_by_the_chance_their_groups_disagree():
    priority = TypePriority(samples_per_task=4)
    assert priority.weight("status") == 1.0  # not seen yet
    priority.update([_trajectory(i < 2, task="s", sample=i) for i in range(4)])
    assert priority.success == {"-": 0.5}  # untagged tasks are one type
    priority = TypePriority(4, {"status": 0.5, "cancel": 1.0, "never": 0.0})
    assert priority.weight("status") == pytest.approx(1 - 2 * 0.5 ** 4)
    assert priority.weight("cancel") == priority.weight("never") == FLOOR
    solved = [_trajectory(True, task="c", sample=i) for i in range(4)]
    for t in solved:
        t.tags = ["status"]
    priority.update(solved)  # an exponential average: the last step counts 1 - DECAY
    assert priority.success["status"] == pytest.approx(0.5 * DECAY + 1.0 * (1 - DECAY))
    assert set(priority.metrics()) == {"tasks/weight/status", "tasks/weight/cancel", "tasks/weight/never"}


def test_prioritized_stream_draws_task_types_by_weight_and_resumes_at_its_cursor():
    factory = EnvFactory(EnvConfig(name="shop"))
    solved = {type_: 1.0 for type_ in ("cancel", "cancel_ask", "refund", "drop", "cancel_shipped", "sold_out")}
    priority = TypePriority(4, solved)  # only buy_one, buy_two, status (and off_topic) keep weight 1
    first = TaskStream(factory, seed=7)
    drawn = first.next(60, priority)
    uniform = TaskStream(factory, seed=7).next(60)
    share = lambda tasks: sum(t.tags[0] in solved for t in tasks) / len(tasks)
    assert share(uniform) > 0.5 and share(drawn) < 0.15
    assert first.cursor > 60  # the skipped tasks are used up
    cursor = first.cursor
    later = first.next(10, priority)
    assert [t.id for t in TaskStream(factory, seed=7, cursor=cursor).next(10, priority)] == [t.id for t in later]


def test_checkpoints_commit_atomically_and_rotate(tmp_path):
    run = RunDir(tmp_path / "run")
    for step in (1, 2, 3):
        tmp = run.begin_checkpoint(step)
        (tmp / "weights").write_text(str(step))
        run.commit_checkpoint(step, tmp, {"step": step}, keep=2)
    run.begin_checkpoint(4)  # a checkpoint killed half-way is never "latest"
    assert run.latest().name == "step_3"
    assert [p.name for p in run.completed()] == ["step_2", "step_3"]
    assert json.loads((run.latest() / "trainer_state.json").read_text()) == {"step": 3}


def test_plots_follow_evaluations_not_every_step(tmp_path, monkeypatch):
    """Redrawing the PNGs costs a fraction of a second; a fast step must not pay it each time."""
    log = MetricsLog(tmp_path, tensorboard=False)
    drawn, draw = [], log.plot
    monkeypatch.setattr(log, "plot", lambda: drawn.append(len(log.rows)) or draw())
    for step in range(1, 6):
        log.log(step, {"train/loss": 1.0 / step})
    log.log(6, {"eval/success": 0.5, "train/loss": 0.1})
    log.log(7, {"train/loss": 0.1})
    log.close()
    assert drawn == [1, 6, 7]  # the first row, the evaluation, the close
    assert {p.name for p in (tmp_path / "plots").iterdir()} >= {"reward.png", "success.png", "kinds.png", "time.png"}


def test_ahead_makes_the_next_steps_data_on_a_thread_and_checkpoints_before_it():
    """SFT data made a step ahead (k2rl.loop.ahead): the same sequence as made in turn, the next on
    another thread, and a checkpoint's task cursor from before the data in flight, so that a run
    resumed from it makes that data again."""
    import threading

    stream = TaskStream(EnvFactory(EnvConfig(name="shop")), seed=3)
    threads = []

    def make():
        threads.append(threading.get_ident())
        return [t.id for t in stream.next(4)]

    ahead = Ahead(make, lambda: stream.cursor)
    first = ahead.take(more=True)
    assert ahead.mark() == 4  # the second batch is in flight: a checkpoint now resumes before it
    second = ahead.take(more=True)
    assert ahead.mark() == 8
    ahead.settle()
    assert stream.cursor == 12 and threads[0] == threading.get_ident() != threads[1]
    resumed_stream = TaskStream(EnvFactory(EnvConfig(name="shop")), seed=3, cursor=ahead.mark())
    resumed = Ahead(lambda: [t.id for t in resumed_stream.next(4)], lambda: resumed_stream.cursor)
    third = ahead.take(more=False)
    assert resumed.take(more=False) == third
    assert ahead.mark() == stream.cursor == 12  # nothing in flight
    straight = TaskStream(EnvFactory(EnvConfig(name="shop")), seed=3).next(12)
    assert first + second + third == [t.id for t in straight]
    ahead.close()
    resumed.close()


def test_ahead_raises_the_works_error_where_it_is_taken():
    def make():
        raise ValueError("no tasks")

    ahead = Ahead(make, lambda: 0)
    with pytest.raises(ValueError, match="no tasks"):
        ahead.take(more=True)
    ahead.close()

