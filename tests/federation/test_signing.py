"""End-to-end signing's sans-I/O core (federation.signing), and that the daemon's async
wrapper (runtime.signing.EndToEnd) agrees with it byte for byte."""

from __future__ import annotations

import asyncio
import dataclasses

import numpy as np
import pytest

from fedloom.algorithms.protocol import Metric
from fedloom.federation.signing import EndToEndCore, held_digest
from fedloom.runtime.signing import EndToEnd
from fedloom.transport.e2e import as_received, tensors_digest
from fedloom.transport.errors import ProtocolError
from fedloom.transport.identity import Identity
from fedloom.transport.roster import Roster, RosterEntry
from fedloom.transport.tensors import CodecSpec
from fedloom.transport.wire import ModelBroadcast, TrainRequest, Update

ROOT = Identity.generate("root", "root")
REGION = Identity.generate("region", "region")
OTHER_REGION = Identity.generate("region-2", "region")
SITE = Identity.generate("site-1", "site")
ROSTER = Roster(
    1, [RosterEntry(i.node_id, i.role, i.public_key) for i in (ROOT, REGION, OTHER_REGION, SITE)]
)
FP32 = CodecSpec()


def core(identity: Identity, reports: list[Metric] | None = None) -> EndToEndCore:
    return EndToEndCore(identity, ROSTER, report=None if reports is None else reports.append)


def tensors(seed: int, n: int = 50) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"w": rng.standard_normal(n).astype(np.float32), "b": np.zeros(3, np.float32)}


def update(seq: int = 1, src: str = "site-1") -> Update:
    return Update(src, seq, 0, tensors(seq), 10)


def refusal(end: EndToEndCore, msg: object, peer: str) -> str:
    with pytest.raises(ProtocolError) as info:
        end.check_now(msg, peer)  # type: ignore[arg-type]
    return str(info.value.reason)


def test_a_sealed_update_verifies_at_its_recipient_only() -> None:
    site, region, other = core(SITE), core(REGION), core(OTHER_REGION)
    sealed = site.seal_now(update(), "region", FP32)
    assert isinstance(sealed, Update) and len(sealed.sig) == 64 and site.signed == 1
    region.check_now(sealed, "site-1")
    assert region.verified == 1
    assert refusal(other, sealed, "site-1") == "bad_signature"  # redirected


def test_bad_updates_are_refused_counted_and_reported() -> None:
    reports: list[Metric] = []
    site, region = core(SITE), core(REGION, reports)
    sealed = site.seal_now(update(), "region", FP32)
    assert isinstance(sealed, Update)
    altered = dict(sealed.delta)
    altered["w"] = altered["w"] + np.float32(1e-3)
    assert refusal(region, dataclasses.replace(sealed, delta=altered), "site-1") == "bad_signature"
    assert refusal(region, update(2), "site-1") == "unsigned"
    assert refusal(region, sealed, "region-2") == "src_mismatch"  # one hop, from its signer
    assert region.rejected == {"bad_signature": 1, "unsigned": 1, "src_mismatch": 1}
    assert [(m.name, dict(m.labels or {})) for m in reports] == [
        ("update_rejected", {"reason": r}) for r in ("bad_signature", "unsigned", "src_mismatch")
    ]


def test_an_update_not_its_own_is_sent_as_is() -> None:
    region = core(REGION)
    msg = update()
    assert region.seal_now(msg, "root", FP32) is msg and region.signed == 0


def test_a_lossy_codec_is_signed_as_the_receiver_decodes_it() -> None:
    site, region = core(SITE), core(REGION)
    spec = CodecSpec(kind="int8")
    sealed = site.seal_now(update(), "region", spec)
    assert isinstance(sealed, Update)
    with pytest.raises(ProtocolError):  # the sender's own float32 delta is not what was signed
        region.check_now(sealed, "site-1")
    region.check_now(dataclasses.replace(sealed, delta=as_received(sealed.delta, spec)), "site-1")


def test_the_root_signs_each_version_once_and_chains_them() -> None:
    root = core(ROOT)
    w1, w2 = tensors(1), tensors(2)
    a = root.seal_now(ModelBroadcast(1, w1), "region", FP32)
    b = root.seal_now(TrainRequest(7, 1, w1), "site-1", FP32)
    c = root.seal_now(ModelBroadcast(2, w2), "region", FP32)
    assert isinstance(a, ModelBroadcast) and isinstance(b, TrainRequest)
    assert isinstance(c, ModelBroadcast)
    assert a.sig == b.sig and root.signed == 2  # one signature per version
    assert (a.signer, a.parent, c.parent) == ("root", 0, 1)


def test_a_region_relays_the_proof_it_verified_and_sites_guard_versions() -> None:
    root, region, site = core(ROOT), core(REGION), core(SITE)
    v2 = root.seal_now(ModelBroadcast(2, tensors(2)), "region", FP32)
    region.check_now(v2, "root")
    assert region.layout is not None  # learnt from the first verified model
    relayed = region.seal_now(TrainRequest(1, 2, tensors(2)), "site-1", FP32)
    assert isinstance(relayed, TrainRequest) and relayed.sig == v2.sig  # type: ignore[union-attr]
    site.check_now(relayed, "region")
    assert site.guard.current == 2
    # A version the region never verified goes out unsigned (warned), and is refused.
    unsigned = region.seal_now(TrainRequest(2, 3, tensors(3)), "site-1", FP32)
    assert region.unsigned_sent == 1 and refusal(site, unsigned, "region") == "unsigned"
    # An older version than one held is refused, as is another model under version 2.
    v1 = root.seal_now(ModelBroadcast(1, tensors(1)), "region", FP32)
    assert refusal(site, v1, "region") == "stale_model"
    other = core(ROOT)
    conflict = other.seal_now(ModelBroadcast(2, tensors(9)), "region", FP32)
    assert refusal(site, conflict, "region") == "model_conflict"


def test_only_a_root_signs_models() -> None:
    region = core(REGION)
    forged = EndToEndCore(REGION, ROSTER)
    assert forged.signs_models is False
    # A region cannot mint a proof: with no verified one it sends the model unsigned.
    out = forged.seal_now(ModelBroadcast(5, tensors(5)), "site-1", FP32)
    assert out.sig == b""  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="only a root"):
        region.new_model_proof(5, 4, tensors_digest(tensors(5)))


def test_held_digest_is_the_digest_of_the_decoded_float32_tensors() -> None:
    t64 = {"w": np.arange(5, dtype=np.float64)}
    t32 = {"w": np.arange(5, dtype=np.float32)}
    assert held_digest(t64) == tensors_digest(t32) == held_digest(t32)


def test_the_daemons_async_signing_and_the_core_agree() -> None:
    """What the daemon signs the simulator's core accepts, and the reverse."""

    async def both_ways() -> None:
        daemon_site = EndToEnd(SITE, ROSTER)
        daemon_region = EndToEnd(REGION, ROSTER)
        sealed = await daemon_site.seal(update(3), "region", FP32)
        core(REGION).check_now(sealed, "site-1")
        await daemon_region.check(core(SITE).seal_now(update(4), "region", FP32), "site-1")
        root_model = core(ROOT).seal_now(ModelBroadcast(1, tensors(1)), "region", FP32)
        await daemon_region.check(root_model, "root")
        relayed = await daemon_region.seal(TrainRequest(1, 1, tensors(1)), "site-1", FP32)
        core(SITE).check_now(relayed, "region")
        assert daemon_region.verified == 2

    asyncio.run(both_ways())
