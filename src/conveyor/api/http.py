"""HTTP plumbing shared by the API's routers: the JSON response, the error
envelope, and API-key authentication for requests and WebSockets."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any

import orjson
import structlog
from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.requests import HTTPConnection

from conveyor.api.params import refuse_unknown_params
from conveyor.app import Conveyor
from conveyor.auditing import AUDIT_ACTOR
from conveyor.domain.auth import ApiKey
from conveyor.domain.auth import Scope as KeyScope
from conveyor.domain.errors import FieldError
from conveyor.security.api_keys import hash_key

if TYPE_CHECKING:
    from conveyor.api.ratelimit import RequestLimits


class JSON(JSONResponse):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def fail(
    status: int,
    error: str,
    details: list[FieldError] | None = None,
    headers: dict[str, str] | None = None,
) -> JSON:
    body: dict[str, Any] = {"success": False, "error": error}
    if details is not None:
        body["details"] = [{"field": d.field, "message": d.message} for d in details]
    return JSON(body, status_code=status, headers=headers)


class ApiError(Exception):
    def __init__(self, status: int, error: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(error)
        self.status, self.error, self.headers = status, error, headers


# -- auth ------------------------------------------------------------------------------------
KEY_RECHECK_SECONDS = 2.0  #: an open WebSocket's key is checked again this often
TOUCH_INTERVAL = 60.0  #: seconds between two writes of one key's ``last_used_at``
_log = structlog.get_logger("conveyor.api")


def sees_internal(key: ApiKey | None) -> bool:
    """Whether a caller sees Conveyor's own jobs and their events: an admin key, or
    anonymous loopback use (no key exists, so the caller owns the server)."""
    return key is None or key.scope.allows(KeyScope.ADMIN)


class Auth:
    """Bearer API keys with scopes. Anonymous access only when allowed and no key exists.

    ``recheck_interval``: seconds between checks of an open WebSocket's key; a
    revoked key's sockets are closed within about that long (keys are revoked
    by another process, the CLI, so this polls the store).
    """

    def __init__(
        self,
        conveyor: Conveyor,
        *,
        allow_anonymous: bool,
        recheck_interval: float = KEY_RECHECK_SECONDS,
    ) -> None:
        self.conveyor = conveyor
        self.allow_anonymous = allow_anonymous
        self.recheck_interval = recheck_interval
        self._keys_exist: tuple[float, bool] = (0.0, True)
        # key hash -> (checked at, key or None): many sockets on one key share a lookup.
        self._rechecked: dict[str, tuple[float, ApiKey | None]] = {}
        #: The dashboard's hook: the key of a WebSocket's session cookie, if any.
        self.websocket_session: Callable[[HTTPConnection], Awaitable[ApiKey | None]] | None = None
        #: Request rate limits (api/ratelimit.py); None = unlimited.
        self.limits: RequestLimits | None = None
        self._touched: dict[str, float] = {}  # key id -> when last_used_at was written
        #: Called with the client address of each failed authentication (audit bursts).
        self.on_failure: Callable[[str], None] | None = None

    async def keys_exist(self) -> bool:
        checked, value = self._keys_exist
        if time.monotonic() - checked > 1.0:  # a key created elsewhere applies within 1 s
            value = await self.conveyor.store.count_api_keys() > 0
            self._keys_exist = (time.monotonic(), value)
        return value

    async def authenticate(
        self, conn: HTTPConnection, scope: KeyScope, *, cached: bool = False
    ) -> ApiKey | None:
        """The caller's key (None = anonymous, allowed); raises ``ApiError`` 401/403.

        The key comes from ``Authorization: Bearer <key>``; a WebSocket may pass
        it as ``?token=<key>`` instead (browsers cannot set its headers). A REST
        request with ``?token=`` is refused: keys in URLs end up in logs.
        ``cached``: reuse a lookup of the same key younger than ``recheck_interval``.
        """
        header = conn.headers.get("authorization", "")
        token = header[7:].strip() if header[:7].lower() == "bearer " else ""
        if not token and "token" in conn.query_params:
            if conn.scope["type"] != "websocket":
                raise ApiError(
                    401,
                    "API keys are accepted in the URL (?token=) only on the WebSocket: "
                    "send 'Authorization: Bearer <key>' instead",
                    {"WWW-Authenticate": "Bearer"},
                )
            token = conn.query_params["token"]
        if not token and conn.scope["type"] == "websocket" and self.websocket_session:
            session_key = await self.websocket_session(conn)
            if session_key is not None:
                if not session_key.scope.allows(scope):
                    raise ApiError(403, f"This API key has scope '{session_key.scope.value}'")
                return session_key
        if not token:
            if self.allow_anonymous and not await self.keys_exist():
                return None
            await self._failed(conn)
            raise ApiError(
                401,
                "Missing API key: send 'Authorization: Bearer <key>' "
                "(create one with `conveyor keys create`)",
                {"WWW-Authenticate": "Bearer"},
            )
        key = await self._find(hash_key(token), cached)
        if key is None:
            await self._failed(conn)
            raise ApiError(401, "Invalid or revoked API key", {"WWW-Authenticate": "Bearer"})
        now = self.conveyor.now()
        if key.expired(now):
            await self._failed(conn)
            raise ApiError(
                401,
                f"This API key expired at {key.expires_at:%Y-%m-%dT%H:%M:%SZ}: create a new "
                "one with `conveyor keys create`",
                {"WWW-Authenticate": "Bearer"},
            )
        await self._touch(key, now)
        if self.limits is not None and not cached:
            await self.limits.key_used(key.id)
        if not key.scope.allows(scope):
            raise ApiError(
                403,
                f"This API key has scope '{key.scope.value}'; this request needs '{scope.value}'",
            )
        return key

    async def _find(self, key_hash: str, cached: bool) -> ApiKey | None:
        now = time.monotonic()
        if cached:
            hit = self._rechecked.get(key_hash)
            if hit is not None and now - hit[0] < self.recheck_interval:
                return hit[1]
        key = await self.conveyor.store.find_api_key(key_hash)
        if cached:
            if len(self._rechecked) > 10_000:  # stale entries of sockets long gone
                self._rechecked.clear()
            self._rechecked[key_hash] = (now, key)
        return key

    async def _touch(self, key: ApiKey, now: datetime) -> None:
        """Record ``last_used_at``, at most once a minute per key and process (a write
        per request would cost more than the request)."""
        last = self._touched.get(key.id)
        if last is not None and time.monotonic() - last < TOUCH_INTERVAL:
            return
        if len(self._touched) > 10_000:
            self._touched.clear()
        self._touched[key.id] = time.monotonic()
        try:
            await self.conveyor.store.touch_api_key(key.id, now)
        except Exception as exc:  # noqa: BLE001 - bookkeeping never fails a request
            _log.warning("api_key_touch_failed", key_id=key.id, error=type(exc).__name__)

    async def _failed(self, conn: HTTPConnection) -> None:
        """Count a failed authentication of ``conn``'s address (429 past the limit)."""
        if self.on_failure is not None:
            self.on_failure(conn.client.host if conn.client else "unknown")
        if self.limits is not None:
            await self.limits.auth_failed(conn.client.host if conn.client else "unknown")

    def require(self, scope: KeyScope) -> Callable[[Request], Awaitable[None]]:
        async def check(request: Request) -> None:
            request.state.api_key = await self.authenticate(request, scope)
            # The audit log's actor for this request (api/audit.py).
            AUDIT_ACTOR.set(request.state.api_key.name if request.state.api_key else "anonymous")
            # Every route, after its key is checked: an unknown or repeated query
            # parameter is a 400, never ignored (api/params.py).
            await refuse_unknown_params(request)

        return check
