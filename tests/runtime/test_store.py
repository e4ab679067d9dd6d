"""StateStore: durable Persist effects, torn-write recovery, checkpoints superseding logs."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedloom.algorithms.fedbuff import FedBuffAggregator
from fedloom.algorithms.protocol import (
    Effect,
    Event,
    PeerUp,
    Persist,
    Received,
    Send,
    Train,
    TrainDone,
    TrainResult,
)
from fedloom.algorithms.regional import RegionalAggregator
from fedloom.algorithms.server_opt import ServerAdam
from fedloom.algorithms.site import SiteNode
from fedloom.federation.store import (
    CorruptStateError,
    Recovery,
    StateStore,
    StoreError,
    encode_state,
)
from fedloom.transport.wire import Ack, Hello, ModelBroadcast, TrainRequest, Update

# --------------------------------------------------------------------------- helpers


def same(a: Any, b: Any, path: str = "") -> None:
    """Deep equality with exact types, arrays compared bit for bit (dtype and shape too)."""
    assert type(a) is type(b), f"{path}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape, path
        assert a.tobytes() == b.tobytes(), path
    elif isinstance(a, dict):
        assert list(a) == list(b), path
        for k in a:
            same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            same(x, y, f"{path}[{i}]")
    elif isinstance(a, Update):
        for name in Update.__slots__:
            same(getattr(a, name), getattr(b, name), f"{path}.{name}")
    elif isinstance(a, float) and a != a:
        assert b != b, path
    else:
        assert a == b, path


def reopen(directory: Path, *, repair: bool = True) -> tuple[StateStore, Recovery]:
    store = StateStore(directory)
    return store, store.load(repair=repair)


def wal(directory: Path) -> Path:
    [path] = sorted(directory.glob("wal.*.log"))
    return path


RICH: dict[str, Any] = {
    "f32": np.arange(6, dtype=np.float32).reshape(2, 3),
    "f64": np.array([0.1, 1e-300, -2.5e300]),  # float32 could not hold these
    "f16": np.array([1.5, -2.0], dtype=np.float16),
    "u64": np.array([2**64 - 1], dtype=np.uint64),
    "bools": np.array([True, False]),
    "empty": np.zeros((0, 3), dtype=np.float32),
    "zero_d": np.array(2.5),
    "strided": np.arange(10.0)[::3],
    "nan": np.array([np.nan, np.inf], dtype=np.float32),
    "scalars": [np.float64(0.25), np.int64(-3), np.float32(1.5), np.bool_(True)],
    "tuple": (1, ("nested", 2.5), None),
    "set": {1, 2, 3},
    "frozen": frozenset({"a"}),
    "int_keys": {1: "one", 2: [b"\x00\xff"]},
    "update": Update(
        "s1", 4, 2, {"w": np.ones((2, 2), np.float32)}, 10, count=3, task=7, metrics={"l": 0.5}
    ),
}


# ------------------------------------------------------------------------ round trips


def test_rich_data_round_trips_bit_exactly(tmp_path: Path) -> None:
    store, rec = reopen(tmp_path)
    assert rec == Recovery(None, {}, {}, 0, 0)
    store.apply(Persist("site/pending", RICH, append=True))
    store.apply(Persist("applied", {"n": 1}, append=True))
    store.apply(Persist("site/pending", {"n": 2}, append=True))
    store.apply(Persist("meta", ("value", np.float64(1.0))))
    store.apply(Persist("big_endian", np.arange(4, dtype=">f8")))
    store.close()
    _, rec = reopen(tmp_path)
    assert list(rec.logs) == ["site/pending", "applied"]
    same(rec.records("site/pending"), [RICH, {"n": 2}])
    same(rec.records("applied"), [{"n": 1}])
    assert list(rec.values) == ["big_endian", "meta"]
    same(rec.values["meta"], ("value", np.float64(1.0)))
    same(rec.values["big_endian"], np.arange(4, dtype="<f8"))  # stored little-endian
    assert rec.records("nothing") == []
    assert not rec.records("site/pending")[0]["f32"].flags.writeable  # views, read-only
    assert (tmp_path / "site%2Fpending.ckpt").exists() is False
    assert (tmp_path / "meta.ckpt").exists()


def test_unsupported_values_raise_before_anything_is_written(tmp_path: Path) -> None:
    store, _ = reopen(tmp_path)
    store.apply(Persist("log", 1, append=True))
    size = wal(tmp_path).stat().st_size
    for bad in (object(), np.array(["text"]), np.array([1 + 2j], dtype=object)):
        with pytest.raises(TypeError):
            store.apply_many([Persist("log", 2, append=True), Persist("log", bad, append=True)])
    assert wal(tmp_path).stat().st_size == size
    with pytest.raises(ValueError, match="non-empty str"):
        store.apply(Persist("", 1))
    store.apply(Persist("log", 3, append=True))  # misuse does not break the store
    store.close()
    assert reopen(tmp_path)[1].records("log") == [1, 3]


_leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(allow_nan=False),
    st.text(max_size=20),
    st.binary(max_size=20),
    st.builds(
        lambda shape, dtype, seed: np.asarray(
            np.random.default_rng(seed).normal(size=shape), dtype
        ),
        st.lists(st.integers(0, 4), max_size=3).map(tuple),
        st.sampled_from(["float32", "float64", "float16", "int8", "int64", "uint16"]),
        st.integers(0, 2**32 - 1),
    ),
)
_trees = st.recursive(
    _leaves,
    lambda kids: st.one_of(
        st.lists(kids, max_size=4),
        st.lists(kids, max_size=4).map(tuple),
        st.dictionaries(st.text(max_size=8), kids, max_size=4),
    ),
    max_leaves=20,
)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_trees)
def test_any_tree_round_trips(tree: Any) -> None:
    from fedloom.federation.store import decode_state

    header, head_len, head, *payload = encode_state(tree)
    assert len(header) == 16 and int.from_bytes(head_len, "little") == len(head)
    same(decode_state(bytes(head), b"".join(payload)), tree)


# ------------------------------------------------------------------------ torn writes


def test_torn_last_record_is_dropped_at_every_byte_offset(tmp_path: Path) -> None:
    live = tmp_path / "live"
    store, _ = reopen(live)
    store.apply(Persist("applied", {"n": 1, "delta": {"w": np.ones(3, np.float32)}}, append=True))
    store.apply(Persist("other", "x", append=True))
    before = wal(live).stat().st_size
    store.apply(Persist("applied", {"n": 2, "delta": {"w": np.zeros(3, np.float32)}}, append=True))
    store.close()
    full = wal(live).read_bytes()
    assert len(full) > before
    for cut in range(before, len(full)):
        crash = tmp_path / f"cut{cut}"
        shutil.copytree(live, crash)
        with wal(crash).open("r+b") as f:
            f.truncate(cut)
        store, rec = reopen(crash)
        assert [r["n"] for r in rec.records("applied")] == [1], cut
        assert rec.records("other") == ["x"] and rec.torn_bytes == cut - before
        assert wal(crash).stat().st_size == before  # repaired
        store.apply(Persist("applied", {"n": 3}, append=True))  # the log goes on cleanly
        store.close()
        assert [r["n"] for r in reopen(crash)[1].records("applied")] == [1, 3]
        shutil.rmtree(crash)


@pytest.mark.parametrize("tail", [b"\x00" * 40, b"FLs1" + b"\xff" * 8, b"F"])
def test_garbage_tail_is_a_torn_write(tmp_path: Path, tail: bytes) -> None:
    store, _ = reopen(tmp_path)
    store.apply(Persist("log", 1, append=True))
    store.close()
    with wal(tmp_path).open("ab") as f:
        f.write(tail)
    # Without repair nothing is changed on disk, but the next append still lands cleanly.
    store, rec = reopen(tmp_path, repair=False)
    assert rec.records("log") == [1] and rec.torn_bytes == len(tail)
    store.apply(Persist("log", 2, append=True))
    store.close()
    assert reopen(tmp_path)[1].records("log") == [1, 2]


def test_damage_before_an_intact_record_is_corruption(tmp_path: Path) -> None:
    store, _ = reopen(tmp_path)
    store.apply(Persist("log", "first record", append=True))
    store.apply(Persist("log", "second record", append=True))
    store.close()
    data = bytearray(wal(tmp_path).read_bytes())
    data[data.index(b"first")] ^= 0xFF
    wal(tmp_path).write_bytes(bytes(data))
    with pytest.raises(CorruptStateError, match=r"offset 0 .*checksum.* intact frame"):
        reopen(tmp_path)


def test_damaged_checkpoint_is_corruption_not_a_torn_write(tmp_path: Path) -> None:
    store, _ = reopen(tmp_path)
    store.apply(Persist("checkpoint", {"weights": np.ones(4, np.float32)}))
    store.close()
    path = tmp_path / "checkpoint.ckpt"
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(CorruptStateError, match=r"checkpoint\.ckpt"):
        reopen(tmp_path)


# ------------------------------------------------------------ checkpoints and the log


def test_checkpoint_supersedes_the_log_and_compacts_it(tmp_path: Path) -> None:
    store, _ = reopen(tmp_path)
    store.apply_many(
        [
            Persist("applied", {"n": 1}, append=True),
            Persist("checkpoint", {"log_n": 1}),
            Persist("applied", {"n": 2}, append=True),
        ]
    )
    assert store.epoch == 1 and wal(tmp_path).name == "wal.0000000001.log"
    old_log = tmp_path / "wal.0000000000.log"
    assert not old_log.exists()
    store.close()
    _, rec = reopen(tmp_path)
    assert rec.checkpoint == {"log_n": 1} and rec.records("applied") == [{"n": 2}]
    assert rec.epoch == 1


def test_crash_between_checkpoint_and_compaction(tmp_path: Path) -> None:
    store, _ = reopen(tmp_path)
    store.apply(Persist("applied", {"n": 1}, append=True))
    stale = wal(tmp_path).read_bytes()
    store.apply(Persist("checkpoint", {"log_n": 1}))
    store.close()
    # The old log survived the crash (its deletion was not durable yet).
    (tmp_path / "wal.0000000000.log").write_bytes(stale)
    (tmp_path / "checkpoint.ckpt.tmp").write_bytes(b"half a checkpoint")
    _, rec = reopen(tmp_path)
    assert rec.checkpoint == {"log_n": 1} and rec.logs == {}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.ckpt", "lock"]


def test_crash_while_writing_a_checkpoint_keeps_the_old_one(tmp_path: Path) -> None:
    store, _ = reopen(tmp_path)
    store.apply(Persist("checkpoint", {"v": 1}))
    store.apply(Persist("applied", {"n": 1}, append=True))
    store.close()
    (tmp_path / "checkpoint.ckpt.tmp").write_bytes(b"FLs1\x00")  # crash before os.replace
    _, rec = reopen(tmp_path)
    assert rec.checkpoint == {"v": 1} and rec.records("applied") == [{"n": 1}]


def test_log_newer_than_its_checkpoint_is_an_error(tmp_path: Path) -> None:
    store, _ = reopen(tmp_path)
    store.apply(Persist("checkpoint", {"v": 1}))
    store.apply(Persist("applied", {"n": 1}, append=True))
    store.close()
    (tmp_path / "checkpoint.ckpt").unlink()
    with pytest.raises(CorruptStateError, match="missing or older"):
        reopen(tmp_path)


def test_misuse_and_exclusive_directory(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    with pytest.raises(StoreError, match="load"):
        store.apply(Persist("log", 1, append=True))
    with pytest.raises(StoreError, match="another process"):
        StateStore(tmp_path)
    store.close()
    with StateStore(tmp_path) as again:
        again.load()


# --------------------------------------------------------------------- fsync ordering


def _record_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    calls: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        calls.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src: Any, dst: Any) -> None:
        calls.append(("replace", f"{src} -> {dst}"))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return calls


def test_replace_fsyncs_file_then_replaces_then_fsyncs_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, _ = reopen(tmp_path)
    calls = _record_calls(monkeypatch)
    store.apply(Persist("checkpoint", {"w": np.ones(2)}))
    d = str(tmp_path)
    assert calls == [
        ("fsync", f"{d}/checkpoint.ckpt.tmp"),
        ("replace", f"{d}/checkpoint.ckpt.tmp -> {d}/checkpoint.ckpt"),
        ("fsync", d),
    ]
    store.close()


def test_appends_fsync_once_per_batch_and_new_logs_fsync_the_dir_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, _ = reopen(tmp_path)
    calls = _record_calls(monkeypatch)
    log = f"{tmp_path}/wal.0000000000.log"
    store.apply_many([Persist("applied", i, append=True) for i in range(3)])
    assert calls == [("fsync", str(tmp_path)), ("fsync", log)]
    calls.clear()
    store.apply_many([Persist("applied", 3, append=True), Persist("site/pending", 4, append=True)])
    assert calls == [("fsync", log)]
    store.close()
    assert reopen(tmp_path)[1].records("applied") == [0, 1, 2, 3]


def test_a_failed_fsync_breaks_the_store_and_leaves_no_half_frame(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, _ = reopen(tmp_path)
    store.apply(Persist("log", 1, append=True))
    size = wal(tmp_path).stat().st_size

    def failing(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing)
    with pytest.raises(OSError):
        store.apply(Persist("log", 2, append=True))
    monkeypatch.undo()
    assert wal(tmp_path).stat().st_size == size
    with pytest.raises(StoreError, match="restart"):
        store.apply(Persist("log", 3, append=True))
    store.close()
    assert reopen(tmp_path)[1].records("log") == [1]


# ------------------------------------- a recovered node equals one that never crashed


def drive(node: Any, store: StateStore | None, events: Iterable[Event]) -> list[list[Effect]]:
    """Feed events; persist each call's Persists as one batch (what the driver does)."""
    outs = []
    for ev in events:
        out = node.handle(ev, 0.0)
        if store is not None:
            store.apply_many([e for e in out if isinstance(e, Persist)])
        outs.append(out)
    return outs


