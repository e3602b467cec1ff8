"""Conveyor against its peers, same machine, same servers, same workload, one command.

    .venv/bin/python bench/peers/run.py                       # N = 20,000 (~15-25 min)
    .venv/bin/python bench/peers/run.py --quick               # N = 2,000
    .venv/bin/python bench/peers/run.py --markdown /tmp/peers.md
    .venv/bin/python bench/peers/run.py --quick --peer conveyor-pg --peer pgqueuer

Starts its own PostgreSQL 15 (tests/pg.py: stock durable settings, fsync=on,
synchronous_commit=on) and Redis (stock RDB snapshots, no AOF) on 127.0.0.1,
creates one virtualenv per peer under bench/peers/.venvs/ on first run (pins
from /work/shared/PEERS.md), and measures for every peer:

1. enqueue single: N jobs one at a time (a producer process);
2. enqueue bulk: N jobs with the peer's bulk API, batches of 1,000;
3. processing: N pre-loaded no-op jobs, 1 worker process, then 2;
4. latency: an idle worker, a producer process enqueueing 300 jobs 5 ms apart;
   handler start minus the producer's clock just before its enqueue call.

Every job's handler appends its id and start time to a file of its process
(bench/peers/common.py); a step counts all N distinct ids there and checks the
peer's own queue afterwards. Nothing is read from logs. Every step has a
deadline; a stuck peer is reported as STUCK. Processes are killed at exit.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import math
import os
import platform
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
VENVS = HERE / ".venvs"
MAIN_PY = ROOT / ".venv" / "bin" / "python"
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(HERE))

from common import WARMUP_BASE, StampReader, git_revision  # noqa: E402

from pg import PostgresServer  # noqa: E402

FULL_N = 20_000
QUICK_N = 2_000
LATENCY_N = 300
LATENCY_GAP = 0.005
BULK_BATCH = 1_000

# Pins and workarounds of /work/shared/PEERS.md.
VENV_PINS: dict[str, list[str]] = {
    "pgqueuer": ["pgqueuer==1.6.0", "typer==0.28.0", "asyncpg"],
    "procrastinate": ["procrastinate==3.10.0", "psycopg[binary]"],
    "celery": ["celery[redis]==5.7.0"],
    "arq": ["arq==0.28.0", "redis<6"],
}


# -- processes -----------------------------------------------------------------------------
_live: list[subprocess.Popen[bytes]] = []  # children of the current step
_servers: list[subprocess.Popen[bytes]] = []  # Redis: lives until the end


def spawn(
    cmd: list[str], env: dict[str, str], log: Path, *, server: bool = False
) -> subprocess.Popen[bytes]:
    """A child in its own session (Ctrl-C reaches only us; we kill its whole group)."""
    with log.open("ab") as out:
        proc = subprocess.Popen(
            cmd,
            cwd=HERE,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    (_servers if server else _live).append(proc)
    return proc


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(10)
    for group in (_live, _servers):
        if proc in group:
            group.remove(proc)


def stop(proc: subprocess.Popen[bytes], grace: float = 20.0, wrapped: bool = False) -> int | None:
    """SIGTERM (every peer's graceful stop), then SIGKILL of the group after ``grace``.

    ``wrapped``: the child is a wrapper (a profiler) around the worker: the worker gets
    the SIGTERM, and the wrapper ends when it does (py-spy kills its child when it is
    stopped itself, before the worker could write its last results).
    """
    if proc.poll() is None:
        targets = [proc.pid]
        if wrapped:
            table = proc_stat_all()
            targets = [
                pid
                for pid in tree_pids([proc.pid], table)
                if pid != proc.pid and b"conveyor_peer.py" in _cmdline(pid)
            ] or targets
        for pid in targets:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            print(f"    (pid {proc.pid} ignored SIGTERM for {grace:.0f}s: killed)", flush=True)
    code = proc.poll()
    kill_group(proc)  # leftovers (pool children) too
    return code


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def cleanup(servers: bool = True) -> None:
    """Kill the step's children (and the servers we spawned, unless ``servers`` is false)."""
    for proc in list(_live) + (list(_servers) if servers else []):
        kill_group(proc)


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def run_json(cmd: list[str], env: dict[str, str], log: Path, timeout: float) -> dict[str, Any]:
    """Run a producer/query child; its last stdout line is JSON. Kills it at ``timeout``."""
    proc = subprocess.Popen(
        cmd,
        cwd=HERE,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=log.open("ab"),
        start_new_session=True,
    )
    _live.append(proc)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        return {"error": f"STUCK: no answer within {timeout:.0f}s"}
    kill_group(proc)
    lines = out.decode(errors="replace").strip().splitlines()
    if proc.returncode != 0 or not lines:
        return {"error": f"exit {proc.returncode}: {tail(log, 6)}"}
    try:
        return json.loads(lines[-1])
    except ValueError:
        return {"error": f"no JSON: {lines[-1][:200]}"}


def tail(path: Path, n: int = 15) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-n:])
    except OSError:
        return ""


# -- /proc: CPU, RSS, noise ------------------------------------------------------------------
TICK = os.sysconf("SC_CLK_TCK")


