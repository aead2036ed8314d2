#!/usr/bin/env bash
# Install everything the tests need and run them: the Python packages, a
# local Kubernetes control plane (etcd, kube-apiserver and
# kube-controller-manager built from Debian's sources, about 5 minutes the
# first time, cached under ~/.cache/lethe), kubectl and helm, Prometheus and
# the Pushgateway, SeaweedFS, and the demo model and books. Extra arguments
# go to pytest (for example -m "not cluster").
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup-venv.sh trainer operator test
bash scripts/install-kube.sh
bash scripts/install-prometheus.sh
.venv/bin/lethe fetch-demo > /dev/null
exec .venv/bin/python -m pytest "$@"
