"""A throwaway PostgreSQL server for tests and benchmarks (standard library only).

    with PostgresServer() as server:          # initdb + start on a free loopback port
        server.execute("CREATE DATABASE app")
        dsn = server.dsn("app")               # postgresql://postgres@127.0.0.1:PORT/app
        server.restart(mode="immediate")      # crash + recovery, data dir kept

The cluster lives in its own temporary directory (data, unix socket, log) and
is never the system service: PostgreSQL refuses to run as root, so when we are
root every server command runs as the ``postgres`` OS user via ``runuser``.
Authentication is ``trust`` for local sockets and 127.0.0.1 only, superuser
``postgres`` without a password. Durability settings stay at PostgreSQL's
defaults (``fsync``, ``synchronous_commit``, ``full_page_writes`` on): promise
tests and benchmarks measure real commits.

Binaries: ``$CONVEYOR_PG_BIN``, else ``pg_config --bindir``, else the newest
``/usr/lib/postgresql/*/bin``; ``PostgresUnavailable`` when none has ``initdb``.

``python tests/pg.py bindir`` prints the binaries' directory (exit 1 if none);
``python tests/pg.py serve`` runs a server until Ctrl-C and prints its DSN.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import os
import pwd
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType

__all__ = ["PostgresServer", "PostgresUnavailable", "TemplateDatabase", "find_bin_dir"]

SERVER_PROGRAMS = ("initdb", "pg_ctl", "postgres", "psql", "pg_isready")


class PostgresUnavailable(RuntimeError):
    """No usable PostgreSQL server binaries on this machine."""


def find_bin_dir() -> Path:
    """The directory holding ``initdb``, ``pg_ctl``, ``postgres`` and ``psql``."""
    explicit = os.environ.get("CONVEYOR_PG_BIN")
    if explicit:
        if _has_server(Path(explicit)):
            return Path(explicit)
        raise PostgresUnavailable(
            f"CONVEYOR_PG_BIN={explicit} lacks one of {', '.join(SERVER_PROGRAMS)}"
        )
    candidates: list[Path] = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        # libpq-dev's pg_config says /usr/bin, which has no initdb: hence the check below.
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True
            )
            candidates.append(Path(out.stdout.strip()))

    def version(p: Path) -> tuple[int, ...]:
        return tuple(int(n) for n in re.findall(r"\d+", p.parent.name)) or (0,)

    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=version, reverse=True)
    for candidate in candidates:
        if _has_server(candidate):
            return candidate
    raise PostgresUnavailable(
        "PostgreSQL server binaries (initdb, pg_ctl, postgres) not found: looked at "
        "$CONVEYOR_PG_BIN, `pg_config --bindir` and /usr/lib/postgresql/*/bin"
    )


def _has_server(bin_dir: Path) -> bool:
    return all(os.access(bin_dir / name, os.X_OK) for name in SERVER_PROGRAMS)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _clean_env() -> dict[str, str]:
    # PGHOST, PGDATABASE, PGOPTIONS... from the caller's shell must not redirect us.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["PGCONNECT_TIMEOUT"] = "10"
    return env


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _quote_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


class PostgresServer:
    """One private PostgreSQL cluster: ``start()``, ``restart()``, ``stop()``."""

    def __init__(
        self,
        *,
        bin_dir: Path | str | None = None,
        parent: Path | str | None = None,
        max_connections: int = 200,
        shared_buffers: str = "128MB",
        settings: dict[str, str] | None = None,
        start_timeout: float = 60.0,
    ) -> None:
        self._bin_dir = Path(bin_dir) if bin_dir else None
        self._parent = parent
        self.settings = {
            "max_connections": str(max_connections),
            "shared_buffers": _quote_literal(shared_buffers),
            **(settings or {}),
        }
        self.start_timeout = start_timeout
        self.base: Path | None = None
        self.port: int | None = None
        self._running = False
        self._lock = threading.Lock()
        self._owner: pwd.struct_passwd | None = None

    # -- lifecycle ---------------------------------------------------------------------
    def start(self) -> PostgresServer:
        """initdb a new cluster and start it; raises ``PostgresUnavailable`` without binaries."""
        if self.base is not None:
            raise RuntimeError("this PostgresServer was already started; use restart()")
        bin_dir = self._bin_dir or find_bin_dir()
        self._bin_dir = bin_dir
        self._owner = pwd.getpwnam("postgres") if os.geteuid() == 0 else None
        self.base = Path(tempfile.mkdtemp(prefix="conveyor-pg-", dir=self._parent))
        atexit.register(self.stop)
        try:
            self._initdb()
            for attempt in itertools.count(1):
                self.port = _free_port()
                self._write_config()
                try:
                    self._start_server()
                    break
                except RuntimeError:
                    # Another process took the port between _free_port() and bind.
                    if attempt >= 5 or "could not bind" not in self.log_tail():
                        raise
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop the server (fast shutdown) and delete its directory. Idempotent."""
        with self._lock:
            base, self.base = self.base, None
            if base is None:
                return
            atexit.unregister(self.stop)
            try:
                # postmaster.pid also covers a start that timed out with the server up.
                if self._running or (base / "data" / "postmaster.pid").exists():
                    try:
                        self._pg_ctl(base, "stop", "-m", "fast")
                    except RuntimeError:
                        self._pg_ctl(base, "stop", "-m", "immediate")
            finally:
                self._running = False
                shutil.rmtree(base, ignore_errors=True)

    def restart(self, mode: str = "fast") -> None:
        """Bounce the server on the same port, keeping its data.

        ``mode``: ``fast`` (clients disconnected, clean shutdown checkpoint),
        ``immediate`` (processes killed, no checkpoint: the start replays the WAL
        as after a crash), ``smart`` (waits for every client to leave).
        """
        self.shutdown(mode)
        self.resume()

    def shutdown(self, mode: str = "fast") -> None:
        """Stop the server but keep its data; ``resume()`` starts it again."""
        self._pg_ctl(self._base, "stop", "-m", mode)
        self._running = False

    def resume(self) -> None:
        self._start_server()

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- connecting ----------------------------------------------------------------
    def dsn(self, dbname: str = "postgres") -> str:
        if self.port is None:
            raise RuntimeError("the server is not started")
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    @property
    def data_dir(self) -> Path:
        return self._base / "data"

    @property
    def socket_dir(self) -> Path:
        return self._base / "run"

    @property
    def pid(self) -> int | None:
        """The postmaster's process id (to ``kill -9`` it), ``None`` when it is not running."""
        try:
            return int((self.data_dir / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    @property
    def log_file(self) -> Path:
        return self._base / "postgres.log"

    def log_tail(self, lines: int = 30) -> str:
        return _tail(self.log_file, lines)

    def execute(self, sql: str, db: str = "postgres") -> str:
        """Run ``sql`` with psql in database (name or DSN) ``db``; unaligned output.

        Statements run one by one in autocommit (so ``CREATE DATABASE`` works);
        the first error stops the script and raises ``RuntimeError``.
        """
        proc = subprocess.run(
            [
                str(self._bin("psql")),
                "-X",  # no ~/.psqlrc
                "-q",
                "-A",
                "-t",
                "-F",
                "\t",
                "-v",
                "ON_ERROR_STOP=1",
                "-d",
                db if "://" in db else self.dsn(db),
                "-f",
                "-",
            ],
            input=sql,
            capture_output=True,
            text=True,
            env=_clean_env(),
            timeout=120,
            check=False,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"psql failed ({proc.returncode}) on:\n{sql}\n{proc.stderr}")
        return proc.stdout

    def query(self, sql: str, db: str = "postgres") -> list[list[str]]:
        """Rows of one ``SELECT`` as lists of strings."""
        return [line.split("\t") for line in self.execute(sql, db).splitlines() if line]

    def table_counts(self, db: str) -> dict[str, int]:
        """``{"schema.table": rows}`` for every user table of ``db``."""
        rows = self.query(
            """
            SELECT format('%s.%s', table_schema, table_name),
                   (xpath('/row/n/text()', query_to_xml(
                       format('SELECT count(*) AS n FROM %I.%I', table_schema, table_name),
                       false, true, '')))[1]::text
            FROM information_schema.tables
            WHERE table_type = 'BASE TABLE'
              AND table_schema NOT IN ('pg_catalog', 'information_schema')
            ORDER BY 1
            """,
            db,
        )
        return {name: int(n) for name, n in rows}

    # -- databases ------------------------------------------------------------------
    def create_template(
        self, name: str, prepare: Callable[[str], None] | None = None
    ) -> TemplateDatabase:
        """Create database ``name``, let ``prepare(dsn)`` fill it, freeze it as a template."""
        ident = _quote_ident(name)
        # A template from an earlier call must lose its flag before it can be dropped.
        self.execute(
            "SELECT format('ALTER DATABASE %I WITH IS_TEMPLATE false', datname) "
            f"FROM pg_database WHERE datname = {_quote_literal(name)} \\gexec\n"
            f"DROP DATABASE IF EXISTS {ident} WITH (FORCE);\nCREATE DATABASE {ident};"
        )
        if prepare is not None:
            prepare(self.dsn(name))
        tables = self.table_counts(name)
        # Cloning fails while anyone is connected to the template: forbid connections
        # (a pool the hook forgot to close gets cut now, not in a random test later).
        self.execute(
            f"ALTER DATABASE {ident} WITH IS_TEMPLATE true ALLOW_CONNECTIONS false;\n"
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            f"WHERE datname = {_quote_literal(name)};"
        )
        return TemplateDatabase(self, name, tables)

    def drop_database(self, name: str) -> None:
        # WITH (FORCE) terminates leftover connections (a leaked pool) before dropping.
        self.execute(f"DROP DATABASE IF EXISTS {_quote_ident(name)} WITH (FORCE);")

    # -- internals ------------------------------------------------------------------
    @property
    def _base(self) -> Path:
        if self.base is None:
            raise RuntimeError("the server is not started")
        return self.base

    def _bin(self, name: str) -> Path:
        if self._bin_dir is None:
            self._bin_dir = find_bin_dir()
        return self._bin_dir / name

    def _as_owner(self, argv: list[str]) -> list[str]:
        if self._owner is None:
            return argv
        return ["runuser", "-u", self._owner.pw_name, "--", *argv]

    def _run_as_owner(
        self, argv: list[str], cwd: Path, timeout: float
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self._as_owner(argv),
            cwd=cwd,  # the postgres user may not be allowed into our cwd
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            env=_clean_env(),
            timeout=timeout,
            check=False,
        )

    def _chown(self, path: Path) -> None:
        if self._owner is not None:
            os.chown(path, self._owner.pw_uid, self._owner.pw_gid)

    def _initdb(self) -> None:
        self._chown(self._base)
        if self._owner is not None:
            reach = self._run_as_owner(["test", "-w", str(self._base)], cwd=Path("/"), timeout=10)
            if reach.returncode != 0:
                raise RuntimeError(
                    f"the {self._owner.pw_name} user cannot reach {self._base}: pass "
                    "PostgresServer(parent=...) a directory every user can enter, like /tmp"
                )
        self.socket_dir.mkdir()
        self._chown(self.socket_dir)
        proc = self._run_as_owner(
            [
                str(self._bin("initdb")),
                "-D",
                str(self.data_dir),
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                # Only initdb's own final fsync of the fresh cluster is skipped; the
                # server runs with fsync=on and synchronous_commit=on.
                "--no-sync",
            ],
            cwd=self._base,
            timeout=self.start_timeout,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"initdb failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")
        hba = self.data_dir / "pg_hba.conf"
        hba.write_text(
            "# conveyor test cluster: local socket and 127.0.0.1 only, no passwords\n"
            "local all all trust\n"
            "host all all 127.0.0.1/32 trust\n"
        )
        conf = self.data_dir / "postgresql.conf"
        with conf.open("a") as f:
            f.write("\ninclude 'conveyor.conf'\n")

    def _write_config(self) -> None:
        settings = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(self.port),
            "unix_socket_directories": _quote_literal(str(self.socket_dir)),
            "fsync": "on",
            "synchronous_commit": "on",
            "full_page_writes": "on",
            "logging_collector": "off",
            "log_line_prefix": "'%m [%p] %q%u@%d '",
            **self.settings,
        }
        path = self.data_dir / "conveyor.conf"
        path.write_text("".join(f"{k} = {v}\n" for k, v in settings.items()))
        self._chown(path)

    def _pg_ctl(self, base: Path, *args: str) -> None:
        proc = self._run_as_owner(
            [
                str(self._bin("pg_ctl")),
                "-D",
                str(base / "data"),
                "-l",
                str(base / "postgres.log"),
                "-w",
                "-t",
                str(int(self.start_timeout)),
                *args,
            ],
            cwd=base,
            timeout=self.start_timeout + 10,
        )
        if proc.returncode != 0:
            raise RuntimeError(
                f"pg_ctl {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}"
                f"{proc.stderr}\n--- {base / 'postgres.log'} ---\n{_tail(base / 'postgres.log')}"
            )

    def _start_server(self) -> None:
        self._pg_ctl(self._base, "start")
        self._running = True
        self._wait_ready(self.start_timeout)

    def _wait_ready(self, timeout: float) -> None:
        """Poll until the server accepts connections over TCP (pg_ctl -w uses the socket)."""
        deadline = time.monotonic() + timeout
        delay = 0.01
        while True:
            proc = subprocess.run(
                [str(self._bin("pg_isready")), "-q", "-d", self.dsn(), "-t", "2"],
                env=_clean_env(),
                capture_output=True,
                timeout=10,
                check=False,
            )
            if proc.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"PostgreSQL on port {self.port} did not accept connections within "
                    f"{timeout}s\n--- {self.log_file} ---\n{self.log_tail()}"
                )
            time.sleep(delay)  # poll interval of a deadline-bounded wait
            delay = min(delay * 2, 0.2)


