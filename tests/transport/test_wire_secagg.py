"""The secure-aggregation wire messages: exact round trips (Hypothesis), strict schemas and
size caps on decode, local misuse on encode, and the size bound of honest messages."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedloom.transport import wire
from fedloom.transport.errors import FrameTooLarge, MalformedMessage, ProtocolError
from fedloom.transport.limits import Limits
from fedloom.transport.wire import (
    COHORT_ID_BYTES,
    MAX_BUNDLE_BYTES,
    MAX_COHORT,
    SECAGG_MESSAGE_TYPES,
    SHARE_BYTES,
    MaskedUpdate,
    SecAggAbort,
    SecAggJoin,
    SecAggSeal,
    SecAggShares,
    SecAggUnmask,
    SecAggView,
    SecAggViewSig,
    decode,
    encode,
    message_type_name,
)

ids = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-._", min_size=1, max_size=12)
cohorts = st.binary(min_size=COHORT_ID_BYTES, max_size=COHORT_ID_BYTES)
shares = st.binary(min_size=SHARE_BYTES, max_size=SHARE_BYTES)
finite = st.floats(allow_nan=False, allow_infinity=False, width=64)
ints = st.integers(-(2**63), 2**63 - 1)
seqs = st.integers(1, 2**63 - 1)
names = st.lists(ids, unique=True, max_size=8).map(tuple)


def named(values: st.SearchStrategy[bytes]) -> st.SearchStrategy[tuple[tuple[str, bytes], ...]]:
    return st.lists(st.tuples(ids, values), unique_by=lambda e: e[0], max_size=6).map(tuple)


pair_shares = st.lists(
    st.tuples(ids, ids, shares).filter(lambda e: e[0] != e[1]),
    unique_by=lambda e: (e[0], e[1]),
    max_size=6,
).map(tuple)

MESSAGES: st.SearchStrategy[wire.Message] = st.one_of(
    st.builds(SecAggJoin, src=ids, seq=ints, base_version=ints, task=ints, n_examples=ints),
    names.flatmap(
        lambda members: st.builds(
            SecAggSeal,
            cohort=cohorts,
            members=st.just(members),
            seqs=st.lists(seqs, min_size=len(members), max_size=len(members)).map(tuple),
            threshold=ints,
            clip=finite,
            precision_bits=ints,
            weight_cap=ints,
            deadline_s=finite,
            noise_sigma=finite,
        )
    ),
    st.builds(
        MaskedUpdate,
        src=ids,
        seq=ints,
        cohort=cohorts,
        base_version=ints,
        n_examples=ints,
        data=st.integers(1, 64).flatmap(lambda n: st.binary(min_size=4 * n, max_size=4 * n)),
        bundles=named(st.binary(max_size=300)),
        sig=st.binary(max_size=64),
    ),
    st.builds(SecAggView, cohort=cohorts, survivors=names, dropped=names),
    st.builds(SecAggViewSig, cohort=cohorts, sig=st.binary(max_size=64)),
    st.builds(
        SecAggUnmask,
        cohort=cohorts,
        survivors=names,
        dropped=names,
        sigs=named(st.binary(max_size=64)),
        bundles=named(st.binary(max_size=300)),
    ),
    st.builds(SecAggShares, cohort=cohorts, self_shares=named(shares), pair_shares=pair_shares),
    st.builds(SecAggAbort, cohort=cohorts, reason=st.text(max_size=40)),
)


def envelope(msg: wire.Message) -> dict[str, Any]:
    return msgpack.unpackb(encode(msg), raw=False)  # type: ignore[no-any-return]


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)  # type: ignore[no-any-return]


COHORT = bytes(range(16))
SHARE = bytes(SHARE_BYTES)


JOIN = SecAggJoin(src="s1", seq=3, base_version=7, task=2, n_examples=40)
SEAL = SecAggSeal(
    cohort=COHORT,
    members=("s1", "s2", "s3"),
    seqs=(3, 1, 9),
    threshold=2,
    clip=1.0,
    precision_bits=16,
    weight_cap=100,
    deadline_s=30.0,
    noise_sigma=0.5,
)
MASKED = MaskedUpdate(
    src="s1",
    seq=3,
    cohort=COHORT,
    base_version=7,
    n_examples=40,
    data=bytes(range(8)),
    bundles=(("s2", b"box2"), ("s3", b"box3")),
    sig=bytes(64),
)
VIEW = SecAggView(cohort=COHORT, survivors=("s1", "s2"), dropped=("s3",))
VIEW_SIG = SecAggViewSig(cohort=COHORT, sig=bytes(64))
UNMASK = SecAggUnmask(
    cohort=COHORT,
    survivors=("s1", "s2"),
    dropped=("s3",),
    sigs=(("s1", bytes(64)), ("s2", bytes(64))),
    bundles=(("s2", b"box"),),
)
SHARES = SecAggShares(
    cohort=COHORT,
    self_shares=(("s1", SHARE), ("s2", SHARE)),
    pair_shares=(("s1", "s3", SHARE), ("s2", "s3", SHARE)),
)
ABORT = SecAggAbort(cohort=COHORT, reason="too_few_uploads")


def examples() -> list[wire.Message]:
    return [JOIN, SEAL, MASKED, VIEW, VIEW_SIG, UNMASK, SHARES, ABORT]


def test_every_secagg_message_type_has_an_example_and_a_schema() -> None:
    assert {type(m) for m in examples()} == set(SECAGG_MESSAGE_TYPES)
    for cls in SECAGG_MESSAGE_TYPES:
        assert cls in wire.MESSAGE_TYPES
        assert message_type_name(cls).startswith(("secagg_", "masked_"))
        fields = [f.name for f in dataclasses.fields(cls)]
        assert [name for name, _ in wire._SCHEMAS[cls].fields] == fields


@pytest.mark.parametrize("msg", examples(), ids=lambda m: type(m).__name__)
def test_examples_round_trip_exactly(msg: wire.Message) -> None:
    got = decode(encode(msg))
    assert got == msg
    for f in dataclasses.fields(msg):  # tuples stay tuples, bytes stay bytes
        assert type(getattr(got, f.name)) is type(getattr(msg, f.name)), f.name


@settings(max_examples=300, deadline=None)
@given(msg=MESSAGES)
def test_any_well_formed_message_round_trips_exactly(msg: wire.Message) -> None:
    assert decode(encode(msg)) == msg


ENCODED = [encode(m) for m in examples()]


@settings(max_examples=400, deadline=None)
@given(
    index=st.integers(0, len(ENCODED) - 1),
    edits=st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255), st.booleans()), max_size=4),
)
def test_corrupted_secagg_messages_raise_only_protocol_errors(
    index: int, edits: list[tuple[float, int, bool]]
) -> None:
    data = bytearray(ENCODED[index])
    for where, byte, cut in edits:
        i = min(int(where * len(data)), len(data) - 1)
        if cut:
            del data[i:]
        else:
            data[i] = byte
        if not data:
            break
    with contextlib.suppress(ProtocolError):
        assert isinstance(decode(bytes(data)), wire.MESSAGE_TYPES)


values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=4)
    | st.binary(max_size=70),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=3), inner, max_size=3)
    ),
    max_leaves=12,
)


@settings(max_examples=400, deadline=None)
@given(data=st.data(), value=values)
def test_replaced_fields_raise_only_protocol_errors(data: st.DataObject, value: Any) -> None:
    env = msgpack.unpackb(data.draw(st.sampled_from(ENCODED)), raw=False)
    target = data.draw(st.sampled_from([*sorted(env), "extra"]))
    env[target] = value
    try:
        msg = decode(pack(env))
    except ProtocolError:
        return
    assert isinstance(msg, wire.MESSAGE_TYPES)


def rejects(msg: wire.Message, field: str, value: Any, match: str) -> None:
    env = envelope(msg)
    env[field] = value
    with pytest.raises(MalformedMessage, match=match):
        decode(pack(env))


@pytest.mark.parametrize("bad", [b"", bytes(15), bytes(17), "x" * 16, 16, None, [0] * 16])
def test_cohort_ids_are_exactly_16_bytes(bad: Any) -> None:
    for msg in examples():
        if msg.__class__ is not SecAggJoin:
            rejects(msg, "cohort", bad, r"\.cohort must be 16 bytes")


def test_member_lists_are_distinct_non_empty_ids_and_capped() -> None:
    view = SecAggView(cohort=COHORT, survivors=("a",), dropped=())
    rejects(view, "survivors", ["a", "a"], "names an id twice")
    rejects(view, "survivors", ["a", ""], "non-empty str")
    rejects(view, "survivors", ["a", 3], "non-empty str")
    rejects(view, "dropped", "a", "must be an array")
    rejects(view, "survivors", [f"s{i}" for i in range(MAX_COHORT + 1)], f"limit {MAX_COHORT}")
    seal = SEAL
    rejects(seal, "members", [f"s{i}" for i in range(MAX_COHORT + 1)], f"limit {MAX_COHORT}")
    rejects(seal, "seqs", [1, 0, 2], "ints >= 1")
    rejects(seal, "seqs", [1, "2"], "ints >= 1")
    ok = [f"s{i}" for i in range(MAX_COHORT)]
    env = envelope(view)
    env["survivors"] = ok
    assert decode(pack(env)) == SecAggView(cohort=COHORT, survivors=tuple(ok), dropped=())


def test_shares_are_exactly_66_bytes_and_pairs_distinct() -> None:
    msg = SHARES
    rejects(msg, "self_shares", [["s1", bytes(65)]], "66 bytes")
    rejects(msg, "self_shares", [["s1", bytes(67)]], "66 bytes")
    rejects(msg, "self_shares", [["s1", SHARE], ["s1", SHARE]], "twice")
    rejects(msg, "self_shares", [["s1", SHARE, SHARE]], "2-element")
    rejects(msg, "pair_shares", [["s1", "s1", SHARE]], "distinct non-empty ids")
    rejects(msg, "pair_shares", [["s1", "s3", SHARE], ["s1", "s3", SHARE]], "twice")
    rejects(msg, "pair_shares", [["s1", "s3", "x" * 66]], "66 bytes")
    env = envelope(msg)
    env["pair_shares"] = [["s1", "s3", SHARE], ["s3", "s1", SHARE]]  # both orders: distinct
    assert isinstance(decode(pack(env)), SecAggShares)


def test_bundles_and_signatures_are_capped() -> None:
    masked = MASKED
    rejects(masked, "bundles", [["s2", bytes(MAX_BUNDLE_BYTES + 1)]], "at most")
    rejects(masked, "bundles", [["s2", b"a"], ["s2", b"b"]], "twice")
    rejects(masked, "bundles", [[f"s{i}", b"x"] for i in range(MAX_COHORT + 1)], "limit")
    unmask = UNMASK
    rejects(unmask, "sigs", [["s1", bytes(wire.MAX_BIN_BYTES + 1)]], "at most")
    rejects(masked, "sig", bytes(wire.MAX_BIN_BYTES + 1), "limit")
    env = envelope(masked)
    env["bundles"] = [["s2", bytes(MAX_BUNDLE_BYTES)]]
    assert isinstance(decode(pack(env)), MaskedUpdate)


def test_masked_data_is_whole_words_within_the_links_decoded_cap() -> None:
    masked = MASKED
    rejects(masked, "data", b"", "whole uint32 words")
    rejects(masked, "data", bytes(6), "whole uint32 words")
    rejects(masked, "data", "abcd", "must be bytes")
    model = {"w": np.zeros(1000, np.float32)}
    limits = Limits.for_model(model)
    honest = dataclasses.replace(masked, data=bytes(4 * 1001))
    assert decode(encode(honest), limits) == honest
    env = envelope(masked)
    env["data"] = bytes(limits.max_decoded_bytes + 4)
    with pytest.raises((MalformedMessage, FrameTooLarge)):
        decode(pack(env), limits)
    small = dataclasses.replace(limits, max_decoded_bytes=64)
    rejects_with = dataclasses.replace(masked, data=bytes(68))
    with pytest.raises(MalformedMessage, match="limit 64"):
        decode(encode(rejects_with), small)


def test_encode_refuses_local_misuse() -> None:
    join, seal, masked, view, unmask, shares_msg, abort = (
        JOIN,
        SEAL,
        MASKED,
        VIEW,
        UNMASK,
        SHARES,
        ABORT,
    )
    with pytest.raises(ValueError, match="16"):
        encode(dataclasses.replace(abort, cohort=bytes(15)))
    with pytest.raises(TypeError, match="must be bytes"):
        encode(dataclasses.replace(abort, cohort=bytearray(16)))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="distinct"):
        encode(dataclasses.replace(view, survivors=("a", "a")))
    with pytest.raises(TypeError, match="non-empty str"):
        encode(dataclasses.replace(view, survivors=("a", "")))
    with pytest.raises(ValueError, match=r"whole|at least 4"):
        encode(dataclasses.replace(masked, data=b""))
    with pytest.raises(ValueError, match="66"):
        encode(dataclasses.replace(shares_msg, self_shares=(("a", bytes(5)),)))
    with pytest.raises(ValueError, match="twice"):
        encode(dataclasses.replace(unmask, sigs=(("a", b"x"), ("a", b"y"))))
    with pytest.raises(ValueError, match="ints >= 1"):
        encode(dataclasses.replace(seal, seqs=(0, 1, 2)))
    with pytest.raises(TypeError):
        encode(dataclasses.replace(join, seq=1.5))  # type: ignore[arg-type]


def test_honest_cohort_messages_fit_the_size_bound_and_model_limits() -> None:
    # A real cohort of 12 members over a model of 2,000 coordinates: every message any
    # side sends encodes within secagg_message_bound, and the model's own link caps.
    from tests.algorithms.secagg_harness import SHAPES, Net, random_delta

    net = Net(12, seed=1)
    rng = np.random.default_rng(0)
    for s in net.sites:
        net.add_update(s, 1, random_delta(rng))
        net.join(s, 1)
    net.after_upload.add(net.sites[0])
    net.run()
    assert net.results
    elements = sum(int(np.prod(s)) for s in SHAPES.values())
    bound = wire.secagg_message_bound(elements, 12)
    limits = Limits.for_model({k: np.zeros(s, np.float32) for k, s in SHAPES.items()})
    sent = [e.msg for effs in net.effects.values() for e in effs if hasattr(e, "msg")]
    assert {type(m) for m in sent} >= set(SECAGG_MESSAGE_TYPES) - {SecAggJoin, SecAggAbort}
    for msg in sent:
        data = encode(msg)
        assert len(data) <= bound
        assert decode(data, limits) == msg
    with pytest.raises(ValueError):
        wire.secagg_message_bound(10, MAX_COHORT + 1)


def test_an_upload_to_60_members_with_the_longest_ids_fits_the_model_link_caps() -> None:
    from fedloom.algorithms.secagg.member import PendingUpdate, SecAggMember
    from fedloom.federation.secagg_keys import derived_secagg_keys

    members = tuple(f"{i:03d}" + "x" * 125 for i in range(60))  # 128 characters each
    keys = derived_secagg_keys([*members, "agg"], 0)
    model = {"w": np.zeros(500, np.float32)}
    seal = SecAggSeal(
        cohort=COHORT,
        members=members,
        seqs=(1,) * 60,
        threshold=31,
        clip=1.0,
        precision_bits=16,
        weight_cap=1,
        deadline_s=30.0,
    )
    me = SecAggMember(members[0], keys[members[0]], np.random.default_rng(0))
    update = PendingUpdate(1, 0, {"w": np.full(500, 0.01, np.float32)}, 1)
    (upload,) = [e.msg for e in me.on_seal("agg", seal, update, "uniform") if hasattr(e, "msg")]
    data = encode(upload)
    assert (
        len(data) <= wire.secagg_message_bound(500, 60) <= Limits.for_model(model).max_message_bytes
    )
    assert decode(data, Limits.for_model(model)) == upload
