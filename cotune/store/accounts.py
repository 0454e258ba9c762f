"""Accounts: tenants, API keys and uploaded files (tables of revision ``0002_accounts``).

API keys
--------
``create_key(tenant)`` returns ``(key_id, plaintext)``; the plaintext is shown once and never
stored. It reads ``ct_<16 hex: the key id>_<secret>``, the secret being 32 bytes from
``secrets`` (256 bits). The table keeps a per-key random salt and ``HMAC-SHA256(salt, secret)``.

Why a fast hash and not scrypt/argon2: slow KDFs protect *low-entropy* human passwords from
offline guessing. A 256-bit random secret cannot be guessed at any hash speed (2^255 tries on
average), so a slow hash would only add tens of milliseconds to every request. The salt makes
every stored hash unique anyway (no precomputed tables, no two equal rows).

``verify_key(plaintext)`` looks the row up by the id embedded in the key and compares digests
with ``hmac.compare_digest`` (constant time). An unknown id still computes and compares a hash,
so timing does not tell a missing id from a wrong secret. Revoked keys answer None.

Files
-----
A file's bytes live in the artifact store under ``key``; its row records who owns it, its
purpose (``data``, ``fine-tune``, ``feedback`` or ``corpus``), size, SHA-256, row count and
which fields its rows hold (``fields``: name -> number of rows with a non-null value), so a
job's spec can be checked against it without reading it again.

Every read takes the caller's tenant; ``tenant_id=None`` means "no scoping" (admin tools).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from pydantic import BaseModel, ConfigDict
from sqlalchemy import and_, delete, func, or_, select, update
from sqlalchemy.exc import IntegrityError

from cotune.errors import CotuneError
from cotune.store.base import SideStore
from cotune.store.models import ApiKey, FileRow, Job, Tenant, matchable, utcnow

TENANT_ID = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
KEY_PREFIX = "ct_"
_ID_HEX = 16
PURPOSES = ("data", "fine-tune", "feedback", "corpus")
# Refresh ``last_used_at`` at most this often (verify_key runs on every request).
_LAST_USED_EVERY = timedelta(minutes=1)
_DUMMY_SALT = secrets.token_hex(16)
_DUMMY_HASH = "0" * 64


class AccountError(CotuneError, ValueError):
    """A bad tenant id, purpose or the like (names what was wrong)."""


class TenantRecord(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    name: str
    created_at: datetime
    max_running_jobs: int | None = None
    max_storage_bytes: int | None = None


class KeyRecord(BaseModel):
    """What ``list_keys`` shows: never the secret nor its hash."""

    model_config = ConfigDict(from_attributes=True)

    id: str
    tenant_id: str
    name: str | None = None
    created_at: datetime
    last_used_at: datetime | None = None
    revoked_at: datetime | None = None

    @property
    def active(self) -> bool:
        return self.revoked_at is None


class FileRecord(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    tenant_id: str
    purpose: str
    filename: str
    bytes: int
    sha256: str
    key: str
    rows: int
    fields: dict[str, int]
    idempotency_key: str | None = None
    created_at: datetime


@dataclass(frozen=True)
class FilePage:
    data: list[FileRecord]
    has_more: bool


def new_file_id() -> str:
    return f"file-{secrets.token_hex(12)}"


def check_tenant_id(tenant_id: str) -> str:
    if not isinstance(tenant_id, str) or not re.match(TENANT_ID, tenant_id):
        raise AccountError(
            f"tenant id {tenant_id!r} must be 1-64 letters, digits, '_', '.' or '-' "
            "(starting with a letter or digit)"
        )
    return tenant_id


def _hash(salt: str, secret: str) -> str:
    return hmac.new(bytes.fromhex(salt), secret.encode("utf-8"), hashlib.sha256).hexdigest()


def _parse_key(plaintext: str) -> tuple[str, str] | None:
    """``(key_id, secret)`` from ``ct_<hex>_<secret>``, or None if it is not shaped so."""
    if not isinstance(plaintext, str) or not plaintext.startswith(KEY_PREFIX):
        return None
    body = plaintext[len(KEY_PREFIX) :]
    hex_id, sep, secret = body[:_ID_HEX], body[_ID_HEX : _ID_HEX + 1], body[_ID_HEX + 1 :]
    if sep != "_" or len(hex_id) != _ID_HEX or not secret or len(plaintext) > 256:
        return None
    if any(c not in "0123456789abcdef" for c in hex_id):
        return None
    return f"key-{hex_id}", secret


class AccountStore(SideStore):
    """Tenants, keys and files over the job store's database (SQLite or PostgreSQL)."""

    # ----------------------------------------------------------------------- tenants

    def ensure_tenant(self, tenant_id: str, name: str | None = None) -> TenantRecord:
        """The tenant, created first if it does not exist."""
        check_tenant_id(tenant_id)
        found = self.get_tenant(tenant_id)
        if found is not None:
            return found
        try:
            with self._tx() as s:
                s.add(Tenant(id=tenant_id, name=name or tenant_id, created_at=utcnow()))
        except IntegrityError:  # created concurrently
            pass
        found = self.get_tenant(tenant_id)
        assert found is not None
        return found

    def get_tenant(self, tenant_id: str) -> TenantRecord | None:
        with self._sessions() as s:
            row = s.get(Tenant, tenant_id)
            return None if row is None else TenantRecord.model_validate(row)

    def set_limits(
        self,
        tenant_id: str,
        *,
        max_running_jobs: int | None = None,
        max_storage_bytes: int | None = None,
    ) -> TenantRecord:
        """Override the server's per-tenant limits for one tenant (None: the default)."""
        self.ensure_tenant(tenant_id)
        with self._tx() as s:
            s.execute(
                update(Tenant)
                .where(Tenant.id == tenant_id)
                .values(max_running_jobs=max_running_jobs, max_storage_bytes=max_storage_bytes)
            )
        found = self.get_tenant(tenant_id)
        assert found is not None
        return found

    # ----------------------------------------------------------------------- API keys

    def create_key(self, tenant: str, name: str | None = None) -> tuple[str, str]:
        """A new key for ``tenant`` (created if needed): ``(key_id, plaintext)``. The
        plaintext is not stored anywhere: show it once."""
        self.ensure_tenant(tenant)
        hex_id = secrets.token_hex(_ID_HEX // 2)
        secret = secrets.token_urlsafe(32)
        salt = secrets.token_hex(16)
        key_id = f"key-{hex_id}"
        with self._tx() as s:
            s.add(
                ApiKey(
                    id=key_id,
                    tenant_id=tenant,
                    name=name,
                    salt=salt,
                    secret_hash=_hash(salt, secret),
                    created_at=utcnow(),
                )
            )
        return key_id, f"{KEY_PREFIX}{hex_id}_{secret}"

    def verify_key(self, plaintext: str) -> str | None:
        """The tenant a live key belongs to, or None (unknown, malformed or revoked)."""
        parsed = _parse_key(plaintext)
        key_id, secret = parsed if parsed is not None else ("", plaintext or "")
        with self._sessions() as s:
            row = s.get(ApiKey, key_id) if key_id else None
            salt, stored = (row.salt, row.secret_hash) if row is not None else (_DUMMY_SALT, "")
            tenant = row.tenant_id if row is not None else None
            revoked = row.revoked_at if row is not None else None
            last_used = row.last_used_at if row is not None else None
        candidate = _hash(salt, secret)
        match = hmac.compare_digest(candidate, stored or _DUMMY_HASH)
        if row is None or not match or revoked is not None:
            return None
        now = utcnow()
        if last_used is None or now - last_used > _LAST_USED_EVERY:
            with self._tx() as s:
                s.execute(update(ApiKey).where(ApiKey.id == key_id).values(last_used_at=now))
        return tenant

    def list_keys(self, tenant: str | None = None) -> list[KeyRecord]:
        q = select(ApiKey)
        if tenant is not None:
            q = q.where(ApiKey.tenant_id == tenant)
        with self._sessions() as s:
            rows = s.scalars(q.order_by(ApiKey.created_at, ApiKey.id)).all()
            return [KeyRecord.model_validate(r) for r in rows]

    def revoke_key(self, key_id: str, tenant: str | None = None) -> bool:
        """Revoke a key; False if there is no such (live) key."""
        q = update(ApiKey).where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None))
        if tenant is not None:
            q = q.where(ApiKey.tenant_id == tenant)
        with self._tx() as s:
            result = s.execute(q.values(revoked_at=utcnow()))
            return bool(getattr(result, "rowcount", 0))

    # ----------------------------------------------------------------------- files

    def add_file(
        self,
        tenant: str,
        purpose: str,
        filename: str,
        nbytes: int,
        sha256: str,
        key: str,
        rows: int,
        fields: dict[str, int],
        *,
        file_id: str | None = None,
        idempotency_key: str | None = None,
    ) -> FileRecord:
        """Record an uploaded file (its bytes already stored under ``key``). With an
        ``idempotency_key`` this tenant already used, that file is returned instead (check
        ``.id``: the caller then deletes the bytes it stored)."""
        if purpose not in PURPOSES:
            raise AccountError(f"purpose must be one of {list(PURPOSES)}, got {purpose!r}")
        self.ensure_tenant(tenant)
        if idempotency_key is not None:
            found = self.file_for_idempotency_key(tenant, idempotency_key)
            if found is not None:
                return found
        row = FileRow(
            id=file_id or new_file_id(),
            tenant_id=tenant,
            purpose=purpose,
            filename=filename[:255],
            bytes=nbytes,
            sha256=sha256,
            key=key,
            rows=rows,
            fields=dict(fields),
            idempotency_key=idempotency_key,
            created_at=utcnow(),
        )
        try:
            with self._tx() as s:
                s.add(row)
        except IntegrityError:
            found = (
                self.file_for_idempotency_key(tenant, idempotency_key)
                if idempotency_key is not None
                else None
            )
            if found is None:
                raise
            return found
        return FileRecord.model_validate(row)

    def file_for_idempotency_key(self, tenant: str, key: str) -> FileRecord | None:
        with self._sessions() as s:
            row = s.scalar(
                select(FileRow).where(FileRow.tenant_id == tenant, FileRow.idempotency_key == key)
            )
            return None if row is None else FileRecord.model_validate(row)

    def get_file(self, file_id: str, tenant: str | None = None) -> FileRecord | None:
        """The file, or None if there is none (or it belongs to another tenant)."""
        if not matchable(file_id):
            return None
        q = select(FileRow).where(FileRow.id == file_id)
        if tenant is not None:
            q = q.where(FileRow.tenant_id == tenant)
        with self._sessions() as s:
            row = s.scalar(q)
            return None if row is None else FileRecord.model_validate(row)

    def list_files(
        self,
        tenant: str | None,
        *,
        purpose: str | None = None,
        after: str | None = None,
        limit: int = 20,
    ) -> FilePage:
        """Newest first; ``after``: the last id of the previous page (an id the tenant
        cannot see raises ``LookupError``)."""
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        q = select(FileRow)
        if tenant is not None:
            q = q.where(FileRow.tenant_id == tenant)
        if purpose is not None:
            q = q.where(FileRow.purpose == purpose)
        with self._sessions() as s:
            if after is not None:
                if not matchable(after):
                    raise LookupError(f"no file {after!r}")
                cq = select(FileRow.created_at).where(FileRow.id == after)
                if tenant is not None:
                    cq = cq.where(FileRow.tenant_id == tenant)
                created = s.scalar(cq)
                if created is None:
                    raise LookupError(f"no file {after}")
                q = q.where(
                    or_(
                        FileRow.created_at < created,
                        and_(FileRow.created_at == created, FileRow.id < after),
                    )
                )
            q = q.order_by(FileRow.created_at.desc(), FileRow.id.desc()).limit(limit + 1)
            rows = [FileRecord.model_validate(r) for r in s.scalars(q)]
        return FilePage(data=rows[:limit], has_more=len(rows) > limit)

    def delete_file(self, file_id: str, tenant: str | None = None) -> FileRecord | None:
        """Delete the file's row and return it (the caller deletes its bytes), or None."""
        found = self.get_file(file_id, tenant)
        if found is None:
            return None
        with self._tx() as s:
            s.execute(delete(FileRow).where(FileRow.id == file_id))
        return found

    def storage_used(self, tenant: str) -> int:
        """Bytes of the tenant's uploaded files."""
        with self._sessions() as s:
            total = s.scalar(
                select(func.coalesce(func.sum(FileRow.bytes), 0)).where(FileRow.tenant_id == tenant)
            )
        return int(total or 0)

    # ----------------------------------------------------------------------- jobs

    def job_for_idempotency_key(self, tenant: str | None, key: str) -> str | None:
        """The id of the tenant's job created with this ``Idempotency-Key``, if any."""
        with self._sessions() as s:
            return s.scalar(
                select(Job.id).where(
                    func.coalesce(Job.tenant_id, "") == (tenant or ""),
                    Job.idempotency_key == key,
                )
            )

    def unfinished_jobs(self, tenant: str) -> list[tuple[str, dict[str, Any]]]:
        """``(id, spec)`` of the tenant's jobs that are not finished (they may still read
        their files)."""
        done = ["succeeded", "failed", "cancelled"]
        with self._sessions() as s:
            rows = s.execute(
                select(Job.id, Job.spec).where(Job.tenant_id == tenant, Job.status.not_in(done))
            ).all()
        return [(job_id, dict(spec)) for job_id, spec in rows]

    def limits(self, tenant: str, defaults: Any) -> tuple[int, int]:
        """``(max_running_jobs, max_storage_bytes)`` for the tenant: its own overrides, else
        ``defaults.max_running_jobs_per_tenant`` / ``defaults.max_storage_bytes_per_tenant``."""
        row = self.get_tenant(tenant)
        running = row.max_running_jobs if row and row.max_running_jobs else None
        storage = row.max_storage_bytes if row and row.max_storage_bytes else None
        return (
            running or int(defaults.max_running_jobs_per_tenant),
            storage or int(defaults.max_storage_bytes_per_tenant),
        )
