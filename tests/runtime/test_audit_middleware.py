"""The audit middleware around real nodes (``LayeredNode`` with a real FedBuff root and a
real site) and the writer thread under a slow disk: what is recorded for updates, refusals,
rejections and datasets; each update once; the event loop's calls never wait for the disk,
and what a full queue could not take is counted and recorded as a gap."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from fedloom.algorithms.protocol import (
    Log,
    Metric,
    PeerDown,
    PeerUp,
    Received,
    Send,
    TrainDone,
    TrainResult,
)
from fedloom.federation.factory import Neighbours, build_node
from fedloom.federation.params import AlgorithmConfig, TrainingConfig
from fedloom.runtime.audit import (
    REJECTIONS_PER_WINDOW,
    AuditLog,
    AuditMiddleware,
    AuditWriter,
    DaemonAudit,
    dataset_of,
    read_entries,
    verify_log,
)
from fedloom.runtime.middleware import LayeredNode
from fedloom.transport.e2e import tensors_digest
from fedloom.transport.identity import Identity
from fedloom.transport.roster import Roster, RosterEntry
from fedloom.transport.wire import Ack, TrainRefused, TrainRequest, Update
from tests.algorithms.alg_helpers import hello, model, recv, upd

pytestmark = pytest.mark.timeout(30)

SITES = {"s1": "site", "s2": "site"}
TRAINING = TrainingConfig(lr=0.1, local_steps=1, batch_size=4, mu=0.0)


def fields(state: Path, kind: str) -> list[dict[str, Any]]:
    return [e["fields"] for e in read_entries(state, [kind])]


def layered_root(state: Path) -> tuple[LayeredNode, AuditMiddleware]:
    node = build_node(
        "root",
        "root",
        "fedbuff",
        AlgorithmConfig(buffer_size=2, concurrency=2),
        TRAINING,
        Neighbours(children=SITES),
        seed=0,
        weights=model(0.0),
    )
    writer = AuditWriter(AuditLog(state, "root"))
    writer.start()
    mw = AuditMiddleware(writer, "root", "root", model=lambda: node.current_model())  # type: ignore[attr-defined]
    return LayeredNode(node, [mw]), mw


def test_the_root_records_each_update_once_and_each_version(tmp_path: Path) -> None:
    root, mw = layered_root(tmp_path)
    for s in SITES:
        root.handle(hello(s), 0.0)
    delta = {k: v + 0.25 for k, v in model().items()}
    root.handle(recv("s1", Update("s1", 1, 0, delta, 10, 1, 1)), 1.0)
    root.handle(recv("s1", Update("s1", 1, 0, delta, 10, 1, 1)), 1.5)  # a resend: re-acked
    root.handle(recv("s2", upd("s2", 1, 0, 0.5, task=2)), 2.0)  # fills the buffer: v1
    root.handle(recv("s2", upd("s2", 2, 0, 0.5, task=3)), 2.5)  # on v0, applied to v1
    assert mw.writer.flush(10)
    applied = fields(tmp_path, "update_applied")
    assert [(f["src"], f["seq"]) for f in applied] == [("s1", 1), ("s2", 1), ("s2", 2)]
    assert applied[0]["digest"] == tensors_digest(delta).hex()
    assert applied[0]["n_examples"] == 10 and applied[0]["base_version"] == 0
    versions = fields(tmp_path, "model_version")
    assert [f["version"] for f in versions] == [1]
    assert versions[0]["digest"] == tensors_digest(root.current_model()[1]).hex()
    mw.writer.close()
    assert verify_log(tmp_path).intact


def test_refusals_and_rejections_are_recorded_and_summarised(tmp_path: Path) -> None:
    root, mw = layered_root(tmp_path)
    for s in SITES:
        root.handle(hello(s), 0.0)
    reason = "plan not approved: sha256:ab\x1b[31m" + "x" * 500
    root.handle(recv("s1", TrainRefused("s1", 1, 0, "plan_not_approved", reason)), 1.0)
    # A hostile child: updates that are not its own, over and over.
    n = REJECTIONS_PER_WINDOW + 25
    for i in range(n):
        root.handle(recv("s2", upd("s1", i + 1)), 2.0 + i * 0.01)
    # s2's flood does not crowd out another child's entries.
    root.handle(recv("s1", TrainRefused("s1", 2, 0, "out_of_bounds", "lr 5 > 0.1")), 3.0)
    root.handle(recv("s2", upd("s1", 999)), 100.0)  # the next window: the summary first
    assert mw.writer.flush(10)
    refusal, second = fields(tmp_path, "refusal_received")
    assert second["code"] == "out_of_bounds"
    assert refusal["code"] == "plan_not_approved" and refusal["from"] == "s1"
    assert len(refusal["reason"]) <= 200 and "\x1b" not in refusal["reason"]
    rejected = fields(tmp_path, "input_rejected")
    assert len(rejected) == REJECTIONS_PER_WINDOW + 1
    assert rejected[0] == {"metric": "update_rejected", "reason": "src_mismatch", "peer": "s2"}
    (summary,) = fields(tmp_path, "rejections_summarised")
    assert summary["count"] == n - REJECTIONS_PER_WINDOW
    assert summary["reasons"] == {"s2: src_mismatch": n - REJECTIONS_PER_WINDOW}
    mw.writer.close()


def test_a_site_records_its_updates_refusals_and_the_data_it_used(tmp_path: Path) -> None:
    site = build_node(
        "site",
        "s1",
        "fedbuff",
        AlgorithmConfig(),
        TRAINING,
        Neighbours(parent="root"),
        seed=0,
        n_examples=10,
    )
    writer = AuditWriter(AuditLog(tmp_path, "s1"))
    writer.start()
    record = SimpleNamespace(name="icu", tags=("icu-2025",), sha256="ab" * 32, rows=120)
    plan = SimpleNamespace(dataset_record=record)
    mw = AuditMiddleware(writer, "s1", "site", plan=plan)
    layered = LayeredNode(site, [mw])
    layered.handle(Received("root", TrainRequest(7, 3, model(1.0), {"lr": 0.1})), 0.0)
    trained = {k: v + 1.0 for k, v in model(1.0).items()}
    out = layered.handle(TrainDone(1, TrainResult(trained, 10)), 1.0)
    layered.handle(Received("root", TrainRequest(8, 4, model(2.0), {"lr": 0.1})), 2.0)
    layered.handle(PeerDown("root"), 3.0)
    layered.handle(PeerUp("root"), 4.0)  # the unacked update is sent again
    assert writer.flush(10)
    (used, used2) = fields(tmp_path, "dataset_used")
    assert used == {
        "job": 1,
        "version": 3,
        "dataset": {"name": "icu", "tags": ["icu-2025"], "sha256": "ab" * 32, "rows": 120},
    }
    assert used2["version"] == 4
    (sent,) = fields(tmp_path, "update_sent")  # once, though resent
    (update,) = [e.msg for e in out if hasattr(e, "msg") and isinstance(e.msg, Update)]
    assert sent["seq"] == update.seq and sent["base_version"] == 3 and sent["to"] == "root"
    assert (
        sent["digest"]
        == tensors_digest({k: v.astype(np.float32) for k, v in update.delta.items()}).hex()
    )
    received = fields(tmp_path, "model_received")
    assert [f["version"] for f in received] == [3, 4]
    # A refusal the site sends (a Flower plan failing, an unapproved plan, ...).
    mw.observe(
        Received("root", TrainRequest(9, 4, model(2.0))),
        [Send("root", TrainRefused("s1", 9, 4, "dataset_revoked", "dataset icu revoked"))],
        5.0,
    )
    assert writer.flush(10)
    (refused,) = fields(tmp_path, "train_refused")
    assert refused == {
        "to": "root",
        "task": 9,
        "version": 4,
        "code": "dataset_revoked",
        "reason": "dataset icu revoked",
    }
    writer.close()
    assert verify_log(tmp_path).intact


def test_dataset_of_names_the_plan_without_a_registered_dataset() -> None:
    assert dataset_of(None) == {"plan": "none"}
    assert dataset_of(SimpleNamespace()) == {"plan": "SimpleNamespace"}
    mapping = SimpleNamespace(dataset_record={"name": "a", "tags": ["t"], "sha256": "00", "x": 1})
    assert dataset_of(mapping) == {"dataset": {"name": "a", "tags": ["t"], "sha256": "00"}}


class StuckDisk:
    """An fsync that blocks until ``gate`` is set (20 s at the most); ``stuck`` is set once
    a write waits in it."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.stuck = threading.Event()

    def fsync(self, fd: int) -> None:
        self.stuck.set()
        self.gate.wait(20)
        os.fsync(fd)


