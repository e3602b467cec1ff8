"""The PostgreSQL test fixtures keep their promises: a private, migrated,
otherwise empty database per test, and a server that can be bounced without
losing committed data."""

from __future__ import annotations

import importlib.util

import pytest

from pg import PostgresServer, TemplateDatabase

PROBE = "CREATE TABLE infra_probe (owner text NOT NULL); INSERT INTO infra_probe VALUES ('{}');"


def test_the_template_holds_the_migrated_schema(pg_template: TemplateDatabase) -> None:
    if importlib.util.find_spec("conveyor.storage.postgres") is not None:
        assert pg_template.tables, "PostgresStore.open() created no tables in the template"
    assert "public.infra_probe" not in pg_template.tables


# Run twice, in either order: whichever runs second would see the first's table.
@pytest.mark.parametrize("owner", ["first", "second"])
def test_each_test_gets_its_own_fresh_database(
    pg_server: PostgresServer, pg_template: TemplateDatabase, postgres_dsn: str, owner: str
) -> None:
    assert postgres_dsn.startswith(f"postgresql://postgres@127.0.0.1:{pg_server.port}/test_")
    assert pg_server.table_counts(postgres_dsn) == pg_template.tables

    pg_server.execute(PROBE.format(owner), postgres_dsn)

    assert pg_server.query("SELECT owner FROM infra_probe", postgres_dsn) == [[owner]]
    assert pg_server.query("SELECT datname FROM pg_database WHERE datname LIKE 'test_%'") == [
        [postgres_dsn.rsplit("/", 1)[1]]
    ], "an earlier test's database was not dropped"


async def test_the_dsn_works_for_asyncpg(postgres_dsn: str) -> None:
    asyncpg = pytest.importorskip("asyncpg")
    conn = await asyncpg.connect(postgres_dsn)
    try:
        assert await conn.fetchval("SHOW fsync") == "on"
        assert await conn.fetchval("SHOW synchronous_commit") == "on"
        assert await conn.fetchval("SELECT current_database()") == postgres_dsn.rsplit("/", 1)[1]
    finally:
        await conn.close()


@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_restart_keeps_committed_data(
    pg_server: PostgresServer, postgres_dsn: str, mode: str
) -> None:
    pg_server.execute(PROBE.format(mode), postgres_dsn)
    port = pg_server.port

    pg_server.restart(mode)  # immediate: no shutdown checkpoint, WAL replay on start

    assert pg_server.port == port
    assert pg_server.query("SELECT owner FROM infra_probe", postgres_dsn) == [[mode]]
