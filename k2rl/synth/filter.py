"""Stage 5, filter: the rubric judge (`k2rl.rewards.RubricScorer`, the same one RL rewards use) scores
each trajectory against the configured rubric plus the task's own criteria; rejection sampling keeps
those that reach the threshold and records, for the others, which criteria fell short and why."""
from __future__ import annotations

from k2rl.llm import LLMClient, LLMFailure
from k2rl.rewards.rubric import load_rubric
from k2rl.rewards.scorer import Episode, RubricScorer
from k2rl.synth.config import SynthConfig
from k2rl.synth.schemas import TaskSpec, Trajectory, Verdict
from k2rl.synth.stage import Stage, StageResult
from k2rl.synth.tasks import task_criteria


def filter_trajectories(config: SynthConfig, client: LLMClient, trajectories: list[Trajectory],
                        tasks: dict[str, TaskSpec]) -> StageResult[Verdict]:
    cfg = config.filter
    scorer = RubricScorer(client, load_rubric(config.path(cfg.rubric) if cfg.rubric.endswith((".yaml", ".yml"))
                                              else cfg.rubric), reason_chars=cfg.reason_chars)

    def work(key: str, trajectory: Trajectory) -> Verdict:
        task = tasks[trajectory.task_id]
        episode = Episode(task=task.goal, messages=trajectory.messages[1:], id=key, criteria=task_criteria(task))
        score = scorer.score_groups([[episode]]).scores[0][0]
        if score.failed:
            raise LLMFailure("judge", "no verdict from the rubric judge")
        reasons = [f"{cid}: {score.reasons.get(cid, '')}".strip() for cid, value in score.criteria.items()
                   if value < cfg.criterion_threshold]
        passed = score.score >= cfg.threshold
        return Verdict(id=key, task_id=task.id, score=score.score, passed=passed, criteria=score.criteria,
                       reasons=[] if passed else reasons or [f"score {score.score:.2f} below {cfg.threshold}"])

    stage = Stage("verdicts", config.out_path, Verdict, workers=config.workers, progress=config.progress)
    return stage.run({t.id: t for t in trajectories}, work)
