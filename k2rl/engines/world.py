"""The torch.distributed environment of a one-rank world, for a TrainEngine run outside a WorkerGroup
(benchmarks, probes, tests): the variables WorkerGroup sets for each of its workers."""
from __future__ import annotations

import os
import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on `host` now (the OS picks it; another process could still take it before use)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def single_rank_world() -> None:
    """RANK 0 of WORLD_SIZE 1, its rendezvous on a free loopback port."""
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
