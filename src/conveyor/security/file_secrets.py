"""Secrets kept outside Conveyor, read from files: the provider for HashiCorp
Vault Agent, the Kubernetes Secrets Store CSI driver, Kubernetes secret volumes
and Docker/Compose secrets, which all write one file per secret.

``CONVEYOR_SECRETS_DIR=/run/secrets`` makes ``{"$secret": "smtp_password"}``
read ``/run/secrets/smtp_password`` first and fall back to the built-in vault
(``StoreSecrets``) when no such file exists. The value is the file's text (UTF-8)
without one trailing newline. A file is read again once it changed (its
modification time, size or inode), so a rotation by the agent applies at the
next job; an unchanged one is served from memory after one ``stat``.
"""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path

from conveyor.domain.errors import ConfigurationError
from conveyor.domain.secrets import SecretNotFound, validate_secret_name
from conveyor.security.vault import SecretsProvider

#: Largest secret file read, in bytes (a secret is a key or a password, not a blob).
MAX_SECRET_FILE_BYTES = 64 * 1024


class FileSecrets:
    """One file per secret in ``directory``. ``get`` raises ``SecretNotFound``
    (no such file), ``ConfigurationError`` (unreadable, not UTF-8, too large).

    The directory must exist when the provider is built (``ConfigurationError``):
    a typo in ``CONVEYOR_SECRETS_DIR`` should stop the process, not make every
    secret silently come from elsewhere.
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise ConfigurationError(
                f"CONVEYOR_SECRETS_DIR {str(self.directory)!r} is not a directory: "
                "create it, or unset the variable to use the built-in vault only"
            )
        self._cache: dict[str, tuple[tuple[int, int, int], str]] = {}

    async def get(self, name: str) -> str:
        validate_secret_name(name)
        if name.startswith("."):  # ".", "..", hidden files: never a secret here
            raise SecretNotFound(name)
        # A file system may block (NFS, a FUSE mount): never on the event loop.
        return await asyncio.to_thread(self._read, name)

    def _read(self, name: str) -> str:
        path = self.directory / name
        try:
            st = path.stat()  # follows symlinks: Kubernetes volumes are made of them
        except FileNotFoundError:
            self._cache.pop(name, None)
            raise SecretNotFound(name) from None
        except OSError as exc:
            raise ConfigurationError(f"Secret file {str(path)!r}: {exc.strerror}") from None
        if not stat.S_ISREG(st.st_mode):  # a FIFO would block, /dev/zero never ends
            raise ConfigurationError(f"Secret file {str(path)!r} is not a regular file")
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        cached = self._cache.get(name)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        if st.st_size > MAX_SECRET_FILE_BYTES:
            raise ConfigurationError(
                f"Secret file {str(path)!r} is larger than {MAX_SECRET_FILE_BYTES} bytes"
            )
        try:
            # O_NONBLOCK: a file swapped for a FIFO after the stat does not hang us.
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            raise SecretNotFound(name) from None
        except OSError as exc:
            raise ConfigurationError(f"Secret file {str(path)!r}: {exc.strerror}") from None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise ConfigurationError(f"Secret file {str(path)!r} is not a regular file")
            with os.fdopen(fd, "rb", closefd=False) as f:
                data = f.read(MAX_SECRET_FILE_BYTES + 1)
        except OSError as exc:
            raise ConfigurationError(f"Secret file {str(path)!r}: {exc.strerror}") from None
        finally:
            os.close(fd)
        if len(data) > MAX_SECRET_FILE_BYTES:
            raise ConfigurationError(
                f"Secret file {str(path)!r} is larger than {MAX_SECRET_FILE_BYTES} bytes"
            )
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise ConfigurationError(f"Secret file {str(path)!r} is not UTF-8 text") from None
        value = text[:-1] if text.endswith("\n") else text
        if value.endswith("\r"):
            value = value[:-1]
        self._cache[name] = (stamp, value)
        return value


class ChainedSecrets:
    """Ask each provider in turn; the first that has ``name`` answers. Raises the
    last provider's ``SecretNotFound`` when none has it (other errors at once)."""

    def __init__(self, *providers: SecretsProvider) -> None:
        if not providers:
            raise ValueError("ChainedSecrets needs at least one provider")
        self.providers = providers

    async def get(self, name: str) -> str:
        missing: SecretNotFound | None = None
        for provider in self.providers:
            try:
                return await provider.get(name)
            except SecretNotFound as exc:
                missing = exc
        assert missing is not None
        raise missing
