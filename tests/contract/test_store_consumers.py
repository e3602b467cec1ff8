"""Contract: outbox reading order, consumer leases, webhooks and their delivery log."""

from __future__ import annotations

import pytest
from storekit import all_events, at, new, submit, submit_one

from conveyor.domain.errors import ValidationError
from conveyor.domain.events import WEBHOOK_DISABLED
from conveyor.domain.webhooks import (
    DeliveryAttempt,
    DeliveryOutcome,
    Webhook,
    WebhookNotFound,
    WebhookState,
)
from conveyor.storage.base import Store


async def test_events_after_pages_in_order_from_any_event(store: Store) -> None:
    await submit(store, *[new() for _ in range(7)], now=at(0))
    everything = await all_events(store)
    assert len(everything) == 7
    assert await store.latest_event_id() == everything[-1].id
    page, seen = [], 0
    while batch := await store.events_after(seen, 3):
        assert len(batch) <= 3
        page.extend(batch)
        seen = batch[-1].id
    assert [e.id for e in page] == [e.id for e in everything]
    assert await store.events_after(everything[2].id, 100) == everything[3:]
    assert await store.events_after(everything[-1].id, 100) == []


async def test_latest_event_id_is_zero_when_empty(store: Store) -> None:
    assert await store.latest_event_id() == 0
    assert await store.events_after(0, 10) == []


async def test_pruned_anchor_still_resumes_after_it(store: Store) -> None:
    await submit_one(store, now=at(0))
    old = (await all_events(store))[-1]
    await submit_one(store, now=at(100))
    await store.prune(older_than=at(50))
    after = await store.events_after(old.id, 10)
    assert [e.created_at for e in after] == [at(100)]


async def test_consumer_lease_is_exclusive_until_it_expires(store: Store) -> None:
    assert await store.claim_consumer("relay", "a", 10, at(0)) == 0
    assert await store.claim_consumer("relay", "b", 10, at(5)) is None
    assert await store.advance_consumer("relay", "a", 42, at(6))
    assert not await store.advance_consumer("relay", "b", 99, at(6))
    assert await store.claim_consumer("relay", "a", 10, at(7)) == 42  # renew
    # a's lease (renewed at 7, ttl 10) expires at 17: b takes over where a left off
    assert await store.claim_consumer("relay", "b", 10, at(18)) == 42
    assert not await store.advance_consumer("relay", "a", 50, at(19))  # fenced off
    assert await store.claim_consumer("relay", "b", 10, at(19)) == 42


async def test_released_consumer_is_taken_at_once_and_names_are_independent(store: Store) -> None:
    assert await store.claim_consumer("relay", "a", 60, at(0)) == 0
    assert await store.claim_consumer("webhooks", "b", 60, at(0)) == 0
    assert await store.advance_consumer("relay", "a", 7, at(1))
    await store.release_consumer("relay", "a", at(2))
    assert await store.claim_consumer("relay", "c", 60, at(3)) == 7
    assert await store.claim_consumer("webhooks", "b", 60, at(3)) == 0


def hook(hook_id: str = "wh1", **fields: object) -> Webhook:
    base: dict[str, object] = {
        "id": hook_id,
        "url": "https://example.test/hook",
        "event_types": ("job_*",),
        "secret": "s" * 32,
        "created_at": at(0),
    }
    base.update(fields)
    return Webhook(**base)  # type: ignore[arg-type]


def attempt(n: int, ok: bool, hook_id: str = "wh1") -> DeliveryAttempt:
    return DeliveryAttempt(
        webhook_id=hook_id,
        delivery_id=f"d{n}",
        event_id=n,
        event_type="job_completed",
        job_id=f"job{n}",
        attempt=1,
        outcome=DeliveryOutcome.DELIVERED if ok else DeliveryOutcome.FAILED,
        status_code=200 if ok else 500,
        error=None if ok else "HTTP 500",
        duration_ms=1.5,
        created_at=at(n),
    )


async def test_webhook_crud(store: Store) -> None:
    await store.create_webhook(hook("wh1"))
    await store.create_webhook(hook("wh2", event_types=("job_failed", "job_completed")))
    with pytest.raises(ValidationError):
        await store.create_webhook(hook("wh1"))
    got = await store.get_webhook("wh2")
    assert got.event_types == ("job_failed", "job_completed")
    assert got.state is WebhookState.ACTIVE
    assert got.secret == "s" * 32
    assert [w.id for w in await store.list_webhooks()] == ["wh1", "wh2"]
    await store.delete_webhook("wh1")
    with pytest.raises(WebhookNotFound):
        await store.get_webhook("wh1")
    with pytest.raises(WebhookNotFound):
        await store.delete_webhook("wh1")
    assert [w.id for w in await store.list_webhooks()] == ["wh2"]


async def test_deliveries_are_logged_newest_first(store: Store) -> None:
    await store.create_webhook(hook())
    await store.record_delivery(attempt(1, ok=False), disable_after=5)
    after = await store.record_delivery(attempt(2, ok=True), disable_after=5)
    assert after.consecutive_failures == 0
    log = await store.list_deliveries("wh1", 10)
    assert [(d.delivery_id, d.outcome, d.status_code) for d in log] == [
        ("d2", DeliveryOutcome.DELIVERED, 200),
        ("d1", DeliveryOutcome.FAILED, 500),
    ]
    assert log[1].error == "HTTP 500"
    assert log[0].duration_ms == 1.5
    assert len(await store.list_deliveries("wh1", 1)) == 1
    with pytest.raises(WebhookNotFound):
        await store.list_deliveries("nope", 10)
    with pytest.raises(WebhookNotFound):
        await store.record_delivery(attempt(3, ok=True, hook_id="nope"), disable_after=5)


async def test_consecutive_failures_disable_the_endpoint_once_with_an_event(store: Store) -> None:
    await store.create_webhook(hook())
    states = []
    for n in range(1, 5):
        w = await store.record_delivery(attempt(n, ok=False), disable_after=3)
        states.append((w.consecutive_failures, w.state))
    assert states == [
        (1, WebhookState.ACTIVE),
        (2, WebhookState.ACTIVE),
        (3, WebhookState.DISABLED),
        (4, WebhookState.DISABLED),
    ]
    disabled = await store.get_webhook("wh1")
    assert disabled.disabled_at == at(3)
    assert disabled.disabled_reason == "3 consecutive failed deliveries"
    events = [e for e in await all_events(store) if e.type == WEBHOOK_DISABLED]
    assert len(events) == 1
    assert events[0].data["webhook_id"] == "wh1"
    assert events[0].job_id is None


async def test_disable_after_zero_never_disables(store: Store) -> None:
    await store.create_webhook(hook())
    for n in range(1, 6):
        w = await store.record_delivery(attempt(n, ok=False), disable_after=0)
    assert w.state is WebhookState.ACTIVE
    assert w.consecutive_failures == 5


async def test_consumer_positions_lists_every_consumer(store: Store) -> None:
    assert await store.consumer_positions() == {}
    await store.claim_consumer("webhooks", "a", 10, at(0))
    await store.claim_consumer("relay", "a", 10, at(0))
    assert await store.advance_consumer("relay", "a", 12, at(1))
    assert await store.consumer_positions() == {"relay": 12, "webhooks": 0}
