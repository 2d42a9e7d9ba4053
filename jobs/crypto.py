"""Encryption at rest: uploads, PNGs and DICOM objects are sealed (AES-256-GCM) before they reach Redis.

The operator key ``AEX_DATA_KEY`` is base64 of 32 random bytes (``generate_data_key``); more
keys after commas decrypt only, so a key can be rotated without losing what is stored. A
sealed blob is ``MAGIC | version | key id | nonce | ciphertext + tag``: the key id (the first
bytes of a hash of the key, never the key) says which key sealed it, and the associated data
binds the blob to the Redis key (and hash field) it is stored under, so a blob copied to
another job's key fails to open. ``blob_context(upload_key(job_id))`` or
``blob_context(images_key(job_id), name)`` is that binding. Opening anything that is not a
sealed blob, or that fails authentication, raises ``DecryptionError``: there is no fallback to
plain text. Torch-free: the API process uses it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import secrets

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from models.errors import BadParameterError, DecryptionError

MAGIC = b"AEXE"
VERSION = 1
KEY_BYTES = 32
KEY_ID_BYTES = 4
NONCE_BYTES = 12  # random per blob: at most 2**32 blobs per key keeps the collision risk negligible
HEADER_BYTES = len(MAGIC) + 1 + KEY_ID_BYTES + NONCE_BYTES
TAG_BYTES = 16


def generate_data_key() -> str:
    """A new AEX_DATA_KEY: URL-safe base64 of 32 random bytes."""
    return base64.urlsafe_b64encode(secrets.token_bytes(KEY_BYTES)).decode("ascii")


def key_id(key: bytes) -> bytes:
    """The 4-byte id a blob names its key by (a hash of the key, not the key)."""
    return hashlib.sha256(b"aex data key id\x00" + key).digest()[:KEY_ID_BYTES]


def parse_data_key(text: str) -> bytes:
    """The 32 bytes of one key written as base64 (standard or URL-safe, padding optional)."""
    raw = text.strip()
    try:
        key = base64.urlsafe_b64decode(raw.replace("+", "-").replace("/", "_") + "=" * (-len(raw) % 4))
    except (binascii.Error, ValueError):
        key = b""
    if len(key) != KEY_BYTES:
        raise BadParameterError(
            "AEX_DATA_KEY must be base64 of 32 random bytes (`aex data-key` prints a new one); "
            "more keys after commas are for decryption only"
        )
    return key


def blob_context(redis_key: str, field: str | None = None) -> bytes:
    """The associated data of a blob stored at ``redis_key`` (and ``field`` of a hash)."""
    return redis_key.encode() + (b"\x00" + field.encode() if field is not None else b"")


class DataCipher:
    """Seals with the first key, opens with any of them (``keys``: 32 bytes each)."""

    def __init__(self, keys: list[bytes]):
        if not keys or any(len(k) != KEY_BYTES for k in keys):
            raise BadParameterError("a data cipher needs one or more keys of 32 bytes")
        self._keys = {key_id(k): AESGCM(k) for k in reversed(keys)}
        self._current = key_id(keys[0])

    @classmethod
    def from_text(cls, text: str) -> DataCipher:
        """From the AEX_DATA_KEY syntax: ``key[,older key,...]``."""
        parts = [p for p in (text or "").split(",") if p.strip()]
        if not parts:
            raise BadParameterError("AEX_DATA_KEY is empty")
        return cls([parse_data_key(p) for p in parts])

    def __repr__(self) -> str:  # never the keys
        return f"DataCipher(key id {self._current.hex()}, {len(self._keys)} key(s))"

    def seal(self, data: bytes, context: bytes) -> bytes:
        """``data`` encrypted and authenticated, bound to ``context`` (see ``blob_context``)."""
        nonce = os.urandom(NONCE_BYTES)
        header = MAGIC + bytes([VERSION]) + self._current + nonce
        return header + self._keys[self._current].encrypt(nonce, bytes(data), header + context)

    def open(self, blob: bytes, context: bytes) -> bytes:
        """The plain bytes of a sealed ``blob`` stored under ``context``; DecryptionError when it
        is not a sealed blob, was sealed with a key this service does not have, was altered, or
        belongs to another Redis key."""
        blob = bytes(blob)
        if len(blob) < HEADER_BYTES + TAG_BYTES or not blob.startswith(MAGIC):
            raise DecryptionError("a stored upload or output is not encrypted data of this service")
        if blob[len(MAGIC)] != VERSION:
            raise DecryptionError(f"a stored upload or output has an unknown format version {blob[len(MAGIC)]}")
        kid = blob[len(MAGIC) + 1 : len(MAGIC) + 1 + KEY_ID_BYTES]
        aead = self._keys.get(kid)
        if aead is None:
            raise DecryptionError(
                f"a stored upload or output was encrypted with a key this service does not have (key id {kid.hex()}): "
                "check AEX_DATA_KEY (the API and every worker need the same keys)"
            )
        header, body = blob[:HEADER_BYTES], blob[HEADER_BYTES:]
        try:
            return self._keys[kid].decrypt(header[-NONCE_BYTES:], body, header + context)
        except InvalidTag:
            raise DecryptionError(
                "a stored upload or output failed authentication: it was altered, or belongs to another job"
            ) from None


def cipher_from_settings(data_key) -> DataCipher:
    """The cipher of ``settings.data_key`` (a SecretStr, a string or None). None is an error:
    aex never stores patient data in clear; ``aex serve`` generates a key for its embedded
    Redis, an external Redis needs AEX_DATA_KEY (the same on the API and every worker)."""
    if data_key is None:
        raise BadParameterError(
            "AEX_DATA_KEY is not set: uploads and outputs are encrypted at rest in Redis; "
            "run `aex data-key` and give its output to the API and every worker as AEX_DATA_KEY"
        )
    text = data_key.get_secret_value() if hasattr(data_key, "get_secret_value") else str(data_key)
    return DataCipher.from_text(text)
