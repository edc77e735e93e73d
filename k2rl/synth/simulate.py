"""Stage 4, trajectories: the agent talks to the LLM user simulator and calls tools answered by the LLM
tool simulator, through the synthetic environment (so SFT data and RL episodes behave the same)."""
from __future__ import annotations

from k2rl.synth.ask import item_seed
from k2rl.synth.config import SynthConfig
from k2rl.synth.environment import PoolEntry, SyntheticEnv
from k2rl.synth.schemas import Trajectory
from k2rl.synth.stage import Stage, StageResult


def simulate(config: SynthConfig, env: SyntheticEnv, agent, entry: PoolEntry, key: str) -> Trajectory:
    """One dialog until the user is done or the agent's turns run out. A simulator or agent endpoint
    that gives up raises (the item is retried on the next run) rather than leaving a hole in the data."""
    messages = env.reset(entry.task)
    tools = list(env.tools.values())
    end, turns, user_turns, calls = "max_turns", 0, 0, 0
    while turns < config.trajectories.max_agent_turns:
        turn = agent.turn(messages, tools, seed=item_seed(config, f"{key}/{turns}"))
        step = env.step(turn)
        if env.sim_failures:
            raise env.sim_failures[0]
        message = {"role": "assistant", "content": turn.content}
        if turn.calls:
            message["tool_calls"] = [c.as_message_call() for c in turn.calls]
        messages += [message, *step.observations]
        turns, calls = turns + 1, calls + step.tool_calls
        user_turns += sum(o["role"] == "user" for o in step.observations)
        if step.done:
            end = "user_done"
            break
    return Trajectory(id=key, task_id=entry.task.id, agent_id=entry.agent_id, messages=messages,
                      tools=env.declarations(), end=end, agent_turns=turns, user_turns=user_turns, tool_calls=calls,
                      injected=dict(env.injected), final_state=env.state)


def generate_trajectories(config: SynthConfig, make_env, agent, pool: dict[str, PoolEntry]) -> StageResult[Trajectory]:
    """`make_env()` gives a fresh environment per dialog (state and user history are per episode)."""
    items = {f"{task_id}/s{k}": entry for task_id, entry in pool.items()
             for k in range(config.trajectories.samples_per_task)}
    stage = Stage("trajectories", config.out_path, Trajectory, workers=config.workers, progress=config.progress)
    return stage.run(items, lambda key, entry: simulate(config, make_env(), agent, entry, key))
