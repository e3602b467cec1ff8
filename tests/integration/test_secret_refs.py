"""Secret references end to end: ``{"$secret": name}`` is resolved only for the
handler call (thread and process isolation); the plaintext is nowhere else:
not in the SQLite files, the logs, the events, the API answers or stored errors."""

from __future__ import annotations

import asyncio
import hashlib
import io
import secrets
import sys
from pathlib import Path

import httpx
import pytest

from conveyor import Conveyor
from conveyor.api.app import create_app
from conveyor.domain.states import JobState
from conveyor.observability.logging import configure_logging
from conveyor.security.vault import MasterKey
from conveyor.settings import Settings
from integration import secret_handlers as h
from support import async_wait_until, running_worker

pytestmark = pytest.mark.timeout(90)


def vault_app(**settings: object) -> Conveyor:
    """An in-memory app with a fresh master key and fast heartbeats."""
    base: dict[str, object] = {
        "database_url": "memory://",
        "master_key": MasterKey.generate().to_base64(),
        "heartbeat_interval": 0.2,
    }
    return Conveyor(settings=Settings(**{**base, **settings}))  # type: ignore[arg-type]


async def test_plaintext_never_leaves_the_handler_call(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    plain = "pw-" + secrets.token_hex(16)
    db = tmp_path / "c.db"
    logs = io.StringIO()
    configure_logging("DEBUG", stream=logs, fmt="json")
    settings = Settings(
        database_url=f"sqlite:///{db}",
        master_key=MasterKey.generate().to_base64(),
        heartbeat_interval=0.2,
    )
    app = Conveyor(settings=settings)
    for isolation in ("thread", "process"):
        app.job(f"use_{isolation}", isolation=isolation, max_retries=0)(h.use_secret)
        app.job(f"leak_{isolation}", isolation=isolation, max_retries=0)(h.leak_secret)
    ref = {"$secret": "smtp_password"}
    try:
        await app.open()
        await app.secrets.set("smtp_password", plain)
        ids: dict[str, str] = {}
        for kind in ("use_thread", "use_process", "leak_thread", "leak_process"):
            out = str(tmp_path / f"{kind}.sha")
            ids[kind] = (await app.enqueue(kind, {"password": ref, "out": out})).id
        async with running_worker(app, concurrency=4):

            async def all_final() -> dict | None:
                found = {i: await app.store.get(i) for i in ids.values()}
                final = (JobState.COMPLETED, JobState.FAILED)
                return found if all(j.state in final for j in found.values()) else None

            jobs = await async_wait_until(all_final, 30, "the four jobs to finish")
        digest = hashlib.sha256(plain.encode()).hexdigest()
        for kind in ("use_thread", "use_process"):
            job = jobs[ids[kind]]
            assert job.state is JobState.COMPLETED, job.error
            assert job.result == {"length": len(plain)}
            assert (tmp_path / f"{kind}.sha").read_text() == digest  # it got the value
        for kind in ("leak_thread", "leak_process"):
            job = jobs[ids[kind]]
            assert job.state is JobState.FAILED
            assert "login refused for password ***" in (job.error or "")
            assert plain not in (job.error or "")
        for job in jobs.values():
            assert job.payload["password"] == ref  # stored as the reference
        texts: list[str] = []
        transport = httpx.ASGITransport(app=create_app(app))
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as http:
            for job_id in ids.values():
                r = await http.get(f"/api/jobs/{job_id}")
                assert r.status_code == 200
                assert '"$secret"' in r.text
                texts.append(r.text)
            r = await http.get("/api/events", params={"limit": 1000})
            assert r.status_code == 200
            assert len(r.json()["events"]) >= 8
            texts.append(r.text)
        events = await app.store.events_after(0, 10_000)
        texts.append(repr(events))
        for execution_list in [await app.store.executions(i) for i in ids.values()]:
            texts.append(repr(execution_list))
        texts.append(logs.getvalue())
        captured = capfd.readouterr()  # the process's and its children's stdout/stderr
        texts.extend((captured.out, captured.err))
        assert "job_dead_lettered" in logs.getvalue()
        for text in texts:
            assert plain not in text
    finally:
        await app.close()
        configure_logging(stream=sys.__stderr__)  # not the capture, closed after this test
    files = [p for p in tmp_path.iterdir() if p.name.startswith("c.db")]
    assert files
    for path in files:
        assert plain.encode() not in path.read_bytes(), path.name


async def test_a_missing_secret_fails_the_attempt_clearly(tmp_path: Path) -> None:
    app = vault_app()
    app.job("use", max_retries=0)(h.use_secret)
    out = str(tmp_path / "use.sha")
    try:
        await app.open()
        job = await app.enqueue("use", {"password": {"$secret": "nope"}, "out": out})
        async with running_worker(app, concurrency=1):

            async def failed() -> object:
                j = await app.store.get(job.id)
                return j if j.state is JobState.FAILED else None

            done = await async_wait_until(failed, 20, "the job to fail")
        assert "Secret 'nope' not found" in done.error
        assert not Path(out).exists()
    finally:
        await app.close()


async def test_a_secrets_directory_is_read_first_then_the_vault(tmp_path: Path) -> None:
    # As Vault Agent, a Kubernetes secret volume or Docker secrets lay them out.
    folder = tmp_path / "run-secrets"
    folder.mkdir()
    (folder / "smtp_password").write_text("from-the-file\n")
    (folder / "conveyor.webhook.x").write_text("never used for Conveyor's own")
    app = vault_app(secrets_dir=str(folder))
    app.job("use", max_retries=0)(h.use_secret)
    try:
        await app.open()
        await app.secrets.set("smtp_password", "from-the-vault")
        await app.secrets.set("api_token", "vault-only")
        await app.secrets.set("conveyor.webhook.x", "vault-for-conveyor")
        assert await app._resolve_secret("smtp_password") == "from-the-file"
        assert await app._resolve_secret("api_token") == "vault-only"
        assert await app._resolve_secret("conveyor.webhook.x") == "vault-for-conveyor"
        # An agent rotating the file: the next read sees the new value.
        (folder / "smtp_password").write_text("rotated-by-the-agent")
        assert await app._resolve_secret("smtp_password") == "rotated-by-the-agent"

        outs = {n: str(tmp_path / f"{n}.sha") for n in ("file", "vault")}
        jobs = {
            "file": await app.enqueue(
                "use", {"password": {"$secret": "smtp_password"}, "out": outs["file"]}
            ),
            "vault": await app.enqueue(
                "use", {"password": {"$secret": "api_token"}, "out": outs["vault"]}
            ),
        }
        async with running_worker(app, concurrency=2):

            async def done() -> bool:
                states = [(await app.store.get(j.id)).state for j in jobs.values()]
                return all(s is JobState.COMPLETED for s in states)

            await async_wait_until(done, 20, "both jobs to complete")
        expected = {"file": "rotated-by-the-agent", "vault": "vault-only"}
        for n, value in expected.items():
            assert Path(outs[n]).read_text() == hashlib.sha256(value.encode()).hexdigest()
    finally:
        await app.close()


async def test_a_missing_secrets_directory_stops_the_process(tmp_path: Path) -> None:
    from conveyor.domain.errors import ConfigurationError

    app = Conveyor(settings=Settings(database_url="memory://", secrets_dir=str(tmp_path / "t")))
    with pytest.raises(ConfigurationError, match="CONVEYOR_SECRETS_DIR"):
        await app.open()


async def test_conveyors_own_secrets_cannot_be_referenced(tmp_path: Path) -> None:
    from conveyor.domain.errors import ValidationError

    app = vault_app(allow_unknown_job_types=True)
    app.job("use", max_retries=0)(h.use_secret)
    try:
        await app.open()
        await app.secrets.set("conveyor.webhook.wh_1", "signing-secret")
        out = str(tmp_path / "use.sha")
        ref = {"$secret": "conveyor.webhook.wh_1"}
        with pytest.raises(ValidationError, match=r"is Conveyor.s own"):
            await app.enqueue("use", {"password": ref, "out": out})
        # A type no registration checks at submit: refused when the worker resolves it.
        job = await app.enqueue("nobody_registered_this", {"x": [ref]})
        app.job("nobody_registered_this", max_retries=0)(lambda ctx, x: x)
        async with running_worker(app, concurrency=1):

            async def failed() -> object:
                j = await app.store.get(job.id)
                return j if j.state is JobState.FAILED else None

            done = await async_wait_until(failed, 20, "the job to fail")
        assert "Conveyor's own" in (done.error or "")
        assert "signing-secret" not in repr(done)
    finally:
        await app.close()


@pytest.mark.parametrize("isolation", ["thread", "process"])
async def test_a_secret_straddling_a_cut_is_masked_before_the_cut(
    tmp_path: Path, isolation: str
) -> None:
    app = vault_app()
    app.job("leak", isolation=isolation, max_retries=0)(h.leak_at_the_cut)
    plain = "Sup3rS3cretValue!xyz-" + secrets.token_hex(8)
    try:
        await app.open()
        await app.secrets.set("pw", plain)
        # Cuts: 8,192 characters of error here, 8 KiB (with its marker) in a child;
        # the traceback's last 8,192 characters here, 16 KiB in a child.
        cases = [(8_180, 0), (8_150, 0), (8_134, 0), (8_120, 0), (10, 8_180), (10, 16_330)]
        cases += [(10, 16_300), (100, 0)]
        ids = [
            (
                await app.enqueue(
                    "leak", {"password": {"$secret": "pw"}, "pad": pad, "after": after}
                )
            ).id
            for pad, after in cases
        ]
        async with running_worker(app, concurrency=1):

            async def all_failed() -> bool:
                jobs = [await app.store.get(i) for i in ids]
                return all(j.state is JobState.FAILED for j in jobs)

            await async_wait_until(all_failed, 60, "the jobs to fail")
        texts = []
        for i in ids:
            job = await app.store.get(i)
            texts.append(job.error or "")
            texts += [f"{e.error} {e.traceback}" for e in await app.store.executions(i)]
        joined = "\n".join(texts)
        for n in range(6, len(plain) + 1):  # no piece of it, from either end
            assert plain[:n] not in joined, n
            assert plain[-n:] not in joined, n
        assert "***" in texts[-1]  # the short one: masked in place
    finally:
        await app.close()


async def test_the_secrets_directory_reads_only_small_regular_text_files(tmp_path: Path) -> None:
    import os

    from conveyor.domain.errors import ConfigurationError
    from conveyor.security.file_secrets import MAX_SECRET_FILE_BYTES, FileSecrets

    folder = tmp_path / "s"
    folder.mkdir()
    (folder / "zero").symlink_to("/dev/zero")  # would never end
    os.mkfifo(folder / "fifo")  # would block the reader for good
    (folder / "big").write_bytes(b"x" * (MAX_SECRET_FILE_BYTES + 1))
    (folder / "binary").write_bytes(b"\xff\xfe\x00")
    (folder / "ok").write_text("fine\n")
    (tmp_path / "outside").write_text("not here")
    provider = FileSecrets(folder)
    for name, reason in (
        ("zero", "not a regular file"),
        ("fifo", "not a regular file"),
        ("big", "larger than"),
        ("binary", "not UTF-8"),
    ):
        with pytest.raises(ConfigurationError, match=reason):
            await asyncio.wait_for(provider.get(name), 5)
    assert await provider.get("ok") == "fine"
    from conveyor.domain.errors import ValidationError
    from conveyor.domain.secrets import SecretNotFound

    for name in ("..", ".hidden", "missing"):
        with pytest.raises(SecretNotFound):
            await provider.get(name)
    with pytest.raises(ValidationError):
        await provider.get("../outside")


@pytest.mark.parametrize("isolation", ["thread", "process"])
async def test_a_result_never_carries_a_resolved_secret(tmp_path: Path, isolation: str) -> None:
    app = vault_app()
    app.job("echo", isolation=isolation, max_retries=0)(h.echo)
    plain = "echo-me-" + secrets.token_hex(8)
    try:
        await app.open()
        await app.secrets.set("pw", plain)
        job = await app.enqueue("echo", {"password": {"$secret": "pw"}})
        async with running_worker(app, concurrency=1):

            async def done() -> object:
                j = await app.store.get(job.id)
                return j if j.state is JobState.COMPLETED else None

            got = await async_wait_until(done, 30, "the job to complete")
        assert plain not in repr(got.result)
        assert got.result == {"got": "***", "nested": ["pw=***"], "***": "as a key"}
    finally:
        await app.close()
