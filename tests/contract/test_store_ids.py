"""Contract: job ids by prefix (what the CLI resolves a copied id prefix with)."""

from __future__ import annotations

from storekit import new, submit

from conveyor.storage.base import Store


async def test_ids_with_prefix_finds_exactly_the_ids_starting_with_it(store: Store) -> None:
    jobs = await submit(store, *(new() for _ in range(20)))
    ids = sorted(j.id for j in jobs)
    target = ids[7]
    assert await store.ids_with_prefix(target, 5) == [target]
    for size in (6, 12, 14, 20):
        expected = [i for i in ids if i.startswith(target[:size])]
        assert await store.ids_with_prefix(target[:size], 50) == expected
    assert (
        await store.ids_with_prefix(target[:12], 2)
        == [i for i in ids if i.startswith(target[:12])][:2]
    )
    assert await store.ids_with_prefix("ffffffffffff", 5) == []
    edge = target[:11] + "f"  # the last hex digit: the upper bound is past "f"
    assert await store.ids_with_prefix(edge, 50) == [i for i in ids if i.startswith(edge)]
