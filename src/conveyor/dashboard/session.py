"""Dashboard sessions: a signed cookie, CSRF tokens, and who the viewer is.

The cookie holds ``{"k": key hash or null, "n": nonce, "e": expiry}`` signed
with HMAC-SHA256; never the key itself. The hash only selects the key in the
store, which is checked again on every request (a revoked key ends its
sessions at once). The CSRF token is an HMAC of the session's nonce: a page
of another site can neither read it nor forge it, and every state-changing
dashboard request must echo it in ``X-CSRF-Token``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from typing import Any

import orjson
from starlette.requests import HTTPConnection
from starlette.responses import Response

from conveyor.api.http import Auth
from conveyor.domain.auth import ApiKey
from conveyor.domain.auth import Scope as KeyScope
from conveyor.domain.errors import ConfigurationError
from conveyor.security.api_keys import hash_key

COOKIE = "conveyor_session"
SESSION_SECONDS = 8 * 3600  #: a login lasts this long
ANONYMOUS_SECONDS = 24 * 3600  #: the CSRF nonce of a visitor who has not logged in
MIN_SECRET_CHARS = 16
KEY_CACHE_SECONDS = 2.0  #: a session's key is looked up again after this long


@dataclass(frozen=True, slots=True)
class Viewer:
    """Who is looking: ``key`` None is keyless loopback use (full rights)."""

    key: ApiKey | None
    nonce: str
    csrf: str

    def allows(self, scope: KeyScope) -> bool:
        return self.key is None or self.key.scope.allows(scope)

    @property
    def can_write(self) -> bool:
        return self.allows(KeyScope.WRITE)

    @property
    def can_admin(self) -> bool:
        return self.allows(KeyScope.ADMIN)

    @property
    def label(self) -> str:
        if self.key is None:
            return "local (no API keys)"
        return f"{self.key.name} ({self.key.scope.value})"


@dataclass(frozen=True, slots=True)
class Session:
    key_hash: str | None
    nonce: str
    expires: float


class Sessions:
    """Signs and reads session cookies for one server process."""

    def __init__(self, auth: Auth, secret: str = "") -> None:
        if secret and len(secret) < MIN_SECRET_CHARS:
            raise ConfigurationError(
                f"dashboard_secret must be at least {MIN_SECRET_CHARS} characters"
            )
        self.auth = auth
        self._secret = secret.encode() if secret else secrets.token_bytes(32)
        self._keys: dict[str, tuple[float, ApiKey | None]] = {}

    # -- the cookie --------------------------------------------------------------------
    def _sign(self, body: bytes) -> str:
        return hmac.new(self._secret, body, hashlib.sha256).hexdigest()

    def encode(self, session: Session) -> str:
        data = {"k": session.key_hash, "n": session.nonce, "e": int(session.expires)}
        body = base64.urlsafe_b64encode(orjson.dumps(data)).rstrip(b"=")
        return body.decode() + "." + self._sign(body)

    def decode(self, raw: str | None) -> Session | None:
        """The session of a cookie value; None if absent, forged or expired."""
        if not raw or len(raw) > 1024 or "." not in raw:
            return None
        body, _, signature = raw.rpartition(".")
        if not hmac.compare_digest(self._sign(body.encode()), signature):
            return None
        try:
            data: Any = orjson.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
            session = Session(data["k"], str(data["n"]), float(data["e"]))
        except (ValueError, KeyError, TypeError):
            return None
        return session if session.expires > time.time() else None

    def csrf_for(self, nonce: str) -> str:
        return self._sign(b"csrf:" + nonce.encode())

    def csrf_ok(self, conn: HTTPConnection, token: str | None) -> bool:
        session = self.decode(conn.cookies.get(COOKIE))
        return bool(
            session is not None
            and token
            and hmac.compare_digest(self.csrf_for(session.nonce), token)
        )

    def set_cookie(self, response: Response, conn: HTTPConnection, session: Session) -> None:
        response.set_cookie(
            COOKIE,
            self.encode(session),
            max_age=max(1, int(session.expires - time.time())),
            path="/",
            httponly=True,
            samesite="strict",
            secure=conn.url.scheme in ("https", "wss"),
        )

    @staticmethod
    def new_session(key_hash: str | None) -> Session:
        lifetime = SESSION_SECONDS if key_hash else ANONYMOUS_SECONDS
        return Session(key_hash, secrets.token_urlsafe(16), time.time() + lifetime)

    # -- who is looking ---------------------------------------------------------------
    async def _key(self, key_hash: str) -> ApiKey | None:
        now = time.monotonic()
        hit = self._keys.get(key_hash)
        if hit is not None and now - hit[0] < KEY_CACHE_SECONDS:
            return hit[1]
        key = await self.auth.conveyor.store.find_api_key(key_hash)
        if len(self._keys) > 10_000:
            self._keys.clear()
        self._keys[key_hash] = (now, key)
        return key

    async def viewer(self, conn: HTTPConnection) -> tuple[Viewer | None, Session | None]:
        """The viewer (None: must log in) and a new session to set as the cookie
        when the visitor has none yet (for its CSRF nonce)."""
        session = self.decode(conn.cookies.get(COOKIE))
        fresh = None
        if session is None:
            session = fresh = self.new_session(None)
        if session.key_hash is not None:
            key = await self._key(session.key_hash)
            if key is not None:
                return Viewer(key, session.nonce, self.csrf_for(session.nonce)), fresh
        if self.auth.allow_anonymous and not await self.auth.keys_exist():
            return Viewer(None, session.nonce, self.csrf_for(session.nonce)), fresh
        if session.key_hash is not None:  # a revoked key: start over, logged out
            fresh = self.new_session(None)
            return None, fresh
        return None, fresh

    async def login(self, token: str) -> tuple[ApiKey | None, Session | None]:
        """The key of ``token`` and a new session for it (None if not a key)."""
        if not token or len(token) > 512:
            return None, None
        key_hash = hash_key(token.strip())
        key = await self.auth.conveyor.store.find_api_key(key_hash)
        if key is None:
            return None, None
        self._keys[key_hash] = (time.monotonic(), key)
        return key, self.new_session(key_hash)

    async def websocket_key(self, conn: HTTPConnection) -> ApiKey | None:
        """For ``Auth``: the key of a logged-in dashboard session on a WebSocket
        (the browser sends the cookie; it cannot set an Authorization header)."""
        session = self.decode(conn.cookies.get(COOKIE))
        if session is None or session.key_hash is None:
            return None
        return await self._key(session.key_hash)
