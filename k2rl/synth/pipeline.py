"""`k2rl synth`: the stages in order, each resumable, then the outputs and the report."""
from __future__ import annotations

from k2rl.env.user import LLMUser
from k2rl.synth.agent import EndpointAgent, EngineAgent
from k2rl.synth.agents import generate_agents
from k2rl.synth.ask import make_client
from k2rl.synth.config import SynthConfig
from k2rl.synth.environment import SyntheticEnv
from k2rl.synth.export import kept, pool_entry, write_pool, write_sft
from k2rl.synth.filter import filter_trajectories
from k2rl.synth.report import build_report, write_report
from k2rl.synth.simulate import generate_trajectories
from k2rl.synth.tasks import generate_tasks
from k2rl.synth.toolsim import ToolSimulator
from k2rl.synth.tools import build_catalog, generate_apps, generate_tools


def make_agent(config: SynthConfig, client):
    cfg = config.trajectories.agent
    if cfg.kind == "engine":
        return EngineAgent(str(config.path(cfg.model_dir)), max_tokens=cfg.max_tokens, temperature=cfg.temperature)
    if cfg.base_url or cfg.model:
        client = make_client(config, cfg.base_url, cfg.model)
    return EndpointAgent(client, temperature=cfg.temperature, max_calls=cfg.max_calls)


def run_pipeline(config: SynthConfig, agent=None) -> dict:
    """Run (or resume) every stage; returns the report (also written to OUT/report.json).
    Outputs: OUT/tools.jsonl (catalog), OUT/task_pool.jsonl (RL task pool), OUT/sft.jsonl (SFT dataset)."""
    out = config.out_path
    out.mkdir(parents=True, exist_ok=True)
    client = make_client(config)
    stages = {"apps": generate_apps(config, client, config.domains())}
    stages["tool_batches"] = generate_tools(config, client, [a for b in stages["apps"].records for a in b.apps])
    catalog, dropped = build_catalog(config, stages["tool_batches"].records)
    tools = {t.name: t for t in catalog}
    stages["agents"] = generate_agents(config, client, catalog)
    agents = {a.id: a for a in stages["agents"].records}
    stages["tasks"] = generate_tasks(config, client, list(agents.values()), tools)
    candidates = {t.id: pool_entry(t, agents[t.agent_id], tools) for t in stages["tasks"].records}
    write_pool(out / "pool.candidates.jsonl", list(candidates.values()))

    sim = config.trajectories
    simulator = ToolSimulator(client, sim.failures)
    make_env = lambda: SyntheticEnv(pool=candidates, simulator=simulator, seed=config.seed,  # noqa: E731
                                    user=LLMUser(client, max_tokens=sim.user_max_tokens), max_user_turns=sim.max_user_turns)
    stages["trajectories"] = generate_trajectories(config, make_env, agent or make_agent(config, client), candidates)
    stages["verdicts"] = filter_trajectories(config, client, stages["trajectories"].records,
                                             {t.id: t for t in stages["tasks"].records})

    keep = kept(stages["trajectories"].records, stages["verdicts"].records)
    sft = write_sft(out / "sft.jsonl", keep, config.output.tokenizer and str(config.path(config.output.tokenizer)))
    solved = {t.task_id for t in keep}
    pool = [e for task_id, e in candidates.items() if task_id in solved]
    write_pool(out / "task_pool.jsonl", pool)
    report = build_report(stages, catalog_size=len(catalog), dropped=dropped, sft=sft, pool=len(pool),
                          llm_stats=client.stats.snapshot())
    write_report(out / "report.json", report)
    return report
