"""Contract: outbox reading order, consumer leases, webhooks and their delivery log."""

from __future__ import annotations

import pytest
from storekit import all_events, at, new, submit, submit_one

from conveyor.domain.errors import ValidationError
from conveyor.domain.events import WEBHOOK_DISABLED
from conveyor.domain.webhooks import (
    DeliveryAttempt,
    DeliveryOutcome,
    DisablePolicy,
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


def attempt(n: float, ok: bool, hook_id: str = "wh1") -> DeliveryAttempt:
    """An attempt at ``at(n)``."""
    return DeliveryAttempt(
        webhook_id=hook_id,
        delivery_id=f"d{n}",
        event_id=int(n),
        event_type="job_completed",
        job_id=f"job{n}",
        attempt=1,
        outcome=DeliveryOutcome.DELIVERED if ok else DeliveryOutcome.FAILED,
        status_code=200 if ok else 500,
        error=None if ok else "HTTP 500",
        duration_ms=1.5,
        created_at=at(n),
    )


#: Disabled after 10 s without a delivered attempt, with at least 3 failures in a row.
POLICY = DisablePolicy(after_seconds=10, min_failures=3)


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
    failed = await store.record_delivery(attempt(1, ok=False), POLICY)
    assert failed.failing_since == at(1)
    assert failed.last_delivered_at is None
    after = await store.record_delivery(attempt(2, ok=True), POLICY)
    assert after.consecutive_failures == 0
    assert after.failing_since is None
    assert after.last_delivered_at == at(2)
    assert await store.get_webhook("wh1") == after
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
        await store.record_delivery(attempt(3, ok=True, hook_id="nope"), POLICY)


async def test_a_burst_of_failures_does_not_disable_until_failing_long_enough(
    store: Store,
) -> None:
    """Many failures within seconds (a receiver restarting during a burst) keep the
    endpoint active; it is disabled once it has failed for the policy's time."""
    await store.create_webhook(hook())
    for n in (1, 1.1, 1.2, 1.3, 1.4, 2, 5, 10.9):
        w = await store.record_delivery(attempt(n, ok=False), POLICY)
        assert w.state is WebhookState.ACTIVE, n
    assert w.consecutive_failures == 8
    assert w.failing_since == at(1)
    disabled = await store.record_delivery(attempt(11, ok=False), POLICY)
    assert disabled.state is WebhookState.DISABLED
    assert disabled.disabled_at == at(11)
    assert disabled.disabled_reason == (
        "no delivery succeeded for 10.0 seconds (9 failed attempts in a row)"
    )
    again = await store.record_delivery(attempt(12, ok=False), POLICY)
    assert again.state is WebhookState.DISABLED
    events = [e for e in await all_events(store) if e.type == WEBHOOK_DISABLED]
    assert len(events) == 1
    assert events[0].data["webhook_id"] == "wh1"
    assert events[0].data["consecutive_failures"] == 9
    assert events[0].job_id is None
    assert (await store.get_webhook("wh1")).replay_after == events[0].id


async def test_a_delivered_attempt_restarts_the_failing_clock(store: Store) -> None:
    await store.create_webhook(hook())
    for n in (1, 2, 3):
        await store.record_delivery(attempt(n, ok=False), POLICY)
    await store.record_delivery(attempt(9, ok=True), POLICY)
    for n in (10, 12, 19.5):
        w = await store.record_delivery(attempt(n, ok=False), POLICY)
    assert w.state is WebhookState.ACTIVE  # failing since 10, not since 1
    assert w.failing_since == at(10)
    w = await store.record_delivery(attempt(20, ok=False), POLICY)
    assert w.state is WebhookState.DISABLED


async def test_time_alone_needs_the_minimum_failures_in_a_row(store: Store) -> None:
    """Two failures a day apart (a quiet endpoint) are not yet a failing endpoint."""
    await store.create_webhook(hook())
    await store.record_delivery(attempt(0, ok=False), POLICY)
    w = await store.record_delivery(attempt(86_400, ok=False), POLICY)
    assert w.state is WebhookState.ACTIVE
    w = await store.record_delivery(attempt(86_401, ok=False), POLICY)
    assert w.state is WebhookState.DISABLED


@pytest.mark.parametrize(
    "policy",
    [
        DisablePolicy(after_seconds=0, min_failures=3),
        DisablePolicy(after_seconds=10, min_failures=0),
    ],
)
async def test_a_zero_policy_never_disables(store: Store, policy: DisablePolicy) -> None:
    await store.create_webhook(hook())
    for n in range(0, 100, 10):
        w = await store.record_delivery(attempt(n, ok=False), policy)
    assert w.state is WebhookState.ACTIVE
    assert w.consecutive_failures == 10


async def test_enable_reactivates_and_says_where_missed_events_start(store: Store) -> None:
    await store.create_webhook(hook())
    for n in (1, 6, 11):
        disabled = await store.record_delivery(attempt(n, ok=False), POLICY)
    assert disabled.state is WebhookState.DISABLED
    marker = next(e for e in await all_events(store) if e.type == WEBHOOK_DISABLED).id

    enabled, after = await store.enable_webhook("wh1")
    assert after == marker
    assert enabled.state is WebhookState.ACTIVE
    assert enabled.consecutive_failures == 0
    assert enabled.failing_since is None
    assert enabled.disabled_at is None
    assert enabled.disabled_reason is None
    assert enabled.replay_after is None
    assert await store.get_webhook("wh1") == enabled
    assert await store.enable_webhook("wh1") == (enabled, None)  # active: nothing to replay
    # A fresh streak: one more failure does not disable it again at once.
    w = await store.record_delivery(attempt(12, ok=False), POLICY)
    assert w.state is WebhookState.ACTIVE
    assert w.failing_since == at(12)
    with pytest.raises(WebhookNotFound):
        await store.enable_webhook("nope")


async def test_consumer_positions_lists_every_consumer(store: Store) -> None:
    assert await store.consumer_positions() == {}
    await store.claim_consumer("webhooks", "a", 10, at(0))
    await store.claim_consumer("relay", "a", 10, at(0))
    assert await store.advance_consumer("relay", "a", 12, at(1))
    assert await store.consumer_positions() == {"relay": 12, "webhooks": 0}
