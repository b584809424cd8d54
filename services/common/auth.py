"""API keys: salted hashes in ClickHouse, looked up by a short non-secret index.

A key is shown once when created. The store keeps ``key_id`` (the first 16 hex digits of the
key's SHA-256, an index only), a random salt and ``sha256(salt || key)``; a request's key is
compared with :func:`hmac.compare_digest`. Every service loads its in-memory copy again once it
is ``keys_refresh_s`` old, so a revoked key stops working within twice that time.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from typing import Annotated

import structlog
from fastapi import Depends, Request

from services.common.clickhouse import ClickHouse
from services.common.errors import RateLimited, Unauthorized
from services.common.logging import detached
from services.common.ratelimit import STATE_KEY, RateLimiter

log = structlog.get_logger(__name__)

KEY_PREFIX = "mk-"


def generate_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def key_id(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def hash_key(key: str, salt: bytes) -> str:
    return hashlib.sha256(salt + key.encode()).hexdigest()


def check_project(project: str) -> str:
    """A project name: not empty, no ``/`` (a record's key is ``project/completion_id``, and
    dead letters are filed by what comes before the first ``/``), no spaces, at most 128."""
    if not project or len(project) > 128 or "/" in project or any(c.isspace() for c in project):
        raise ValueError(f"invalid project {project!r}: 1-128 characters, no '/' and no spaces")
    return project


def parse_seed(spec: str) -> list[tuple[str, str]]:
    """``"projA:key1,projB:key2"`` -> ``[("projA", "key1"), ("projB", "key2")]``."""
    pairs: list[tuple[str, str]] = []
    for chunk in spec.split(","):
        chunk = chunk.strip()
        if not chunk:
            continue
        project, sep, key = chunk.partition(":")
        if not sep or not project.strip() or not key.strip():
            raise ValueError('MANIAC_API_KEYS must look like "projA:key1,projB:key2"')
        pairs.append((project.strip(), key.strip()))
    return pairs


class RevokedKey(ValueError):
    """The key was revoked: it is never made valid again."""


@dataclass(frozen=True)
class StoredKey:
    key_id: str
    project: str
    salt: bytes
    key_hash: str


class KeyStore:
    def __init__(self, clickhouse: ClickHouse, refresh_s: float = 5.0) -> None:
        self._ch = clickhouse
        self._refresh_s = refresh_s
        self._by_id: dict[str, list[StoredKey]] = {}
        self._loaded_at = 0.0
        self._lock = asyncio.Lock()
        self._refreshing: asyncio.Task[None] | None = None

    async def load(self) -> None:
        rows = await self._ch.rows(
            "SELECT key_id, project, salt, key_hash FROM {database}.api_keys FINAL "
            "WHERE revoked = 0"
        )
        by_id: dict[str, list[StoredKey]] = {}
        for kid, project, salt, key_hash in rows:
            by_id.setdefault(kid, []).append(StoredKey(kid, project, bytes.fromhex(salt), key_hash))
        self._by_id = by_id
        self._loaded_at = time.monotonic()

    async def refresh(self) -> None:
        """Load the keys again, once for all callers; keep those we have if ClickHouse fails."""
        async with self._lock:
            if time.monotonic() - self._loaded_at < self._refresh_s:
                return  # another caller just did
            try:
                await self.load()
            except Exception as exc:  # ClickHouse away: keep the keys we have
                self._loaded_at = time.monotonic()  # and ask again one refresh later
                log.warning("api_keys_refresh_failed", error=str(exc), kept=len(self._by_id))

    async def authenticate(self, key: str) -> str | None:
        """The project of ``key``, or None.

        Keys older than ``refresh_s`` are loaded again. A request with a key among them is
        answered from them while they are loaded in the background; it waits for the load
        when its key is not among them (perhaps one added since), or when they are older than
        twice ``refresh_s`` (no request came for a while). So no key revoked more than twice
        ``refresh_s`` ago is accepted, and under steady traffic requests do not wait.
        """
        project = self._lookup(key)
        age = time.monotonic() - self._loaded_at
        if age >= self._refresh_s:
            if project is None or age >= 2 * self._refresh_s:
                await self.refresh()
                project = self._lookup(key)
            elif self._refreshing is None or self._refreshing.done():
                self._refreshing = detached(self.refresh(), name="api-keys-refresh")
        return project

    def _lookup(self, key: str) -> str | None:
        for stored in self._by_id.get(key_id(key), ()):
            if hmac.compare_digest(hash_key(key, stored.salt), stored.key_hash):
                return stored.project
        return None

    async def add(self, project: str, key: str) -> str:
        """Store ``key`` for ``project`` (idempotent for the same pair); return its key id.

        A revoked key stays revoked: adding it again raises :class:`RevokedKey`.
        """
        check_project(project)
        kid = key_id(key)
        rows = await self._ch.rows(
            "SELECT project, salt, key_hash, revoked FROM {database}.api_keys FINAL "
            "WHERE key_id = {kid:String}",
            {"kid": kid},
        )
        for stored_project, salt, key_hash, revoked in rows:
            if hmac.compare_digest(hash_key(key, bytes.fromhex(salt)), key_hash):
                if revoked:
                    raise RevokedKey(f"key {kid} was revoked; a revoked key is not added again")
                if stored_project != project:
                    raise ValueError(f"this key already belongs to project {stored_project!r}")
                return kid
        salt = secrets.token_bytes(16)
        await self._ch.command(
            "INSERT INTO {database}.api_keys (key_id, project, salt, key_hash, created_at, "
            "revoked, version) VALUES ({kid:String}, {project:String}, {salt:String}, "
            "{hash:String}, now64(3), 0, {version:UInt64})",
            {
                "kid": kid,
                "project": project,
                "salt": salt.hex(),
                "hash": hash_key(key, salt),
                "version": time.time_ns(),
            },
        )
        await self.load()
        log.info("api_key_added", project=project, key_id=kid)
        return kid

    async def create(self, project: str) -> str:
        """A new random key for ``project``; the caller shows it once."""
        key = generate_key()
        await self.add(project, key)
        return key

    async def revoke(self, kid: str) -> int:
        """Revoke every key with this key id; return how many were revoked."""
        rows = await self._ch.rows(
            "SELECT project, salt, key_hash, created_at FROM {database}.api_keys FINAL "
            "WHERE key_id = {kid:String} AND revoked = 0",
            {"kid": kid},
        )
        for project, salt, key_hash, created_at in rows:
            await self._ch.command(
                "INSERT INTO {database}.api_keys (key_id, project, salt, key_hash, created_at, "
                "revoked, version) VALUES ({kid:String}, {project:String}, {salt:String}, "
                "{hash:String}, {created:DateTime64(3)}, 1, {version:UInt64})",
                {
                    "kid": kid,
                    "project": project,
                    "salt": salt,
                    "hash": key_hash,
                    "created": created_at,
                    "version": time.time_ns(),
                },
            )
        await self.load()
        return len(rows)

    async def count(self) -> int:
        await self.load()
        return sum(len(v) for v in self._by_id.values())

    async def list(self) -> list[tuple[str, str]]:
        """(key_id, project) of every active key."""
        await self.load()
        return sorted((s.key_id, s.project) for v in self._by_id.values() for s in v)


async def require_project(request: Request) -> str:
    """The project of the request's Bearer key; 401 in the envelope otherwise."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        # RFC 6750: a 401 names the scheme it wants, and why the token was refused
        raise Unauthorized(
            "Missing API key: send 'Authorization: Bearer <key>'.",
            headers={"WWW-Authenticate": "Bearer"},
        )
    store: KeyStore = request.state.keys
    project = await store.authenticate(token.strip())
    if project is None:
        raise Unauthorized(
            "Invalid API key.", headers={"WWW-Authenticate": 'Bearer error="invalid_token"'}
        )
    structlog.contextvars.bind_contextvars(project=project)
    limiter: RateLimiter | None = getattr(request.state, "rate_limiter", None)
    if limiter is not None and limiter.enabled:
        decision = limiter.hit(key_id(token.strip()))
        setattr(request.state, STATE_KEY, decision.headers())
        if not decision.allowed:
            raise RateLimited(
                f"Rate limit of {decision.limit} requests per minute for this key exceeded; "
                f"retry in {decision.retry_after} s.",
                details={"limit": decision.limit, "reset": decision.reset},
            )
    return project


ProjectDep = Annotated[str, Depends(require_project)]
