"""Secure-aggregation keys from roster identities (and from a seed, for the simulator)."""

from __future__ import annotations

import nacl.signing
import pytest

from fedloom.algorithms.secagg.keys import (
    SecAggCryptoError,
    SecAggKeyError,
    SecAggKeys,
    pair_context,
)
from fedloom.federation.secagg_keys import derived_secagg_keys
from fedloom.transport.identity import Identity
from fedloom.transport.roster import Roster, RosterEntry
from fedloom.transport.secagg_keys import SIGN_PREFIX, RosterSecAggKeys

COHORT = b"\x42" * 16


def _world(*ids: str) -> tuple[dict[str, Identity], Roster]:
    idents = {i: Identity.generate(i, "site") for i in ids}
    roster = Roster(1, [RosterEntry(i, "site", idents[i].public_key) for i in ids])
    return idents, roster


def _keys(ident: Identity, roster: Roster) -> RosterSecAggKeys:
    return RosterSecAggKeys(ident.node_id, ident, roster)


def test_both_sides_derive_the_same_pair_seed_bound_to_the_context() -> None:
    idents, roster = _world("a", "b", "c")
    a, b, c = (_keys(idents[i], roster) for i in "abc")
    assert isinstance(a, SecAggKeys)
    ctx = pair_context("root", COHORT, "a", "b")
    assert ctx == pair_context("root", COHORT, "b", "a")
    seed = a.pair_seed("b", ctx)
    assert len(seed) == 32 and seed == b.pair_seed("a", ctx)
    assert a.pair_seed("b", pair_context("root", b"\x43" * 16, "a", "b")) != seed
    assert a.pair_seed("b", pair_context("region-1", COHORT, "a", "b")) != seed
    assert a.pair_seed("c", pair_context("root", COHORT, "a", "c")) == c.pair_seed(
        "a", pair_context("root", COHORT, "a", "c")
    )
    # A third node cannot compute a's and b's seed: its own with either differs.
    assert c.pair_seed("a", ctx) != seed and c.pair_seed("b", ctx) != seed
    with pytest.raises(ValueError):
        pair_context("root", COHORT, "a", "a")


def test_boxes_open_only_for_their_recipient_from_their_sender() -> None:
    idents, roster = _world("a", "b", "c")
    a, b, c = (_keys(idents[i], roster) for i in "abc")
    box = a.seal_to("b", b"shares for b")
    assert b.open_from("a", box) == b"shares for b"
    assert a.seal_to("b", b"shares for b") != box  # random nonce
    with pytest.raises(SecAggCryptoError):
        c.open_from("a", box)  # a third node
    with pytest.raises(SecAggCryptoError):
        b.open_from("c", box)  # the wrong claimed sender
    for k in (0, 10, len(box) - 1):
        tampered = bytearray(box)
        tampered[k] ^= 0x01
        with pytest.raises(SecAggCryptoError):
            b.open_from("a", bytes(tampered))
    for bad in (b"", box[:30], b"x" * 100):
        with pytest.raises(SecAggCryptoError):
            b.open_from("a", bad)


def test_signatures_are_domain_separated_and_per_peer() -> None:
    idents, roster = _world("a", "b")
    a, b = _keys(idents["a"], roster), _keys(idents["b"], roster)
    sig = a.sign(b"view")
    assert b.verify("a", b"view", sig)
    assert not b.verify("a", b"view2", sig)
    assert not b.verify("b", b"view", sig)
    assert not b.verify("a", b"view", sig[:-1] + bytes([sig[-1] ^ 1]))
    assert not b.verify("a", b"view", b"")
    # The plain identity signature of the same bytes is not a secure-aggregation one,
    # and a secure-aggregation signature is the identity's signature of prefixed bytes.
    assert not b.verify("a", b"view", idents["a"].sign(b"view"))
    nacl.signing.VerifyKey(idents["a"].public_key).verify(SIGN_PREFIX + b"view", sig)


def test_peers_missing_from_the_roster_raise_key_errors() -> None:
    idents, roster = _world("a", "b")
    a = _keys(idents["a"], roster)
    ctx = pair_context("root", COHORT, "a", "z")
    calls = [
        lambda: a.pair_seed("z", ctx),
        lambda: a.seal_to("z", b"x"),
        lambda: a.open_from("z", b"x" * 64),
        lambda: a.verify("z", b"x", b"\0" * 64),
    ]
    for call in calls:
        with pytest.raises(SecAggKeyError, match="unknown_key"):
            call()
    assert issubclass(SecAggKeyError, SecAggCryptoError)
    assert issubclass(SecAggCryptoError, ValueError)


