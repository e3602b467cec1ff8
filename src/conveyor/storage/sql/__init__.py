"""SQL lives in named blocks of ``.sql`` files, one folder per backend.

A block starts with a line ``-- name: <query_name>`` and runs to the next one.
Migrations are ``migrations/NNNN_<name>.sql`` files, applied in order and
recorded with their checksum.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from importlib import resources

_NAME = re.compile(r"^--\s*name:\s*([a-z_][a-z0-9_]*)\s*$", re.MULTILINE)


def load_queries(backend: str, filename: str = "queries.sql") -> dict[str, str]:
    text = resources.files(__package__).joinpath(backend, filename).read_text("utf-8")
    parts = _NAME.split(text)
    queries: dict[str, str] = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        if name in queries:
            raise RuntimeError(f"duplicate query name {name!r} in {backend}/{filename}")
        queries[name] = body.strip()
    return queries


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def load_migrations(backend: str) -> list[Migration]:
    folder = resources.files(__package__).joinpath(backend, "migrations")
    out = []
    for entry in folder.iterdir():
        match = re.fullmatch(r"(\d{4})_([a-z0-9_]+)\.sql", entry.name)
        if match:
            out.append(Migration(int(match[1]), match[2], entry.read_text("utf-8")))
    out.sort(key=lambda m: m.version)
    versions = [m.version for m in out]
    if len(set(versions)) != len(versions):
        raise RuntimeError(f"two {backend} migrations share a version number: {versions}")
    return out
