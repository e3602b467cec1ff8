#!/usr/bin/env bash
# The README's second command: set up and run lint, type checks and the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
export PATH="$PWD/.venv/bin:$PATH"

# Servers the tests start privately (tests/pg.py, the event-bus tests) and the
# browser of the dashboard tests: installed when missing, never used as system
# services. Silent when already present.
missing=()
[ -n "${CONVEYOR_PG_BIN:-}" ] || python tests/pg.py bindir >/dev/null 2>&1 || missing+=(postgresql)
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
# promtool (rule checks and unit tests) and a Prometheus server (the alerting test).
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
# The dashboard's browser tests drive Debian's Chromium (never a downloaded one).
[ -x "${CONVEYOR_CHROMIUM:-/usr/bin/chromium}" ] || missing+=(chromium)
if [ ${#missing[@]} -gt 0 ]; then
    if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
        echo "== installing ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    else
        echo "note: ${missing[*]} missing; install them (e.g. apt-get install -y ${missing[*]})," \
            "or their tests skip locally and fail in CI" >&2
    fi
fi

echo "== ruff"
ruff check src tests bench
ruff format --check src tests bench
echo "== mypy"
mypy
echo "== import-linter (layers)"
lint-imports
echo "== wheel (built, installed in a clean venv with its extras)"
bash scripts/check-wheel.sh
echo "== pytest"
pytest "$@"
