"""Start (or resume) a run: run directory, initial model, Ray workers, then the Trainer."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from k2rl.config import JobConfig
from k2rl.loop.run_dir import RunDir
from k2rl.loop.trainer import Trainer, restore
from k2rl.validation import ValidationFailed


def given_model(config: JobConfig) -> Path | None:
    """`model.path`, checked, or None (the job builds its preset)."""
    if not config.model.path:
        return None
    path = Path(config.model.path)
    if not (path / "config.json").exists():
        raise ValidationFailed(f"model.path {path}: no config.json there; expected an HF-layout model directory "
                               "(`k2rl make-model` writes one)")
    return path


def initial_model(config: JobConfig, run_dir: RunDir) -> Path:
    """`model.path` when given, else the preset built once into the run directory (seeded)."""
    if path := given_model(config):
        return path
    path = run_dir.path / "model_init"
    if not (path / "model.safetensors").exists() and not list(path.glob("model-*.safetensors")):
        # In a child process: on a GPU machine it initialises on the GPU, and the driver holds none of it
        cmd = [sys.executable, "-m", "k2rl.cli", "make-model", "--preset", config.model.preset, "--out", str(path),
               "--seed", str(config.model.init_seed)]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return path


def train(config: JobConfig, resume_dir: Path | None = None) -> Path | None:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    import ray

    from k2rl.worker import WorkerGroup

    run_dir = RunDir(resume_dir or config.run_dir)
    state, model_dir, ckpt = None, None, None
    reference_dir = None
    if resume_dir is not None:
        restored = restore(run_dir)
        if restored is None:
            raise ValidationFailed(f"--resume {resume_dir}: no complete checkpoint under {run_dir.checkpoints}; "
                                   "start the run afresh without --resume")
        state, ckpt = restored
        model_dir = ckpt / "model"
    else:
        run_dir.create(config)
        model_dir = initial_model(config, run_dir)
    trainer = Trainer(config, model_dir, run_dir, state)  # every input read and checked before a worker starts
    if not ray.is_initialized():
        if config.workers.ray_address:
            ray.init(address=config.workers.ray_address)
        else:
            # "local": a fresh instance, never a cluster another job left running on this machine
            cpus = max(2, int(config.workers.num_workers * config.workers.cpus_per_worker))
            ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    if config.algorithm.kl_coef > 0:  # the KL anchor is the run's initial policy, also after a resume
        reference_dir = initial_model(config, run_dir)
    group = WorkerGroup(model_dir, config, reference_dir)
    try:
        if ckpt is not None:  # weights came with model_dir; the optimizer state comes from here
            group.to_train()  # vLLM gets the weights when the run next rolls out
            group.load_checkpoint(str(ckpt / "model"))
        return trainer.run(group)
    finally:
        group.shutdown()
