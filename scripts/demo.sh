#!/usr/bin/env bash
# The main job: build the namespace lab, live-migrate a VM under probe traffic
# with no orchestrator, with QEMU's RARP alone and with the orchestrator, and
# print the side-by-side report. Exit status 1 if the orchestrated run lost
# any packet after the VM resumed. Extra arguments go to `vmm lab demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/vmm lab demo "$@"
