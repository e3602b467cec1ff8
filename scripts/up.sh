#!/usr/bin/env bash
# The README's first command: set up (once) and run `conveyor up` on the SQLite default.
# Extra arguments go to `conveyor up` (e.g. --port 8080 --app myapp.jobs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/conveyor up "$@"
