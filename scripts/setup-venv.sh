#!/usr/bin/env bash
# Create ./.venv and install Lethe into it with the extras named as arguments
# (for example: trainer, or trainer operator test). Safe to run again.
#
# torch is pinned to 2.13.0 (pyproject.toml); pip takes a locally cached
# wheel of it when one is configured, and downloads it otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."

extras=$(IFS=,; echo "$*")
if [[ ! -x .venv/bin/python ]]; then
    python3.11 -m venv .venv 2>/dev/null || python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[${extras}]"
