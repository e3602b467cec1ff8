"""Distributed locks with fencing tokens, and leader leases, over a lock backend.

The backend is the store (``Store.acquire_lock`` & co., one statement per call)
or ``RedisLocks`` (storage/redis_locks.py); both hand out, per key, fencing
tokens that only grow. Nothing here reads the wall clock: ``clock`` gives the
time the backend compares expiries with, ``time.monotonic`` bounds waits and
tells when a held lock runs out locally.

- ``Locks.acquire`` / ``Locks.__call__`` (``async with locks("k", ttl=30)``):
  one holder at a time, ``wait`` seconds of polling with backoff (and an
  immediate wake-up when a holder in this process releases), else
  ``LockNotAcquired``.
- ``Locks.run``: run a coroutine function while holding the lock, renewing it in
  the background; the function is cancelled and ``LockLost`` raised if the
  lock can't be renewed.
- ``Locks.check``: the fence: ``StaleFencingToken`` unless the token still holds.
- ``Leadership``: a lease on ``leader:<name>`` for singletons (maintenance
  passes, a user's report sender): ``hold()`` takes or renews it and says
  whether this process leads; ``async with`` waits to lead and cancels its body
  if the lease is lost.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import random
import socket
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any, Protocol, TypeVar

import structlog

from conveyor.domain.errors import LockLost, LockNotAcquired, StaleFencingToken
from conveyor.domain.ids import new_token
from conveyor.domain.locks import LockInfo, check_lock_args, check_owner, leader_key

log = structlog.get_logger("conveyor.locks")

T = TypeVar("T")

#: First and longest pause between two tries of a held lock, in seconds.
FIRST_BACKOFF = 0.02
MAX_BACKOFF = 1.0
#: Seconds between tries to renew a lock or lease after the backend failed.
RENEW_RETRY = 0.2
#: The leader lease of the workers' maintenance passes (rescue of dead workers'
#: jobs, pruning): the lock key ``leader:conveyor.maintenance``.
MAINTENANCE_LEADER = "conveyor.maintenance"


class LockBackend(Protocol):
    """What a lock backend provides (``Store`` and ``RedisLocks`` do); see
    ``Store.acquire_lock`` for the meaning of each call."""

    async def acquire_lock(self, key: str, owner: str, ttl: float, now: datetime) -> int | None: ...

    async def extend_lock(
        self, key: str, owner: str, token: int, ttl: float, now: datetime
    ) -> bool: ...

    async def release_lock(self, key: str, owner: str, token: int, now: datetime) -> bool: ...

    async def check_lock(self, key: str, token: int, now: datetime) -> bool: ...

    async def list_locks(
        self, now: datetime, *, limit: int = 100, include_free: bool = False
    ) -> list[LockInfo]: ...


def new_owner() -> str:
    """A unique owner label: host, pid and a random part."""
    return f"{socket.gethostname()}-{os.getpid()}-{new_token()[:12]}"


class Lock:
    """A lock this process took. ``token`` is its fencing token: pass it along
    with every write the lock protects (see docs/locks.md).

    ``held`` is this process's view: released, or past its expiry as measured
    from before the request that took or last extended it, counts as not held.
    """

    def __init__(self, locks: Locks, key: str, owner: str, token: int, ttl: float, since: float):
        self._locks = locks
        self.key = key
        self.owner = owner
        self.token = token
        self.ttl = ttl
        self._deadline = since + ttl
        self._released = False

    @property
    def held(self) -> bool:
        return not self._released and time.monotonic() < self._deadline

    @property
    def remaining(self) -> float:
        """Seconds until the lock expires, as this process counts (0 when not held)."""
        return max(0.0, self._deadline - time.monotonic()) if not self._released else 0.0

    async def extend(self, ttl: float | None = None) -> None:
        """Hold the lock ``ttl`` more seconds from now (default: its own TTL).
        Raises ``LockLost`` when it expired, was released or was taken over."""
        ttl = self.ttl if ttl is None else ttl
        check_lock_args(self.key, ttl=ttl)
        started = time.monotonic()
        if self._released or not await self._locks.backend.extend_lock(
            self.key, self.owner, self.token, ttl, self._locks.clock()
        ):
            self._released = True
            raise LockLost(
                f"Lock {self.key!r} (token {self.token}) is no longer held: it expired, was "
                "released or taken over",
                key=self.key,
                token=self.token,
            )
        self.ttl = ttl
        self._deadline = started + ttl

    async def release(self) -> bool:
        """Give the lock up. Returns whether it was still held until now (``False``:
        it had expired, so another holder may have run meanwhile)."""
        if self._released:
            return False
        self._released = True
        try:
            return await self._locks.backend.release_lock(
                self.key, self.owner, self.token, self._locks.clock()
            )
        finally:
            self._locks.wake(self.key)

    async def check(self) -> None:
        """Raise ``StaleFencingToken`` unless this lock still holds its key."""
        await self._locks.check(self.key, self.token)

    def __repr__(self) -> str:
        return f"<Lock {self.key!r} token={self.token} held={self.held}>"


class LockRequest:
    """``async with locks(key, ...) as lock`` (also ``lock = await locks(key, ...)``)."""

    def __init__(self, locks: Locks, key: str, ttl: float, wait: float) -> None:
        self._locks, self._key, self._ttl, self._wait = locks, key, ttl, wait
        self._lock: Lock | None = None

    def __await__(self) -> Any:
        return self._locks.acquire(self._key, ttl=self._ttl, wait=self._wait).__await__()

    async def __aenter__(self) -> Lock:
        self._lock = await self._locks.acquire(self._key, ttl=self._ttl, wait=self._wait)
        return self._lock

    async def __aexit__(self, *exc: object) -> None:
        lock, self._lock = self._lock, None
        if lock is not None and not await lock.release():
            log.warning("lock_expired_before_release", key=lock.key, token=lock.token)


class Locks:
    """Distributed locks over ``backend`` (the store, or Redis).

    ``clock`` is the time expiries are stored and compared in (the app's clock);
    ``owner`` a label of this process (default: host-pid-random; every lock gets
    its own suffix so two locks of one process never share an owner).
    """

    def __init__(
        self,
        backend: LockBackend,
        *,
        clock: Callable[[], datetime],
        owner: str | None = None,
        rand: Callable[[], float] = random.random,
    ) -> None:
        if owner is not None:
            check_owner(owner)
        self.backend = backend
        self.clock = clock
        self.owner = owner or new_owner()
        self._rand = rand
        self._wakeups: dict[str, asyncio.Event] = {}

    def __call__(self, key: str, *, ttl: float = 30.0, wait: float = 0.0) -> LockRequest:
        """``async with locks("invoice:42", ttl=30, wait=5) as lock:`` (released at
        the end; see ``acquire``)."""
        check_lock_args(key, ttl=ttl, wait=wait)
        return LockRequest(self, key, ttl, wait)

    async def acquire(self, key: str, *, ttl: float = 30.0, wait: float = 0.0) -> Lock:
        """Take ``key`` for ``ttl`` seconds. While someone holds it, try again with
        backoff for up to ``wait`` seconds (0: fail fast). Raises
        ``LockNotAcquired`` when it stayed held, ``ValidationError`` for a bad key
        (1-200 characters, no control characters), ttl (0.01 s to 30 days) or wait
        (0 to 1 day)."""
        check_lock_args(key, ttl=ttl, wait=wait)
        owner = f"{self.owner}/{new_token()[:8]}"
        deadline = time.monotonic() + wait
        delay = FIRST_BACKOFF
        while True:
            started = time.monotonic()
            token = await self.backend.acquire_lock(key, owner, ttl, self.clock())
            if token is not None:
                return Lock(self, key, owner, token, ttl, started)
            left = deadline - time.monotonic()
            if left <= 0:
                raise LockNotAcquired(
                    f"Lock {key!r} is held by someone else"
                    + (f" (waited {wait:g}s)" if wait else " (wait=0: not waiting)"),
                    key=key,
                )
            pause = min(delay * (0.5 + self._rand() / 2), left)
            delay = min(delay * 2, MAX_BACKOFF)
            event = self._wakeups.setdefault(key, asyncio.Event())
            try:
                async with asyncio.timeout(pause):
                    await event.wait()
            except TimeoutError:
                pass

    def wake(self, key: str) -> None:
        """Wake the waiters of ``key`` in this process (a holder here released it)."""
        event = self._wakeups.pop(key, None)
        if event is not None:
            event.set()

    async def is_current(self, key: str, token: int) -> bool:
        """Whether ``token`` holds ``key`` now."""
        check_lock_args(key, token=token)
        return await self.backend.check_lock(key, token, self.clock())

    async def check(self, key: str, token: int) -> None:
        """The fence before a protected write: raise ``StaleFencingToken`` unless
        ``token`` still holds ``key`` (not expired, released or superseded).

        A check followed by a write elsewhere still has a window in which the
        lock can expire: for writes that must never interleave, also store the
        token with the data and refuse lower ones there (docs/locks.md)."""
        if not await self.is_current(key, token):
            raise StaleFencingToken(key, token)

    async def list(self, *, limit: int = 100, include_free: bool = False) -> list[LockInfo]:
        """The held locks (or every key ever locked), in key order."""
        return await self.backend.list_locks(self.clock(), limit=limit, include_free=include_free)

    async def run(
        self,
        key: str,
        fn: Callable[..., Awaitable[T]],
        *args: Any,
        ttl: float = 30.0,
        wait: float = 0.0,
        renew_every: float | None = None,
        **kwargs: Any,
    ) -> T:
        """Hold ``key`` while ``await fn(*args, **kwargs)`` runs, renewing it every
        ``renew_every`` seconds (default ``ttl / 3``); returns what ``fn`` returns.
        When the lock can't be renewed (taken over, or the backend unreachable
        until it ran out), ``fn`` is cancelled and ``LockLost`` raised. Raises
        ``LockNotAcquired`` as ``acquire`` does."""
        if not callable(fn):
            raise TypeError(f"with_lock needs an async function, got {type(fn).__name__}")
        # Checked before taking the lock: 0, NaN or a negative period would renew in a
        # hot loop (one store write every few ms), a string would fail only after fn started.
        check_lock_args(key, ttl=ttl, wait=wait, renew_every=renew_every)
        lock = await self.acquire(key, ttl=ttl, wait=wait)
        try:
            work = fn(*args, **kwargs)
            if not inspect.isawaitable(work):
                raise TypeError(
                    f"with_lock needs an async function: {fn!r} returned "
                    f"{type(work).__name__}, not an awaitable"
                )
            return await hold_while(lock.extend, lock, work, renew_every)
        finally:
            await lock.release()  # a no-op once lost or taken over


async def hold_while(
    renew: Callable[[], Awaitable[None]],
    lock: Lock | Leadership,
    work: Awaitable[T],
    renew_every: float | None,
) -> T:
    """Await ``work`` while calling ``renew`` every ``renew_every`` seconds (default
    a third of the TTL); cancel it and raise ``LockLost`` once ``renew`` raised
    ``LockLost`` or failed until the lock ran out."""
    task = asyncio.ensure_future(work)
    every = renew_every if renew_every is not None else lock.ttl / 3
    renewer = asyncio.create_task(_renew_loop(renew, lock, every))
    try:
        done, _ = await asyncio.wait({task, renewer}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        renewer.result()  # raises LockLost
        raise AssertionError("the renewer ends only by losing the lock")  # pragma: no cover
    finally:
        for t in (task, renewer):
            if not t.done():
                t.cancel()
        await asyncio.gather(task, renewer, return_exceptions=True)


async def _renew_loop(
    renew: Callable[[], Awaitable[None]], lock: Lock | Leadership, every: float
) -> None:
    while True:
        # Renew early enough that one failed try still leaves time for another.
        await asyncio.sleep(max(0.005, min(every, lock.remaining / 2)))
        if lock.remaining <= 0:
            raise _lost(lock)
        try:
            await renew()
        except LockLost:
            raise
        except Exception as exc:  # noqa: BLE001 - the backend may come back before expiry
            log.warning("lock_renew_failed", key=lock.key, error=str(exc))
            await asyncio.sleep(min(RENEW_RETRY, lock.remaining))


def _lost(lock: Lock | Leadership) -> LockLost:
    token = lock.token or 0
    return LockLost(
        f"Lock {lock.key!r} (token {token}) ran out before it could be renewed",
        key=lock.key,
        token=token,
    )


class Leadership:
    """A leader lease ``name`` (the lock ``leader:<name>`` in ``store``): one
    holder at a time; a holder that stops renewing (crash, kill -9) is replaced
    by the next ``hold()`` after ``ttl`` seconds.

    Two ways to use it:

    - ``if await lease.hold(): do_the_pass()`` in a loop that runs more often than
      ``ttl`` (the maintenance passes do this): ``hold`` takes or renews the lease.
    - ``async with lease:`` waits until this process leads (trying every
      ``ttl / 3`` seconds), renews in the background and cancels the body with
      ``LockLost`` if the lease is lost. ``token`` is the lease's fencing token.
    """

    def __init__(
        self,
        store: LockBackend,
        name: str,
        *,
        ttl: float = 15.0,
        clock: Callable[[], datetime],
        owner: str | None = None,
    ) -> None:
        check_lock_args(name, ttl=ttl, field="name")
        self.key = leader_key(name)
        check_lock_args(self.key, field="name")
        if owner is not None:
            check_owner(owner)
        self.name = name
        self.store = store
        self.ttl = ttl
        self.clock = clock
        self.owner = owner or new_owner()
        self.token: int | None = None
        self._deadline = 0.0
        self._task: asyncio.Task[Any] | None = None
        self._renewer: asyncio.Task[None] | None = None
        self._lost: LockLost | None = None

    @property
    def is_leader(self) -> bool:
        """Whether this process leads, as it counts (lease taken or renewed less
        than ``ttl`` seconds ago)."""
        return self.token is not None and time.monotonic() < self._deadline

    @property
    def remaining(self) -> float:
        return max(0.0, self._deadline - time.monotonic()) if self.token is not None else 0.0

    async def hold(self) -> bool:
        """Take the lease when free, renew it when ours. Returns whether this
        process leads now. Backend errors propagate (the caller is not leader)."""
        started = time.monotonic()
        now = self.clock()
        if self.token is not None:
            if await self.store.extend_lock(self.key, self.owner, self.token, self.ttl, now):
                self._deadline = started + self.ttl
                return True
            log.warning("leader_lease_lost", name=self.name, token=self.token)
            self.token = None
        token = await self.store.acquire_lock(self.key, self.owner, self.ttl, now)
        if token is None:
            return False
        self.token, self._deadline = token, started + self.ttl
        log.info("leader_elected", name=self.name, owner=self.owner, token=token)
        return True

    async def renew(self) -> None:
        """Renew the lease; ``LockLost`` when it is no longer ours."""
        token = self.token or 0
        if not await self.hold() or self.token != token:
            raise LockLost(
                f"Leader lease {self.name!r} (token {token}) was lost", key=self.key, token=token
            )

    async def resign(self) -> None:
        """Give the lease up at once (the next candidate's ``hold`` gets it)."""
        token, self.token = self.token, None
        if token is not None:
            await self.store.release_lock(self.key, self.owner, token, self.clock())
            log.info("leader_resigned", name=self.name, token=token)

    async def wait_until_leader(self, wait: float | None = None) -> None:
        """Try every ``ttl / 3`` seconds until this process leads; ``wait`` bounds
        it (``LockNotAcquired``), ``None`` waits as long as it takes."""
        deadline = None if wait is None else time.monotonic() + wait
        while True:
            try:
                if await self.hold():
                    return
            except Exception as exc:  # noqa: BLE001 - keep campaigning
                log.warning("leader_campaign_failed", name=self.name, error=str(exc))
            pause = self.ttl / 3
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise LockNotAcquired(
                        f"Leader lease {self.name!r} is held by another process", key=self.key
                    )
                pause = min(pause, left)
            await asyncio.sleep(pause)

    async def run(self, fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        """Wait to lead, then ``await fn(*args, **kwargs)`` while renewing; ``fn``
        is cancelled and ``LockLost`` raised when the lease is lost. Resigns
        at the end."""
        await self.wait_until_leader()
        try:
            return await hold_while(self.renew, self, fn(*args, **kwargs), None)
        finally:
            await self.resign_quietly()

    async def __aenter__(self) -> Leadership:
        await self.wait_until_leader()
        self._task = asyncio.current_task()
        self._lost = None
        self._renewer = asyncio.create_task(self._renew_or_cancel())
        return self

    async def __aexit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        renewer, self._renewer = self._renewer, None
        if renewer is not None:
            renewer.cancel()
            try:
                await asyncio.gather(renewer, return_exceptions=True)
            except asyncio.CancelledError:
                # The renewer's cancel landed here, after the body ended: ours, consumed.
                if self._lost is None:
                    raise
        await self.resign_quietly()
        lost, self._lost = self._lost, None
        task, self._task = self._task, None
        # Our own cancel becomes LockLost; a cancel from outside stays a cancel.
        if (
            lost is not None
            and task is not None
            and task.uncancel() == 0
            and exc_type in (None, asyncio.CancelledError)
        ):
            raise lost
        return False

    async def _renew_or_cancel(self) -> None:
        try:
            await _renew_loop(self.renew, self, self.ttl / 3)
        except LockLost as exc:
            self._lost = exc
            if self._task is not None:
                self._task.cancel()

    async def resign_quietly(self) -> None:
        """``resign``, logging instead of raising when the backend fails."""
        try:
            await self.resign()
        except Exception as exc:  # noqa: BLE001 - the lease then expires on its own
            log.warning("leader_resign_failed", name=self.name, error=str(exc))
