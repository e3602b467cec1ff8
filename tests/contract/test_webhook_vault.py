"""Contract: webhook signing secrets in the vault (every backend).

With a master key a new endpoint's secret is sealed in the vault and its row
keeps a reference only; rows written without one move at the next open with a
key. Deliveries still verify with the secret the endpoint was given, the
plaintext is gone from the stored rows (and from the SQLite files / the
PostgreSQL table), and deleting an endpoint deletes its vault secret.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from appkit import api_client, app_on

from conveyor import Conveyor
from conveyor.domain.job import Job, JobQuery
from conveyor.domain.secrets import SecretNotFound
from conveyor.domain.states import JobState
from conveyor.runtime.status import collect_status
from conveyor.security.vault import MasterKey
from conveyor.security.webhook_secrets import vault_name
from conveyor.storage.base import Store
from integration.test_webhooks import SECRET, Receiver
from support import async_wait_until, running_worker

FAST = {
    "poll_interval": 0.05,
    "event_poll_interval": 0.02,
    "webhook_allow_private": True,  # the receiver is on loopback
    "webhook_retry_base": 0.01,
}


def register(app: Conveyor) -> None:
    app.job("noop")(_noop)


async def _noop(ctx: object) -> None:
    return None


async def stored_plaintext(store: Store, text: str) -> bool:
    """Whether ``text`` is anywhere the backend keeps webhooks: the SQLite files
    (database and WAL, every byte), the PostgreSQL table (every column), the
    memory store's rows."""
    from conveyor.storage.sqlite import SQLiteStore

    if isinstance(store, SQLiteStore):
        base = Path(store.path)
        files = [base, base.with_name(base.name + "-wal")]
        return any(text.encode() in f.read_bytes() for f in files if f.exists())
    if type(store).__name__ == "PostgresStore":
        async with store._conn() as conn:  # type: ignore[attr-defined]
            rows = await conn.fetch("SELECT w::text FROM conveyor.webhooks AS w")
        return any(text in r[0] for r in rows)
    return any(text in repr(w) for w in await store.list_webhooks())


async def delivered_signed(app: Conveyor, receiver: Receiver) -> None:
    """Run one job; its ``job_completed`` delivery verifies with ``SECRET``."""
    async with running_worker(app):
        job = await app.enqueue("noop")

        async def received() -> bool:
            return any(r["event"]["job_id"] == job.id for r in receiver.received)

        await async_wait_until(received, 30, "a signed delivery")
    assert receiver.bad_signatures == 0


async def test_a_new_endpoint_keeps_its_secret_in_the_vault(store: Store) -> None:
    key = MasterKey.generate().to_base64()
    with Receiver().running() as receiver:
        async with app_on(store, register, master_key=key, **FAST) as app:
            async with api_client(app) as http:
                r = await http.post(
                    "/api/webhooks",
                    json={"url": receiver.url, "event_types": ["job_completed"], "secret": SECRET},
                )
                assert r.status_code == 201, r.text
                assert r.json()["secret"] == SECRET  # shown once, as before
                assert r.json()["webhook"]["secret_storage"] == "vault"
                hook_id = r.json()["webhook"]["id"]
            row = await store.get_webhook(hook_id)
            assert (row.secret, row.secret_ref) == ("", vault_name(hook_id))
            assert await app.secrets.get(vault_name(hook_id)) == SECRET
            assert not await stored_plaintext(store, SECRET)
            assert (await collect_status(app.deps))["webhook_secrets_unencrypted"] == 0
            await delivered_signed(app, receiver)

            async with api_client(app) as http:
                assert (await http.delete(f"/api/webhooks/{hook_id}")).status_code == 200
            with pytest.raises(SecretNotFound):
                await app.secrets.get(vault_name(hook_id))


