"""The signed roster: signature checks, peer checks, and refusal of older versions."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedloom.transport.errors import PeerRefused, ProtocolError
from fedloom.transport.identity import Identity, key_text
from fedloom.transport.roster import (
    Roster,
    RosterEntry,
    RosterError,
    RosterStore,
    StaleRosterError,
    sign,
)

CONSORTIUM = Identity.generate("consortium", "consortium")
ROOT = Identity.generate("root", "root")
SITE_A = Identity.generate("site-a", "site")
SITE_B = Identity.generate("site-b", "site")
OUTSIDER = Identity.generate("site-x", "site")


def unsigned(version: int = 1, *idents: Identity) -> str:
    idents = idents or (ROOT, SITE_A, SITE_B)
    parts = [f"# consortium roster\nversion = {version}\n"]
    for ident in idents:
        parts.append(
            "[[nodes]]\n"
            f'id = "{ident.node_id}"\nrole = "{ident.role}"\n'
            f'public_key = "{key_text(ident.public_key)}"\n'
            'endpoints = ["wss://agg.example.org:8443/fl"]\n'
        )
    return "\n".join(parts)


def roster(version: int = 1) -> Roster:
    return Roster.loads(sign(unsigned(version), CONSORTIUM), CONSORTIUM.public_key)


def test_sign_and_load_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "roster.toml"
    path.write_text(sign(unsigned(4), CONSORTIUM))
    r = Roster.load(path, CONSORTIUM.public_key)
    assert r.version == 4 and len(r) == 3 and r.consortium_key == CONSORTIUM.public_key
    entry = r.lookup("site-a")
    assert entry == RosterEntry(
        "site-a", "site", SITE_A.public_key, ("wss://agg.example.org:8443/fl",)
    )
    assert r.by_key(ROOT.public_key) == r.lookup("root")
    assert r.lookup("nobody") is None and r.by_key(OUTSIDER.public_key) is None


def test_signature_covers_content_not_layout() -> None:
    signed = sign(unsigned(2), CONSORTIUM)
    relaid = "# re-formatted by hand\n" + signed.replace("\n\n", "\n").replace(" = ", "=")
    assert Roster.loads(relaid, CONSORTIUM.public_key).digest == roster(2).digest


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("version = 3", "version = 4"),
        ('role = "site"', 'role = "root"'),
        ("agg.example.org", "evil.example.org"),
        (key_text(SITE_A.public_key), key_text(OUTSIDER.public_key)),
    ],
    ids=["version", "role", "endpoint", "public_key"],  # stable: the keys are random
)
def test_modified_roster_is_refused(old: str, new: str) -> None:
    signed = sign(unsigned(3), CONSORTIUM)
    assert old in signed
    with pytest.raises(RosterError, match="does not verify"):
        Roster.loads(signed.replace(old, new, 1), CONSORTIUM.public_key)


def test_roster_signed_by_another_key_or_unsigned_is_refused() -> None:
    rogue = Identity.generate("rogue", "consortium")
    with pytest.raises(RosterError, match="not by the consortium key"):
        Roster.loads(sign(unsigned(), rogue), CONSORTIUM.public_key)
    # Naming the real consortium key does not help: the signature is still the rogue's.
    forged = sign(unsigned(), rogue).replace(
        key_text(rogue.public_key), key_text(CONSORTIUM.public_key)
    )
    with pytest.raises(RosterError, match="does not verify"):
        Roster.loads(forged, CONSORTIUM.public_key)
    with pytest.raises(RosterError, match="not signed"):
        Roster.loads(unsigned(), CONSORTIUM.public_key)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("version = 0\n", "version"),
        ('version = "1"\n', "version"),
        ("version = 1\nextra = 2\n", "unknown roster field"),
        ("version = 1\n[[nodes]]\nid = 'a'\nrole = 'site'\n", "missing field 'public_key'"),
        (
            f"version = 1\n[[nodes]]\nid = 'a'\nrole = 'boss'\npublic_key = '{'A' * 43}='\n",
            "invalid role",
        ),
        ("version = 1\n[[nodes]]\nid = 'a'\nrole = 'site'\npublic_key = 'AAAA'\n", "32 bytes"),
        ("version = [", "not valid TOML"),
    ],
)
def test_malformed_rosters_are_refused(text: str, message: str) -> None:
    with pytest.raises(RosterError, match=message):
        Roster.loads_unsigned(text)


def test_duplicate_ids_and_keys_are_refused() -> None:
    twin = Identity("site-a", "site", SITE_B.signing_key)
    with pytest.raises(RosterError, match="listed twice"):
        Roster.loads_unsigned(unsigned(1, SITE_A, Identity("site-a", "site", ROOT.signing_key)))
    with pytest.raises(RosterError, match="same public key"):
        Roster.loads_unsigned(unsigned(1, SITE_B, Identity("site-c", "site", twin.signing_key)))


def test_check_accepts_listed_peers() -> None:
    assert roster().check("site-a", "site", SITE_A.public_key).node_id == "site-a"


def test_check_refuses_unknown_key() -> None:
    with pytest.raises(PeerRefused, match=r"unknown key.*not in roster version 1"):
        roster().check("site-x", "site", OUTSIDER.public_key)
    with pytest.raises(PeerRefused, match=r"unknown key.*another key for 'site-a'"):
        roster().check("site-a", "site", OUTSIDER.public_key)


def test_check_refuses_key_listed_under_another_id() -> None:
    with pytest.raises(PeerRefused, match=r"another id.*'site-b'.*'site-a'"):
        roster().check("site-b", "site", SITE_A.public_key)


def test_check_refuses_wrong_role() -> None:
    with pytest.raises(PeerRefused, match=r"wrong role.*'root'.*'site'"):
        roster().check("site-a", "root", SITE_A.public_key)


def test_store_refuses_an_older_roster() -> None:
    store = RosterStore()
    store.accept(roster(3))
    with pytest.raises(StaleRosterError, match="version 2 is older than version 3"):
        store.accept(roster(2))
    assert store.current is not None and store.current.version == 3
    store.accept(roster(3))  # the same roster again (re-read from disk) is fine
    store.accept(roster(5))
    assert store.newest_seen == 5


def test_store_remembers_across_restarts_through_the_persisted_int() -> None:
    persisted = RosterStore()
    persisted.accept(roster(7))
    restarted = RosterStore(newest_seen=persisted.newest_seen)
    with pytest.raises(StaleRosterError):
        restarted.accept(roster(6))
    restarted.accept(roster(7))


def test_store_refuses_a_different_roster_with_the_same_version() -> None:
    store = RosterStore()
    store.accept(roster(3))
    other = Roster.loads(sign(unsigned(3, ROOT, SITE_A), CONSORTIUM), CONSORTIUM.public_key)
    with pytest.raises(StaleRosterError, match="same version"):
        store.accept(other)
    assert issubclass(StaleRosterError, ProtocolError)
