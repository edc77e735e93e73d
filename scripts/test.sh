#!/usr/bin/env bash
# README's test command: set up the venv if needed, then run the whole test suite on the CPU.
exec bash "$(dirname "${BASH_SOURCE[0]}")/in-venv.sh" -m pytest -q -p no:cacheprovider --durations=15 "$@"
