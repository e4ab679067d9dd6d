"""Secure aggregation's masked uploads are signed end to end by their site like updates:
both drivers' signing (the simulator's ``EndToEndCore`` and the daemon's ``EndToEnd``)
sign them for the recipient, and the recipient refuses a redirected, tampered, unsigned
or relayed one before its coordinator sees it."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from fedloom.algorithms.protocol import Metric
from fedloom.federation.signing import EndToEndCore
from fedloom.runtime.signing import EndToEnd
from fedloom.transport.errors import ProtocolError
from fedloom.transport.identity import Identity
from fedloom.transport.roster import Roster, RosterEntry
from fedloom.transport.tensors import CodecSpec
from fedloom.transport.wire import MaskedUpdate

ROOT = Identity.generate("root", "root")
REGION = Identity.generate("region", "region")
SITE = Identity.generate("site-1", "site")
OTHER = Identity.generate("site-2", "site")
ROSTER = Roster(
    1, [RosterEntry(i.node_id, i.role, i.public_key) for i in (ROOT, REGION, SITE, OTHER)]
)
FP32 = CodecSpec()


def masked(src: str = "site-1") -> MaskedUpdate:
    return MaskedUpdate(
        src=src,
        seq=3,
        cohort=bytes(range(16)),
        base_version=7,
        n_examples=12,
        data=bytes(range(40)),
        bundles=(("site-2", b"box-for-2"),),
    )


def refusal(end: EndToEndCore, msg: MaskedUpdate, peer: str) -> str:
    with pytest.raises(ProtocolError) as info:
        end.check_now(msg, peer)
    return str(info.value.reason)


def test_masked_upload_is_signed_for_its_recipient_and_verified() -> None:
    reports: list[Metric] = []
    site = EndToEndCore(SITE, ROSTER)
    root = EndToEndCore(ROOT, ROSTER, report=reports.append)
    sealed = site.seal_now(masked(), "root", FP32)
    assert isinstance(sealed, MaskedUpdate) and len(sealed.sig) == 64
    root.check_now(sealed, "site-1")
    assert root.verified == 1
    # Redirected to another aggregator, or any field changed: refused.
    assert refusal(EndToEndCore(REGION, ROSTER), sealed, "site-1") == "bad_signature"
    for change in (
        {"data": bytes(40)},
        {"bundles": (("site-2", b"other"),)},
        {"cohort": bytes(16)},
        {"seq": 4},
        {"base_version": 6},
        {"n_examples": 13},
    ):
        tampered = dataclasses.replace(sealed, **change)  # type: ignore[arg-type]
        assert refusal(root, tampered, "site-1") == "bad_signature", change
    assert refusal(root, masked(), "site-1") == "unsigned"
    assert refusal(root, sealed, "site-2") == "src_mismatch"  # relayed by another site
    assert any(m.name == "update_rejected" for m in reports)


def test_a_node_does_not_sign_another_sites_upload() -> None:
    other = EndToEndCore(OTHER, ROSTER)
    assert other.seal_now(masked("site-1"), "root", FP32).sig == b""


def test_daemon_signing_agrees_with_the_simulators() -> None:
    async def run() -> None:
        site, root = EndToEnd(SITE, ROSTER), EndToEnd(ROOT, ROSTER)
        sealed = await site.seal(masked(), "root", FP32)
        assert isinstance(sealed, MaskedUpdate)
        await root.check(sealed, "site-1")
        EndToEndCore(ROOT, ROSTER).check_now(sealed, "site-1")  # same bytes either way
        with pytest.raises(ProtocolError):
            await root.check(dataclasses.replace(sealed, data=bytes(40)), "site-1")

    asyncio.run(run())
