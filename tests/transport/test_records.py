"""Encrypted records: round trips, rekeying, and every tampering the stream must catch."""

from __future__ import annotations

import os

import nacl.bindings as sodium
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedloom.transport.errors import ProtocolError
from fedloom.transport.records import (
    CHUNK_SIZE,
    CIPHER_AEGIS256,
    CIPHER_SECRETSTREAM,
    END,
    FINAL,
    HEADER_BYTES,
    MAX_RECORD_BYTES,
    RECORD_OVERHEAD,
    REKEY,
    RecordError,
    RecordReceiver,
    RecordSender,
)
from tests.transport.cipher_params import CIPHER_PARAMS

KEY = bytes(range(32))

# Every test runs against both record ciphers (the handshake picks one).
pytestmark = pytest.mark.parametrize("cipher", CIPHER_PARAMS)


def chunks_of(message: bytes, size: int = CHUNK_SIZE) -> list[tuple[bytes, bool]]:
    if not message:
        return [(b"", True)]
    parts = [message[i : i + size] for i in range(0, len(message), size)]
    return [(p, i == len(parts) - 1) for i, p in enumerate(parts)]


def seal_all(sender: RecordSender, messages: list[bytes], size: int = 1000) -> list[bytes]:
    return [
        sender.seal(chunk, last=last, now=0.0)
        for message in messages
        for chunk, last in chunks_of(message, size)
    ]


def receiver_for(sender: RecordSender, **kw: int) -> RecordReceiver:
    receiver = RecordReceiver(KEY, cipher=sender.cipher, **kw)
    receiver.start(sender.header())
    return receiver


def read_messages(receiver: RecordReceiver, records: list[bytes]) -> list[bytes]:
    out, parts = [], []
    for record in records:
        chunk, end = receiver.open(record)
        parts.append(chunk)
        if end:
            out.append(b"".join(parts))
            parts = []
    return out


MESSAGES = [b"", b"x", os.urandom(2500), os.urandom(1000), b"tail"]


def test_messages_round_trip_chunk_by_chunk(cipher: str) -> None:
    sender = RecordSender(KEY, cipher=cipher)
    records = seal_all(sender, MESSAGES)
    receiver = receiver_for(sender)
    assert read_messages(receiver, records) == MESSAGES
    assert not receiver.in_message
    assert sender.overhead == RECORD_OVERHEAD[cipher]
    # secretstream: a 17-byte MAC and tag, and no flags byte without a rekey;
    # aegis256: the flags byte and a 32-byte MAC.
    expected = {CIPHER_SECRETSTREAM: 17, CIPHER_AEGIS256: 33}[cipher]
    assert len(sender.seal(b"abc", last=True, now=0.0)) == 3 + expected


def test_full_size_chunks_round_trip_and_bigger_ones_are_refused(cipher: str) -> None:
    sender = RecordSender(KEY, cipher=cipher)
    receiver = receiver_for(sender)
    big = os.urandom(CHUNK_SIZE)
    record = sender.seal(big, last=True, now=0.0)
    assert len(record) <= MAX_RECORD_BYTES
    assert receiver.open(record) == (big, True)
    with pytest.raises(ValueError, match="limit"):
        sender.seal(big + b"!", last=True, now=0.0)
    with pytest.raises(RecordError, match="limit"):
        receiver.open(b"\x00" * (MAX_RECORD_BYTES + 1))  # refused before any crypto


def test_memoryview_chunks_are_accepted(cipher: str) -> None:
    sender = RecordSender(KEY, cipher=cipher)
    receiver = receiver_for(sender)
    data = bytearray(b"0123456789")
    assert receiver.open(sender.seal(memoryview(data)[2:5], last=True, now=0.0)) == (b"234", True)


# ------------------------------------------------------------------ orderly close


