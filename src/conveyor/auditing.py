"""The audit log service: who changed what, chained and anchored (docs/security.md).

``app.audit.change(action, resource_type, resource_id, summary)`` wraps a change::

    async with app.audit.change("job.cancel", "job", job_id):
        await app.cancel(job_id)

The entry is appended inside the change's own write transaction (SQLite,
PostgreSQL; see ``conveyor.storage.audit``); when the change ran no
transaction of ours (the memory store, a PostgreSQL single-statement write
that was not upgraded) it is appended right after it. If the change raises
before committing, no entry is written.

The actor and request id come from context variables that the API (from the
request's key and ``X-Request-Id``) and the CLI (``cli:<os user>``) set;
anything else is ``system``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, TypeVar

import structlog

from conveyor.domain.audit import (
    Anchor,
    AuditDraft,
    AuditEntry,
    AuditQuery,
    Broken,
    Verdict,
    make_anchor,
    verify,
)
from conveyor.domain.errors import ConfigurationError, FieldError, ValidationError
from conveyor.domain.secrets import SecretInfo, SecretNotFound, SecretVersion
from conveyor.security.vault import MasterKey, StoreSecrets, load_keyring
from conveyor.storage.audit import covered, pending

if TYPE_CHECKING:
    from conveyor.app import Conveyor

T = TypeVar("T")
log = structlog.get_logger("conveyor.audit")

#: The vault secret holding the anchors' HMAC key (created on first use).
ANCHOR_KEY_SECRET = "conveyor.audit_anchor_key"
#: Who is acting, and under which request id (set by the API and the CLI).
#: Secrets Conveyor keeps for itself (webhook signing secrets, the anchor key).
INTERNAL_SECRET_PREFIX = "conveyor."
AUDIT_ACTOR: ContextVar[str] = ContextVar("conveyor_audit_actor", default="system")
AUDIT_REQUEST_ID: ContextVar[str | None] = ContextVar("conveyor_audit_request_id", default=None)
_SECRET_ACTIONS = {
    "get": "secret.read",
    "set": "secret.set",
    "delete": "secret.delete",
    "list": "secret.list",
    "rotate-master": "secret.rotate_master",
}
_EXPORT_PAGE = 1000


def cli_actor() -> str:
    """``cli:<os user>`` for the CLI's entries."""
    try:
        import getpass

        user = getpass.getuser()
    except Exception:  # noqa: BLE001 - no user name (containers): the uid will do
        user = str(os.getuid()) if hasattr(os, "getuid") else "unknown"
    return f"cli:{user}"[:200]


@contextlib.contextmanager
def acting_as(actor: str, request_id: str | None = None) -> Iterator[None]:
    """Entries written inside are by ``actor`` (and ``request_id``)."""
    token = AUDIT_ACTOR.set(actor)
    rtoken = AUDIT_REQUEST_ID.set(request_id)
    try:
        yield
    finally:
        AUDIT_REQUEST_ID.reset(rtoken)
        AUDIT_ACTOR.reset(token)


async def audited(
    app: Conveyor,
    action: str,
    resource_type: str,
    resource_id: str,
    fn: Callable[[], Awaitable[T]],
    summary: Mapping[str, Any] | None = None,
) -> T:
    """``await fn()`` recorded as ``action`` on the resource (``AuditLog.change``)."""
    async with app.audit.change(action, resource_type, resource_id, summary):
        return await fn()


