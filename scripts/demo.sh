#!/usr/bin/env bash
# README's main command: set up the venv if needed, then run the CPU demo (SFT cold start + RL on k2-tiny).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
venv="${K2RL_VENV:-$HOME/.venvs/k2rl}"
cd "$root"
export VLLM_ENABLE_V1_MULTIPROCESSING=0 DS_ACCELERATOR=cpu RAY_USAGE_STATS_ENABLED=0 TOKENIZERS_PARALLELISM=false
exec "$venv/bin/python" scripts/demo.py "$@"
