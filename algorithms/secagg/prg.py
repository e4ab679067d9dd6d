"""The mask generator: a 32-byte seed expanded into ``n`` uniform ``uint32`` words.

The words are the ChaCha20 keystream under key ``seed`` and the all-zero nonce: pynacl's
public ``crypto_aead_chacha20poly1305_ietf_encrypt`` of ``4n`` zero bytes, without its
16-byte tag, read as little-endian ``uint32`` (IETF ChaCha20-Poly1305 encrypts with the
block counter starting at 1; block 0 keys the tag, which is dropped). The bytes are the
same on every platform; ``tests/algorithms/test_secagg_prg.py`` pins the first words.

A zero nonce is sound because every seed is used for exactly one expansion: self seeds
are fresh per (cohort, upload) and pair seeds are bound to one cohort.

Cost: one keystream pass plus one copy out of the library, ~4-5 ms per million words on
one core. The zero input is cached (one buffer per length), and the returned array is a
read-only view of the library's output (no further copy).
"""

from __future__ import annotations

import nacl.bindings as sodium
import numpy as np
import numpy.typing as npt

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
        return np.zeros(0, dtype=np.uint32)
    stream = sodium.crypto_aead_chacha20poly1305_ietf_encrypt(
        _zero_bytes(4 * n), None, _NONCE, seed
    )
    # count=n drops the tag without slicing (which would copy 4n bytes).
    return np.frombuffer(stream, dtype="<u4", count=n).astype(np.uint32, copy=False)