def test_close_sends_tag_final_and_nothing_may_follow(cipher: str) -> None:
    sender = RecordSender(KEY, cipher=cipher)
    receiver = receiver_for(sender)
    read_messages(receiver, seal_all(sender, [b"hello"]))
    assert not receiver.closed
    assert receiver.open(sender.close()) == (b"", False)
    assert receiver.closed
    with pytest.raises(ValueError):
        sender.seal(b"more", last=True, now=0.0)


def test_missing_tag_final_is_detectable(cipher: str) -> None:
    sender = RecordSender(KEY, cipher=cipher)
    receiver = receiver_for(sender)
    read_messages(receiver, seal_all(sender, MESSAGES))
    sender.close()  # the FINAL record is lost: the peer just stops
    assert not receiver.closed and not receiver.failed


def test_record_after_final_is_refused(cipher: str) -> None:
    sender = RecordSender(KEY, cipher=cipher)
    receiver = receiver_for(sender)
    final = sender.close()
    receiver.open(final)
    with pytest.raises(RecordError, match="after FINAL"):
        receiver.open(final)


def test_close_in_the_middle_of_a_message_is_refused(cipher: str) -> None:
    sender = RecordSender(KEY, cipher=cipher)
    receiver = receiver_for(sender)
    receiver.open(sender.seal(b"first half", last=False, now=0.0))
    assert receiver.in_message
    with pytest.raises(RecordError, match="middle of a message"):
        receiver.open(sender.close())


# ------------------------------------------------------------------ tampering


def fresh_stream(cipher: str) -> tuple[RecordSender, list[bytes]]:
    sender = RecordSender(KEY, cipher=cipher)
    return sender, seal_all(sender, MESSAGES, size=700)


@pytest.mark.parametrize("position", [0, 5, 16, 17, 18, 400, -1])
def test_flipped_bit_is_refused_and_the_stream_stays_failed(position: int, cipher: str) -> None:
    sender, records = fresh_stream(cipher)
    receiver = receiver_for(sender)
    receiver.open(records[0])
    bad = bytearray(records[3])
    bad[position] ^= 0x01
    with pytest.raises(RecordError, match="failed authentication"):
        receiver.open(records[1])  # fine
        receiver.open(records[2])  # fine
        receiver.open(bytes(bad))
    assert receiver.failed
    with pytest.raises(RecordError, match="already failed"):
        receiver.open(records[3])  # even the genuine record: the connection must close


def test_truncated_record_is_refused(cipher: str) -> None:
    sender, records = fresh_stream(cipher)
    receiver = receiver_for(sender)
    with pytest.raises(RecordError, match="failed authentication"):
        receiver.open(records[0])
        receiver.open(records[1])
        receiver.open(records[2][:-1])  # a 700-byte chunk missing its last byte
    receiver = receiver_for(sender)
    with pytest.raises(RecordError, match="shorter than its overhead"):
        receiver.open(records[0][:16])


def test_reordered_records_are_refused(cipher: str) -> None:
    sender, records = fresh_stream(cipher)
    receiver = receiver_for(sender)
    receiver.open(records[0])
    with pytest.raises(RecordError, match="failed authentication"):
        receiver.open(records[2])


def test_duplicated_record_is_refused(cipher: str) -> None:
    sender, records = fresh_stream(cipher)
    receiver = receiver_for(sender)
    receiver.open(records[0])
    receiver.open(records[1])
    with pytest.raises(RecordError, match="failed authentication"):
        receiver.open(records[1])


def test_removed_record_is_refused(cipher: str) -> None:
    sender, records = fresh_stream(cipher)
    receiver = receiver_for(sender)
    receiver.open(records[0])
    with pytest.raises(RecordError):
        receiver.open(records[2])


def test_records_from_another_stream_or_key_are_refused(cipher: str) -> None:
    sender, records = fresh_stream(cipher)
    _, other_records = fresh_stream(cipher)
    receiver = receiver_for(sender)
    with pytest.raises(RecordError, match="failed authentication"):
        receiver.open(other_records[0])  # same key, another header (another stream)
    wrong_key = RecordReceiver(bytes(32), cipher=cipher)
    wrong_key.start(sender.header())
    with pytest.raises(RecordError, match="failed authentication"):
        wrong_key.open(records[0])


