"""The mask generator: a 32-byte seed expanded into ``n`` uniform ``uint32`` words.

The words are the ChaCha20 keystream under key ``seed`` and the all-zero nonce: pynacl's
public ``crypto_aead_chacha20poly1305_ietf_encrypt`` of ``4n`` zero bytes, without its
16-byte tag, read as little-endian ``uint32`` (IETF ChaCha20-Poly1305 encrypts with the
block counter starting at 1; block 0 keys the tag, which is dropped). The bytes are the
same on every platform; ``tests/algorithms/test_secagg_prg.py`` pins the first words.

A zero nonce is sound because every seed is used for exactly one expansion: self seeds
are fresh per (cohort, upload) and pair seeds are bound to one cohort.

Cost: ``expand`` makes one keystream pass plus pynacl's allocations and copy out, ~4-5 ms
per million words on one core; the zero input is cached (one buffer per length) and the
returned array is a read-only view of the library's output (no further copy). Masking
expands hundreds of seeds per cohort, so ``Expander`` writes each keystream into ONE
reused buffer by calling the same libsodium function through pynacl's cffi binding
(``nacl._sodium``, the module pynacl's public wrapper calls): the same bytes, ~2.5x
faster with the add that follows, no allocation per seed. Where that binding is missing
``Expander`` falls back to ``expand``.

The AEAD also runs Poly1305 over the whole ciphertext, only to make a tag that is
dropped. ``Expander`` therefore prefers libsodium's ``crypto_stream_chacha20_ietf_xor_ic``
(XOR with the ChaCha20-IETF keystream from block counter ``ic``), called with ``ic = 1``
over the cached zeros: exactly the bytes the AEAD encrypts with, without the MAC. pynacl's
cffi module does not declare that function, but its extension exports it (libsodium is
linked in), so it is bound here with cffi's ABI mode from the same shared object (the
library pynacl already initialised). Where the symbol is missing the AEAD path above is
used; ``tests/algorithms/test_secagg_prg.py`` checks that all paths give the same words.
"""

from __future__ import annotations

from typing import Any

import nacl.bindings as sodium
import numpy as np
import numpy.typing as npt

try:  # pynacl's cffi binding: the C function its public wrapper calls
    from nacl._sodium import ffi as _ffi
    from nacl._sodium import lib as _lib

    _FAST = hasattr(_lib, "crypto_aead_chacha20poly1305_ietf_encrypt")
except ImportError:  # pragma: no cover - every pynacl wheel has it
    _ffi = _lib = None
    _FAST = False


def _bind_stream() -> tuple[Any, Any] | None:
    """(ffi, lib) with ``crypto_stream_chacha20_ietf_xor_ic`` from pynacl's extension,
    or ``None`` where it cannot be bound."""
    try:
        import cffi
        import nacl._sodium as native

        ffi = cffi.FFI()
        ffi.cdef(
            "int crypto_stream_chacha20_ietf_xor_ic(unsigned char *c, const unsigned char *m,"
            " unsigned long long mlen, const unsigned char *n, uint32_t ic,"
            " const unsigned char *k);"
        )
        lib = ffi.dlopen(native.__file__)
        lib.crypto_stream_chacha20_ietf_xor_ic  # noqa: B018 - resolves the symbol now
    except (ImportError, OSError, AttributeError):  # pragma: no cover - pynacl wheels export it
        return None
    return ffi, lib


_stream = _bind_stream()
_STREAM = _stream is not None