def proc_stat_all() -> dict[int, tuple[int, float]]:
    """{pid: (ppid, CPU seconds incl. reaped children)} of every process."""
    out: dict[int, tuple[int, float]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            raw = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        f = raw.rsplit(")", 1)[1].split()
        # fields after ")": state ppid ... utime(11) stime(12) cutime(13) cstime(14)
        out[int(entry)] = (int(f[1]), sum(int(x) for x in f[11:15]) / TICK)
    return out


def tree_pids(roots: list[int], table: dict[int, tuple[int, float]]) -> set[int]:
    pids = {r for r in roots if r in table}
    grew = True
    while grew:
        grew = False
        for pid, (ppid, _) in table.items():
            if ppid in pids and pid not in pids:
                pids.add(pid)
                grew = True
    return pids


def tree_cpu(roots: list[int], table: dict[int, tuple[int, float]] | None = None) -> float:
    table = table if table is not None else proc_stat_all()
    return sum(table[p][1] for p in tree_pids(roots, table))


def tree_hwm_mib(roots: list[int]) -> list[float]:
    """Peak RSS (VmHWM) of each process of the trees, MiB."""
    out = []
    for pid in tree_pids(roots, proc_stat_all()):
        with contextlib.suppress(OSError, ValueError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    out.append(int(line.split()[1]) / 1024)
    return out


def machine_jiffies() -> tuple[int, int]:
    """(all, busy) jiffies of the machine since boot."""
    values = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    total = sum(values[:8])
    return total, total - values[3] - values[4]


def busy_share(seconds: float) -> float:
    t0, b0 = machine_jiffies()
    time.sleep(seconds)
    t1, b1 = machine_jiffies()
    return (b1 - b0) / max(1, t1 - t0)


class LoadWatch:
    """As in bench/sqlite_bench.py: wait for a quiet machine before a step, and tell
    afterwards how much CPU processes other than ours took meanwhile. "Ours" is this
    process tree (producers, workers, Redis) plus the PostgreSQL server we started."""

    def __init__(self, wait: float, roots: Callable[[], list[int]], limit: float = 0.25) -> None:
        self.wait, self.roots, self.limit = wait, roots, limit
        self.noisy: list[str] = []
        self._start: tuple[int, int, float] | None = None

    def before(self, label: str) -> None:
        deadline = time.monotonic() + self.wait
        busy = busy_share(0.5)
        while busy > self.limit and time.monotonic() < deadline:
            busy = busy_share(2.0)
        if busy > self.limit:
            print(f"    WARNING: machine {busy:.0%} busy before {label}", flush=True)
        self._start = (*machine_jiffies(), tree_cpu(self.roots()))

    def after(self) -> float:
        if self._start is None:
            return 0.0
        total0, busy0, ours0 = self._start
        total1, busy1 = machine_jiffies()
        machine = (total1 - total0) / TICK
        others = (busy1 - busy0) / TICK - (tree_cpu(self.roots()) - ours0)
        return max(0.0, others / machine) if machine > 0 else 0.0

    def noisy_step(self, label: str, share: float, final: bool) -> bool:
        if share <= self.limit / 2:
            return False
        if final:
            print(f"    WARNING: other processes used {share:.0%} of the machine", flush=True)
            self.noisy.append(f"{label} ({share:.0%})")
        else:
            print(f"    (other processes used {share:.0%} of the machine: again)", flush=True)
        return True


# -- servers -----------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """redis-server on a free loopback port, own temp dir, stock persistence (RDB)."""

    def __init__(self, parent: str | None) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="peers-redis-", dir=parent))
        self.port = free_port()
        exe = shutil.which("redis-server")
        if exe is None:
            raise SystemExit("redis-server not found: apt-get install -y redis-server")
        self.proc = spawn(
            [
                exe,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.dir),
                "--daemonize",
                "no",
                "--logfile",
                str(self.dir / "redis.log"),
            ],
            dict(os.environ),
            self.dir / "stdout.log",
            server=True,
        )
        deadline = time.monotonic() + 20
        while self.cli("PING") != "PONG":
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise SystemExit(f"redis-server did not start: {tail(self.dir / 'redis.log')}")
            time.sleep(0.05)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def cli(self, *args: str) -> str:
        try:
            return subprocess.run(
                ["redis-cli", "-h", "127.0.0.1", "-p", str(self.port), *args],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    def stop(self) -> None:
        stop(self.proc, 10)
        shutil.rmtree(self.dir, ignore_errors=True)


def postmaster_pid(pg: PostgresServer) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        return int((pg.data_dir / "postmaster.pid").read_text().split()[0])
    return None


# -- virtualenvs --------------------------------------------------------------------------------
def ensure_venv(name: str) -> Path:
    """bench/peers/.venvs/NAME with the PEERS.md pins; created (or redone) when they differ."""
    venv = VENVS / name
    marker = venv / "bench-pins.json"
    pins = VENV_PINS[name]
    python = venv / "bin" / "python"
    if python.exists() and marker.exists() and json.loads(marker.read_text()) == pins:
        return venv
    print(f"  creating {venv.relative_to(ROOT)}: pip install {' '.join(pins)}", flush=True)
    shutil.rmtree(venv, ignore_errors=True)
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", str(venv)], check=True)
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *pins],
        check=True,
    )
    marker.write_text(json.dumps(pins))
    return venv