def test_a_slow_disk_never_blocks_the_caller_and_nothing_is_lost_silently(
    tmp_path: Path,
) -> None:
    """fsync blocks until the test lets it go: every submit returns meanwhile (were one to
    wait for the disk, this test would hang until its timeout); what the bounded queue
    could not take is counted by kind and recorded as an audit_gap once the disk is back."""
    disk = StuckDisk()

    metrics: list[Metric] = []
    ident = Identity.generate("root", "root")
    log = AuditLog(tmp_path, "root", ident, fsync=disk.fsync)
    writer = AuditWriter(log, metrics.append, max_queue=10, slow_s=0.0)
    writer.start()
    assert writer.submit("daemon_start", {})
    assert disk.stuck.wait(10)  # the first batch is stuck in the disk
    accepted = [writer.submit("update_applied", {"i": i}) for i in range(25)]
    accepted += [writer.submit("model_version", {"version": 1})]
    assert accepted.count(True) == 10 and not disk.gate.is_set()  # all returned, disk still stuck
    assert writer.dropped_total == 16
    dropped = [m for m in metrics if m.name == "audit_dropped"]
    assert sum(m.value for m in dropped) == 16
    assert {(m.labels or {}).get("kind") for m in dropped} == {"update_applied", "model_version"}
    disk.gate.set()
    assert writer.flush(10)
    assert writer.close()
    entries = read_entries(tmp_path, public_key=ident.public_key)
    kinds = [e["kind"] for e in entries]
    assert kinds[0] == "daemon_start" and kinds.count("update_applied") == 10
    (gap,) = [e["fields"] for e in entries if e["kind"] == "audit_gap"]
    assert gap == {"dropped": 16, "kinds": {"model_version": 1, "update_applied": 15}}
    assert [e["fields"]["i"] for e in entries if e["kind"] == "update_applied"] == list(range(10))
    names = {m.name for m in metrics}
    assert {"audit_queue_size", "audit_slow_writes", "audit_entries"} <= names
    assert verify_log(tmp_path, ident.public_key).intact