def test_header_problems_are_record_errors(cipher: str) -> None:
    receiver = RecordReceiver(KEY, cipher=cipher)
    with pytest.raises(RecordError, match="before the stream header"):
        receiver.open(b"x" * 40)
    receiver = RecordReceiver(KEY, cipher=cipher)
    with pytest.raises(RecordError, match=f"expected {HEADER_BYTES}"):
        receiver.start(b"short")
    sender = RecordSender(KEY, cipher=cipher)
    receiver = receiver_for(sender)
    with pytest.raises(RecordError, match="second stream header"):
        receiver.start(sender.header())


def test_message_larger_than_the_cap_is_refused(cipher: str) -> None:
    sender = RecordSender(KEY, cipher=cipher)
    receiver = receiver_for(sender, max_message_bytes=2500)
    exact = os.urandom(2500)
    records = seal_all(sender, [exact, os.urandom(2501)])
    assert read_messages(receiver, records[:3]) == [exact]  # 3 chunks of <= 1000 bytes
    with pytest.raises(RecordError, match="larger than 2500"):
        read_messages(receiver, records[3:])


def forge(cipher: str, plaintext: bytes, tag_or_flags: int) -> tuple[bytes, bytes]:
    """(header, first record): an authentic record with any layout (a buggy peer's)."""
    if cipher == CIPHER_SECRETSTREAM:
        state = sodium.crypto_secretstream_xchacha20poly1305_state()
        header = sodium.crypto_secretstream_xchacha20poly1305_init_push(state, KEY)
        record = sodium.crypto_secretstream_xchacha20poly1305_push(
            state, plaintext, None, tag_or_flags
        )
        return header, record
    header = os.urandom(HEADER_BYTES)
    flags = bytes((tag_or_flags,))
    nonce = header + (0).to_bytes(8, "little")
    return header, flags + sodium.crypto_aead_aegis256_encrypt(plaintext, flags, nonce, KEY)


def test_authentic_but_malformed_records_are_refused(cipher: str) -> None:
    # A buggy (authenticated) peer: right key, wrong record layout.
    cases = {
        CIPHER_SECRETSTREAM: [
            (b"", sodium.crypto_secretstream_xchacha20poly1305_TAG_REKEY, "flags byte"),
            (b"\x02data", sodium.crypto_secretstream_xchacha20poly1305_TAG_REKEY, "flags byte"),
            (b"x", sodium.crypto_secretstream_xchacha20poly1305_TAG_FINAL, "not empty"),
            (b"x", 0x10, "unknown tag 16"),
        ],
        CIPHER_AEGIS256: [
            (b"x", FINAL, "not empty"),
            (b"", FINAL | END, "other flags set"),
            (b"", FINAL | REKEY, "other flags set"),
            (b"x", 0x08, "unknown flags 0x08"),
            (b"x", 0x80 | END, "unknown flags 0x81"),
        ],
    }[cipher]
    for plaintext, tag, message in cases:
        header, record = forge(cipher, plaintext, tag)
        receiver = RecordReceiver(KEY, cipher=cipher)
        receiver.start(header)
        with pytest.raises(RecordError, match=message):
            receiver.open(record)
        assert receiver.failed


def test_a_forged_record_matches_what_the_sender_makes(cipher: str) -> None:
    # The record layout above is the real one: a well-formed forged record opens.
    header, record = forge(
        cipher,
        b"data",
        sodium.crypto_secretstream_xchacha20poly1305_TAG_PUSH
        if cipher == CIPHER_SECRETSTREAM
        else END,
    )
    receiver = RecordReceiver(KEY, cipher=cipher)
    receiver.start(header)
    assert receiver.open(record) == (b"data", True)