def dist_versions(python: Path, dists: list[str]) -> dict[str, str]:
    """Installed versions of ``dists`` in the interpreter ``python`` ("?" when missing)."""
    code = (
        "import importlib.metadata as m, json, sys\n"
        "out = {}\n"
        "for d in sys.argv[1:]:\n"
        "    try: out[d] = m.version(d)\n"
        "    except m.PackageNotFoundError: out[d] = '?'\n"
        "print(json.dumps(out))"
    )
    try:
        raw = subprocess.run(
            [str(python), "-c", code, *dists],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
        return dict(json.loads(raw))
    except (OSError, ValueError, subprocess.SubprocessError):
        return dict.fromkeys(dists, "?")


# Libraries under each peer worth naming next to its version.
STACK = {
    "conveyor": ["asyncpg", "orjson"],
    "pgqueuer": ["asyncpg", "typer", "uvloop"],
    "procrastinate": ["psycopg", "psycopg-binary", "psycopg-pool"],
    "celery": ["kombu", "redis"],
    "arq": ["redis", "hiredis"],
}


# -- peers ---------------------------------------------------------------------------------------
@dataclass
class Peer:
    key: str
    label: str
    backend: str  # postgresql | sqlite | redis
    module: str
    venv: str | None  # None: /work/main/.venv
    dist: str
    has_bulk: bool
    setup: str  # how its worker runs (for the report)
    durability: str
    version: str = "?"
    stack: str = ""

    @property
    def python(self) -> Path:
        return MAIN_PY if self.venv is None else VENVS / self.venv / "bin" / "python"

    def bin(self, name: str) -> str:
        return str(VENVS / (self.venv or "") / "bin" / name)


PG_DURABLE = "durable: each commit fsynced (PostgreSQL fsync=on, synchronous_commit=on)"
REDIS_DURABILITY = (
    "not durable per job: Redis RDB snapshots (stock `save` rules), no AOF: "
    "a crash loses what came after the last snapshot"
)


def make_peers(args: argparse.Namespace) -> list[Peer]:
    c = args.conveyor_concurrency
    return [
        Peer(
            "conveyor-pg",
            "Conveyor",
            "postgresql",
            "conveyor_peer.py",
            None,
            "conveyor",
            True,
            f"worker concurrency {c} (asyncpg pool 10, LISTEN/NOTIFY wake-ups, poll 1 s); "
            "bulk = app.enqueue_many",
            PG_DURABLE,
        ),
        Peer(
            "conveyor-sqlite",
            "Conveyor",
            "sqlite",
            "conveyor_peer.py",
            None,
            "conveyor",
            True,
            f"worker concurrency {c}; SQLite WAL, synchronous=FULL (store defaults); "
            "bulk = app.enqueue_many",
            "durable: each commit fsynced (SQLite WAL, synchronous=FULL)",
        ),
        Peer(
            "pgqueuer",
            "pgqueuer",
            "postgresql",
            "pgqueuer_peer.py",
            "pgqueuer",
            "pgqueuer",
            True,
            "`pgq install`; `pgq run --log-level WARNING pgqueuer_peer:create` (its defaults: "
            "batch size 10, no concurrency cap, uvloop); bulk = Queries.enqueue with lists",
            PG_DURABLE,
        ),
        Peer(
            "procrastinate",
            "procrastinate",
            "postgresql",
            "procrastinate_peer.py",
            "procrastinate",
            "procrastinate",
            True,
            "`procrastinate schema --apply`; `procrastinate --log-level=warning worker "
            "--concurrency=10` (PsycopgConnector, psycopg[binary]); bulk = batch_defer_async",
            PG_DURABLE,
        ),
        Peer(
            "celery",
            "Celery",
            "redis",
            "celery_peer.py",
            "celery",
            "celery",
            True,
            "`celery worker --pool=threads --concurrency=10 --loglevel=WARNING`, Redis broker, "
            "no result backend, other settings default; bulk = group(...).apply_async()",
            REDIS_DURABILITY,
        ),
        Peer(
            "arq",
            "arq",
            "redis",
            "arq_peer.py",
            "arq",
            "arq",
            False,
            "`arq arq_peer.WorkerSettings` with a WARNING log config (its defaults: max_jobs 10, "
            "poll_delay 0.5 s, results kept 1 h); no bulk API",
            REDIS_DURABILITY,
        ),
    ]


def wrapped(peer: Peer, args: argparse.Namespace) -> bool:
    return bool(args.conveyor_wrapper) and peer.key.startswith("conveyor")


def worker_cmd(peer: Peer, k: int, args: argparse.Namespace) -> list[str]:
    if peer.key.startswith("conveyor"):
        wrapper = shlex.split(args.conveyor_wrapper.replace("{run}", f"{peer.key}-{k}"))
        return [
            *wrapper,
            str(MAIN_PY),
            str(HERE / "conveyor_peer.py"),
            "worker",
            "--concurrency",
            str(args.conveyor_concurrency),
        ]
    if peer.key == "pgqueuer":
        return [peer.bin("pgq"), "run", "--log-level", "WARNING", "pgqueuer_peer:create"]
    if peer.key == "procrastinate":
        return [
            peer.bin("procrastinate"),
            "--app=procrastinate_peer.app",
            "--log-level=warning",
            "worker",
            "--concurrency=10",
        ]
    if peer.key == "celery":
        return [
            peer.bin("celery"),
            "-A",
            "celery_peer",
            "worker",
            "--pool=threads",
            "--concurrency=10",
            "--loglevel=WARNING",
            f"--hostname=bench{k}@%h",
        ]
    if peer.key == "arq":
        return [
            peer.bin("arq"),
            "arq_peer.WorkerSettings",
            "--custom-log-dict",
            "arq_peer.LOG_CONFIG",
        ]
    raise ValueError(peer.key)


# -- one step's backend --------------------------------------------------------------------------
class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.pg: PostgresServer | None = None
        self.redis: RedisServer | None = None
        self.templates: dict[str, Any] = {}
        self.tmp = Path(tempfile.mkdtemp(prefix="peers-bench-", dir=args.dir))
        self.step_no = 0
        self.watch = LoadWatch(args.wait_idle, self.our_roots)

    def our_roots(self) -> list[int]:
        roots = [os.getpid()]
        pm = postmaster_pid(self.pg) if self.pg else None
        return [*roots, pm] if pm else roots

    def close(self) -> None:
        cleanup()
        if self.redis is not None:
            self.redis.stop()
        if self.pg is not None:
            self.pg.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def base_env(self, peer: Peer, out: Path) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "VIRTUAL_ENV"))}
        env["PYTHONPATH"] = str(HERE)
        env["BENCH_OUT_DIR"] = str(out)
        env["PATH"] = f"{peer.python.parent}:{env.get('PATH', '')}"
        return env

    def template(self, peer: Peer) -> Any:
        """A database with the peer's schema installed its documented way, cloned per step."""
        if peer.key in self.templates:
            return self.templates[peer.key]
        assert self.pg is not None
        log = self.tmp / f"setup-{peer.key}.log"

        def prepare(dsn: str) -> None:
            env = self.base_env(peer, self.tmp)
            env["BENCH_PG_DSN"] = env["BENCH_DB_URL"] = dsn
            if peer.key == "pgqueuer":
                cmd = [peer.bin("pgq"), "--pg-dsn", dsn, "install"]
            elif peer.key == "procrastinate":
                cmd = [
                    peer.bin("procrastinate"),
                    "--app=procrastinate_peer.app",
                    "schema",
                    "--apply",
                ]
            else:  # Conveyor migrates on open
                cmd = [str(peer.python), peer.module, "queued"]
            with log.open("ab") as out:
                proc = subprocess.run(
                    cmd, cwd=HERE, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=120
                )
            if proc.returncode != 0:
                raise RuntimeError(f"schema setup of {peer.key} failed: {tail(log)}")

        self.templates[peer.key] = self.pg.create_template(
            f"tpl_{peer.key.replace('-', '_')}", prepare
        )
        return self.templates[peer.key]

    @contextlib.contextmanager
    def backend(self, peer: Peer, name: str) -> Any:
        """A fresh database / empty Redis for one step; yields (env, step dir)."""
        self.step_no += 1
        out = self.tmp / f"{self.step_no:03d}-{peer.key}-{name}"
        out.mkdir()
        env = self.base_env(peer, out)
        db_name = None
        if peer.backend == "postgresql":
            assert self.pg is not None
            db_name = self.template(peer).clone(f"s{self.step_no}_{peer.key.replace('-', '_')}")
            env["BENCH_PG_DSN"] = env["BENCH_DB_URL"] = self.pg.dsn(db_name)
            self.pg.execute("CHECKPOINT;")  # no checkpoint left over from the last step
        elif peer.backend == "sqlite":
            env["BENCH_DB_URL"] = f"sqlite:///{out / 'conveyor.db'}"
        else:
            assert self.redis is not None
            self.redis.cli("FLUSHALL")
            env["BENCH_REDIS_URL"] = self.redis.url
        try:
            q = self.queued(peer, env, out)  # also creates the SQLite schema
            if q.get("queued") != 0:
                raise RuntimeError(f"fresh backend of {peer.key} not empty: {q}")
            yield env, out
        finally:
            cleanup(servers=False)
            if db_name is not None and self.pg is not None:
                with contextlib.suppress(RuntimeError):
                    self.pg.drop_database(db_name)

    def pg_stats_reset(self) -> None:
        if self.args.pg_stats and self.pg is not None:
            self.pg.execute("SELECT pg_stat_statements_reset();")

    def pg_stats_report(self, peer: Peer, n: int) -> None:
        """Top statements of a processing step (``--pg-stats``, for profiling runs only)."""
        if not (self.args.pg_stats and self.pg is not None and peer.backend == "postgresql"):
            return
        rows = self.pg.query(
            "SELECT calls, round(total_exec_time::numeric, 1), "
            "round((total_exec_time / calls)::numeric, 3), rows, wal_records, wal_bytes, "
            "regexp_replace(left(query, 90), '\\s+', ' ', 'g') "
            "FROM pg_stat_statements WHERE dbid <> (SELECT oid FROM pg_database "
            "WHERE datname = 'postgres') ORDER BY total_exec_time DESC LIMIT 10"
        )
        total = sum(float(r[1]) for r in rows)
        print(f"    pg_stat_statements (top 10, {total:.0f} ms exec in all; {n} jobs):")
        print("      calls   total ms  mean ms     rows   wal rec   wal bytes  query")
        for calls, tot, mean, nrows, wal, walb, query in rows:
            print(f"      {calls:>6} {tot:>10} {mean:>8} {nrows:>8} {wal:>9} {walb:>11}  {query}")

    def queued(self, peer: Peer, env: dict[str, str], out: Path) -> dict[str, Any]:
        return run_json([str(peer.python), peer.module, "queued"], env, out / "queued.log", 60)

    def produce(
        self, peer: Peer, env: dict[str, str], out: Path, mode: str, n: int, *extra: str
    ) -> dict[str, Any]:
        cmd = [str(peer.python), peer.module, "produce", mode, "--n", str(n)]
        cmd += ["--deadline", str(self.args.deadline), *extra]
        return run_json(cmd, env, out / f"producer-{mode}.log", self.args.deadline + 30)


