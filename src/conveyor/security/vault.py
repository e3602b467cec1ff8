"""The secrets vault: envelope encryption over the store, and the provider port.

Each secret version gets its own random 256-bit data key. The value is sealed
with AES-256-GCM under that data key; the data key is sealed (wrapped) with
AES-256-GCM under the master key. The store holds only the result::

    header  = b"CVS1" | master key id (8 bytes) | version (4 bytes, big-endian)
    blob    = header | wrap nonce (12) | wrapped data key (32 + 16 tag)
                     | value nonce (12) | sealed value (n + 16 tag)

The associated data of both seals names the secret and its version, so a row
copied onto another name or version (or a header edited) does not decrypt:
``SecretDecryptError``. ``rotate_master`` unwraps and re-wraps the data keys
only (the sealed values stay as they are), all rows in one transaction.

The master key comes from ``CONVEYOR_MASTER_KEY`` (base64 of 32 bytes) or
``CONVEYOR_MASTER_KEY_FILE`` (refused unless only its owner can read it).

``SecretsProvider`` is the port the application and the workers use. The
built-in ``StoreSecrets`` is the default; a HashiCorp Vault or cloud secrets
manager provider would be an optional extra implementing the same protocol.
Every read and change goes through ``StoreSecrets._access`` (the ``on_access``
hook), the one place an audit log attaches to.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import stat
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol, runtime_checkable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from conveyor.domain.errors import ConfigurationError
from conveyor.domain.secrets import (
    SecretDecryptError,
    SecretInfo,
    SecretVersion,
    validate_secret_name,
    validate_secret_value,
)
from conveyor.settings import Settings
from conveyor.storage.base import Store

MAGIC = b"CVS1"
_HEADER = struct.Struct(">4s8sI")
_NONCE = 12
_WRAPPED = 32 + 16
_MIN_BLOB = _HEADER.size + _NONCE + _WRAPPED + _NONCE + 16

#: ``on_access(action, name, version)``: action is one of "get", "set", "delete",
#: "list", "rotate-master"; version is None where there is none.
AccessHook = Callable[[str, str, int | None], None]


@dataclass(frozen=True, slots=True)
class MasterKey:
    """A 32-byte master key and its id (hex of the first 8 bytes of its SHA-256)."""

    key: bytes
    key_id: str

    def __repr__(self) -> str:  # never the key itself
        return f"MasterKey(key_id={self.key_id!r})"

    @classmethod
    def from_bytes(cls, key: bytes) -> MasterKey:
        if len(key) != 32:
            raise ConfigurationError(f"A master key is 32 bytes; this one is {len(key)}")
        return cls(key, hashlib.sha256(key).digest()[:8].hex())

    @classmethod
    def from_base64(cls, text: str, where: str = "CONVEYOR_MASTER_KEY") -> MasterKey:
        try:
            raw = base64.b64decode(text.strip(), validate=True)
        except (binascii.Error, ValueError):
            raise ConfigurationError(
                f"{where} is not base64 (make one with `conveyor secrets new-master-key`)"
            ) from None
        if len(raw) != 32:
            raise ConfigurationError(
                f"{where} must be base64 of 32 bytes, it decodes to {len(raw)} bytes"
            )
        return cls.from_bytes(raw)

    @classmethod
    def generate(cls) -> MasterKey:
        return cls.from_bytes(AESGCM.generate_key(bit_length=256))

    def to_base64(self) -> str:
        return base64.b64encode(self.key).decode()


def read_key_file(path: str) -> MasterKey:
    """The master key in file ``path`` (base64 text). Raises ``ConfigurationError``
    when it is missing, unreadable, or readable by anyone but its owner."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise ConfigurationError(
            f"Cannot read the master key file {path}: {exc.strerror}"
        ) from None
    if not stat.S_ISREG(st.st_mode):
        raise ConfigurationError(f"The master key file {path} is not a regular file")
    if st.st_mode & 0o077:
        raise ConfigurationError(
            f"The master key file {path} is mode {stat.S_IMODE(st.st_mode):04o}: other users "
            f"can read it. Run `chmod 600 {path}`"
        )
    try:
        with open(path, encoding="ascii") as f:
            text = f.read(4096)
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigurationError(f"Cannot read the master key file {path}: {exc}") from None
    return MasterKey.from_base64(text, where=f"The master key file {path}")