def test_an_unusable_roster_key_is_a_crypto_error() -> None:
    ident = Identity.generate("a", "site")
    a = RosterSecAggKeys("a", ident.signing_key, {"a": ident.public_key, "bad": b"\xff" * 32})
    with pytest.raises(SecAggCryptoError):
        a.pair_seed("bad", pair_context("root", COHORT, "a", "bad"))
    with pytest.raises(SecAggCryptoError):
        a.seal_to("bad", b"x")


def test_update_roster_swaps_keys_and_drops_cached_secrets() -> None:
    idents, roster = _world("a", "b")
    a = _keys(idents["a"], roster)
    ctx = pair_context("root", COHORT, "a", "b")
    old_seed = a.pair_seed("b", ctx)
    old_box = _keys(idents["b"], roster).seal_to("a", b"hi")
    new_b = Identity.generate("b", "site")
    roster2 = Roster(
        2,
        [
            RosterEntry("a", "site", idents["a"].public_key),
            RosterEntry("b", "site", new_b.public_key),
        ],
    )
    a.update_roster(roster2)
    b2 = _keys(new_b, roster2)
    assert a.pair_seed("b", ctx) == b2.pair_seed("a", ctx) != old_seed
    with pytest.raises(SecAggCryptoError):
        a.open_from("b", old_box)  # sealed by the key b no longer holds
    assert a.open_from("b", b2.seal_to("a", b"hi")) == b"hi"
    a.update_roster(Roster(3, [RosterEntry("a", "site", idents["a"].public_key)]))
    with pytest.raises(SecAggKeyError):
        a.pair_seed("b", ctx)


def test_identity_and_node_id_must_agree() -> None:
    idents, roster = _world("a", "b")
    with pytest.raises(ValueError):
        RosterSecAggKeys("b", idents["a"], roster)
    with pytest.raises(TypeError):
        RosterSecAggKeys("a", b"\0" * 32, roster)  # type: ignore[arg-type]
    a = _keys(idents["a"], roster)
    with pytest.raises(ValueError):
        a.pair_seed("a", b"ctx")
    s1, s2 = a.fresh_secret(), a.fresh_secret()
    assert len(s1) == 32 and s1 != s2


def test_derived_keys_run_the_same_crypto_and_are_reproducible() -> None:
    ids = ["root", "s1", "s2", "s3"]
    k1 = derived_secagg_keys(ids, seed=7)
    k2 = derived_secagg_keys(ids, seed=7)
    k3 = derived_secagg_keys(ids, seed=8)
    ctx = pair_context("root", COHORT, "s1", "s2")
    assert k1["s1"].pair_seed("s2", ctx) == k1["s2"].pair_seed("s1", ctx)
    assert k1["s1"].pair_seed("s2", ctx) == k2["s1"].pair_seed("s2", ctx)
    assert k1["s1"].pair_seed("s2", ctx) != k3["s1"].pair_seed("s2", ctx)
    assert k1["s2"].open_from("s1", k2["s1"].seal_to("s2", b"m")) == b"m"
    with pytest.raises(SecAggCryptoError):
        k1["s3"].open_from("s1", k1["s1"].seal_to("s2", b"m"))
    assert k1["s1"].verify("s2", b"v", k2["s2"].sign(b"v"))
    # Fresh secrets: reproducible per (seed, node), distinct across nodes and draws.
    draws1 = [k1["s1"].fresh_secret() for _ in range(3)]
    assert draws1 == [k2["s1"].fresh_secret() for _ in range(3)]
    assert len(set(draws1)) == 3
    assert k1["s2"].fresh_secret() not in draws1
    with pytest.raises(SecAggKeyError):
        k1["s1"].pair_seed("stranger", ctx)
    # Adding a node does not change the others' keys.
    k4 = derived_secagg_keys([*ids, "s4"], seed=7)
    assert k4["s1"].pair_seed("s2", ctx) == k1["s1"].pair_seed("s2", ctx)