# ------------------------------------------------------------------ rekeying


def test_rekey_by_bytes_mid_message_round_trips(cipher: str) -> None:
    sender = RecordSender(KEY, cipher=cipher, rekey_bytes=3000)
    big = os.urandom(20_000)
    records = seal_all(sender, [big, b"after"], size=1000)
    assert sender.rekeys == 6
    assert read_messages(receiver_for(sender), records) == [big, b"after"]


def test_rekey_by_time_round_trips_even_for_single_chunk_messages(cipher: str) -> None:
    sender = RecordSender(KEY, cipher=cipher, rekey_seconds=10.0)
    receiver = receiver_for(sender)
    for i in range(40):  # one small message a second: a rekey every 10 s
        record = sender.seal(b"heartbeat %d" % i, last=True, now=float(i))
        assert receiver.open(record) == (b"heartbeat %d" % i, True)
    assert sender.rekeys == 3
    receiver.open(sender.close())
    assert receiver.closed


def test_a_rekeyed_record_cannot_be_replayed_after_the_rekey(cipher: str) -> None:
    sender = RecordSender(KEY, cipher=cipher, rekey_bytes=1)  # every record rekeys
    records = seal_all(sender, [b"a", b"b", b"c"])
    receiver = receiver_for(sender)
    receiver.open(records[0])
    with pytest.raises(RecordError):
        receiver.open(records[0])


def test_bad_parameters_are_value_errors(cipher: str) -> None:
    with pytest.raises(ValueError, match="unknown record cipher 'rot13'"):
        RecordReceiver(KEY, cipher="rot13")
    with pytest.raises(ValueError, match="32 bytes"):
        RecordSender(b"short")
    with pytest.raises(ValueError, match="rekey_bytes"):
        RecordSender(KEY, cipher=cipher, rekey_bytes=0)
    with pytest.raises(ValueError, match="rekey_seconds"):
        RecordSender(KEY, cipher=cipher, rekey_seconds=0)
    with pytest.raises(ValueError, match="max_message_bytes"):
        RecordReceiver(KEY, cipher=cipher, max_message_bytes=0)
    with pytest.raises(ValueError, match="finite"):
        RecordSender(KEY, cipher=cipher).seal(b"", last=True, now=float("nan"))


# ------------------------------------------------------------------ fuzzing

SETTINGS = settings(max_examples=200, deadline=None)
_, GOOD = fresh_stream(CIPHER_SECRETSTREAM)  # as many records with either cipher


@SETTINGS
@given(st.lists(st.binary(max_size=200), min_size=1, max_size=4))
def test_arbitrary_records_raise_only_record_errors(cipher: str, records: list[bytes]) -> None:
    sender = RecordSender(KEY, cipher=cipher)
    receiver = receiver_for(sender)
    with pytest.raises(RecordError):
        for record in records:
            receiver.open(record)
    assert receiver.failed


@SETTINGS
@given(st.binary(max_size=64), st.binary(max_size=200))
def test_arbitrary_header_and_record_raise_only_protocol_errors(
    cipher: str, header: bytes, record: bytes
) -> None:
    receiver = RecordReceiver(KEY, cipher=cipher)
    try:
        receiver.start(header)
        receiver.open(record)
    except ProtocolError:
        return
    raise AssertionError("garbage decrypted")  # pragma: no cover


@SETTINGS
@given(st.integers(0, len(GOOD) - 1), st.integers(0, 10_000), st.integers(0, 7))
def test_any_single_bit_flip_is_caught(cipher: str, index: int, position: int, bit: int) -> None:
    sender, records = fresh_stream(cipher)
    receiver = receiver_for(sender)
    bad = bytearray(records[index])
    bad[position % len(bad)] ^= 1 << bit
    records[index] = bytes(bad)
    with pytest.raises(RecordError):
        read_messages(receiver, records)