def sends(outs: list[list[Effect]]) -> list[Any]:
    return [(e.peer, e.msg) for out in outs for e in out if isinstance(e, Send)]


def weights(value: float) -> dict[str, np.ndarray]:
    return {"w": np.full((3, 2), value, np.float32), "b": np.full(2, value, np.float32)}


SITES = {f"s{i}": "site" for i in range(4)}


def update_stream(n: int) -> list[Event]:
    rng = np.random.default_rng(5)
    seqs = dict.fromkeys(SITES, 0)
    events: list[Event] = []
    for i in range(n):
        src = f"s{rng.integers(4)}"
        seqs[src] += 1
        delta = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in weights(0).items()}
        base = max(0, i // 3 - int(rng.integers(3)))
        events.append(Received(src, Update(src, seqs[src], base, delta, 10)))
    return events


def make_root() -> FedBuffAggregator:
    # Adam keeps float64 moments: a lossy store would show up as a different model.
    return FedBuffAggregator(
        "root", SITES, weights(0.0), buffer_size=3, concurrency=0,
        server_opt=ServerAdam(lr=0.1), checkpoint_every=2,
    )  # fmt: skip


def recover(directory: Path, make: Callable[[], Any]) -> Any:
    store, rec = reopen(directory)
    store.close()
    node = make()
    node.restore(rec.checkpoint, rec)
    return node


@pytest.mark.parametrize("crash_after", [0, 4, 6, 7, 11, 12, 17])
def test_recovered_fedbuff_equals_one_that_never_crashed(tmp_path: Path, crash_after: int) -> None:
    events = [Received(s, Hello(s, "site")) for s in SITES] + update_stream(24)
    cut = len(SITES) + crash_after
    reference = make_root()
    drive(reference, None, events[:cut])
    store, _ = reopen(tmp_path)
    crashed = make_root()
    drive(crashed, store, events[:cut])
    # The crash hits while the next event's records are being written: torn, never acked
    # (unless that event wrote a checkpoint, which is atomic and then durable).
    size = wal(tmp_path).stat().st_size if list(tmp_path.glob("wal.*")) else 0
    [out] = drive(crashed, store, events[cut : cut + 1])
    store.close()
    if any(isinstance(e, Persist) and e.key == "checkpoint" for e in out):
        drive(reference, None, events[cut : cut + 1])
        cut += 1
    elif any(isinstance(e, Persist) for e in out):
        # Tear the event's first record (it may write more: held updates taken after a
        # flush); records are about the same size, each carrying one delta.
        records = sum(isinstance(e, Persist) for e in out)
        end = wal(tmp_path).stat().st_size
        with wal(tmp_path).open("r+b") as f:
            f.truncate(size + (end - size) // (2 * records))
    back = recover(tmp_path, make_root)
    same(back.snapshot(), reference.snapshot())
    # Updates held over a site's intake quota were never acked: after reconnecting, their
    # sites resend them (in their original order); the uncrashed root holds them already
    # (and is at the point the crash was: it did not see the torn event).
    order = {(e.msg.src, e.msg.seq): i for i, e in enumerate(events) if isinstance(e.msg, Update)}  # type: ignore[union-attr]
    held = sorted(
        (u for us in reference._held.values() for u in us), key=lambda u: order[(u.src, u.seq)]
    )
    # From here on both behave identically, byte for byte.
    hellos: list[Event] = [Received(s, Hello(s, "site")) for s in SITES]
    rest = hellos + [Received(u.src, u) for u in held] + events[cut:]
    same(sends(drive(back, None, rest)), sends(drive(reference, None, rest)))
    same(back.snapshot(), reference.snapshot())
    assert back.version == reference.version > 0


def site_events() -> list[Event]:
    events: list[Event] = [PeerUp("agg")]
    for job in range(1, 6):
        events.append(Received("agg", TrainRequest(job, job - 1, weights(job - 1.0), {"lr": 1})))
        events.append(TrainDone(job, TrainResult(weights(job + 0.5), 9, {"loss": 1.0 / job})))
        if job % 2 == 0:
            events.append(Received("agg", Ack("s1", job - 1)))
    return events


def make_site() -> SiteNode:
    return SiteNode("s1", "agg", n_examples=9, seed=3)


@pytest.mark.parametrize("checkpoint_at", [None, 3, 8])
def test_recovered_site_resends_exactly_its_unacked_updates(
    tmp_path: Path, checkpoint_at: int | None
) -> None:
    events = site_events()
    store, _ = reopen(tmp_path)
    live = make_site()
    for i, ev in enumerate(events):
        out = live.handle(ev, 0.0)
        store.apply_many([e for e in out if isinstance(e, Persist)])
        if i == checkpoint_at:  # the driver checkpoints sites now and then
            store.apply(Persist("checkpoint", live.snapshot()))
    store.close()
    back = recover(tmp_path, make_site)
    assert back.seq == live.seq == 5 and back.pending == live.pending == 3
    resent = [m for p, m in sends([back.handle(PeerUp("agg"), 0.0)]) if isinstance(m, Update)]
    expected = [m for p, m in sends([live.handle(PeerUp("agg"), 0.0)]) if isinstance(m, Update)]
    assert [u.seq for u in resent] == [2, 4, 5]
    same(resent, expected)


def make_region() -> RegionalAggregator:
    return RegionalAggregator("r", "root", SITES, buffer_size=2, concurrency=0, checkpoint_every=2)


def region_events() -> list[Event]:
    events: list[Event] = [Received("root", ModelBroadcast(0, weights(0.0)))]
    events += [Received(s, Hello(s, "site")) for s in SITES]
    for ev in update_stream(20):
        assert isinstance(ev, Received) and isinstance(ev.msg, Update)
        m = ev.msg
        events.append(Received(m.src, Update(m.src, m.seq, 0, m.delta, 10)))
    events.insert(12, Received("root", Ack("r", 1)))
    return events


@pytest.mark.parametrize(
    "n",
    [
        3,
        9,
        16,
    ],
)
def test_recovered_region_equals_one_that_never_crashed(tmp_path: Path, n: int) -> None:
    events = region_events()
    store, _ = reopen(tmp_path)
    live = make_region()
    drive(live, store, events[: 5 + n])
    store.close()
    back = recover(tmp_path, make_region)
    same(back.snapshot(), live.snapshot())
    assert back.pending == live.pending and back.seq == live.seq


def test_a_long_running_site_keeps_its_state_directory_small(tmp_path: Path) -> None:
    """Each update is logged with its delta; the checkpoint a drained outbox writes
    deletes those logs, so the directory does not grow with the number of rounds."""
    site = SiteNode("s1", "agg")
    weights = {"w": np.zeros(250_000, np.float32)}  # 1 MB per logged delta
    sizes = []
    with StateStore(tmp_path) as store:
        store.load()
        for r in range(8):
            out = site.handle(Received("agg", TrainRequest(r, r, weights)), float(r))
            [train] = [e for e in out if isinstance(e, Train)]
            done = TrainDone(train.job, TrainResult({"w": weights["w"] + 1}, 5))
            out = site.handle(done, float(r))
            store.apply_many([e for e in out if isinstance(e, Persist)])
            out = site.handle(Received("agg", Ack("s1", r + 1)), float(r))
            store.apply_many([e for e in out if isinstance(e, Persist)])
            sizes.append(sum(f.stat().st_size for f in tmp_path.iterdir()))
    assert max(sizes) < 100_000  # no delta left on disk once acknowledged
    _, recovery = reopen(tmp_path)
    restored = SiteNode("s1", "agg")
    restored.restore(recovery.checkpoint, recovery)
    assert restored.seq == 8 and restored.pending == 0
