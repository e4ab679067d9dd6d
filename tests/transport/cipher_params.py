"""Record ciphers as test parameters: AEGIS-256 cases run only where this PyNaCl's
libsodium has it (``transport.records.aegis_available``); elsewhere they are skipped and
say why, and the secretstream cases still run."""

from __future__ import annotations

import pytest

from fedloom.transport.records import CIPHER_AEGIS256, CIPHERS, aegis_available

needs_aegis = pytest.mark.skipif(
    not aegis_available(), reason="this PyNaCl's libsodium has no AEGIS-256"
)
CIPHER_PARAMS = [
    pytest.param(cipher, marks=needs_aegis if cipher == CIPHER_AEGIS256 else ())
    for cipher in CIPHERS
]
