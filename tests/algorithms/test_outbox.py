"""The outbox's window: acknowledgement-paced resend, bounds derived from the model and
the parent's ledger, refused updates retried, and a state machine of acks in any order,
duplicates, drops, holds and reconnects against a real ``AppliedLedger``."""

from __future__ import annotations

import math
from collections import deque

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from fedloom.algorithms.ledger import MAX_ABOVE, AppliedLedger
from fedloom.algorithms.outbox import (
    DEFAULT_OUTBOX_UPDATES,
    METRICS_EVERY_S,
    RESEND_AFTER_S,
    WINDOW,
    WINDOW_MESSAGES_OF_CAP,
    Outbox,
)
from fedloom.algorithms.protocol import Effect, Metric, Persist, Send
from fedloom.runtime.connection import DEFAULT_MAX_QUEUE, QUEUE_MESSAGES_OF_CAP
from fedloom.transport.limits import Limits
from fedloom.transport.wire import Update

SMALL = {"w": np.zeros(8, dtype=np.float32)}


def update(seq: int, delta: dict[str, np.ndarray] = SMALL) -> Update:
    return Update("s", seq, 0, delta, 1)


def sent(effects: list[Effect]) -> list[int]:
    return [e.msg.seq for e in effects if isinstance(e, Send) and isinstance(e.msg, Update)]


def backlog(n: int, delta: dict[str, np.ndarray] = SMALL, **kwargs: object) -> Outbox:
    """An outbox that made ``n`` updates while its parent was unreachable."""
    box = Outbox("k", **kwargs)  # type: ignore[arg-type]
    box.link_down()
    for _ in range(n):
        assert sent(box.push("p", update(box.next_seq(), delta))) == []
    return box


def test_a_backlog_is_resent_a_window_at_a_time_and_each_ack_releases_the_next() -> None:
    box = backlog(3000)
    first = sent(box.resend("p"))
    assert first == list(range(1, WINDOW + 1))  # the oldest, in seq order, up to the window
    assert WINDOW < DEFAULT_MAX_QUEUE and WINDOW <= MAX_ABOVE
    order = list(first)
    for seq in range(1, 3001):
        more = sent(box.ack(seq))
        assert len(more) == (1 if seq + WINDOW <= 3000 else 0)
        order += more
        assert box.in_flight <= WINDOW
    assert order == list(range(1, 3001)) and len(box) == 0 and box.bytes == 0


def test_the_window_in_bytes_fits_the_send_queue_of_any_model_size() -> None:
    for n in (8, 10_000, 3_000_000):  # 32 B, 40 KB, 12 MB of float32
        delta = {"w": np.zeros(n, dtype=np.float32)}
        box = backlog(100, delta)
        burst = sent(box.resend("p"))
        queue_cap = QUEUE_MESSAGES_OF_CAP * Limits.for_model(delta).max_message_bytes
        assert 1 <= len(burst) <= WINDOW
        assert box.in_flight_bytes <= queue_cap // 2  # the rest is for other messages
        assert len(burst) == box.effective_window()
    assert box.effective_window() == 2  # a 12 MB model: two in flight


def test_each_model_shape_gets_the_window_of_its_own_size_cap() -> None:
    # Caps are kept by model shape (100,000 simulated outboxes share one model): a model
    # seen before, or another one between, gets exactly the cap derived afresh.
    for n, dtype, names in [
        (8, np.float32, "w"),
        (10_000, np.float32, "w"),
        (8, np.int32, "w"),
        (8, np.float32, "wv"),
        (10_000, np.float32, "w"),
        (8, np.float32, "w"),
    ]:
        delta = {name: np.zeros(n, dtype) for name in names}
        cap = Limits.for_model(delta).max_message_bytes
        assert backlog(1, delta).window_bytes() == WINDOW_MESSAGES_OF_CAP * cap


def test_an_update_larger_than_the_byte_budget_still_goes_alone() -> None:
    box = backlog(3, window_bytes=10)
    assert sent(box.resend("p")) == [1]
    assert sent(box.ack(1)) == [2]


def test_acks_in_any_order_and_re_acked_duplicates_release_slots() -> None:
    box = backlog(200, window=4)
    assert sent(box.resend("p")) == [1, 2, 3, 4]
    assert sent(box.ack(1)) == [5]
    assert sent(box.ack(1)) == []  # a duplicate ack of something gone: ignored
    # 3 acked before 2: 2 was seen and not acked (held or dropped): its slot is freed and
    # it is retried after RESEND_AFTER_S, not at once; nothing beyond 2 + window - 1 goes.
    assert sent(box.ack(3, now=1.0)) == []
    assert box.in_flight == 2  # 4 and 5
    assert box.next_deadline() == 1.0 + RESEND_AFTER_S
    assert sent(box.on_deadline(1.0 + RESEND_AFTER_S - 0.1)) == []
    assert sent(box.on_deadline(1.0 + RESEND_AFTER_S)) == [2]
    assert sent(box.ack(4, now=7.0)) == []
    # This ack of 2 may answer the first copy (held, decided late) or the second: the
    # second keeps its slot until its re-ack, so the window opens by the acked 5 only.
    assert sent(box.ack(2, now=7.0)) == [6, 7]
    assert sent(box.ack(5, now=7.0)) == [8]
    assert sent(box.ack(2, now=7.0)) == [9]  # the re-ack of the second copy


