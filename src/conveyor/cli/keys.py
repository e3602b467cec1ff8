"""``conveyor keys rotate`` and the revoke helpers of ``conveyor keys`` (the key
lifecycle, docs/security.md). The CLI is the only place keys are created: no
REST route makes one."""

from __future__ import annotations

import click

from conveyor.app import Conveyor
from conveyor.cli.main import Ctx, _plain, err, keys, run
from conveyor.domain.auth import ApiKey
from conveyor.domain.errors import FieldError, ValidationError
from conveyor.presenters import iso
from conveyor.security.api_keys import (
    parse_duration,
    parse_overlap,
    resolve_key_id,
    rotated_key,
)

#: What ``keys revoke`` prints when no active key is left.
LAST_KEY_WARNING = (
    "Warning: no active API key is left. A server bound to a non-loopback address "
    "keeps answering 401 to every request and refuses to start again until a key "
    "exists (`conveyor keys create --scope admin --name ops`); a server bound to "
    "127.0.0.1 now answers without a key."
)


async def revoke_key(app: Conveyor, text: str) -> tuple[ApiKey, int]:
    """Revoke the key ``text`` names (id or unique prefix); returns it and how many
    active keys are left. Raises ``ApiKeyNotFound``, ``ValidationError``."""
    key = resolve_key_id(text, await app.store.list_api_keys())
    if key.revoked_at is not None:
        raise ValidationError(
            f"Key {key.id} was already revoked at {iso(key.revoked_at)}: nothing to do",
            [FieldError("key_id", "already revoked")],
        )
    async with app.audit.change("api_key.revoke", "api_key", key.id):
        revoked = await app.store.revoke_api_key(key.id, app.now())
    now = app.now()
    # Keys that still let someone in: an expired one keeps the API locked but
    # opens nothing.
    usable = [k for k in await app.store.list_api_keys() if k.active and not k.expired(now)]
    return revoked, len(usable)


def warn_if_last(remaining: int) -> None:
    if remaining == 0:
        err.print(f"[bold yellow]{LAST_KEY_WARNING}[/]", highlight=False)


@keys.command("rotate")
@click.argument("key_id")
@click.option(
    "--overlap",
    default="24h",
    show_default=True,
    help="How long the old key keeps working next to the new one: 1h, 7d, "
    "0 = revoke it at once (at most 30d).",
)
@click.option(
    "--expires-in",
    default=None,
    help="The new key's lifetime: 90d, 12h (default: the old key's lifetime, or never).",
)
@click.pass_obj
def keys_rotate(obj: Ctx, key_id: str, overlap: str, expires_in: str | None) -> None:
    """Replace key KEY_ID (an id or a unique prefix) by a new key with its name and
    scope. The new key is printed once; the old one stops after --overlap."""
    seconds = parse_overlap(overlap)
    lifetime = None if expires_in is None else parse_duration(expires_in)

    async def go(app: Conveyor) -> tuple[str, ApiKey, ApiKey, ApiKey]:
        keys = await app.store.list_api_keys()
        old = resolve_key_id(key_id, keys)
        now = app.now()
        successor = next(
            (
                k
                for k in keys
                if k.id != old.id
                and (k.name, k.scope) == (old.name, old.scope)
                and k.created_at > old.created_at
                and k.active
                and not k.expired(now)
            ),
            None,
        )
        if successor is not None and old.active:
            # Rotating it again would take its overlap for its lifetime (a short-lived
            # successor) and leave two replacements in use.
            raise ValidationError(
                f"Key {old.id} was already replaced by {successor.id} (same name and "
                f"scope): rotate {successor.id} instead, or revoke {old.id}",
                [FieldError("key_id", "already rotated")],
            )
        key, record, until = rotated_key(old, now, seconds, lifetime)
        summary = {"new_key_id": record.id, "old_key_until": until.isoformat()}
        async with app.audit.change("api_key.rotate", "api_key", old.id, summary):
            await app.store.rotate_api_key(old.id, record, until, now)
        (ended,) = [k for k in await app.store.list_api_keys() if k.id == old.id]
        return key, old, record, ended

    key, old, record, ended = run(go, obj.app())
    if ended.revoked_at is not None:
        ends = "was revoked"
    else:
        ends = f"stays valid until {iso(ended.expires_at)}"
    err.print(
        f"Rotated {old.scope.value} key {old.id} ({_plain(repr(old.name))}): the new key is "
        f"{record.id}; the old one {ends}. Store the new key now: it is not shown again.",
        highlight=False,
    )
    click.echo(key)
