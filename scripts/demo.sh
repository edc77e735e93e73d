#!/usr/bin/env bash
# README's main command: set up the venv if needed, then run the CPU demo (SFT cold start + RL on k2-tiny).
exec bash "$(dirname "${BASH_SOURCE[0]}")/in-venv.sh" scripts/demo.py "$@"
