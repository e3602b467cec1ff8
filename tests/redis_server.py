"""A throwaway Redis server for tests and benchmarks (standard library only).

    server = RedisServer()
    server.start()                 # redis-server on a free 127.0.0.1 port, own temp dir
    url = server.url               # redis://127.0.0.1:PORT/0
    server.kill()                  # SIGKILL: a crash
    server.restart()               # same port and dir: the AOF brings the data back
    server.stop()                  # SHUTDOWN, then the temp dir is removed

Durability is on: ``--appendonly yes --appendfsync always`` (every write is
fsynced before it is acknowledged), no RDB snapshots, so a kill -9 loses
nothing a client was told was written. The binary is ``$CONVEYOR_REDIS_BIN``
or ``redis-server`` on ``PATH``; ``RedisUnavailable`` when there is none.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

__all__ = ["RedisServer", "RedisUnavailable", "find_redis_server"]

START_TIMEOUT = 15.0


class RedisUnavailable(RuntimeError):
    """No usable redis-server binary on this machine."""


def find_redis_server() -> str:
    explicit = os.environ.get("CONVEYOR_REDIS_BIN")
    if explicit:
        path = Path(explicit)
        if path.is_dir():
            path = path / "redis-server"
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
        raise RedisUnavailable(f"CONVEYOR_REDIS_BIN={explicit} is not an executable redis-server")
    found = shutil.which("redis-server")
    if found is None:
        raise RedisUnavailable("redis-server not found: looked at $CONVEYOR_REDIS_BIN and PATH")
    return found


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ping(port: int, timeout: float = 0.5) -> bool:
    """True when the server answers PING with PONG (not while it is loading the AOF)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    def __init__(self, binary: str | None = None) -> None:
        self.binary = binary or find_redis_server()
        self.port = 0
        self.dir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: Path | None = None

    @property
    def url(self) -> str:
        if not self.port:
            raise RuntimeError("RedisServer.url before start()")
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> RedisServer:
        if self.dir is None:
            self.dir = Path(tempfile.mkdtemp(prefix="conveyor-redis-"))
            self._log = self.dir / "redis.log"
            atexit.register(self._cleanup)
        # A port taken between free_port() and bind: retry with another one (first start only).
        attempts = 1 if self.port else 5
        for _ in range(attempts):
            self.port = self.port or free_port()
            try:
                self._spawn()
                return self
            except RuntimeError:
                if attempts == 1:
                    raise
                self.port = 0
        raise RuntimeError(f"redis-server did not start; see {self._log}")

    def _spawn(self) -> None:
        assert self.dir is not None
        assert self._log is not None
        args = [
            self.binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--protected-mode", "no",
            "--dir", str(self.dir),
            "--save", "",
            "--appendonly", "yes",
            "--appendfsync", "always",
            "--logfile", str(self._log),
            "--daemonize", "no",
        ]  # fmt: skip
        self._proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                self._proc = None
                raise RuntimeError(f"redis-server exited at start; see {self._log}")
            if _ping(self.port):
                return
            # Poll, not sleep-and-hope: wait on the process itself between pings.
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout=0.02)
        self.kill()
        raise RuntimeError(f"redis-server did not answer PING in {START_TIMEOUT}s; see {self._log}")

    def stop(self) -> None:
        """Graceful shutdown (SIGTERM: redis flushes the AOF and exits)."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None

    def kill(self) -> None:
        """SIGKILL: a crash; with ``appendfsync always`` no acknowledged write is lost."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait()
        self._proc = None

    def restart(self, *, crash: bool = False) -> None:
        """Stop (or ``crash``) and start again on the same port and data directory."""
        if crash:
            self.kill()
        else:
            self.stop()
        self.start()

    def _cleanup(self) -> None:
        self.kill()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def close(self) -> None:
        """Stop the server and remove its directory."""
        self.stop()
        self._cleanup()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


if __name__ == "__main__":
    with RedisServer() as server:
        print(server.url, flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()
