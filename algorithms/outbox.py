"""The sender side of at-least-once delivery: numbered updates kept until acknowledged,
sent under an acknowledgement-paced window.

An update gets the next ``seq`` (1, 2, 3, ...), is persisted (``Persist(key, {"op": "add",
...}, append=True)``) and only then sent; it stays pending until the parent's ``Ack`` for
exactly that seq. The receiver's ledger turns duplicates into re-acks.

Flow control (a sliding window in the manner of TCP's, RFC 9293 §3.8.6, counted in
updates): on the current link at most ``window`` copies are in flight (sent, not answered
by an ack), their tensors at most ``window_bytes`` (one update always fits), and only seqs
below ``oldest pending + window`` are sent. Each ack releases a slot and sends the next
pending update, oldest first; after ``PeerUp`` (``resend``) sending starts again from the
oldest. So a backlog of thousands after a long outage drains at the pace the parent acks,
never all at once: that burst overflowed the connection's send queue (256 messages, or 4
messages of the link's size cap in bytes), which dropped the link, and every reconnect
resent everything again (a livelock, issue 13).

* Why these bounds: ``window`` ≤ ``ledger.MAX_ABOVE`` (64), so the parent's ledger never
  holds more out-of-order seqs than it keeps (beyond that it would jump its watermark over
  the gap and later take the missing update for a duplicate), and far below the send
  queue's 256 messages. ``window_bytes`` defaults to ``WINDOW_MESSAGES_OF_CAP`` (2) times
  the size cap ``transport.limits.Limits.for_model`` derives from the update's own model,
  half the queue's default byte cap (``runtime.connection.QUEUE_MESSAGES_OF_CAP`` = 4 of
  them): 64 updates of a 34 KB model, two of a 100 MB one. A sans-I/O node cannot see the
  queue; the window is its own rule, derived from the same model size as the queue's cap.
* Links deliver in order, so an ack for a copy means the parent has seen every copy sent
  before it on this link: one of those still unanswered was held or dropped (an intake
  quota, a region without a model). Its slot is released and the update is sent again
  once ``resend_after_s`` has passed (a deadline), so one refused update neither blocks
  the window until the next reconnect nor makes the parent's ledger skip it. A re-ack of a
  duplicate answers its copy like any ack. When an update whose first copy was refused
  that way is acked while a second copy is out, the ack may answer either (a held copy
  decided late, or the second): the second keeps its slot until its own re-ack, a later
  copy's ack or ``resend_after_s``, so the count errs on the side of the send queue.

Kept updates: a node may keep updates after their ack (a region's forwards until a
parent region settles them). ``resend(parent, kept=...)`` sends those once more on the
new link, oldest first and ahead of the pending ones, under the same window, so a long
list of them never leaves at once either; an ack (or ``ack`` on settling) answers each.

Backpressure: ``bytes`` counts the pending updates' tensors; ``full`` says they reached
``max_bytes`` (None: ``DEFAULT_OUTBOX_UPDATES`` updates of the size of the largest one
pending); ``full_with(kept)`` counts the node's kept updates too. The outbox only reports
it: its node stops making new updates (a region stops dispatching tasks, a site stops
starting training) until acks drain it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any, Final

from fedloom.algorithms.ledger import MAX_ABOVE
from fedloom.algorithms.protocol import Effect, Metric, Persist, Send
from fedloom.transport.limits import Limits
from fedloom.transport.wire import Update

__all__ = [
    "DEFAULT_OUTBOX_UPDATES",
    "OUTBOX_GAUGES",
    "RESEND_AFTER_S",
    "WINDOW",
    "WINDOW_MESSAGES_OF_CAP",
    "Outbox",
    "update_bytes",
]

WINDOW = MAX_ABOVE  # updates in flight at most: what the parent's ledger keeps out of order
WINDOW_MESSAGES_OF_CAP = 2  # in-flight bytes: this many messages of the model's size cap
RESEND_AFTER_S = 5.0  # an update the parent saw and did not ack is sent again after this
DEFAULT_OUTBOX_UPDATES = 16  # backpressure default: this many updates' worth of bytes
METRICS_EVERY_S = 10.0  # while updates wait: how often the gauges (ack age) are refreshed


def update_bytes(update: Update) -> int:
    """Tensor bytes of ``update``'s delta (what it costs to hold, and what a send queue
    counts against its byte cap)."""
    delta = update.delta
    if type(delta) is not dict and not isinstance(delta, Mapping):  # dict: no ABC check
        return 0
    total = 0
    for arr in delta.values():  # a loop, not sum() of a generator: once per update
        total += int(getattr(arr, "nbytes", 0))
    return total


# Size caps by model shape ((name, shape, dtype) of each tensor): every outbox derives its
# window once, and a simulation builds 100,000 of them for one model.
_CAPS: dict[tuple[Any, ...], int] = {}
_CAPS_KEPT = 64


def _window_bytes_for(update: Update) -> int:
    """``WINDOW_MESSAGES_OF_CAP`` messages of the size cap of ``update``'s model."""
    delta = update.delta
    if not isinstance(delta, Mapping) or not delta:
        return 1
    try:
        key: tuple[Any, ...] | None = tuple(
            (name, arr.shape, arr.dtype.str) for name, arr in delta.items()
        )
        cap = _CAPS.get(key)  # type: ignore[arg-type]
    except (AttributeError, TypeError):  # not arrays, or unhashable names: no shortcut
        key, cap = None, None
    if cap is None:
        try:
            cap = Limits.for_model(delta).max_message_bytes
        except (TypeError, ValueError):  # not shaped like a model: fall back to its own size
            return max(1, WINDOW_MESSAGES_OF_CAP * update_bytes(update))
        if key is not None and len(_CAPS) < _CAPS_KEPT:
            _CAPS[key] = cap
    return max(1, WINDOW_MESSAGES_OF_CAP * cap)