def load_keyring(settings: Settings) -> list[MasterKey]:
    """The configured master keys, current first (empty: no vault configured).
    Raises ``ConfigurationError`` for a malformed key or an unsafe key file."""
    if settings.master_key and settings.master_key_file:
        raise ConfigurationError("Set CONVEYOR_MASTER_KEY or CONVEYOR_MASTER_KEY_FILE, not both")
    keys: list[MasterKey] = []
    if settings.master_key:
        keys.append(MasterKey.from_base64(settings.master_key))
    elif settings.master_key_file:
        keys.append(read_key_file(settings.master_key_file))
    if settings.master_key_previous:
        if not keys:
            raise ConfigurationError(
                "CONVEYOR_MASTER_KEY_PREVIOUS needs a current master key as well"
            )
        keys.append(
            MasterKey.from_base64(settings.master_key_previous, "CONVEYOR_MASTER_KEY_PREVIOUS")
        )
    return keys


# -- sealing ------------------------------------------------------------------------
def _aad(name: str, version: int) -> bytes:
    return b"conveyor-secret\x00" + name.encode() + b"\x00" + str(version).encode()


def seal(master: MasterKey, name: str, version: int, value: bytes) -> bytes:
    """``value`` sealed for secret ``name`` version ``version`` (see the module doc)."""
    data_key = AESGCM.generate_key(bit_length=256)
    header = _HEADER.pack(MAGIC, bytes.fromhex(master.key_id), version)
    aad = _aad(name, version)
    wrap_nonce, nonce = os.urandom(_NONCE), os.urandom(_NONCE)
    wrapped = AESGCM(master.key).encrypt(wrap_nonce, data_key, header + aad)
    sealed = AESGCM(data_key).encrypt(nonce, value, aad)
    return header + wrap_nonce + wrapped + nonce + sealed


def _parse(blob: bytes, name: str, version: int) -> tuple[str, int, bytes, bytes, bytes, bytes]:
    if len(blob) < _MIN_BLOB or blob[:4] != MAGIC:
        raise SecretDecryptError(
            f"Secret {name!r} version {version} is not a Conveyor ciphertext (edited row?)"
        )
    _, kid, v = _HEADER.unpack_from(blob)
    rest = blob[_HEADER.size :]
    return (
        kid.hex(),
        v,
        rest[:_NONCE],
        rest[_NONCE : _NONCE + _WRAPPED],
        rest[_NONCE + _WRAPPED : 2 * _NONCE + _WRAPPED],
        rest[2 * _NONCE + _WRAPPED :],
    )


def _unwrap(keys: list[MasterKey], name: str, version: int, blob: bytes) -> tuple[bytes, bytes]:
    """(data key, blob tail after the wrapped key) or ``SecretDecryptError``."""
    kid, v, wrap_nonce, wrapped, _, _ = _parse(blob, name, version)
    tampered = SecretDecryptError(
        f"Secret {name!r} version {version} does not decrypt: its row was edited, or "
        "copied from another secret or version"
    )
    if v != version:
        raise tampered
    master = next((k for k in keys if k.key_id == kid), None)
    if master is None:
        held = ", ".join(k.key_id for k in keys) or "none"
        raise SecretDecryptError(
            f"Secret {name!r} version {version} is wrapped by master key {kid}; this "
            f"process holds {held} (set CONVEYOR_MASTER_KEY_PREVIOUS during a rotation)"
        )
    try:
        data_key = AESGCM(master.key).decrypt(
            wrap_nonce, wrapped, blob[: _HEADER.size] + _aad(name, version)
        )
    except InvalidTag:
        raise tampered from None
    return data_key, blob[_HEADER.size + _NONCE + _WRAPPED :]


def open_sealed(keys: list[MasterKey], name: str, version: int, blob: bytes) -> bytes:
    """The value sealed in ``blob`` for ``name`` version ``version``. Raises
    ``SecretDecryptError`` for an edited or swapped row, or an unknown master key."""
    data_key, tail = _unwrap(keys, name, version, blob)
    try:
        return AESGCM(data_key).decrypt(tail[:_NONCE], tail[_NONCE:], _aad(name, version))
    except InvalidTag:
        raise SecretDecryptError(
            f"Secret {name!r} version {version} does not decrypt: its row was edited, or "
            "copied from another secret or version"
        ) from None


def rewrap(keys: list[MasterKey], new: MasterKey, row: SecretVersion) -> tuple[str, bytes]:
    """``row``'s data key re-wrapped under ``new`` (the sealed value is kept)."""
    data_key, tail = _unwrap(keys, row.name, row.version, row.ciphertext)
    header = _HEADER.pack(MAGIC, bytes.fromhex(new.key_id), row.version)
    wrap_nonce = os.urandom(_NONCE)
    wrapped = AESGCM(new.key).encrypt(wrap_nonce, data_key, header + _aad(row.name, row.version))
    return new.key_id, header + wrap_nonce + wrapped + tail