def test_the_window_never_spans_more_seqs_than_the_ledger_keeps_out_of_order() -> None:
    """The parent drops seq 1 every time; the others are acked. Sending stops at 1 + window
    - 1, so the ledger's out-of-order set never overflows into skipping seq 1."""
    box = backlog(500)
    ledger = AppliedLedger()
    out = box.resend("p")
    now = 0.0
    for _ in range(2000):
        seqs = sent(out)
        if not seqs:
            now += RESEND_AFTER_S
            out = box.on_deadline(now)
            if not sent(out):
                break
            continue
        out = []
        for seq in seqs:
            if seq == 1:
                continue  # dropped, unacked
            ledger.record("s", seq)
            out += box.ack(seq, now=now)
        assert not ledger.seen("s", 1)  # never skipped over
        assert len(ledger.snapshot()["above"].get("s", [])) <= MAX_ABOVE
    # Stalled at the span, 1 retried every RESEND_AFTER_S; nothing later was sent.
    assert [u.seq for u in box.pending()] == [1, *range(WINDOW + 1, 501)]
    assert max(ledger.snapshot()["above"]["s"]) == WINDOW
    # Once the parent takes 1, the rest flows (1's last copy keeps a slot: the ack may
    # have answered an earlier one, so the count errs on the side of the send queue).
    ledger.record("s", 1)
    assert sent(box.ack(1, now=now)) == list(range(WINDOW + 1, 2 * WINDOW))


def test_nothing_is_sent_while_the_link_is_down_and_everything_is_persisted() -> None:
    box = Outbox("k")
    box.link_down()
    effects = box.push("p", update(box.next_seq()))
    assert [type(e) for e in effects] == [Persist]
    assert sent(box.resend("p")) == [1]
    box.link_down()
    assert sent(box.ack(1)) == []  # a late ack still forgets it
    assert len(box) == 0


def test_a_full_outbox_is_reported_in_bytes() -> None:
    delta = {"w": np.zeros(1000, dtype=np.float32)}
    box = backlog(DEFAULT_OUTBOX_UPDATES - 1, delta)
    assert not box.full
    box.push("p", update(box.next_seq(), delta))
    assert box.full and box.bytes == DEFAULT_OUTBOX_UPDATES * 4000
    box.resend("p")
    box.ack(1)
    assert not box.full
    capped = backlog(3, delta, max_bytes=8000)
    assert capped.full and capped.limit_bytes() == 8000


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="window"):
        Outbox("k", window=MAX_ABOVE + 1)
    with pytest.raises(ValueError, match="max_bytes"):
        Outbox("k", max_bytes=0)
    with pytest.raises(ValueError, match="resend_after_s"):
        Outbox("k", resend_after_s=0.0)


def test_restore_rebuilds_the_bytes_and_sends_from_the_oldest() -> None:
    box = backlog(10)
    again = Outbox("k", window=3)
    again.restore(box.snapshot())
    assert again.bytes == box.bytes
    assert sent(again.resend("p")) == [1, 2, 3]


# ------------------------------------------------------------------ state machine
HELD = 2  # a parent holds at most this many updates to decide later (an intake quota)