# -- steps ---------------------------------------------------------------------------------------
@dataclass
class Outcome:
    value: float | None = None  # jobs/s; None: failed (see note)
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def step_enqueue(bench: Bench, peer: Peer, mode: str, n: int) -> Outcome:
    with bench.backend(peer, mode) as (env, out):
        bench.pg_stats_reset()
        r = bench.produce(peer, env, out, mode, n)
        bench.pg_stats_report(peer, n)
        if "error" in r:
            return Outcome(None, r["error"])
        q = bench.queued(peer, env, out)
        if r["sent"] != n or q.get("queued") != n:
            return Outcome(None, f"sent {r['sent']}/{n} in {r['elapsed']:.1f}s, queued {q}")
        return Outcome(n / r["elapsed"], extra={"elapsed": r["elapsed"]})


def step_process(bench: Bench, peer: Peer, n: int, procs: int) -> Outcome:
    args = bench.args
    with bench.backend(peer, f"process{procs}") as (env, out):
        r = bench.produce(peer, env, out, "preload", n)
        q = bench.queued(peer, env, out)
        if "error" in r or q.get("queued") != n:
            return Outcome(None, f"preload failed: {r.get('error', '')} queued {q}")
        bench.pg_stats_reset()
        reader = StampReader(out)
        t_spawn = time.perf_counter()
        workers = [
            spawn(worker_cmd(peer, k, args), env, out / f"worker-{k}.log") for k in range(procs)
        ]
        pids = [w.pid for w in workers]
        server = bench.our_roots()[1:] if peer.backend == "postgresql" else []
        if peer.backend == "redis" and bench.redis is not None:
            server = [bench.redis.proc.pid]
        deadline = time.monotonic() + args.deadline
        first: tuple[float, int, tuple[int, int], float, float] | None = None
        note = ""
        while True:
            got = reader.poll()
            if got and first is None:
                table = proc_stat_all()
                first = (
                    time.perf_counter(),
                    got,
                    machine_jiffies(),
                    tree_cpu(pids, table),
                    tree_cpu(server, table),
                )
            if got >= n:
                break
            dead = [w for w in workers if w.poll() is not None]
            if dead:
                note = f"worker exited ({dead[0].returncode}): {tail(out / 'worker-0.log', 5)}"
                break
            if time.monotonic() > deadline:
                note = f"STUCK: {got}/{n} jobs ran within {args.deadline:.0f}s"
                break
            time.sleep(0.02)
        t_done = time.perf_counter()
        table = proc_stat_all()
        done_jiffies = machine_jiffies()
        worker_cpu, server_cpu = tree_cpu(pids, table), tree_cpu(server, table)
        rss = tree_hwm_mib(pids)
        codes = [stop(w, wrapped=wrapped(peer, args)) for w in workers]
        bench.pg_stats_report(peer, n)
        stats = [json.loads(p.read_text()) for p in out.glob("stats-*.json")]
        reader.poll()
        if note:
            return Outcome(None, note)
        extra: dict[str, Any] = {"rss_mib": max(rss, default=0.0), "exit_codes": codes}
        if stats:
            extra["maxrss_mib"] = max(s["maxrss_kb"] for s in stats) / 1024
        wrong = [i for i in reader.stamps if not 0 <= i < n]
        if wrong or reader.duplicates:
            extra["anomaly"] = f"{len(wrong)} unknown ids, {reader.duplicates} duplicate runs"
        # Steady state: from the moment every worker process had started its first job.
        per_proc_first = [
            min(float(line.split()[1]) for line in p.read_text().splitlines() if line)
            for p in out.glob("stamps-*.txt")
        ]
        t_first, t_last = min(reader.stamps.values()), max(reader.stamps.values())
        t_all = max(per_proc_first)
        in_window = sum(1 for t in reader.stamps.values() if t >= t_all)
        window = t_last - t_all
        value = in_window / window if window > 0 and in_window > n // 2 else n / (t_last - t_first)
        extra.update(
            {
                "first_to_last": n / (t_last - t_first),
                "from_spawn": n / (t_last - t_spawn),
                "startup_s": t_first - t_spawn,
                "all_procs_after_s": t_all - t_first,
                "procs_seen": len(per_proc_first),
            }
        )
        if first is not None:
            t0, got0, (tot0, busy0), wcpu0, scpu0 = first
            jobs = n - got0
            if jobs > 0:
                span_jiffies = done_jiffies[0] - tot0
                extra["machine_cpu_ms_per_job"] = (done_jiffies[1] - busy0) / TICK * 1000 / jobs
                extra["worker_cpu_ms_per_job"] = (worker_cpu - wcpu0) * 1000 / jobs
                extra["server_cpu_ms_per_job"] = (server_cpu - scpu0) * 1000 / jobs
                extra["machine_busy"] = (done_jiffies[1] - busy0) / max(1, span_jiffies)
                extra["observed_s"] = t_done - t0
        # The peer's own books: nothing left queued (and all completed where it says so).
        q = bench.queued(peer, env, out)
        if q.get("queued") != 0 or (q.get("done") is not None and q["done"] != n):
            extra["anomaly"] = (extra.get("anomaly", "") + f" queue after stop: {q}").strip()
        return Outcome(value, extra=extra)


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_values:
        return float("nan")
    rank = math.ceil(q / 100 * len(sorted_values))
    return sorted_values[max(0, min(len(sorted_values) - 1, rank - 1))]


