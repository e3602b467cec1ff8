"""Webhook signing secrets in the vault (docs/security.md, "Webhook secrets").

With a master key configured, an endpoint's signing secret is a vault secret
named ``conveyor.webhook.<webhook id>``: sealed like any other secret, and the
``webhooks`` row keeps only that name (``secret_ref``; its ``secret`` column is
empty). Without a master key the secret stays in the row as given, as before,
and ``conveyor status`` says so. Rows written before a master key existed are
moved by ``move_webhook_secrets`` when an app opens with one.
"""

from __future__ import annotations

import contextlib
from dataclasses import replace

from conveyor.domain.secrets import SecretNotFound
from conveyor.domain.webhooks import Webhook, WebhookNotFound
from conveyor.security.vault import StoreSecrets
from conveyor.storage.base import Store

PREFIX = "conveyor.webhook."


def vault_name(webhook_id: str) -> str:
    """The vault secret holding endpoint ``webhook_id``'s signing secret."""
    return PREFIX + webhook_id


async def create_webhook(store: Store, vault: StoreSecrets, hook: Webhook) -> Webhook:
    """Store a new endpoint; its secret goes into the vault first when ``vault``
    has a master key (else into the row, unencrypted). Returns what was stored.
    Raises what ``Store.create_webhook`` raises (the vault secret is removed then)."""
    if not vault.keys:
        await store.create_webhook(hook)
        return hook
    name = vault_name(hook.id)
    await vault.set(name, hook.secret)
    sealed = replace(hook, secret="", secret_ref=name)
    try:
        await store.create_webhook(sealed)
    except BaseException:
        with contextlib.suppress(SecretNotFound):
            await vault.delete(name)
        raise
    return sealed


async def delete_webhook(store: Store, vault: StoreSecrets, webhook_id: str) -> None:
    """Delete an endpoint and the vault secret holding its signing secret.
    Raises ``WebhookNotFound``."""
    hook = await store.get_webhook(webhook_id)
    await store.delete_webhook(webhook_id)
    if hook.secret_ref is not None:
        with contextlib.suppress(SecretNotFound):
            await vault.delete(hook.secret_ref)


async def move_webhook_secrets(store: Store, vault: StoreSecrets) -> int:
    """Move every endpoint secret still stored in its row into the vault (a no-op
    without a master key); returns how many moved. Safe to run in several
    processes at once: a row changes only while it still holds the secret sealed."""
    if not vault.keys:
        return 0
    moved = 0
    for hook in await store.list_webhooks():
        if hook.secret_ref is not None or not hook.secret:
            continue
        name = vault_name(hook.id)
        await vault.set(name, hook.secret)
        if await store.move_webhook_secret(hook.id, name, hook.secret):
            moved += 1
            continue
        try:
            await store.get_webhook(hook.id)
        except WebhookNotFound:  # deleted meanwhile: its sealed copy goes too
            with contextlib.suppress(SecretNotFound):
                await vault.delete(name)
    return moved


def unencrypted(hooks: list[Webhook]) -> int:
    """How many of ``hooks`` keep their signing secret unencrypted in the database."""
    return sum(1 for h in hooks if h.secret_ref is None)
