#!/usr/bin/env bash
# Build the wheel and install it (with the postgres and redis extras) into a
# throwaway venv: the package data (SQL files, docs assets) must be in it, and the
# installed package must migrate a database and answer the CLI. Run by scripts/test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
.venv/bin/python -m pip wheel -q --disable-pip-version-check --no-deps -w "$tmp/dist" . >/dev/null
wheel="$(ls "$tmp"/dist/conveyor-*.whl)"
python3 -m venv "$tmp/venv"
if ! "$tmp/venv/bin/python" -m pip install -q --disable-pip-version-check \
    "${wheel}[postgres,redis]" 2>"$tmp/pip.log"; then
    cat "$tmp/pip.log" >&2
    exit 1
fi
cd "$tmp"   # away from the source tree: only the installed package is importable
"$tmp/venv/bin/python" - <<'PY'
from importlib import resources
import conveyor.storage.sql as sql
for backend in ("sqlite", "postgres"):
    names = [p.name for p in resources.files(sql).joinpath(backend, "migrations").iterdir()]
    assert any(n.endswith(".sql") for n in names), (backend, names)
    assert resources.files(sql).joinpath(backend, "queries.sql").is_file()
import asyncpg, redis, fastapi_offline  # the extras and the docs assets came along
import conveyor.dashboard as dash  # the dashboard's templates and static files too
for name in ("templates/base.html", "templates/overview.html", "static/dashboard.js",
             "static/dashboard.css", "static/favicon.svg"):
    assert resources.files(dash).joinpath(name).is_file(), name
from conveyor.dashboard.router import environment
environment().get_template("overview.html")
PY
CONVEYOR_DATABASE_URL="sqlite:///$tmp/w.db" "$tmp/venv/bin/conveyor" migrate >/dev/null
CONVEYOR_DATABASE_URL="sqlite:///$tmp/w.db" "$tmp/venv/bin/conveyor" jobs submit test_job \
    --payload '{"n": 1}' >/dev/null
echo "wheel ok: $(basename "$wheel") installs with its SQL files and runs"
