"""The mask PRG: ChaCha20 keystream, pinned by known answers."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedloom.algorithms.secagg import prg
from fedloom.algorithms.secagg.prg import expand


def _rotl(v: int, c: int) -> int:
    return ((v << c) & 0xFFFFFFFF) | (v >> (32 - c))


def _quarter(s: list[int], a: int, b: int, c: int, d: int) -> None:
    s[a] = (s[a] + s[b]) & 0xFFFFFFFF
    s[d] = _rotl(s[d] ^ s[a], 16)
    s[c] = (s[c] + s[d]) & 0xFFFFFFFF
    s[b] = _rotl(s[b] ^ s[c], 12)
    s[a] = (s[a] + s[b]) & 0xFFFFFFFF
    s[d] = _rotl(s[d] ^ s[a], 8)
    s[c] = (s[c] + s[d]) & 0xFFFFFFFF
    s[b] = _rotl(s[b] ^ s[c], 7)


def chacha20_block(key: bytes, counter: int, nonce: bytes) -> list[int]:
    """RFC 7539 section 2.3, written out independently of libsodium."""
    state = [0x61707865, 0x3320646E, 0x79622D32, 0x6B206574]
    state += [*struct.unpack("<8I", key), counter, *struct.unpack("<3I", nonce)]
    work = list(state)
    for _ in range(10):
        _quarter(work, 0, 4, 8, 12)
        _quarter(work, 1, 5, 9, 13)
        _quarter(work, 2, 6, 10, 14)
        _quarter(work, 3, 7, 11, 15)
        _quarter(work, 0, 5, 10, 15)
        _quarter(work, 1, 6, 11, 12)
        _quarter(work, 2, 7, 8, 13)
        _quarter(work, 3, 4, 9, 14)
    return [(w + s) & 0xFFFFFFFF for w, s in zip(work, state, strict=True)]


def test_reference_block_matches_rfc7539_section_2_3_2() -> None:
    block = chacha20_block(bytes(range(32)), 1, bytes.fromhex("000000090000004a00000000"))
    serialized = struct.pack("<16I", *block)
    assert serialized[:16].hex() == "10f1e7e4d13b5915500fdd1fa32071c4"


def test_known_answer_zero_key_is_rfc7539_appendix_a1_vector_2() -> None:
    # Key 0, nonce 0, block counter 1 (the AEAD's first keystream block).
    words = expand(bytes(32), 4)
    assert struct.pack("<4I", *map(int, words)).hex() == "9f07e7be5551387a98ba977c732d080d"


def test_known_answer_pinned_words() -> None:
    assert [int(w) for w in expand(bytes(range(32)), 8)] == [
        0x3142B818,
        0xD1A6E6AD,
        0x615C6113,
        0x274E43AF,
        0xF5F3B1F8,
        0x5C5BADE1,
        0x12FCF8EC,
        0x5C75352A,
    ]


@settings(max_examples=25, deadline=None)
@given(key=st.binary(min_size=32, max_size=32), n=st.integers(1, 80))
def test_expand_is_the_chacha20_keystream_from_counter_1(key: bytes, n: int) -> None:
    expected: list[int] = []
    counter = 1
    while len(expected) < n:
        expected += chacha20_block(key, counter, bytes(12))
        counter += 1
    out = expand(key, n)
    assert out.dtype == np.uint32 and out.shape == (n,)
    assert out.tolist() == expected[:n]


def test_prefix_property_and_determinism() -> None:
    seed = b"\x07" * 32
    long = expand(seed, 10_000)
    np.testing.assert_array_equal(expand(seed, 123), long[:123])
    np.testing.assert_array_equal(expand(seed, 10_000), long)
    assert not np.array_equal(expand(b"\x08" * 32, 123), long[:123])
    assert expand(seed, 0).shape == (0,)


def test_expand_output_looks_uniform() -> None:
    words = expand(b"\x01" * 32, 1 << 16)
    assert abs(float(words.mean()) / 2**32 - 0.5) < 0.01
    bits = np.unpackbits(words.view(np.uint8))
    assert abs(float(bits.mean()) - 0.5) < 0.005


@pytest.mark.parametrize("seed", [b"", b"\0" * 31, b"\0" * 33, "x" * 32, bytearray(32)])
def test_expand_refuses_bad_seeds(seed: object) -> None:
    with pytest.raises(ValueError):
        expand(seed, 4)  # type: ignore[arg-type]


def test_expand_refuses_bad_lengths() -> None:
    for n in (-1, 1.5, True):
        with pytest.raises(ValueError):
            expand(bytes(32), n)  # type: ignore[arg-type]


@pytest.mark.parametrize("fast", [True, False])
def test_expander_gives_the_same_words_into_one_buffer(
    fast: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not fast:
        monkeypatch.setattr(prg, "_FAST", False)
        monkeypatch.setattr(prg, "_STREAM", False)
    for n in (0, 1, 17, 4096):
        ex = prg.Expander(n)
        seeds = [bytes([k]) * 32 for k in range(3)]
        outs = []
        for seed in seeds:
            words = ex.expand(seed)
            assert words.dtype == np.uint32 and words.shape == (n,)
            assert not words.flags.writeable
            np.testing.assert_array_equal(words, expand(seed, n))
            outs.append(words.copy())
        if n and fast:
            # The view is reused: the last call's words are what it shows now.
            np.testing.assert_array_equal(ex.expand(seeds[0]), outs[0])
    with pytest.raises(ValueError):
        prg.Expander(4).expand(b"short")
    with pytest.raises(ValueError):
        prg.Expander(-1)


def _expander_words(path: str, seed: bytes, n: int, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """``Expander(n).expand(seed)`` forced onto one path: "stream" (the bare keystream,
    no Poly1305), "aead" (the AEAD through pynacl's cffi binding) or "public"."""
    with monkeypatch.context() as m:
        m.setattr(prg, "_STREAM", path == "stream")
        m.setattr(prg, "_FAST", path == "aead")
        ex = prg.Expander(n)
        assert ex._stream == (path == "stream" and n > 0)
        return [int(w) for w in ex.expand(seed)]


def test_the_stream_path_is_bound_here() -> None:
    # pynacl's extension exports crypto_stream_chacha20_ietf_xor_ic; if a wheel ever
    # stops doing so the AEAD fallback is taken, and this says so.
    assert prg._STREAM


@settings(max_examples=30, deadline=None)
@given(seed=st.binary(min_size=32, max_size=32), n=st.integers(0, 300))
def test_stream_and_aead_paths_give_identical_words(seed: bytes, n: int) -> None:
    with pytest.MonkeyPatch.context() as mp:
        words = {p: _expander_words(p, seed, n, mp) for p in ("stream", "aead", "public")}
    assert words["stream"] == words["aead"] == words["public"] == expand(seed, n).tolist()
    reference: list[int] = []
    counter = 1
    while len(reference) < n:
        reference += chacha20_block(seed, counter, bytes(12))
        counter += 1
    assert words["stream"] == reference[:n]


def test_stream_and_aead_paths_agree_on_a_long_vector(monkeypatch: pytest.MonkeyPatch) -> None:
    n = (1 << 18) + 7  # many blocks and a partial last one
    seed = bytes(range(32))
    stream = _expander_words("stream", seed, n, monkeypatch)
    assert stream == _expander_words("aead", seed, n, monkeypatch)
    assert stream[:8] == [int(w) for w in expand(seed, 8)]