# -- the provider port and the built-in provider ---------------------------------------
@runtime_checkable
class SecretsProvider(Protocol):
    """Where secret values come from. ``get`` raises ``SecretNotFound``."""

    async def get(self, name: str) -> str: ...


class StoreSecrets:
    """The built-in provider: sealed values in the job store, a per-process cache.

    ``get`` keeps a decrypted value up to ``cache_ttl`` seconds, and on each hit
    asks the store for the newest version number (one indexed read): a new
    version written anywhere replaces the cached value at once. Values are text
    (UTF-8); ``keep`` versions of each secret are kept, and an old version only
    ``retention`` seconds after a newer one replaced it (None: no time limit).
    """

    def __init__(
        self,
        store: Store,
        keys: list[MasterKey],
        now: Callable[[], datetime],
        *,
        cache_ttl: float = 300.0,
        keep: int = 5,
        on_access: AccessHook | None = None,
        retention: float | None = None,
    ) -> None:
        self.store = store
        self.keys = keys
        self._now = now
        self.cache_ttl = cache_ttl
        self.keep = keep
        self.on_access = on_access
        self._cache: dict[str, tuple[int, str, float]] = {}
        self.retention = retention

    def _access(self, action: str, name: str, version: int | None) -> None:
        """The one hook every read and change passes (an audit log attaches here)."""
        if self.on_access is not None:
            self.on_access(action, name, version)

    def _master(self) -> MasterKey:
        if not self.keys:
            raise ConfigurationError(
                "No master key: set CONVEYOR_MASTER_KEY (base64 of 32 bytes; make one with "
                "`conveyor secrets new-master-key`) or CONVEYOR_MASTER_KEY_FILE"
            )
        return self.keys[0]

    async def get(self, name: str, version: int | None = None) -> str:
        """The value of ``name`` (its newest version unless ``version``). Raises
        ``SecretNotFound``, ``SecretDecryptError``, ``ConfigurationError`` (no key)."""
        validate_secret_name(name)
        self._master()
        cached = self._cache.get(name) if version is None else None
        if (
            cached is not None
            and time.monotonic() - cached[2] < self.cache_ttl
            and await self.store.secret_version(name) == cached[0]
        ):
            self._access("get", name, cached[0])
            return cached[1]
        row = await self.store.get_secret(name, version)
        value = open_sealed(self.keys, row.name, row.version, row.ciphertext).decode()
        if version is None and self.cache_ttl > 0:
            self._cache[name] = (row.version, value, time.monotonic())
        self._access("get", name, row.version)
        return value

    async def set(self, name: str, value: str | bytes) -> SecretVersion:
        """Store ``value`` as the next version of ``name``; returns the stored row
        (its ciphertext, never the value). Raises ``ValidationError``."""
        validate_secret_name(name)
        raw = validate_secret_value(value)
        master = self._master()
        row = await self.store.put_secret(
            name, master.key_id, lambda v: seal(master, name, v, raw), self._now(), self.keep
        )
        self._cache.pop(name, None)
        self._access("set", name, row.version)
        await self.prune()
        return row

    async def list(self) -> list[SecretInfo]:
        infos = await self.store.list_secrets()
        self._access("list", "*", None)
        return infos

    async def delete(self, name: str) -> None:
        """Delete every version of ``name``. Raises ``SecretNotFound``."""
        validate_secret_name(name)
        await self.store.delete_secret(name)
        self._cache.pop(name, None)
        self._access("delete", name, None)

    async def rotate_master(self, new: MasterKey | None = None) -> int:
        """Re-wrap every data key under ``new`` (default: the current master key,
        unwrapping with any key of the keyring), in one transaction; returns the
        number of versions re-wrapped. Raises ``SecretDecryptError`` (nothing changes)."""
        target = new or self._master()
        keys = [*self.keys, *([new] if new is not None else [])]
        count = await self.store.rewrap_secrets(lambda row: rewrap(keys, target, row))
        if new is not None:
            self.keys = [new, *[k for k in self.keys if k.key_id != new.key_id]]
        self._cache.clear()
        self._access("rotate-master", "*", None)
        return count

    def forget(self) -> None:
        """Drop every cached value."""
        self._cache.clear()

    async def prune(self) -> int:
        """Delete the versions replaced more than ``retention`` seconds ago (none
        when ``retention`` is None); returns how many went. Workers also run
        this once a minute (``Store.prune_secret_versions``)."""
        if self.retention is None:
            return 0
        return await self.store.prune_secret_versions(
            self._now() - timedelta(seconds=self.retention)
        )