def test_a_failed_fsync_is_recorded_not_rewritten(tmp_path: Path) -> None:
    failures = [OSError(28, "No space left on device")] * 2

    def failing_fsync(fd: int) -> None:
        if failures:
            raise failures.pop()
        os.fsync(fd)

    metrics: list[Metric] = []
    writer = AuditWriter(AuditLog(tmp_path, "n", fsync=failing_fsync), metrics.append)
    for i in range(5):
        writer.submit("tick", {"i": i})
    writer.start()  # one batch of 5: its fsync fails, then the note's fsync fails too
    assert writer.flush(10) and writer.close()
    assert sum(1 for m in metrics if m.name == "audit_write_errors") == 2
    verdict = verify_log(tmp_path)
    assert verdict.intact  # each entry once, the chain whole
    kinds = [(e["kind"], e["fields"]) for e in verdict.entries]
    assert kinds == [
        *(("tick", {"i": i}) for i in range(5)),
        ("audit_sync_failed", {"from_seq": 1, "to_seq": 5, "error": "No space left on device"}),
        ("audit_sync_failed", {"from_seq": 6, "to_seq": 6, "error": "No space left on device"}),
    ]


def test_a_stalled_disk_does_not_pin_tensors(tmp_path: Path) -> None:
    """Past ``max_thunks`` queued digests (each holds a model's arrays until computed),
    entries go in without their digest and say why."""
    disk = StuckDisk()

    writer = AuditWriter(AuditLog(tmp_path, "s1", fsync=disk.fsync), max_thunks=2)
    mw = AuditMiddleware(writer, "s1", "site")
    writer.start()
    writer.submit("daemon_start", {})
    assert disk.stuck.wait(10)
    for seq in range(1, 5):
        update = Update("s1", seq, 0, model(float(seq)), 10)
        mw.observe(PeerUp("root"), [Send("root", update)], float(seq))
    assert writer.digests_skipped == 2
    disk.gate.set()
    assert writer.flush(10) and writer.close()
    sent = fields(tmp_path, "update_sent")
    assert [f["seq"] for f in sent] == [1, 2, 3, 4]
    assert [f["digest"] is not None for f in sent] == [True, True, False, False]
    assert sent[1]["digest"] == tensors_digest(model(2.0)).hex()
    assert sent[3]["digest_skipped"] == "audit writer behind"


def test_secure_cohorts_and_roster_installs_are_recorded(tmp_path: Path) -> None:
    writer = AuditWriter(AuditLog(tmp_path, "root"))
    writer.start()
    mw = DaemonAudit(writer, "root", "root")
    applied = Log("info", "secure cohort applied", {"members": 3, "survivors": 2, "version": 4})
    effects = [applied, Send("s1", Ack("s1", 7)), Send("s2", Ack("s2", 9))]
    mw.observe(PeerUp("s1"), effects, 1.0)
    seen: list[int] = []
    roster = Roster(3, [RosterEntry("s1", "site", Identity.generate("s1").public_key)])
    installed = mw.on_roster(lambda r: seen.append(r.version))
    installed(roster)
    assert seen == [3]  # the daemon's own hook still runs, first
    assert writer.flush(10) and writer.close()
    assert fields(tmp_path, "secure_cohort_applied") == [
        {
            "members": 3,
            "survivors": 2,
            "version": 4,
            "pairs": [["s1", 7], ["s2", 9]],
            "pairs_total": 2,
        }
    ]
    assert fields(tmp_path, "roster_installed") == [{"version": 3, "digest": roster.digest.hex()}]
