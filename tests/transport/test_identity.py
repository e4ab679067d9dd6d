"""Identities: key files are private, round-trip, and refuse tampering."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from fedloom.transport.identity import (
    Identity,
    IdentityError,
    parse_key,
    parse_public_line,
    verify_signature,
)


def test_save_load_round_trip_with_private_mode(tmp_path: Path) -> None:
    ident = Identity.generate("site-a", "site")
    private, public = ident.save(tmp_path / "keys")
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert public.read_text().strip() == ident.public_line()
    loaded = Identity.load(private)
    assert (loaded.node_id, loaded.role, loaded.public_key) == ("site-a", "site", ident.public_key)
    # Same signing key: a signature by one verifies under the other's public key.
    assert verify_signature(ident.public_key, b"data", loaded.sign(b"data"))
    assert not [p for p in private.parent.iterdir() if ".tmp" in p.name]


def test_private_mode_does_not_depend_on_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        private, _ = Identity.generate("n1", "root").save(tmp_path)
    finally:
        os.umask(old)
    assert stat.S_IMODE(private.stat().st_mode) == 0o600


def test_public_line_is_one_printable_line_and_parses() -> None:
    ident = Identity.generate("region-eu", "region")
    line = ident.public_line()
    assert "\n" not in line and line.isprintable()
    parsed = parse_public_line(line)
    assert parsed == ident.public
    assert "private" not in repr(ident).lower()


def test_save_refuses_to_overwrite_a_key(tmp_path: Path) -> None:
    Identity.generate("site-a").save(tmp_path)
    other = Identity.generate("site-a")
    with pytest.raises(FileExistsError):
        other.save(tmp_path)
    other.save(tmp_path, overwrite=True)
    assert Identity.load(tmp_path / "site-a.key").public_key == other.public_key


def test_load_refuses_group_readable_file(tmp_path: Path) -> None:
    private, _ = Identity.generate("site-a").save(tmp_path)
    private.chmod(0o644)
    with pytest.raises(IdentityError, match="chmod 600"):
        Identity.load(private)


def test_load_refuses_mismatched_or_garbled_files(tmp_path: Path) -> None:
    private, _ = Identity.generate("site-a").save(tmp_path)
    other = Identity.generate("x").public_line().split()[2]
    text = private.read_text()
    lines = [
        f'public_key = "{other}"' if ln.startswith("public_key") else ln for ln in text.splitlines()
    ]
    private.write_text("\n".join(lines))
    with pytest.raises(IdentityError, match="does not match"):
        Identity.load(private)
    private.write_text("not = [toml")
    with pytest.raises(IdentityError, match="not an identity file"):
        Identity.load(private)
    with pytest.raises(IdentityError, match="not found"):
        Identity.load(tmp_path / "missing.key")


@pytest.mark.parametrize("node_id", ["", "../etc", "a b", ".hidden", "x" * 129, "é"])
def test_invalid_ids_are_refused(node_id: str) -> None:
    with pytest.raises(IdentityError, match="invalid node id"):
        Identity.generate(node_id)


def test_invalid_role_and_keys_are_refused() -> None:
    with pytest.raises(IdentityError, match="invalid role"):
        Identity.generate("a", "admin")
    with pytest.raises(IdentityError, match="base64"):
        parse_key("!!!")
    with pytest.raises(IdentityError, match="32 bytes"):
        parse_key("AAAA")
    with pytest.raises(IdentityError, match="got 2 field"):
        parse_public_line("a site")


def test_signatures_verify_only_for_the_signed_data_and_key() -> None:
    a, b = Identity.generate("a"), Identity.generate("b")
    sig = a.sign(b"hello")
    assert len(sig) == 64
    assert verify_signature(a.public_key, b"hello", sig)
    assert not verify_signature(a.public_key, b"hellO", sig)
    assert not verify_signature(b.public_key, b"hello", sig)
    assert not verify_signature(a.public_key, b"hello", sig[:-1])
    assert not verify_signature(b"\x00" * 32, b"hello", sig)