def step_latency(bench: Bench, peer: Peer, n: int) -> Outcome:
    args = bench.args
    with bench.backend(peer, "latency") as (env, out):
        worker = spawn(worker_cmd(peer, 0, args), env, out / "worker-0.log")
        sent_file = out / "sent.json"
        r = bench.produce(
            peer, env, out, "latency", n, "--gap", str(LATENCY_GAP), "--out", str(sent_file)
        )
        if "error" in r:
            stop(worker)
            return Outcome(None, f"{r['error']} {tail(out / 'worker-0.log', 5)}")
        reader = StampReader(out)
        deadline = time.monotonic() + args.deadline
        ids = range(n)
        while True:
            reader.poll()
            if reader.count_in(ids) >= n:
                break
            if time.monotonic() > deadline or worker.poll() is not None:
                break
            time.sleep(0.02)
        stop(worker, wrapped=wrapped(peer, args))
        reader.poll()
        got = reader.count_in(ids)
        if got < n:
            return Outcome(None, f"STUCK: {got}/{n} latency jobs ran")
        sent = {int(k): v for k, v in json.loads(sent_file.read_text()).items()}
        lat = sorted((reader.stamps[i] - sent[i]) * 1000 for i in ids)
        q = {p: percentile(lat, int(p[1:])) for p in ("p50", "p95", "p99")}
        q["max"] = lat[-1]
        extra_ids = [i for i in reader.stamps if not (0 <= i < n or i >= WARMUP_BASE)]
        if extra_ids or reader.duplicates:
            q["anomaly"] = f"{len(extra_ids)} unknown ids, {reader.duplicates} duplicates"
        return Outcome(q["p95"], extra=q)


