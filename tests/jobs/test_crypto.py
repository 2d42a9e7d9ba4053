"""Encryption at rest (jobs/crypto.py): a round trip through a real Redis, tampering and
wrong keys detected, blobs bound to their Redis key, and no readable patient data stored."""

from __future__ import annotations

import base64

import pytest

from jobs.crypto import (
    HEADER_BYTES,
    MAGIC,
    DataCipher,
    blob_context,
    cipher_from_settings,
    generate_data_key,
    key_id,
    parse_data_key,
)
from jobs.keys import dicom_key, images_key, upload_key
from jobs.settings import Settings
from models.errors import BadParameterError, DecryptionError

DB = 8  # a database no other test uses (flushed around each test)
MARKER = b"PatientName=MARKER^Patient^7f3a"
JOB_A, JOB_B = "a" * 32, "b" * 32


@pytest.fixture
def cipher():
    return DataCipher.from_text(generate_data_key())


def scan_everything(conn) -> list[bytes]:
    """Every key name and every value (strings and hash fields) of the database."""
    out = []
    for key in conn.scan_iter(count=1000):
        out.append(key)
        kind = conn.type(key)
        if kind == b"string":
            out.append(conn.get(key))
        elif kind == b"hash":
            for field, value in conn.hgetall(key).items():
                out += [field, value]
    return out


def test_a_sealed_upload_round_trips_through_redis_and_holds_no_plaintext(conn, cipher):
    data = b"DICM" + MARKER * 20 + bytes(range(256))
    conn.set(upload_key(JOB_A), cipher.seal(data, blob_context(upload_key(JOB_A))))
    conn.hset(dicom_key(JOB_A), "sc.dcm", cipher.seal(data, blob_context(dicom_key(JOB_A), "sc.dcm")))
    conn.hset(
        images_key(JOB_A), "input.png", cipher.seal(b"\x89PNG" + MARKER, blob_context(images_key(JOB_A), "input.png"))
    )
    stored = conn.get(upload_key(JOB_A))
    assert stored.startswith(MAGIC) and len(stored) == HEADER_BYTES + len(data) + 16
    assert cipher.open(stored, blob_context(upload_key(JOB_A))) == data
    assert cipher.open(conn.hget(dicom_key(JOB_A), "sc.dcm"), blob_context(dicom_key(JOB_A), "sc.dcm")) == data
    everything = b"\n".join(scan_everything(conn))
    assert b"MARKER" not in everything and b"Patient" not in everything and b"DICM" not in everything


def test_each_seal_uses_a_fresh_nonce(cipher):
    ctx = blob_context(upload_key(JOB_A))
    one, two = cipher.seal(b"same", ctx), cipher.seal(b"same", ctx)
    assert one != two and cipher.open(one, ctx) == cipher.open(two, ctx) == b"same"


def test_any_altered_byte_is_detected(cipher):
    ctx = blob_context(upload_key(JOB_A))
    blob = cipher.seal(MARKER, ctx)
    for i in [len(MAGIC) + 1, HEADER_BYTES - 1, HEADER_BYTES, len(blob) - 1]:  # key id, nonce, body, tag
        bad = bytearray(blob)
        bad[i] ^= 0x01
        with pytest.raises(DecryptionError):
            cipher.open(bytes(bad), ctx)
    with pytest.raises(DecryptionError, match="not encrypted data"):
        cipher.open(blob[:HEADER_BYTES], ctx)  # truncated
    with pytest.raises(DecryptionError, match="not encrypted data"):
        cipher.open(MARKER, ctx)  # plain text is never accepted as it is


def test_a_blob_moved_to_another_job_does_not_open(conn, cipher):
    conn.set(upload_key(JOB_A), cipher.seal(MARKER, blob_context(upload_key(JOB_A))))
    conn.copy(upload_key(JOB_A), upload_key(JOB_B))  # someone with write access swaps uploads
    with pytest.raises(DecryptionError, match="altered, or belongs to another job"):
        cipher.open(conn.get(upload_key(JOB_B)), blob_context(upload_key(JOB_B)))
    image = cipher.seal(MARKER, blob_context(images_key(JOB_A), "a.png"))
    with pytest.raises(DecryptionError):
        cipher.open(image, blob_context(images_key(JOB_A), "b.png"))  # another field of the same hash


def test_a_wrong_key_fails_clearly_and_rotation_keeps_old_blobs_readable():
    old_text, new_text = generate_data_key(), generate_data_key()
    ctx = blob_context(upload_key(JOB_A))
    blob = DataCipher.from_text(old_text).seal(MARKER, ctx)
    with pytest.raises(DecryptionError, match="key this service does not have") as info:
        DataCipher.from_text(new_text).open(blob, ctx)
    assert info.value.code == "decryption_failed"
    assert key_id(parse_data_key(old_text)).hex() in info.value.message  # the id, never the key
    assert old_text not in info.value.message
    rotated = DataCipher.from_text(f"{new_text},{old_text}")
    assert rotated.open(blob, ctx) == MARKER
    fresh = rotated.seal(MARKER, ctx)
    assert fresh[len(MAGIC) + 1 : len(MAGIC) + 5] == key_id(parse_data_key(new_text))


def test_keys_are_parsed_strictly_and_never_shown():
    text = generate_data_key()
    raw = parse_data_key(text)
    assert len(raw) == 32
    assert parse_data_key(base64.b64encode(raw).decode()) == raw  # standard base64 too
    assert parse_data_key(text.rstrip("=")) == raw  # padding optional
    for bad in ["", "short", base64.b64encode(b"x" * 16).decode(), "not base64 at all!!"]:
        with pytest.raises(BadParameterError, match="base64 of 32 random bytes"):
            parse_data_key(bad)
    with pytest.raises(BadParameterError, match="AEX_DATA_KEY is not set"):
        cipher_from_settings(None)
    settings = Settings(data_key=text)
    assert text not in repr(settings) and text not in repr(cipher_from_settings(settings.data_key))
    assert settings.as_env()["AEX_DATA_KEY"] == text  # children of the worker pool get the key
    assert cipher_from_settings(settings.data_key).open(DataCipher([raw]).seal(b"x", b"k"), b"k") == b"x"
