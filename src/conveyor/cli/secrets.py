"""``conveyor secrets``: set, get, list, delete, rotate-master, new-master-key
(the vault, docs/security.md)."""

from __future__ import annotations

import sys

import click

from conveyor.app import Conveyor
from conveyor.auditing import audited
from conveyor.cli.main import ConveyorGroup, Ctx, _add_row, _table, cli, emit_json, err, out, run
from conveyor.security.vault import MasterKey, read_key_file


def _one_line(text: str) -> str:
    """A value as typed or saved by an editor: one trailing newline is not part of it."""
    if text.endswith("\r\n"):
        return text[:-2]
    return text[:-1] if text.endswith("\n") else text


@cli.group(cls=ConveyorGroup)
def secrets() -> None:
    """Secrets vault: values encrypted with the master key (CONVEYOR_MASTER_KEY)."""


@secrets.command("set")
@click.argument("name")
@click.option(
    "--from-file",
    type=click.Path(dir_okay=False, exists=True),
    default=None,
    help="Read the value from this file (else from stdin, or a hidden prompt).",
)
@click.pass_obj
def secrets_set(obj: Ctx, name: str, from_file: str | None) -> None:
    """Store a new version of secret NAME. The value never goes on the command line
    (it would show in `ps` and shell history); one trailing newline is dropped."""
    if from_file is not None:
        try:
            with open(from_file, encoding="utf-8") as f:
                value = _one_line(f.read(64 * 1024 + 3))
        except UnicodeDecodeError:
            raise click.BadParameter(
                "the file is not UTF-8 text", param_hint="--from-file"
            ) from None
    elif sys.stdin.isatty():
        value = click.prompt("Value", hide_input=True, confirmation_prompt=True)
    else:
        value = _one_line(sys.stdin.read(64 * 1024 + 3))
    row = run(
        lambda a: audited(a, "secret.set", "secret", name, lambda: a.secrets.set(name, value)),
        obj.app(),
    )
    out.print(f"Stored {row.name} version {row.version}", highlight=False)


@secrets.command("get")
@click.argument("name")
@click.option("--version", type=click.IntRange(1, 2**31 - 1), default=None)
@click.pass_obj
def secrets_get(obj: Ctx, name: str, version: int | None) -> None:
    """Print the value of secret NAME (its newest version unless --version)."""
    click.echo(run(lambda a: a.secrets.get(name, version), obj.app()))


@secrets.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def secrets_list(obj: Ctx, as_json: bool) -> None:
    """List secrets: names, versions and dates, never values."""
    infos = run(lambda a: a.secrets.list(), obj.app())
    if as_json:
        emit_json([i.to_dict() for i in infos])
        return
    table = _table("Secrets", ("name", "version", "versions kept", "created", "updated"))
    for i in infos:
        _add_row(
            table,
            i.name,
            str(i.version),
            str(i.versions),
            i.created_at.isoformat(timespec="seconds"),
            i.updated_at.isoformat(timespec="seconds"),
        )
    out.print(table)


@secrets.command("delete")
@click.argument("name")
@click.pass_obj
def secrets_delete(obj: Ctx, name: str) -> None:
    """Delete secret NAME, every version."""
    run(
        lambda a: audited(a, "secret.delete", "secret", name, lambda: a.secrets.delete(name)),
        obj.app(),
    )
    out.print(f"Deleted {name}", highlight=False)


@secrets.command("rotate-master")
@click.option(
    "--new-key-file",
    type=click.Path(dir_okay=False),
    default=None,
    help="Re-wrap under the key in this file (mode 0600). Without it: re-wrap under "
    "CONVEYOR_MASTER_KEY rows still wrapped by CONVEYOR_MASTER_KEY_PREVIOUS.",
)
@click.pass_obj
def secrets_rotate_master(obj: Ctx, new_key_file: str | None) -> None:
    """Re-wrap every secret's data key under a new master key, in one transaction."""
    new = read_key_file(new_key_file) if new_key_file else None

    async def go(app: Conveyor) -> tuple[int, str]:
        async with app.audit.change("secret.rotate_master", "secret", "*"):
            count = await app.secrets.rotate_master(new)
        return count, app.secrets.keys[0].key_id

    count, key_id = run(go, obj.app())
    out.print(f"Re-wrapped {count} secret version(s) under master key {key_id}", highlight=False)
    if new is not None:
        err.print(
            "Now set CONVEYOR_MASTER_KEY_FILE (or CONVEYOR_MASTER_KEY) to the new key "
            "everywhere; processes still on the old key fail to decrypt until then.",
            highlight=False,
        )


@secrets.command("new-master-key")
def secrets_new_master_key() -> None:
    """Print a fresh random master key (base64 of 32 bytes) for CONVEYOR_MASTER_KEY
    or a key file (`umask 077; conveyor secrets new-master-key > master.key`)."""
    click.echo(MasterKey.generate().to_base64())