# -- report -----------------------------------------------------------------------------------
COLUMNS = [
    ("single", "enqueue 1-by-1 /s"),
    ("bulk", "bulk enqueue /s"),
    ("process1", "process, 1 worker proc /s"),
    ("process2", "process, 2 worker procs /s"),
    ("latency", "enqueue->start p50 / p95 / p99 ms (ratios of p50 / p95)"),
]


def fmt_rate(v: float) -> str:
    return f"{v:,.0f}"


def fmt_ms(v: float) -> str:
    return f"{v:.1f}" if v < 100 else f"{v:,.0f}"


def cell(key: str, o: Outcome | None, ref: Outcome | None, is_ref: bool) -> str:
    if o is None:
        return "—"
    if o.value is None:
        return "STUCK" if o.note.startswith("STUCK") else "FAILED"
    if key == "latency":
        text = " / ".join(fmt_ms(o.extra[p]) for p in ("p50", "p95", "p99"))
        if not is_ref and ref is not None and ref.value:
            text += f" ({o.extra['p50'] / ref.extra['p50']:.2f}x / {o.value / ref.value:.2f}x)"
        return text
    text = fmt_rate(o.value)
    if not is_ref and ref is not None and ref.value:
        text += f" ({o.value / ref.value:.2f}x)"
    return text


def peer_name(p: Peer) -> str:
    return f"{p.label} {p.version}"


def backend_name(p: Peer) -> str:
    return {"postgresql": "PostgreSQL", "sqlite": "SQLite", "redis": "Redis"}[p.backend]


def build_table(peers: list[Peer], results: dict[str, dict[str, Outcome]]) -> list[list[str]]:
    ref = results.get("conveyor-pg", {})
    rows = []
    for p in peers:
        r = results.get(p.key, {})
        row = [peer_name(p), backend_name(p)]
        row += [cell(k, r.get(k), ref.get(k), p.key == "conveyor-pg") for k, _ in COLUMNS]
        row.append("yes" if p.durability.startswith("durable") else "no (RDB snapshots)")
        rows.append(row)
    return rows


HEADER = ["peer", "backend", *(label for _, label in COLUMNS), "durable per job"]


def detail_rows(peers: list[Peer], results: dict[str, dict[str, Outcome]]) -> list[list[str]]:
    rows = []
    for p in peers:
        for k in ("process1", "process2"):
            o = results.get(p.key, {}).get(k)
            if o is None or o.value is None:
                continue
            e = o.extra
            rss = e.get("maxrss_mib") or e.get("rss_mib", 0.0)
            rows.append(
                [
                    f"{peer_name(p)} ({backend_name(p)})",
                    k[-1],
                    fmt_rate(e["first_to_last"]),
                    f"{e['startup_s']:.2f}",
                    f"{e.get('machine_cpu_ms_per_job', float('nan')):.3f}",
                    f"{e.get('worker_cpu_ms_per_job', float('nan')):.3f}",
                    f"{e.get('server_cpu_ms_per_job', float('nan')):.3f}",
                    f"{rss:.0f}",
                ]
            )
    return rows


DETAIL_HEADER = [
    "peer",
    "worker procs",
    "first->last job /s",
    "spawn->first job s",
    "machine CPU ms/job",
    "worker CPU ms/job",
    "server CPU ms/job",
    "worker peak RSS MiB",
]