class WindowMachine(RuleBasedStateMachine):
    """An outbox against a parent over an in-order link that may drop: the parent acks,
    drops (unacked) or holds what it gets, re-acks duplicates, and acks held updates
    later in any order; the link may break and come back."""

    @initialize(window=st.integers(1, 8), n=st.integers(0, 30))
    def start(self, window: int, n: int) -> None:
        self.box = Outbox("k", window=window)
        self.now = 0.0
        self.ledger = AppliedLedger()
        self.applied: list[int] = []
        self.up_link: deque[Update] = deque()  # outbox -> parent, in order
        self.down_link: deque[int] = deque()  # parent -> outbox acks, in order
        self.held: list[int] = []
        self.made = 0
        self.box.link_down()
        for _ in range(n):
            self.make()
        self._take(self.box.resend("p", now=self.now))

    def _take(self, effects: list[Effect]) -> None:
        for e in effects:
            if isinstance(e, Send):
                assert isinstance(e.msg, Update)
                self.up_link.append(e.msg)

    @rule()
    def make(self) -> None:
        self.made += 1
        self._take(self.box.push("p", update(self.box.next_seq()), now=self.now))

    @precondition(lambda self: self.up_link)
    @rule(what=st.sampled_from(["ack", "ack", "ack", "drop", "hold"]))
    def parent_gets(self, what: str) -> None:
        msg = self.up_link.popleft()
        seq = msg.seq
        if self.ledger.seen("s", seq):
            self.down_link.append(seq)  # a duplicate: re-acked, never applied again
        elif seq in self.held or what == "drop" or (what == "hold" and len(self.held) >= HELD):
            pass  # refused unacked
        elif what == "hold":
            self.held.append(seq)
        else:
            self._apply(seq)

    def _apply(self, seq: int) -> None:
        self.ledger.record("s", seq)
        self.applied.append(seq)
        self.down_link.append(seq)

    @precondition(lambda self: self.held)
    @rule(i=st.integers(0, HELD - 1))
    def parent_decides_held(self, i: int) -> None:
        self._apply(self.held.pop(i % len(self.held)))

    @precondition(lambda self: self.down_link)
    @rule()
    def ack_arrives(self) -> None:
        self._take(self.box.ack(self.down_link.popleft(), now=self.now))

    @rule(dt=st.floats(0.1, 2 * RESEND_AFTER_S))
    def time_passes(self, dt: float) -> None:
        self.now += dt
        due = self.box.next_deadline()
        if due is not None and due <= self.now:
            self._take(self.box.on_deadline(self.now))

    @rule()
    def link_breaks_and_heals(self) -> None:
        self.up_link.clear()
        self.down_link.clear()
        self.held.clear()  # a parent drops what it held from a child that went down
        self.box.link_down()
        self._take(self.box.resend("p", now=self.now))

    @invariant()
    def bounded(self) -> None:
        assert self.box.in_flight <= self.box.window
        # Each copy on the link is counted in flight, but for copies of held updates
        # acked late (the ack is ambiguous: at most one per held update).
        assert len(self.up_link) <= self.box.window + HELD
        above = self.ledger.snapshot()["above"].get("s", [])
        assert len(above) < self.box.window <= MAX_ABOVE  # the ledger never skips a seq
        assert len(self.applied) == len(set(self.applied))  # applied at most once

    def teardown(self) -> None:
        if not hasattr(self, "box"):
            return
        # Heal everything: the parent acks all it gets; the backlog drains completely.
        self.held.clear()
        self.link_breaks_and_heals()
        for _ in range(100 * (self.made + 1)):
            if self.up_link:
                msg = self.up_link.popleft()
                if self.ledger.seen("s", msg.seq):
                    self.down_link.append(msg.seq)
                else:
                    self._apply(msg.seq)
            elif self.down_link:
                self.ack_arrives()
            elif len(self.box):
                self.time_passes(RESEND_AFTER_S)
            else:
                break
        assert len(self.box) == 0
        assert sorted(self.applied) == list(range(1, self.made + 1))


TestWindowMachine = WindowMachine.TestCase
TestWindowMachine.settings = settings(max_examples=150, stateful_step_count=60, deadline=None)


def test_gauges_are_reported_when_due_with_the_values_of_the_moment() -> None:
    """``metrics`` reports every gauge (equal to a freshly made Metric) when something
    changed or the gauges are due again, nothing in between; ``metrics_due`` says which.
    Recurring values may come back as one shared (immutable) effect, but a value is never
    taken for an equal one of another type or sign."""
    box = Outbox("k")
    assert box.metrics_due(0.0)
    first = box.metrics(0.0, dispatch_paused=0.0, held=0.0, kept=3.0)
    assert first == [
        Metric("outbox_updates", 0.0),
        Metric("outbox_bytes", 0.0),
        Metric("outbox_in_flight", 0.0),
        Metric("outbox_window", float(WINDOW)),
        Metric("parent_up", 1.0),
        Metric("parent_ack_age_seconds", 0.0),
        Metric("dispatch_paused", 0.0),
        Metric("held", 0.0),
        Metric("kept", 3.0),
    ]
    assert not box.metrics_due(1.0) and box.metrics(1.0, dispatch_paused=0.0) == []
    box.push("p", update(1), now=2.0)
    assert box.metrics_due(2.0)
    odd = {"held": -0.0, "kept": 3}  # equal to the values above, not the same
    again = {m.name: m for m in box.metrics(2.0, **odd)}  # type: ignore[arg-type, union-attr]
    held, kept = again["held"].value, again["kept"].value
    assert math.copysign(1.0, held) < 0.0 and type(kept) is int
    assert again["outbox_updates"] == Metric("outbox_updates", 1.0)
    assert again["outbox_in_flight"] == Metric("outbox_in_flight", 1.0)
    assert again["parent_up"] == first[4]
    assert not box.metrics_due(3.0)
    due = 2.0 + METRICS_EVERY_S  # pending updates: the gauges are refreshed
    assert box.next_deadline() == due and box.metrics_due(due)
    [age] = [m for m in box.metrics(due) if m.name == "parent_ack_age_seconds"]  # type: ignore[union-attr]
    assert age == Metric("parent_ack_age_seconds", METRICS_EVERY_S)
