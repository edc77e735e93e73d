#!/usr/bin/env bash
# Set up k2rl's venv if needed, then run its python from the repo root with the CPU runtime settings
# (in-process vLLM, DeepSpeed on the CPU accelerator): `bash scripts/in-venv.sh ARGS...`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
cd "$root"
export VLLM_ENABLE_V1_MULTIPROCESSING=0 RAY_USAGE_STATS_ENABLED=0 TOKENIZERS_PARALLELISM=false
export DS_ACCELERATOR="${DS_ACCELERATOR:-$(command -v nvidia-smi >/dev/null && echo cuda || echo cpu)}"
exec "${K2RL_VENV:-$HOME/.venvs/k2rl}/bin/python" "$@"