class AuditLog:
    """``app.audit``: write, read, verify and anchor the audit log."""

    def __init__(self, app: Conveyor) -> None:
        self.app = app
        self._later: set[asyncio.Task[Any]] = set()
        self._last_anchor: int | None = None
        self._anchor_key: tuple[bytes, str] | None = None

    # -- writing ---------------------------------------------------------------------
    def draft(
        self,
        action: str,
        resource_type: str,
        resource_id: str,
        summary: Mapping[str, Any] | None = None,
        *,
        actor: str | None = None,
        **ai: Any,
    ) -> AuditDraft:
        """A checked entry by the current actor, now. ``ai``: ``model``, ``prompt``,
        ``response``, ``hash_ai_fields``. Raises ``ValidationError``."""
        return AuditDraft.make(
            action,
            resource_type,
            resource_id,
            at=self.app.now(),
            actor=actor or AUDIT_ACTOR.get(),
            summary=summary,
            request_id=AUDIT_REQUEST_ID.get(),
            **ai,
        )

    @contextlib.asynccontextmanager
    async def change(
        self,
        action: str,
        resource_type: str,
        resource_id: str,
        summary: Mapping[str, Any] | None = None,
    ) -> AsyncIterator[AuditDraft]:
        """Record the change made inside, in its own transaction where the store
        allows it (module doc)."""
        draft = self.draft(action, resource_type, resource_id, summary)
        await self.app.open()  # not inside the scope: opening migrates
        with pending([draft]) as scope:
            yield draft
        if scope.written is None:
            scope.written = await self.app.store.append_audit(scope.drafts)
        await self._after_append(scope.written)

    async def record(
        self,
        action: str,
        resource_type: str,
        resource_id: str,
        summary: Mapping[str, Any] | None = None,
        **ai: Any,
    ) -> AuditEntry:
        """Append one entry now (for a change already made, or a handler's decision)."""
        return (await self.append([self.draft(action, resource_type, resource_id, summary, **ai)]))[
            0
        ]

    async def record_handler(
        self, fields: Mapping[str, Any], job: Mapping[str, Any]
    ) -> dict[str, Any]:
        """A handler's ``ctx.audit`` entry; ``fields`` may come from a child process,
        so everything is checked here (``ValidationError``, nothing written)."""
        summary = fields.get("summary")
        if summary is not None and not isinstance(summary, Mapping):
            raise ValidationError(
                "summary must be a JSON object", [FieldError("summary", "must be a JSON object")]
            )
        merged = {**(summary or {}), "job": dict(job)}
        draft = AuditDraft.make(
            fields.get("action"),  # type: ignore[arg-type] # checked by make
            fields.get("resource_type", "job"),
            fields.get("resource_id", job.get("job_id")),
            at=self.app.now(),
            actor="system",
            summary=merged,
            model=fields.get("model"),
            prompt=fields.get("prompt"),
            response=fields.get("response"),
            hash_ai_fields=fields.get("hash_ai_fields", True),
        )
        (entry,) = await self.append([draft])
        return entry.to_dict()

    async def append(self, drafts: list[AuditDraft]) -> list[AuditEntry]:
        await self.app.open()
        entries = await self.app.store.append_audit(drafts)
        await self._after_append(entries)
        return entries

    def record_soon(self, draft: AuditDraft) -> None:
        """Append ``draft`` from synchronous code (a hook): in a task ``drain`` awaits."""
        task = asyncio.ensure_future(self._append_logged(draft))
        self._later.add(task)
        task.add_done_callback(self._later.discard)

    async def _append_logged(self, draft: AuditDraft) -> None:
        if not self.app._opened:  # closed meanwhile: never reopen the store for this
            log.error("audit_append_failed", action=draft.action, error="the app is closed")
            return
        try:
            entries = await self.app.store.append_audit([draft])
            await self._after_append(entries)
        except Exception as exc:  # noqa: BLE001 - logged: a hook has nobody to raise to
            log.error("audit_append_failed", action=draft.action, error=str(exc)[:300])

    async def drain(self) -> None:
        """Wait for every ``record_soon`` append."""
        while self._later:
            await asyncio.gather(*list(self._later), return_exceptions=True)

    def secret_drafts(self, accesses: list[tuple[str, str, int | None]]) -> list[AuditDraft]:
        """Entries for the vault accesses of one call, but those the caller's own
        ``change`` records already (in the change's transaction)."""
        drafts = []
        system = AUDIT_ACTOR.get() == "system"
        for action, name, version in accesses:
            kind = _SECRET_ACTIONS.get(action, f"secret.{action}")
            if covered(kind, name):
                continue
            if system and action == "get" and name.startswith(INTERNAL_SECRET_PREFIX):
                # Conveyor reading its own (a webhook's signing secret at each delivery,
                # the anchor key): one entry per delivery would flood the log and
                # serialize deliveries on the chain. Changes to them are audited, and
                # so is anyone else reading them.
                continue
            summary: dict[str, Any] = {} if version is None else {"version": version}
            drafts.append(self.draft(kind, "secret", name, summary))
        return drafts

    # -- anchors -----------------------------------------------------------------------
    async def _after_append(self, entries: list[AuditEntry]) -> None:
        every = self.app.settings.audit_anchor_every
        if not entries or every <= 0:
            return
        if self._last_anchor is None:
            anchors = await self.app.store.list_audit_anchors()
            self._last_anchor = anchors[-1].seq if anchors else 0
        if entries[-1].seq - self._last_anchor >= every:
            try:
                await self.anchor(entries[-1])
            except Exception as exc:  # noqa: BLE001 - the change is committed; logged
                log.warning("audit_anchor_failed", error=str(exc)[:300])

    def _signing_available(self) -> bool:
        """Whether this process holds a master key (so it can check every anchor)."""
        try:
            return bool(load_keyring(self.app.settings))
        except ConfigurationError:
            return False

    def _vault(self) -> StoreSecrets:
        # Its own vault without the audit hook: reading the anchor key is not a
        # change worth an entry, and an entry per anchor would never settle.
        return StoreSecrets(self.app.store, load_keyring(self.app.settings), self.app.now)

    async def anchor_key(self, *, create: bool) -> tuple[bytes, str] | None:
        """The anchors' HMAC key and its id (``name:vN``); None without a master key
        (or, unless ``create``, before the first signed anchor)."""
        if self._anchor_key is not None:
            return self._anchor_key
        try:
            vault = self._vault()
            try:
                text = await vault.get(ANCHOR_KEY_SECRET)
                version = await self.app.store.secret_version(ANCHOR_KEY_SECRET)
            except SecretNotFound:
                if not create:
                    return None
                # One key for the fleet: processes anchoring at once would each make
                # a version, and anchors signed by a pruned one could not be checked.
                async with self.app.lock(ANCHOR_KEY_SECRET, ttl=30, wait=30):
                    try:
                        text = await vault.get(ANCHOR_KEY_SECRET)
                        version = await self.app.store.secret_version(ANCHOR_KEY_SECRET)
                    except SecretNotFound:
                        fresh = base64.b64encode(os.urandom(32))
                        row = await vault.set(ANCHOR_KEY_SECRET, fresh)
                        text = await vault.get(ANCHOR_KEY_SECRET, row.version)
                        version = row.version
        except ConfigurationError:
            return None
        self._anchor_key = (base64.b64decode(text), f"{ANCHOR_KEY_SECRET}:v{version}")
        return self._anchor_key

    async def _key_for(self, key_id: str) -> bytes | None:
        cached = self._anchor_key
        if cached is not None and cached[1] == key_id:
            return cached[0]
        name, _, version = key_id.rpartition(":v")
        if name != ANCHOR_KEY_SECRET or not version.isdigit():
            return None
        try:
            return base64.b64decode(await self._vault().get(name, int(version)))
        except (ConfigurationError, SecretNotFound, ValueError):
            return None

    async def anchor(self, head: AuditEntry | None = None) -> Anchor | None:
        """Record a signed anchor at the newest entry (``head`` if given); None when
        the log is empty, or when this process has no master key but the log's
        anchors are signed. Unsigned (``mac`` None, a warning logged) without a
        master key in a log never signed."""
        await self.app.open()
        if head is None:
            head = await self.head()
            if head is None:
                return None
        key = await self.anchor_key(create=True)
        if key is None:
            if any(a.mac is not None for a in await self.app.store.list_audit_anchors()):
                # The log is signed: an unsigned anchor from a process without the
                # master key would read as a removed signature where it is checked.
                log.warning(
                    "audit_anchor_skipped",
                    reason="the log's anchors are signed and this process has no master key",
                )
                return None
            log.warning("audit_anchor_unsigned", reason="no master key configured")
        anchor = make_anchor(
            head.seq, head.hash, self.app.now(), None if key is None else key[0], key and key[1]
        )
        await self.app.store.add_audit_anchor(anchor)
        self._last_anchor = max(self._last_anchor or 0, head.seq)
        # An anchor already at that seq is kept (the insert is ignored): report the
        # stored one, which verify checks, never the one we only meant to write.
        stored = [a for a in await self.app.store.list_audit_anchors() if a.seq == head.seq]
        return stored[0] if stored else anchor

    # -- reading -----------------------------------------------------------------------
    async def list(self, query: AuditQuery) -> list[AuditEntry]:
        await self.app.open()
        return await self.app.store.list_audit(query)

    async def entries(self, after: int = 0) -> AsyncIterator[AuditEntry]:
        """Every entry after ``after``, in ``seq`` order, a page at a time."""
        await self.app.open()
        while True:
            page = await self.app.store.list_audit(AuditQuery(after=after, limit=_EXPORT_PAGE))
            for entry in page:
                yield entry
            if len(page) < _EXPORT_PAGE:
                return
            after = page[-1].seq

    async def head(self) -> AuditEntry | None:
        last = None
        async for entry in self.entries():
            last = entry
        return last

    async def verify(self, *, allow_unsigned: bool = False) -> Verdict:
        """Walk the whole chain and every anchor (``domain.audit.verify``); anchors
        are checked against the key each names.

        With a master key configured this process can check every signature, so
        an anchor it cannot check breaks the chain instead of warning: an unsigned
        anchor (someone with database access removed its MAC to move or forge it;
        ``allow_unsigned`` accepts those of a log written before the master key
        was set), a MAC without a key id, or a key version the vault no longer
        has. Without a master key, signatures are not checked (a warning)."""
        await self.app.open()
        entries = [e async for e in self.entries()]
        anchors = await self.app.store.list_audit_anchors()
        verdict = verify(entries, [])
        if not verdict.ok:
            return verdict
        keys: dict[str, bytes | None] = {}
        for key_id in {a.key_id for a in anchors if a.key_id is not None}:
            keys[key_id] = await self._key_for(key_id)
        if self._signing_available():
            for a in anchors:
                reason = None
                if a.key_id is None and a.mac is not None:
                    reason = "anchor has a MAC but names no key (edited)"
                elif a.key_id is None and not allow_unsigned:
                    reason = (
                        "anchor is unsigned although a master key is configured (its MAC "
                        "was removed?); `conveyor audit verify --allow-unsigned` accepts "
                        "anchors made before the master key was set"
                    )
                elif a.key_id is not None and a.mac is None:
                    reason = f"anchor names key {a.key_id!r} but has no MAC (edited)"
                elif a.key_id is not None and keys.get(a.key_id) is None:
                    reason = f"anchor names key {a.key_id!r}, which the vault does not have"
                if reason is not None:
                    return _with_anchor(
                        Verdict(
                            verdict.count,
                            verdict.last_seq,
                            verdict.last_hash,
                            Broken(a.seq, reason),
                            None,
                        ),
                        anchors,
                    )
        # Anchors by the key they name; one verify per key keeps the domain function simple.
        result = verify(entries, [a for a in anchors if a.key_id is None])
        if not result.ok:
            return _with_anchor(result, anchors)
        warnings = list(result.warnings)
        for key_id, key in keys.items():
            part = verify(entries, [a for a in anchors if a.key_id == key_id], anchor_key=key)
            if not part.ok:
                return _with_anchor(part, anchors)
            warnings.extend(w for w in part.warnings if w not in warnings)
        if anchors:
            warnings = [w for w in warnings if not w.startswith("no anchor yet")]
        return Verdict(
            result.count,
            result.last_seq,
            result.last_hash,
            None,
            anchors[-1] if anchors else None,
            tuple(warnings),
        )