# The gauges ``Outbox.metrics`` reports itself (before its node's ``extra`` ones).
OUTBOX_GAUGES: Final = frozenset(
    {
        "outbox_updates",
        "outbox_bytes",
        "outbox_in_flight",
        "outbox_window",
        "parent_up",
        "parent_ack_age_seconds",
    }
)

# Gauge effects by (name, value), shared by every outbox: a Metric is immutable, and the
# same few values (counts, 0/1 flags) recur on every event of every node.
_GAUGES: dict[tuple[str, float], Metric] = {}
_GAUGES_KEPT: Final = 4096


def _gauge(name: str, value: float) -> Metric:
    """``Metric(name, value)``, the one made before for these if there is one."""
    if type(value) is not float or (value == 0.0 and math.copysign(1.0, value) < 0.0):
        return Metric(name, value)  # only exact keys: 1 == 1.0 and -0.0 == 0.0 as keys
    key = (name, value)
    metric = _GAUGES.get(key)
    if metric is None:
        metric = Metric(name, value)
        if len(_GAUGES) < _GAUGES_KEPT:
            _GAUGES[key] = metric
    return metric


class Outbox:
    """Pending updates from one source to one parent, in seq order, sent under a window."""

    __slots__ = (
        "_derived_window_bytes",
        "_dirty",
        "_extra",
        "_ghost_until",
        "_key",
        "_last_ack",
        "_metrics_at",
        "_omit",
        "_out",
        "_parent",
        "_pending",
        "_quiet",
        "_released",
        "_retry_at",
        "_sends",
        "_sizes",
        "_unit",
        "_up",
        "_window_bytes",
        "bytes",
        "max_bytes",
        "resend_after_s",
        "seq",
        "window",
    )

    def __init__(
        self,
        key: str,
        *,
        window: int = WINDOW,
        window_bytes: int | None = None,
        max_bytes: int | None = None,
        resend_after_s: float = RESEND_AFTER_S,
    ) -> None:
        if not 1 <= window <= MAX_ABOVE:
            raise ValueError(f"window must be 1..{MAX_ABOVE} (the ledger's bound), got {window}")
        if window_bytes is not None and window_bytes < 1:
            raise ValueError(f"window_bytes must be >= 1 or None, got {window_bytes}")
        if max_bytes is not None and max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1 or None, got {max_bytes}")
        if not 0.0 < resend_after_s < math.inf:
            raise ValueError(f"resend_after_s must be > 0 and finite, got {resend_after_s}")
        self._key = key
        self._omit: frozenset[str] = frozenset()  # gauges nobody reads (``omit_gauges``)
        self._quiet = False  # all of this outbox's own gauges are omitted
        self.window = window
        self._window_bytes = window_bytes  # None: derived from the updates' model
        self._derived_window_bytes: int | None = None  # the model's, once an update shows it
        self.max_bytes = max_bytes
        self.resend_after_s = resend_after_s
        self._pending: dict[int, Update] = {}  # insertion order == seq order
        # Acked updates the node still keeps, to send once more on this link (``resend``).
        self._extra: dict[int, Update] = {}
        self._sizes: dict[int, int] = {}  # seq -> tensor bytes (pending, and copies in flight)
        self.bytes = 0  # tensor bytes of the pending updates
        self._unit = 0  # the largest update's bytes (one model: all the same size)
        self.seq = 0
        # The link: None/up until told otherwise, so a node that never sees PeerUp still sends.
        self._parent: str | None = None
        self._up = True
        self._sends = 0  # copies sent so far: the order they leave in
        self._out: dict[int, int] = {}  # seq -> send number of its copy in flight
        self._released: set[int] = set()  # seqs a copy of which the parent saw, unacked
        self._retry_at: dict[int, float] = {}  # seq -> when a refused update may go again
        self._ghost_until: dict[int, float] = {}  # acked seq -> when its copy stops counting
        # When the parent last acked, or updates began to wait (after a restore: the first
        # link up). A reconnect does not reset it, so a link that keeps coming up without
        # any ack shows as a growing age.
        self._last_ack: float | None = None
        self._metrics_at: float | None = None  # when the gauges were last reported
        self._dirty = True

    def __len__(self) -> int:
        return len(self._pending)

    # ------------------------------------------------------------- reading
    @property
    def in_flight(self) -> int:
        """Copies sent on the current link and not yet answered by an ack."""
        return len(self._out)

    @property
    def in_flight_bytes(self) -> int:
        return sum(self._sizes.get(s, 0) for s in self._out)

    @property
    def link_up(self) -> bool:
        return self._up

    def window_bytes(self) -> int | None:
        """The in-flight byte budget (None until an update gives the model's size)."""
        if self._window_bytes is not None:
            return self._window_bytes
        if self._derived_window_bytes is None:  # one model per outbox: derived once
            newest = next(reversed(self._pending.values()), None)
            if newest is None:
                newest = next(iter(self._extra.values()), None)
            if newest is None:
                return None
            self._derived_window_bytes = _window_bytes_for(newest)
        return self._derived_window_bytes

    def effective_window(self) -> int:
        """Updates the window lets fly at once for updates of the current size."""
        budget = self.window_bytes()
        unit = self._unit
        if budget is None or unit <= 0:
            return self.window
        fits = budget // unit  # max(1, min(window, fits)), without the builtins' calls
        return self.window if fits >= self.window else fits if fits >= 1 else 1

    def limit_bytes(self) -> int | None:
        """The backpressure bound: ``max_bytes``, else ``DEFAULT_OUTBOX_UPDATES`` of the
        largest update (None while nothing is pending)."""
        if self.max_bytes is not None:
            return self.max_bytes
        if not self._pending or not self._unit:
            return None
        return DEFAULT_OUTBOX_UPDATES * self._unit

    @property
    def full(self) -> bool:
        """Pending updates hold ``limit_bytes()`` or more: make no new ones."""
        limit = self.limit_bytes()
        return limit is not None and self.bytes >= limit

    def full_with(self, kept: Iterable[Update]) -> bool:
        """``full``, counting also ``kept``: updates acknowledged that the node still keeps
        (memory and checkpoint alike), of which none is pending here."""
        sizes = [update_bytes(u) for u in kept]
        total = self.bytes + sum(sizes)
        if self.max_bytes is not None:
            return total >= self.max_bytes
        limit = DEFAULT_OUTBOX_UPDATES * max([self._unit, *sizes])
        return total > 0 and total >= limit

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def pending(self) -> list[Update]:
        return list(self._pending.values())

    # ------------------------------------------------------------- events
    def push(self, parent: str, update: Update, *, now: float = 0.0) -> list[Effect]:
        """Record ``update`` (numbered by ``next_seq``): Persist, then Send if the window
        has room (else it goes when acks make room)."""
        self._parent = parent
        if not self._pending:
            self._last_ack = now  # nothing waited before: the age counts from here
        self._pending[update.seq] = update
        size = update_bytes(update)
        self._sizes[update.seq] = size
        self._unit = max(self._unit, size)
        self.bytes += size
        self._dirty = True
        out: list[Effect] = [
            Persist(self._key, {"op": "add", "seq": update.seq, "update": update}, append=True)
        ]
        out.extend(self._fill(now))
        return out

    def ack(self, seq: int, *, now: float = 0.0) -> list[Effect]:
        """The parent acknowledged ``seq``: forget it (Persist), release its window slot
        and those of copies it overtook, and send what now fits. An ack for something
        neither pending nor in flight is ignored."""
        out: list[Effect] = []
        answered = self._answer(seq, now)
        if self._extra.pop(seq, None) is not None:
            self._retry_at.pop(seq, None)
        update = self._pending.pop(seq, None)
        if update is not None:
            self.bytes -= self._sizes.get(seq, 0)
            self._retry_at.pop(seq, None)
            out.append(Persist(self._key, {"op": "ack", "seq": seq}, append=True))
        if seq not in self._out and seq not in self._pending:
            self._sizes.pop(seq, None)
        if update is None and not answered:
            return out
        self._last_ack = now
        self._dirty = True
        out.extend(self._fill(now))
        return out

    def resend(self, parent: str, *, now: float = 0.0, kept: Iterable[Update] = ()) -> list[Effect]:
        """The link to ``parent`` (re)started: send again from the oldest pending update,
        in seq order, up to the window; ``kept`` (acked updates the node still keeps, none
        pending) go first, once each, under the same window."""
        self._parent = parent
        self._up = True
        self._forget_link()
        for u in sorted(kept, key=lambda u: u.seq):
            if u.seq not in self._pending:
                self._extra[u.seq] = u
                size = self._sizes[u.seq] = update_bytes(u)
                self._unit = max(self._unit, size)
        if self._last_ack is None:
            self._last_ack = now
        self._dirty = True
        return self._fill(now)

    def replace(self, update: Update, *, now: float = 0.0) -> list[Effect]:
        """The parent refused pending ``update.seq`` unrecorded (``Overlap``) and it was
        rebuilt: the refused copy counts as answered, the new one takes its place (its node
        logs how to rebuild it) and is sent when the window allows."""
        seq = update.seq
        if seq not in self._pending:
            return []
        self._answer(seq, now)
        size = update_bytes(update)
        self.bytes += size - self._sizes.get(seq, 0)
        self._sizes[seq] = size
        self._pending[seq] = update
        self._retry_at.pop(seq, None)
        self._dirty = True
        return self._fill(now)

    def link_down(self) -> None:
        """The link is gone: nothing is in flight; nothing is sent until ``resend``."""
        self._up = False
        self._forget_link()
        self._dirty = True

    def next_deadline(self) -> float | None:
        """When a refused update may be sent again, or the gauges refreshed."""
        ghosts, retry = self._ghost_until, self._retry_at
        best = min(ghosts.values()) if ghosts else None
        if self._up and retry:
            t = min(retry.values())
            if best is None or t < best:
                best = t
        if self._pending and self._metrics_at is not None:
            t = self._metrics_at + METRICS_EVERY_S
            if best is None or t < best:
                best = t
        return best

    def on_deadline(self, now: float) -> list[Effect]:
        """Send what the window now allows (refused updates whose wait is over)."""
        return self._fill(now)

    def metrics_due(self, now: float) -> bool:
        """Whether ``metrics(now)`` reports anything: something changed since the last
        report, or the gauges are due again (a node asks before gathering its ``extra``)."""
        if self._dirty:
            return True
        at = self._metrics_at
        return at is None or (bool(self._pending) and now >= at + METRICS_EVERY_S)

    def omit_gauges(self, names: Iterable[str]) -> None:
        """Leave the gauges ``names`` out of ``metrics`` (its node's driver drops them
        unread: the simulator's live gauges, ``federation.step``); when and whether gauges
        are due is unchanged."""
        self._omit = frozenset(names)
        self._quiet = self._omit.issuperset(OUTBOX_GAUGES)

    def wants(self, gauge: str) -> bool:
        """Whether ``gauge`` is reported (not omitted): a node computes an ``extra`` gauge
        for ``metrics`` only then."""
        return gauge not in self._omit

    def metrics(self, now: float, **extra: float) -> list[Effect]:
        """The outbox and link gauges, when something changed or they are due again
        (``extra``: more gauges of the node's, e.g. ``dispatch_paused``), less those
        omitted (``omit_gauges``)."""
        if not self.metrics_due(now):
            return []
        self._dirty = False
        self._metrics_at = now
        omit = self._omit
        if self._quiet:
            self.window_bytes()  # derived (and kept) here as the outbox_window gauge would
            return [_gauge(name, value) for name, value in extra.items() if name not in omit]
        pending = self._pending
        last_ack = self._last_ack
        age = max(0.0, now - last_ack) if pending and last_ack is not None else 0.0
        out: list[Effect] = [
            _gauge("outbox_updates", float(len(pending))),
            _gauge("outbox_bytes", float(self.bytes)),
            _gauge("outbox_in_flight", float(len(self._out))),
            _gauge("outbox_window", float(self.effective_window())),
            _gauge("parent_up", 1.0 if self._up else 0.0),
            Metric("parent_ack_age_seconds", age),  # a clock reading: seldom the same twice
        ]
        for name, value in extra.items():
            out.append(_gauge(name, value))
        if omit:
            out = [m for m in out if m.name not in omit]  # type: ignore[union-attr]
        return out

    # ------------------------------------------------------------- window
    def _answer(self, seq: int, now: float) -> bool:
        """Count an ack against the copies in flight; True if it answered one. Copies sent
        before the answered one and still unanswered were seen and not acked (links keep
        order): their slots are freed and the updates retried after ``resend_after_s``."""
        if seq in self._released:
            # An earlier copy was seen unacked: this ack may answer it (held, decided
            # late) rather than the copy in flight, which keeps its slot for a while.
            self._released.discard(seq)
            if seq in self._out:
                self._ghost_until[seq] = now + self.resend_after_s
            return False
        sent = self._out.pop(seq, None)
        if sent is None:
            return False
        self._ghost_until.pop(seq, None)
        for s in [s for s, n in self._out.items() if n < sent]:
            del self._out[s]
            self._ghost_until.pop(s, None)
            if s in self._pending or s in self._extra:
                self._released.add(s)
                self._retry_at[s] = now + self.resend_after_s
            else:
                self._sizes.pop(s, None)  # an acked update's copy: nothing left to send
        return True

    def _forget_link(self) -> None:
        for s in [*self._out, *self._extra]:
            if s not in self._pending:
                self._sizes.pop(s, None)
        self._extra.clear()  # the node names them again on the next link
        self._out.clear()
        self._released.clear()
        self._retry_at.clear()
        self._ghost_until.clear()

    def _expire_ghosts(self, now: float) -> None:
        for s in [s for s, t in self._ghost_until.items() if t <= now]:
            del self._ghost_until[s]
            self._out.pop(s, None)
            if s not in self._pending and s not in self._extra:
                self._sizes.pop(s, None)

    def _fill(self, now: float) -> list[Effect]:
        """Send pending updates, oldest first, while the window has room."""
        parent = self._parent
        if self._ghost_until:
            self._expire_ghosts(now)
        if not self._up or parent is None or not (self._pending or self._extra):
            return []
        budget = self.window_bytes()
        in_flight = self._out
        count = len(in_flight)  # self.in_flight, self.in_flight_bytes
        used = sum(self._sizes.get(s, 0) for s in in_flight) if count else 0
        if count >= self.window:
            return []
        # Kept updates first (acked already: no ledger bound), then pending ones.
        oldest = next(iter(self._pending), 0)
        out: list[Effect] = []
        pending = self._pending  # not changed below: iterated as it is when nothing is kept
        items: Iterable[tuple[int, Update]] = (
            [*self._extra.items(), *pending.items()] if self._extra else pending.items()
        )
        for seq, update in items:
            if count >= self.window or (seq in self._pending and seq >= oldest + self.window):
                break
            if seq in self._out:
                continue
            retry = self._retry_at.get(seq)
            if retry is not None and retry > now:
                continue
            size = self._sizes.get(seq, 0)
            if count and budget is not None and used + size > budget:
                break  # one update always fits; more only within the byte budget
            self._retry_at.pop(seq, None)
            self._out[seq] = self._sends
            self._sends += 1
            count += 1
            used += size
            out.append(Send(parent, update))
        if out:
            self._dirty = True
        return out

    # ------------------------------------------------------------- durability
    def snapshot(self) -> dict[str, Any]:
        return {"seq": self.seq, "pending": list(self._pending.values())}

    def restore(self, state: Mapping[str, Any], records: Iterable[Mapping[str, Any]] = ()) -> None:
        """Load a snapshot, then ``replay`` the log records written after it."""
        self.seq = int(state["seq"])
        self._pending = {u.seq: u for u in state["pending"]}
        self._forget_link()
        self.replay(records)

    def replay(self, records: Iterable[Mapping[str, Any]]) -> None:
        """Apply ``add``/``ack``/``floor`` log records; adds of seqs already known are skipped.

        Every record raises ``seq``: an ack whose add a repair dropped (or a ``floor`` that
        ``fedloom state repair`` wrote) names a seq the parent may have applied, and reusing
        it would make the parent ack the next update as a duplicate without applying it."""
        for rec in records:
            seq = int(rec["seq"])
            if rec["op"] == "add":
                if seq > self.seq:
                    self._pending[seq] = rec["update"]
            elif rec["op"] == "ack":
                self._pending.pop(seq, None)
            self.seq = max(self.seq, seq)
        self._pending = dict(sorted(self._pending.items()))
        self._sizes = {s: update_bytes(u) for s, u in self._pending.items()}
        self._unit = max(self._sizes.values(), default=0)
        self.bytes = sum(self._sizes.values())
        self._dirty = True
