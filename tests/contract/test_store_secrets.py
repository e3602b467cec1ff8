"""Contract: the secrets vault over every backend (store methods + envelope crypto).

Stores hold ciphertexts only; versions count up per name and only the newest
``keep`` are kept; a master-key rotation re-wraps every row or none.
"""

from __future__ import annotations

import pytest
from storekit import at

from conveyor.domain.errors import ValidationError
from conveyor.domain.secrets import SecretDecryptError, SecretNotFound, SecretVersion
from conveyor.security.vault import MasterKey, StoreSecrets, open_sealed
from conveyor.storage.base import Store


def vault(store: Store, *keys: MasterKey, keep: int = 5, ttl: float = 300.0) -> StoreSecrets:
    return StoreSecrets(store, list(keys), lambda: at(0), cache_ttl=ttl, keep=keep)


async def test_set_get_list_delete(store: Store) -> None:
    v = vault(store, MasterKey.generate())
    first = await v.set("smtp", "hunter2")
    assert (first.name, first.version) == ("smtp", 1)
    assert b"hunter2" not in first.ciphertext
    assert (await v.set("smtp", "correct horse")).version == 2
    await v.set("api.token", "t0k")
    assert await v.get("smtp") == "correct horse"
    assert await v.get("smtp", version=1) == "hunter2"
    infos = await v.list()
    assert [(i.name, i.version, i.versions) for i in infos] == [
        ("api.token", 1, 1),
        ("smtp", 2, 2),
    ]
    assert "hunter2" not in repr(infos)
    assert "correct horse" not in repr(infos)
    await v.delete("smtp")
    with pytest.raises(SecretNotFound):
        await v.get("smtp")
    with pytest.raises(SecretNotFound):
        await v.delete("smtp")
    assert await store.secret_version("smtp") is None
    assert [i.name for i in await v.list()] == ["api.token"]


async def test_old_versions_are_pruned_to_keep(store: Store) -> None:
    v = vault(store, MasterKey.generate(), keep=2)
    for i in range(5):
        await v.set("k", f"value-{i}")
    assert await store.secret_version("k") == 5
    assert await v.get("k", version=4) == "value-3"
    with pytest.raises(SecretNotFound):
        await v.get("k", version=3)
    (info,) = await v.list()
    assert (info.version, info.versions) == (5, 2)


async def test_hostile_names_and_values_are_refused(store: Store) -> None:
    v = vault(store, MasterKey.generate())
    for name in ("", "a b", "x" * 101, "../etc", "nul\x00", 7):
        with pytest.raises(ValidationError):
            await v.set(name, "v")  # type: ignore[arg-type]
    for value in ("", b"x" * (64 * 1024 + 1), 3, None, "\ud800"):
        with pytest.raises(ValidationError):
            await v.set("ok", value)  # type: ignore[arg-type]
    assert await v.list() == []
    with pytest.raises(ValidationError):
        await store.put_secret("ok", "00", lambda _: b"x", at(0), keep=0)


async def test_rotate_master_rewraps_every_row(store: Store) -> None:
    old, new = MasterKey.generate(), MasterKey.generate()
    v = vault(store, old)
    await v.set("a", "alpha")
    await v.set("a", "alpha-2")
    await v.set("b", "beta")
    assert await v.rotate_master(new) == 3
    rows = [await store.get_secret(n, ver) for n, ver in (("a", 1), ("a", 2), ("b", 1))]
    assert {r.key_id for r in rows} == {new.key_id}
    # Only the new key opens them now; the old one is named as missing.
    fresh = vault(store, new)
    assert await fresh.get("a", version=1) == "alpha"
    assert await fresh.get("b") == "beta"
    with pytest.raises(SecretDecryptError, match=new.key_id):
        await vault(store, old).get("b")


async def test_a_failing_rotation_changes_nothing(store: Store) -> None:
    key = MasterKey.generate()
    v = vault(store, key)
    await v.set("a", "alpha")
    await v.set("b", "beta")
    before = [await store.get_secret(n) for n in ("a", "b")]
    seen: list[SecretVersion] = []

    def explode(row: SecretVersion) -> tuple[str, bytes]:
        seen.append(row)
        if len(seen) == 2:
            raise RuntimeError("boom")
        return "ffffffffffffffff", b"garbage"

    with pytest.raises(RuntimeError):
        await store.rewrap_secrets(explode)
    assert [await store.get_secret(n) for n in ("a", "b")] == before
    assert await vault(store, key).get("a") == "alpha"


async def test_sealed_row_is_bound_to_its_name_and_version(store: Store) -> None:
    key = MasterKey.generate()
    v = vault(store, key)
    await v.set("a", "alpha")
    await v.set("b", "beta")
    row = await store.get_secret("a")
    assert open_sealed([key], "a", 1, row.ciphertext) == b"alpha"
    with pytest.raises(SecretDecryptError, match="copied from another"):
        open_sealed([key], "b", 1, row.ciphertext)
    with pytest.raises(SecretDecryptError):
        open_sealed([key], "a", 2, row.ciphertext)
    flipped = bytearray(row.ciphertext)
    flipped[-1] ^= 1
    with pytest.raises(SecretDecryptError):
        open_sealed([key], "a", 1, bytes(flipped))


async def test_cache_sees_a_new_version_from_another_process(store: Store) -> None:
    key = MasterKey.generate()
    reader, writer = vault(store, key), vault(store, key)
    await writer.set("k", "one")
    assert await reader.get("k") == "one"
    await writer.set("k", "two")  # another provider: the reader's cache is stale
    assert await reader.get("k") == "two"


async def test_keyring_rotation_without_downtime(store: Store) -> None:
    old, new = MasterKey.generate(), MasterKey.generate()
    await vault(store, old).set("a", "alpha")
    both = vault(store, new, old)  # step 1: new key current, old one previous
    assert await both.get("a") == "alpha"
    assert await both.set("b", "beta")  # new rows under the new key at once
    assert await both.rotate_master() == 2  # step 2: re-wrap the rest
    assert {(await store.get_secret(n)).key_id for n in ("a", "b")} == {new.key_id}
    assert await vault(store, new).get("a") == "alpha"  # step 3: old key gone