def _with_anchor(verdict: Verdict, anchors: list[Anchor]) -> Verdict:
    return Verdict(
        verdict.count,
        verdict.last_seq,
        verdict.last_hash,
        verdict.broken,
        anchors[-1] if anchors else None,
        verdict.warnings,
    )


_ACCESSES: ContextVar[list[tuple[str, str, int | None]] | None] = ContextVar(
    "conveyor_secret_accesses", default=None
)


class AuditedSecrets(StoreSecrets):
    """``app.secrets``: the built-in vault whose every read and change is written to
    the audit log before the call returns (in the caller's task: nothing is left
    running when the call is over). A read that fails writes nothing."""

    def __init__(self, *args: Any, audit: AuditLog, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._audit = audit

    def _access(self, action: str, name: str, version: int | None) -> None:
        super()._access(action, name, version)
        accesses = _ACCESSES.get()
        if accesses is not None:
            accesses.append((action, name, version))

    async def _recorded(self, call: Awaitable[T]) -> T:
        token = _ACCESSES.set([])
        try:
            result = await call
            accesses = _ACCESSES.get() or []
        finally:
            _ACCESSES.reset(token)
        drafts = self._audit.secret_drafts(accesses)
        if drafts:
            await self._audit.append(drafts)
        return result

    async def get(self, name: str, version: int | None = None) -> str:
        return await self._recorded(super().get(name, version))

    async def set(self, name: str, value: str | bytes) -> SecretVersion:
        return await self._recorded(super().set(name, value))

    async def list(self) -> list[SecretInfo]:
        return await self._recorded(super().list())

    async def delete(self, name: str) -> None:
        await self._recorded(super().delete(name))

    async def rotate_master(self, new: MasterKey | None = None) -> int:
        return await self._recorded(super().rotate_master(new))


def audit_property(app: Conveyor) -> AuditLog:
    """The app's one ``AuditLog`` (made on first use)."""
    found: AuditLog | None = getattr(app, "_audit_log", None)
    if found is None:
        found = AuditLog(app)
        app._audit_log = found  # type: ignore[attr-defined]
    return found
