"""A site's declared training examples in the signed roster (``examples``): parsed strictly,
covered by the signature, and absent from the signed bytes where undeclared, so rosters
signed before the field existed still verify."""

from __future__ import annotations

import pytest

from fedloom.transport.identity import Identity, key_text, parse_key
from fedloom.transport.roster import MAX_EXAMPLES, Roster, RosterEntry, RosterError, sign

CONSORTIUM = Identity.generate("consortium", "consortium")
ROOT = Identity.generate("root", "root")
SITE = Identity.generate("site-1", "site")

# Signed by the code before ``examples`` existed (version 7, no examples anywhere).
OLD_SIGNED = """version = 7

[[nodes]]
id = "region-a"
role = "region"
public_key = "QiEgRlU6gFaWMTI9x9O98b4+nxPsF4DZRdY/Vg9DFuo="
endpoints = ["wss://agg.example.org:8443/fl"]

[[nodes]]
id = "root"
role = "root"
public_key = "KDfxB9BXXHB67OZUeq8EIeGnKG/W2/nbkFmG5d7UjcQ="
endpoints = ["wss://agg.example.org:8443/fl"]

[[nodes]]
id = "site-1"
role = "site"
public_key = "yYsuYCK5lkepLoha09dJ4cyH5+AoFh8n71RBGpmm2hQ="
endpoints = []

[signature]
consortium_key = "mdUORtLOCuFPvXo0tQiv6L9wuToalWq4GXE7Tl7WW0A="
"""
OLD_SIGNED += (
    'signature = "PDis/Fac0yWhQUON8iA83tbrbSvrtD++O4c17Ae8J2D0HhqcLVHHLdh9k3oh9fCH2gHzaDrHHm+jn'
    '+HI4lwcCg=="\n'
)
OLD_CONSORTIUM_KEY = "mdUORtLOCuFPvXo0tQiv6L9wuToalWq4GXE7Tl7WW0A="


def unsigned(site_extra: str = "", root_extra: str = "") -> str:
    return (
        "version = 2\n\n"
        f'[[nodes]]\nid = "root"\nrole = "root"\npublic_key = "{key_text(ROOT.public_key)}"\n'
        f"{root_extra}\n"
        f'[[nodes]]\nid = "site-1"\nrole = "site"\npublic_key = "{key_text(SITE.public_key)}"\n'
        f"{site_extra}\n"
    )


def test_a_roster_signed_before_examples_existed_still_verifies() -> None:
    roster = Roster.loads(OLD_SIGNED, parse_key(OLD_CONSORTIUM_KEY, "key"))
    assert roster.version == 7 and len(roster) == 3
    site = roster.lookup("site-1")
    assert site is not None and site.examples is None


def test_declared_examples_round_trip_and_are_signed() -> None:
    signed = sign(unsigned("examples = 225\n"), CONSORTIUM)
    assert "examples = 225" in signed
    roster = Roster.loads(signed, CONSORTIUM.public_key)
    site, root = roster.lookup("site-1"), roster.lookup("root")
    assert site is not None and site.examples == 225
    assert root is not None and root.examples is None
    # The declaration is signed: raising it, or adding one to a signed roster, breaks it.
    with pytest.raises(RosterError, match="does not verify"):
        Roster.loads(signed.replace("examples = 225", "examples = 1000000"), CONSORTIUM.public_key)
    plain = sign(unsigned(), CONSORTIUM)
    forged = plain.replace(
        "endpoints = []\n\n[signature]", "endpoints = []\nexamples = 9\n\n[signature]"
    )
    assert forged != plain
    with pytest.raises(RosterError, match="does not verify"):
        Roster.loads(forged, CONSORTIUM.public_key)
    # Zero is a declaration (a site that may not weigh anything), not "undeclared".
    zero = Roster.loads(sign(unsigned("examples = 0\n"), CONSORTIUM), CONSORTIUM.public_key)
    entry = zero.lookup("site-1")
    assert entry is not None and entry.examples == 0
    assert zero.digest != Roster.loads(plain, CONSORTIUM.public_key).digest


@pytest.mark.parametrize(
    "value",
    ["-1", "true", "2.5", "1e3", '"225"', "[225]", str(MAX_EXAMPLES + 1), "9" * 40],
)
def test_bad_examples_are_refused_with_a_clear_error(value: str) -> None:
    with pytest.raises(RosterError, match=r"nodes\[1\] \(site-1\).*examples: expected an int"):
        sign(unsigned(f"examples = {value}\n"), CONSORTIUM)


def test_only_a_site_declares_examples() -> None:
    with pytest.raises(RosterError, match="only a site declares its training examples"):
        sign(unsigned(root_extra="examples = 5\n"), CONSORTIUM)
    with pytest.raises(ValueError, match="only a site"):
        RosterEntry("root", "root", ROOT.public_key, examples=5)


def test_the_largest_declaration_signs() -> None:
    roster = Roster.loads(
        sign(unsigned(f"examples = {MAX_EXAMPLES}\n"), CONSORTIUM), CONSORTIUM.public_key
    )
    entry = roster.lookup("site-1")
    assert entry is not None and entry.examples == MAX_EXAMPLES