def render_text(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = []
    for j, row in enumerate([header, *rows]):
        lines.append(
            "  ".join(
                c.ljust(widths[i]) if i < 2 else c.rjust(widths[i]) for i, c in enumerate(row)
            )
        )
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def render_md(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |"]
    out.append("|" + "|".join(["---", "---"] + ["---:"] * (len(header) - 2)) + "|")
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def machine_facts(pg: PostgresServer | None, redis: RedisServer | None) -> dict[str, str]:
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = "?"
    with contextlib.suppress(OSError, ValueError):
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f"{kb / 1024 / 1024:.0f} GiB"
    facts = {
        "CPUs": f"{os.cpu_count()} ({cpu})",
        "memory": mem,
        "OS": f"{platform.system()} {platform.release()}",
        "Python": sys.version.split()[0],
    }
    if pg is not None:
        facts["PostgreSQL"] = pg.query("SHOW server_version")[0][0]
        settings = pg.query(
            "SELECT string_agg(name || '=' || setting, ', ' ORDER BY name) FROM pg_settings "
            "WHERE name IN ('fsync','synchronous_commit','full_page_writes','wal_sync_method',"
            "'shared_buffers','max_wal_size','checkpoint_timeout')"
        )[0][0]
        facts["PostgreSQL settings"] = settings
    if redis is not None:
        info = redis.cli("INFO", "server")
        version = next(
            (ln.split(":")[1] for ln in info.splitlines() if ln.startswith("redis_version")), "?"
        )
        facts["Redis"] = version
        save = redis.cli("CONFIG", "GET", "save").splitlines()
        aof = redis.cli("CONFIG", "GET", "appendonly").splitlines()
        facts["Redis persistence"] = (
            f"save '{save[-1] if save else '?'}', appendonly {aof[-1] if aof else '?'}"
        )
    return facts


# -- main ---------------------------------------------------------------------------------
STEPS = ("single", "bulk", "process1", "process2", "latency")


def run_peer(bench: Bench, peer: Peer, results: dict[str, Outcome]) -> None:
    args = bench.args
    n = args.n
    plan: list[tuple[str, Callable[[], Outcome]]] = []
    if "single" in args.steps:
        plan.append(("single", lambda: step_enqueue(bench, peer, "single", n)))
    if "bulk" in args.steps and peer.has_bulk:
        plan.append(("bulk", lambda: step_enqueue(bench, peer, "bulk", n)))
    for procs in (1, 2):
        if f"process{procs}" in args.steps:
            plan.append((f"process{procs}", lambda k=procs: step_process(bench, peer, n, k)))
    if "latency" in args.steps:
        plan.append(("latency", lambda: step_latency(bench, peer, args.latency_n)))
    for key, fn in plan:
        label = f"{peer.key} {key}"
        runs: list[Outcome] = []
        for _ in range(args.repeat):
            for attempt in range(args.retry_noisy + 1):
                bench.watch.before(label)
                t0 = time.monotonic()
                try:
                    o = fn()
                except RuntimeError as exc:
                    o = Outcome(None, f"error: {exc}")
                took = time.monotonic() - t0
                print(f"  {label:<28} {describe(key, o)}  [{took:.1f}s]", flush=True)
                final = attempt == args.retry_noisy or o.value is None
                if not bench.watch.noisy_step(label, bench.watch.after(), final):
                    break
            runs.append(o)
            if o.value is None:
                break
        results[key] = median_outcome(key, runs)


def median_outcome(key: str, runs: list[Outcome]) -> Outcome:
    ok = [r for r in runs if r.value is not None]
    if not ok:
        return runs[-1]
    ok.sort(key=lambda r: r.value or 0.0)
    mid = ok[(len(ok) - 1) // 2] if key == "latency" else ok[len(ok) // 2]
    if len(ok) > 1:
        mid.extra["runs"] = [r.value for r in ok]
    return mid


def describe(key: str, o: Outcome) -> str:
    if o.value is None:
        return f"FAILED: {o.note}"
    e = o.extra
    if key == "latency":
        text = (
            f"p50 {e['p50']:.2f} ms, p95 {e['p95']:.2f} ms, p99 {e['p99']:.2f} ms, "
            f"max {e['max']:.1f} ms"
        )
    elif key.startswith("process"):
        text = (
            f"{o.value:,.0f} jobs/s (first->last {e['first_to_last']:,.0f}/s, startup "
            f"{e['startup_s']:.2f}s, procs {e['procs_seen']}; machine CPU "
            f"{e.get('machine_cpu_ms_per_job', 0):.3f} ms/job, worker "
            f"{e.get('worker_cpu_ms_per_job', 0):.3f}, "
            f"server {e.get('server_cpu_ms_per_job', 0):.3f};"
            f" RSS {e.get('maxrss_mib') or e.get('rss_mib', 0):.0f} MiB)"
        )
    else:
        text = f"{o.value:,.0f} jobs/s"
    if "anomaly" in e:
        text += f"  ANOMALY: {e['anomaly']}"
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--n", type=int, help=f"jobs per throughput step (default {FULL_N:,})")
    p.add_argument("--quick", action="store_true", help=f"N = {QUICK_N:,}")
    p.add_argument("--latency-n", type=int, default=LATENCY_N, help="latency jobs (default 300)")
    p.add_argument("--markdown", metavar="PATH", help="also write the tables as markdown")
    p.add_argument(
        "--peer",
        action="append",
        choices=["conveyor-pg", "conveyor-sqlite", "pgqueuer", "procrastinate", "celery", "arq"],
        help="measure only these (repeatable; default all)",
    )
    p.add_argument("--step", action="append", choices=STEPS, help="only these steps (repeatable)")
    p.add_argument("--repeat", type=int, default=1, help="runs per figure, median (default 1)")
    p.add_argument(
        "--conveyor-concurrency", type=int, default=200, help="Conveyor worker concurrency"
    )
    p.add_argument("--deadline", type=float, default=180.0, help="seconds per step (default 180)")
    p.add_argument("--wait-idle", type=float, default=60.0, help="wait up to S for a quiet machine")
    p.add_argument("--retry-noisy", type=int, default=1, help="re-measure a disturbed step K times")
    p.add_argument("--dir", help="parent folder of the temporary files (default $TMPDIR)")
    p.add_argument(
        "--conveyor-wrapper",
        default="",
        help="command put before Conveyor's worker, e.g. a profiler ({run} = peer-worker)",
    )
    p.add_argument(
        "--pg-stats",
        action="store_true",
        help="profiling: load pg_stat_statements, print the top statements of each "
        "PostgreSQL enqueue and processing step",
    )
    args = p.parse_args(argv)
    args.n = args.n or (QUICK_N if args.quick else FULL_N)
    args.steps = set(args.step or STEPS)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGINT, _raise_interrupt)  # even if started with SIGINT ignored
    atexit.register(cleanup)

    peers = [pr for pr in make_peers(args) if not args.peer or pr.key in args.peer]
    for pr in peers:
        if pr.venv is not None:
            ensure_venv(pr.venv)
        found = dist_versions(pr.python, [pr.dist, *STACK[pr.dist]])
        pr.version = found.pop(pr.dist)
        pr.stack = ", ".join(f"{k} {v}" for k, v in found.items())

    bench = Bench(args)
    results: dict[str, dict[str, Outcome]] = {}
    started = time.strftime("%Y-%m-%d %H:%M")
    try:
        if any(pr.backend == "postgresql" for pr in peers):
            settings = {"shared_preload_libraries": "'pg_stat_statements'"} if args.pg_stats else {}
            bench.pg = PostgresServer(parent=args.dir, settings=settings).start()
            if args.pg_stats:
                bench.pg.execute("CREATE EXTENSION pg_stat_statements;")
        if any(pr.backend == "redis" for pr in peers):
            bench.redis = RedisServer(args.dir)
        facts = machine_facts(bench.pg, bench.redis)
        print(
            f"peers bench ({git_revision()}), N={args.n:,}, latency {args.latency_n} jobs "
            f"{LATENCY_GAP * 1000:.0f} ms apart, repeat {args.repeat}",
            flush=True,
        )
        for k, v in facts.items():
            print(f"  {k}: {v}")
        for pr in peers:
            print(f"{peer_name(pr)} ({backend_name(pr)}; {pr.stack}): {pr.setup}", flush=True)
            results[pr.key] = {}
            run_peer(bench, pr, results[pr.key])
    except KeyboardInterrupt:
        print("\ninterrupted: partial results", file=sys.stderr)
    finally:
        bench.close()

    rows = build_table(peers, results)
    details = detail_rows(peers, results)
    print()
    print(render_text(HEADER, rows))
    print()
    print(render_text(DETAIL_HEADER, details))
    notes = report_notes(args, peers, results, bench.watch.noisy)
    for note in notes:
        print(f"  * {note}")
    if args.markdown:
        md = [
            f"Peers benchmark, {started}, Conveyor {git_revision()}; N = {args.n:,} jobs per "
            f"throughput step, latency {args.latency_n} jobs {LATENCY_GAP * 1000:.0f} ms apart; "
            f"{'median of ' + str(args.repeat) + ' runs' if args.repeat > 1 else 'one run'} "
            "per figure. Ratios in brackets: peer / Conveyor-PostgreSQL (above 1 is better "
            "for jobs/s, worse for latency).",
            "",
            *render_md(HEADER, rows),
            "",
            "Processing details (CPU per job over the processing window; server = PostgreSQL "
            "or Redis processes):",
            "",
            *render_md(DETAIL_HEADER, details),
            "",
            "Machine and servers:",
            "",
            *[f"- {k}: {v}" for k, v in facts.items()],
            "",
            "Setup of each row:",
            "",
            *[
                f"- {peer_name(pr)} ({backend_name(pr)}; {pr.stack}): {pr.setup}. "
                f"{pr.durability[0].upper()}{pr.durability[1:]}."
                for pr in peers
            ],
            "",
            "Notes:",
            "",
            *[f"- {n}" for n in notes],
            "",
        ]
        Path(args.markdown).write_text("\n".join(md))
        print(f"\nmarkdown written to {args.markdown}")
    return 0


def report_notes(
    args: argparse.Namespace,
    peers: list[Peer],
    results: dict[str, dict[str, Outcome]],
    noisy: list[str],
) -> list[str]:
    notes = [
        "every job's handler appends its id and start time to a file of its process; a step "
        "passes only when all N distinct ids were seen and the peer's queue is empty afterwards "
        "(Conveyor and procrastinate: all N in their completed state)",
        "enqueue figures are timed inside a producer process (connection already open); "
        f"bulk = batches of {BULK_BATCH:,}; processing pre-loads N jobs, then starts the worker "
        "process(es)",
        "process /s = jobs whose handler started after every worker process had started its "
        "first job, divided by the time from then to the last job's start (startup excluded: "
        "see spawn->first job); first->last job /s counts all N",
        "latency = handler start - the producer's perf_counter() just before its enqueue call "
        "(CLOCK_MONOTONIC, same machine); producer and worker in separate processes, the worker "
        f"idle and warmed up (10 jobs) first; nearest-rank percentiles of {args.latency_n} jobs",
        "all processes (producer, workers, PostgreSQL, Redis) share the machine's cores on "
        "127.0.0.1; every peer's logging at WARNING",
        "arq polls Redis every 0.5 s (poll_delay) and reads at most 100 queued ids per poll "
        "(queue_read_limit = max(5 x max_jobs, 100)), with no wake-up on enqueue; Celery's "
        "worker takes ~1.4 s to start (mingle): their defaults",
    ]
    for pr in peers:
        for key, o in results.get(pr.key, {}).items():
            if o.value is None:
                notes.append(f"{pr.key} {key}: {o.note}")
            elif "anomaly" in o.extra:
                notes.append(f"{pr.key} {key}: ANOMALY {o.extra['anomaly']}")
    if noisy:
        notes.append("WARNING: other processes used the CPU during: " + ", ".join(noisy))
    return notes


if __name__ == "__main__":
    sys.exit(main())
