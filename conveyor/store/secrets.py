"""Encrypted secrets: AES-GCM with ``AP_ENCRYPTION_KEY``, values never leave except to runs.

Each ciphertext is stored with the id of the key that made it (the first 8 hex characters of
the key's SHA-256), so a key can be rotated: :class:`SecretBox` takes the current key plus any
old ones and decrypts with whichever matches. The secret's name is bound into the GCM
associated data, so a ciphertext copied onto another name does not decrypt.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from conveyor.errors import InternalError, NotFound
from conveyor.store.db import Database

_NONCE_BYTES = 12


def key_id(hex_key: str) -> str:
    return hashlib.sha256(bytes.fromhex(hex_key)).hexdigest()[:8]


class SecretBox:
    """Encrypts with ``current`` (32 or 64 hex chars = AES-128/256-GCM); decrypts with it or
    any of ``previous``."""

    def __init__(self, current: str, previous: Sequence[str] = ()) -> None:
        self.current_id = key_id(current)
        self._keys = {key_id(k): AESGCM(bytes.fromhex(k)) for k in (*previous, current)}

    def encrypt(self, name: str, value: str) -> tuple[str, bytes]:
        nonce = os.urandom(_NONCE_BYTES)
        sealed = self._keys[self.current_id].encrypt(nonce, value.encode(), name.encode())
        return self.current_id, nonce + sealed

    def decrypt(self, name: str, kid: str, blob: bytes) -> str:
        # A server misconfiguration (wrong or rotated-away key), never the caller's fault:
        # InternalError answers 500 without naming the secret or the key.
        aead = self._keys.get(kid)
        if aead is None:
            raise InternalError(f"secret {name!r} was encrypted with unknown key id {kid}")
        try:
            return aead.decrypt(blob[:_NONCE_BYTES], blob[_NONCE_BYTES:], name.encode()).decode()
        except InvalidTag:
            raise InternalError(f"secret {name!r} does not decrypt with key {kid}") from None


async def put_secret(db: Database, box: SecretBox, name: str, value: str) -> bool:
    """Create or replace; True when it was created."""
    kid, blob = box.encrypt(name, value)
    async with db.writer() as conn:
        created: bool = await conn.fetchval(
            """INSERT INTO secrets (name, ciphertext, key_id) VALUES ($1, $2, $3)
               ON CONFLICT (name) DO UPDATE SET ciphertext = EXCLUDED.ciphertext,
                   key_id = EXCLUDED.key_id, updated_at = now()
               RETURNING (xmax = 0)""",
            name,
            blob,
            kid,
        )
    return created


async def list_secret_names(db: Database) -> list[dict[str, object]]:
    rows = await db.fetch_read("SELECT name, created_at, updated_at FROM secrets ORDER BY name")
    return [dict(r) for r in rows]


async def delete_secret(db: Database, name: str) -> None:
    async with db.writer() as conn:
        done = await conn.fetchval("DELETE FROM secrets WHERE name = $1 RETURNING name", name)
    if done is None:
        raise NotFound(f"secret {name!r} not found")


async def load_secrets(db: Database, box: SecretBox, names: Iterable[str]) -> dict[str, str]:
    """Plain values of ``names`` that exist (a run reads only the secrets its flow uses)."""
    wanted = sorted(set(names))
    if not wanted:
        return {}
    async with db.writer() as conn:
        rows = await conn.fetch(
            "SELECT name, key_id, ciphertext FROM secrets WHERE name = ANY($1::text[])", wanted
        )
    return {r["name"]: box.decrypt(r["name"], r["key_id"], r["ciphertext"]) for r in rows}