class TemplateDatabase:
    """A frozen database to clone per test: ``CREATE DATABASE ... TEMPLATE`` copies files."""

    def __init__(self, server: PostgresServer, name: str, tables: dict[str, int]) -> None:
        self.server = server
        self.name = name
        self.tables = tables  # what every clone starts with: {"schema.table": rows}
        self._numbers = itertools.count(1)

    def clone(self, name: str | None = None) -> str:
        """A new database copied from the template; returns its name."""
        name = name or f"test_{next(self._numbers)}"
        self.server.execute(
            f"CREATE DATABASE {_quote_ident(name)} TEMPLATE {_quote_ident(self.name)};"
        )
        return name

    @contextlib.contextmanager
    def database(self) -> Iterator[str]:
        """A fresh clone's DSN, dropped afterwards (its connections terminated)."""
        name = self.clone()
        try:
            yield self.server.dsn(name)
        finally:
            self.server.drop_database(name)


def _main(argv: list[str]) -> int:
    command = argv[1] if len(argv) > 1 else "serve"
    try:
        if command == "bindir":
            print(find_bin_dir())
            return 0
        if command == "serve":
            with PostgresServer() as server:
                print(server.dsn(), flush=True)
                with contextlib.suppress(KeyboardInterrupt):
                    threading.Event().wait()
            return 0
    except PostgresUnavailable as exc:
        print(exc, file=sys.stderr)
        return 1
    print(f"usage: {argv[0]} [bindir|serve]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv))