async def test_existing_secrets_move_into_the_vault_at_open(store: Store) -> None:
    with Receiver().running() as receiver:
        async with app_on(store, register, **FAST) as plain:  # no master key yet
            async with api_client(plain) as http:
                r = await http.post(
                    "/api/webhooks",
                    json={"url": receiver.url, "event_types": ["job_completed"], "secret": SECRET},
                )
                assert r.json()["webhook"]["secret_storage"] == "database"
                hook_id = r.json()["webhook"]["id"]
            assert (await store.get_webhook(hook_id)).secret == SECRET
            assert await stored_plaintext(store, SECRET)  # the check can see it
            assert (await collect_status(plain.deps))["webhook_secrets_unencrypted"] == 1
            await delivered_signed(plain, receiver)  # as today without a key

        key = MasterKey.generate().to_base64()
        async with app_on(store, register, master_key=key, **FAST) as app:
            row = await store.get_webhook(hook_id)
            assert (row.secret, row.secret_ref) == ("", vault_name(hook_id))
            assert not await stored_plaintext(store, SECRET)
            assert (await collect_status(app.deps))["webhook_secrets_unencrypted"] == 0
            receiver.received.clear()
            await delivered_signed(app, receiver)

        # Opening again moves nothing twice and keeps one version of the secret.
        async with app_on(store, register, master_key=key, **FAST) as again:
            (info,) = [s for s in await again.secrets.list() if s.name == vault_name(hook_id)]
            assert info.versions == 1
            assert (await store.get_webhook(hook_id)).secret_ref == vault_name(hook_id)


async def test_a_bad_master_key_leaves_the_rows_as_they_are(store: Store) -> None:
    async with app_on(store, register, **FAST) as plain, api_client(plain) as http:
        r = await http.post(
            "/api/webhooks",
            json={"url": "http://127.0.0.1:9/h", "event_types": ["*"], "secret": SECRET},
        )
        hook_id = r.json()["webhook"]["id"]
    async with app_on(store, register, master_key="not base64!", **FAST):
        assert (await store.get_webhook(hook_id)).secret == SECRET  # opened, moved nothing


async def test_a_moved_row_changes_only_while_it_holds_the_sealed_secret(store: Store) -> None:
    async with app_on(store, register, **FAST) as plain, api_client(plain) as http:
        r = await http.post(
            "/api/webhooks",
            json={"url": "http://127.0.0.1:9/h", "event_types": ["*"], "secret": SECRET},
        )
        hook_id = r.json()["webhook"]["id"]
    assert not await store.move_webhook_secret(hook_id, "x", "another-secret-000000")
    assert await store.move_webhook_secret(hook_id, "x", SECRET)
    assert not await store.move_webhook_secret(hook_id, "y", SECRET)  # moved already
    assert not await store.move_webhook_secret("wh_nope", "y", SECRET)
    assert (await store.get_webhook(hook_id)).secret_ref == "x"


async def test_a_worker_without_the_master_key_says_so(store: Store) -> None:
    key = MasterKey.generate().to_base64()
    async with app_on(store, register, master_key=key, **FAST) as app:
        async with api_client(app) as http:
            r = await http.post(
                "/api/webhooks",
                json={"url": "http://127.0.0.1:9/h", "event_types": ["job_completed"]},
            )
            hook_id = r.json()["webhook"]["id"]
        assert (await store.get_webhook(hook_id)).secret_ref == vault_name(hook_id)

    async def failed_delivery() -> list[Job]:
        page = await store.list_jobs(
            JobQuery(job_type="conveyor.webhook", states=(JobState.FAILED,))
        )
        return page.jobs

    async with (
        app_on(store, register, webhook_max_retries=0, **FAST) as keyless,
        running_worker(keyless),
    ):
        await keyless.enqueue("noop")
        (job,) = await async_wait_until(failed_delivery, 30, "the delivery to fail")
    assert "No master key" in (job.error or "")
    assert "CONVEYOR_MASTER_KEY" in (job.error or "")
    assert await store.list_deliveries(hook_id, 10) == []  # nothing was sent unsigned