SEED_BYTES = 32
_NONCE = b"\0" * 12
# ChaCha20-Poly1305 IETF encrypts at most ~256 GiB; far above any model.
MAX_WORDS = (sodium.crypto_aead_chacha20poly1305_ietf_MESSAGEBYTES_MAX // 4) - 1
_zeros: bytes = b""


def _zero_bytes(nbytes: int) -> bytes:
    """``nbytes`` zero bytes, reused while the length stays the same (masks for one model
    are all the same length)."""
    global _zeros
    zeros = _zeros  # one read: a driver may mask in a worker thread
    if len(zeros) != nbytes:
        zeros = bytes(nbytes)
        _zeros = zeros
    return zeros


def expand(seed: bytes, n: int) -> npt.NDArray[np.uint32]:
    """``n`` pseudo-random ``uint32`` words from ``seed`` (32 bytes); read-only array.

    ``ValueError`` for a seed that is not 32 bytes or a negative ``n``.
    """
    if not isinstance(seed, bytes) or len(seed) != SEED_BYTES:
        raise ValueError(f"PRG seed must be {SEED_BYTES} bytes")
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or not 0 <= n <= MAX_WORDS:
        raise ValueError(f"PRG length must be an int from 0 to {MAX_WORDS}, got {n!r}")
    n = int(n)
    if n == 0:
        empty = np.zeros(0, dtype=np.uint32)
        empty.flags.writeable = False
        return empty
    stream = sodium.crypto_aead_chacha20poly1305_ietf_encrypt(
        _zero_bytes(4 * n), None, _NONCE, seed
    )
    # count=n drops the tag without slicing (which would copy 4n bytes).
    return np.frombuffer(stream, dtype="<u4", count=n).astype(np.uint32, copy=False)


class Expander:
    """Expands seeds into ``n`` words each, into one buffer reused from call to call.

    ``expand(seed)`` returns a read-only view that is valid until the next call on the
    same ``Expander`` (add it into an accumulator, do not keep it). Same words as
    ``expand(seed, n)``. One ``Expander`` per masking or unmasking call: it is not meant
    to be shared between threads.
    """

    __slots__ = ("_buf", "_ptr", "_stream", "n")

    def __init__(self, n: int) -> None:
        if isinstance(n, bool) or not isinstance(n, int | np.integer) or not 0 <= n <= MAX_WORDS:
            raise ValueError(f"PRG length must be an int from 0 to {MAX_WORDS}, got {n!r}")
        self.n = int(n)
        self._ptr: Any = None
        self._stream = False
        self._buf = np.empty(0, dtype=np.uint32)
        if _STREAM and _stream is not None and self.n:
            # The bare keystream: n words, no tag, no Poly1305.
            self._buf = np.empty(self.n, dtype="<u4")
            self._ptr = _stream[0].from_buffer(self._buf)
            self._stream = True
        elif _FAST and self.n:
            # 16 more bytes (4 words) for the AEAD tag, which is written and ignored.
            self._buf = np.empty(self.n + 4, dtype="<u4")
            self._ptr = _ffi.from_buffer(self._buf)

    def expand(self, seed: bytes) -> npt.NDArray[np.uint32]:
        """The first ``n`` keystream words of ``seed`` (see the class docstring)."""
        if not isinstance(seed, bytes) or len(seed) != SEED_BYTES:
            raise ValueError(f"PRG seed must be {SEED_BYTES} bytes")
        if self._ptr is None:
            return expand(seed, self.n)
        nbytes = 4 * self.n
        if self._stream and _stream is not None:
            rc = _stream[1].crypto_stream_chacha20_ietf_xor_ic(
                self._ptr, _zero_bytes(nbytes), nbytes, _NONCE, 1, seed
            )
            if rc != 0:  # pragma: no cover - libsodium returns 0 for any valid length
                raise RuntimeError("libsodium failed to expand a PRG seed")
            view = self._buf.view()
            view.flags.writeable = False
            return view.astype(np.uint32, copy=False)
        rc = _lib.crypto_aead_chacha20poly1305_ietf_encrypt(
            self._ptr, _ffi.NULL, _zero_bytes(nbytes), nbytes, _ffi.NULL, 0, _ffi.NULL, _NONCE, seed
        )
        if rc != 0:  # pragma: no cover - libsodium returns 0 for any valid length
            raise RuntimeError("libsodium failed to expand a PRG seed")
        view = self._buf[: self.n]
        view.flags.writeable = False
        return view.astype(np.uint32, copy=False)
