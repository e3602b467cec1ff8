"""A fresh ``migrate`` on PostgreSQL gives exactly the shipped ``schema.sql``."""

from __future__ import annotations

from importlib import resources

import asyncpg

from conveyor.storage.postgres import PostgresStore

CATALOG = """
SELECT 'column ' || table_name || '.' || column_name || ' ' || data_type || ' '
       || is_nullable || ' ' || coalesce(column_default, '')
FROM information_schema.columns WHERE table_schema = 'conveyor'
UNION ALL
SELECT 'index ' || indexdef FROM pg_indexes WHERE schemaname = 'conveyor'
UNION ALL
SELECT 'constraint ' || conrelid::regclass || ' ' || pg_get_constraintdef(oid)
FROM pg_constraint WHERE connamespace = 'conveyor'::regnamespace
UNION ALL
SELECT 'view ' || viewname || ' ' || definition FROM pg_views WHERE schemaname = 'conveyor'
UNION ALL
SELECT 'options ' || relname || ' ' || array_to_string(reloptions, ',')
FROM pg_class WHERE relnamespace = 'conveyor'::regnamespace AND reloptions IS NOT NULL
ORDER BY 1
"""


async def catalog(dsn: str) -> list[str]:
    conn = await asyncpg.connect(dsn)
    try:
        return [r[0] for r in await conn.fetch(CATALOG)]
    finally:
        await conn.close()


async def test_fresh_migrate_equals_shipped_schema(pg_server, postgres_dsn):
    # postgres_dsn is a database migrated from scratch (cloned from a migrated template).
    migrated = await catalog(postgres_dsn)
    pg_server.drop_database("conveyor_schema_file")
    pg_server.execute("CREATE DATABASE conveyor_schema_file")
    dsn = pg_server.dsn("conveyor_schema_file")
    sql = resources.files("conveyor.storage.sql").joinpath("postgres", "schema.sql").read_text()
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()
    try:
        assert migrated == await catalog(dsn)
        assert any("jobs_ready" in line for line in migrated)
    finally:
        pg_server.drop_database("conveyor_schema_file")


async def test_migrate_is_idempotent_and_checksummed(postgres_dsn):
    store = PostgresStore(postgres_dsn)
    await store.open()
    try:
        assert await store.migrate() == []  # nothing left to apply
    finally:
        await store.close()
