"""Secret rows swapped or edited with raw SQL do not decrypt (SQLite and PostgreSQL)."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime

import asyncpg
import pytest

from conveyor.domain.secrets import SecretDecryptError
from conveyor.security.vault import MasterKey, StoreSecrets
from conveyor.storage.postgres import PostgresStore
from conveyor.storage.sqlite import SQLiteStore

TAMPERED = r"'a' version \d does not decrypt: its row was edited"
SWAPS = [
    # the ciphertext of another secret
    "UPDATE {t} SET ciphertext = (SELECT ciphertext FROM {t} WHERE name = 'b') WHERE name = 'a'",
    # rename a row: b's value offered as a's
    "DELETE FROM {t} WHERE name = 'a'; UPDATE {t} SET name = 'a' WHERE name = 'b'",
    # an older version offered as the newest
    "DELETE FROM {t} WHERE name = 'a' AND version = 2; "
    "UPDATE {t} SET version = 2 WHERE name = 'a' AND version = 1",
]


def now() -> datetime:
    return datetime(2026, 1, 1, tzinfo=UTC)


async def seed(vault: StoreSecrets) -> None:
    await vault.set("a", "alpha-1")
    await vault.set("a", "alpha-2")
    await vault.set("b", "beta")


@pytest.mark.parametrize("swap", SWAPS)
async def test_sqlite_swapped_rows_fail_clearly(tmp_path, swap: str) -> None:
    key = MasterKey.generate()
    store = SQLiteStore(tmp_path / "c.db")
    await store.open()
    try:
        await seed(StoreSecrets(store, [key], now, cache_ttl=0))
    finally:
        await store.close()
    conn = sqlite3.connect(tmp_path / "c.db")
    conn.executescript(swap.format(t="secrets"))
    conn.commit()
    conn.close()
    store = SQLiteStore(tmp_path / "c.db")
    await store.open()
    try:
        vault = StoreSecrets(store, [key], now, cache_ttl=0)
        with pytest.raises(SecretDecryptError, match=TAMPERED):
            await vault.get("a")
    finally:
        await store.close()


@pytest.mark.parametrize("swap", SWAPS)
async def test_postgres_swapped_rows_fail_clearly(postgres_dsn: str, swap: str) -> None:
    key = MasterKey.generate()
    store = PostgresStore(postgres_dsn)
    await store.open()
    try:
        vault = StoreSecrets(store, [key], now, cache_ttl=0)
        await seed(vault)
        conn = await asyncpg.connect(postgres_dsn)
        try:
            await conn.execute(swap.format(t="conveyor.secrets"))
        finally:
            await conn.close()
        with pytest.raises(SecretDecryptError, match=TAMPERED):
            await vault.get("a")
    finally:
        await store.close()
