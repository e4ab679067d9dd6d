"""Exactly-once at the root across a regional failover: who must keep which update.

Failover (issue 13, item 4): when a regional aggregator stays down, its sites switch to
the region's elected standby (``SiteNode`` fallbacks). Updates the dead region had
acknowledged but not yet forwarded must neither be lost nor counted twice. The mechanism:

* **Keep until settled.** A child keeps each update after its parent's ``Ack`` until it
  learns the update is *settled*: in the root's model, or decided for good (stale,
  rejected). The root's record is final, so its ``Ack`` of a forward settles it; a region
  then sends ``Incorporated(src, seq)`` to each child whose update the forward carried (a
  parent region does so for a child region once its own forward is settled). A child
  resends what it keeps to whichever parent it has after a reconnect or a failover
  (``HeldUpdates``, sites, one at a time); a region answers a resend it has settled with
  ``Incorporated`` again, so a lost notice costs one resend.
* **Forwards name their site updates.** A region's forward carries the ``(site, seq)``
  pairs folded into it (``Update.pairs``; a nested region passes its children's on). A
  parent that declares a region child's subtree (``PairLedger``) refuses pairs of sites
  outside it, more pairs than the forward's count, and — unrecorded, with an
  ``Overlap`` naming them — a forward carrying pairs it has already taken. So the root
  counts each site update once, whichever region delivers it, including a dead region
  that comes back after a partition with an old forward.
* **A refused region rebuilds.** A region with a standby (``keep_parts``; and the standby)
  keeps the (clipped, discounted) deltas of each forward until that forward is settled
  (``RegionForwards``); on ``Overlap`` it rebuilds the aggregate, under the same seq, from
  the contributions that carry none of the named pairs (those were delivered by the other
  region), or drops it when nothing is left. Nothing else is logged for it: after a
  restart the forward is the original again and the parent refuses it again.

Limits: a contribution from a nested region is one aggregate, so it is kept or dropped
whole; pairs of it that the parent had not taken are then lost (metric ``pairs_lost``),
as are those of a refused forward whose region keeps no parts. Standbys are meant for
regions whose children are sites. The pair ledger keeps per site a watermark and the seqs
taken above a gap; it never lets one region's claims move the watermark far: a pair more
than ``PAIR_AHEAD`` above it is not recorded, and a gap (an update a region decided
stale or rejected, which no region forwards) is given up only once a pair ``PAIR_BEHIND``
above it was taken, which an honest site reaches only after settling everything below
(``MAX_HELD_LIMIT``). A region can thus claim at most ``PAIR_AHEAD`` seqs ahead per pair.
A forward the parent decides without applying (stale) has its pairs recorded all the
same: they are settled, and a site whose updates went stale for a while (its region cut
off from the root while the others went on) must not end up far ahead of the ledger.
A far pair does not refuse its forward, though: a site numbers its own updates (a
hostile one can number them far ahead; an honest straggler's run of more than
``PAIR_AHEAD`` updates decided stale at its region leaves a gap no forward fills), and
refusing would hold every honest update of the forward, and the region behind it, for
ever. The forward is taken and its far pairs are kept apart (``take``): the watermark
does not move for them, so they erase nothing, and the latest ``FAR_KEPT`` of each site
are still named taken when a standby delivers one again.
A root reseeded after losing its state (``fedloom state reseed``) no longer knows where
its sites' numbers stand: its ledger relearns them (``relearn``), each site's first pair
taken after the reseed setting its watermark whatever its distance, the bound applying
again from there. An honest site's unsettled updates lie within ``PAIR_BEHIND`` of each
other, so none of them falls below the watermark its first pair sets.

All of it is sans-I/O bookkeeping; the nodes persist it through ``Persist`` records
(``HELD_KEY`` for sites, ``FORWARDS_KEY`` for regions) and their checkpoints.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fedloom.algorithms.frozen import slot_init
from fedloom.algorithms.ledger import MAX_ABOVE
from fedloom.algorithms.protocol import Effect, Persist, Send, Weights
from fedloom.transport.wire import Update

__all__ = [
    "DEFAULT_FAILOVER_AFTER_S",
    "DEFAULT_MAX_HELD",
    "FAR_KEPT",
    "FORWARDS_KEY",
    "HELD_KEY",
    "MAX_HELD_LIMIT",
    "PAIR_AHEAD",
    "PAIR_BEHIND",
    "Contribution",
    "HeldUpdates",
    "PairLedger",
    "RegionForwards",
]

HELD_KEY = "site/held"
FORWARDS_KEY = "region/forwards"
DEFAULT_FAILOVER_AFTER_S = 60.0
# Updates a site keeps after their ack, waiting to be settled; when full it trains no more
# (backpressure), so its memory and disk stay bounded whatever the tree does.
DEFAULT_MAX_HELD = 32
# Kept plus in-flight updates must stay well inside ``PAIR_BEHIND`` (see ``PairLedger``).
MAX_HELD_LIMIT = MAX_ABOVE // 2
# A parent's pair ledger: a gap this far below the highest seq taken of a site is given up
# (no honest site still holds an update that old), and a pair this far above the watermark
# is refused (no honest site has made it yet, or sent it that far ahead of the rest).
PAIR_BEHIND = MAX_ABOVE
PAIR_AHEAD = 2 * MAX_ABOVE
FAR_KEPT = PAIR_AHEAD  # far pairs remembered per site (``PairLedger.keep_far``)
# Kept updates resent at once on a new link (each answer sends the next): they are
# model-sized and come on top of the outbox's window, whose bytes leave room for one more
# under the connection's send-queue cap (``algorithms.outbox``).
HELD_WINDOW = 1
# A resent kept update the parent saw and neither acked nor settled (held back by its
# intake quota, or dropped over it) is sent again after this long.
HELD_RESEND_AFTER_S = 5.0

Pair = tuple[str, int]


class HeldUpdates:
    """A child's acknowledged, not yet settled updates (seq order), bounded by ``limit``."""

    __slots__ = ("_held", "_in_flight", "_parent", "_queue", "_since_checkpoint", "limit")

    def __init__(self, limit: int = DEFAULT_MAX_HELD) -> None:
        if not 1 <= limit <= MAX_HELD_LIMIT:
            raise ValueError(f"max_held must be 1..{MAX_HELD_LIMIT}, got {limit}")
        self.limit = limit
        self._held: dict[int, Update] = {}
        self._since_checkpoint = 0  # records logged since the last checkpoint
        # The resend pass on the current link: seqs still to send, and those sent unanswered.
        self._parent: str | None = None
        self._queue: list[int] = []
        self._in_flight: dict[int, float] = {}  # seq -> when it was sent

    def __len__(self) -> int:
        return len(self._held)

    @property
    def full(self) -> bool:
        return len(self._held) >= self.limit

    def keep(self, update: Update) -> list[Effect]:
        """Keep an update its parent acknowledged. The record names its seq only: the
        update itself is in the sender's outbox log of the same epoch, or in the outbox of
        the checkpoint that began it (``restore`` is given both), so it is not written
        twice."""
        if update.seq in self._held:
            return []
        self._held[update.seq] = update
        self._since_checkpoint += 1
        return [Persist(HELD_KEY, {"op": "keep", "seq": update.seq}, append=True)]

    def settle(self, seq: int, now: float = 0.0) -> list[Effect]:
        """Forget ``seq`` (settled; a notice for anything not kept is ignored), and resend
        the next kept update if this one was being resent."""
        if self._held.pop(seq, None) is None:
            return self.answered(seq, now)
        self._since_checkpoint += 1
        out: list[Effect] = [Persist(HELD_KEY, {"op": "settle", "seq": seq}, append=True)]
        return out + self.answered(seq, now)

    def resend(self, parent: str, now: float = 0.0) -> list[Effect]:
        """A (new) link to ``parent``: resend every kept update, oldest first, paced by
        the parent's answers (``answered``)."""
        self._parent = parent
        self._queue = sorted(self._held, reverse=True)  # popped from the end: oldest first
        self._in_flight.clear()
        return self._next(now)

    def answered(self, seq: int, now: float = 0.0) -> list[Effect]:
        """The parent answered (acked or settled) ``seq``: send the next kept update."""
        if self._in_flight.pop(seq, None) is None:
            return []
        return self._next(now)

    def next_deadline(self) -> float | None:
        """When an unanswered resend is due again."""
        if not self._in_flight:
            return None
        return min(self._in_flight.values()) + HELD_RESEND_AFTER_S

    def on_deadline(self, now: float) -> list[Effect]:
        """Send again what went unanswered for ``HELD_RESEND_AFTER_S``."""
        if self._parent is None:
            return []
        out: list[Effect] = []
        for seq, sent in list(self._in_flight.items()):
            update = self._held.get(seq)
            if update is None:
                del self._in_flight[seq]
            elif now >= sent + HELD_RESEND_AFTER_S:
                self._in_flight[seq] = now
                out.append(Send(self._parent, update))
        return out + self._next(now)

    def link_down(self) -> None:
        self._parent = None
        self._queue.clear()
        self._in_flight.clear()

    def _next(self, now: float) -> list[Effect]:
        out: list[Effect] = []
        while self._parent is not None and self._queue and len(self._in_flight) < HELD_WINDOW:
            seq = self._queue.pop()
            update = self._held.get(seq)
            if update is not None:
                self._in_flight[seq] = now
                out.append(Send(self._parent, update))
        return out

    def compaction_due(self) -> bool:
        """A checkpoint (which carries every kept update) is worth writing now: nothing is
        kept, or the log has grown by twice the bound since the last one."""
        return not self._held or self._since_checkpoint >= 2 * self.limit

    def checkpointed(self) -> None:
        self._since_checkpoint = 0

    def snapshot(self) -> list[Update]:
        return list(self._held.values())

    def restore(
        self,
        state: Iterable[Update],
        records: Iterable[Mapping[str, Any]] = (),
        sent: Mapping[int, Update] | None = None,
    ) -> None:
        """Load kept updates, then replay "keep"/"settle" records; ``sent`` maps the seqs
        the outbox held or logged since the checkpoint to their updates."""
        self._held = {u.seq: u for u in state}
        for rec in records:
            if rec["op"] == "keep":
                seq = int(rec["seq"])
                update = (sent or {}).get(seq)
                if update is None:
                    raise ValueError(f"a kept update {seq} that the outbox never held")
                self._held[seq] = update
            elif rec["op"] == "settle":
                self._held.pop(int(rec["seq"]), None)
        self._held = dict(sorted(self._held.items()))
        self._since_checkpoint = 0
        self.link_down()


class PairLedger:
    """A parent's record of the site updates it took inside region children's forwards.

    Only region children whose subtree is declared (``set_subtrees``) are checked; for the
    others pairs are ignored, as before forwards carried them. Per site: a watermark and
    the seqs taken above it. Unlike ``AppliedLedger`` it never closes a gap because the
    set overflows (a region could then erase a site's future updates, which another region
    would deliver): ``problem`` refuses a pair more than ``PAIR_AHEAD`` above the watermark,
    and ``record`` gives up a gap only ``PAIR_BEHIND`` below the highest seq taken, so the
    set holds fewer than ``PAIR_AHEAD`` seqs per site.
    """

    __slots__ = ("_above", "_far", "_mark", "_relearned", "_subtrees")

    def __init__(self) -> None:
        self._mark: dict[str, int] = {}
        self._above: dict[str, set[int]] = {}
        self._subtrees: dict[str, frozenset[str]] = {}
        # None, or since a reseed (``relearn``) the sites whose first pair was taken since.
        self._relearned: set[str] | None = None
        # Far pairs taken (``take``): for duplicate checks only, never the watermark; the
        # FAR_KEPT highest per site.
        self._far: dict[str, set[int]] = {}

    def relearn(self) -> None:
        """Forget where the sites' numbers stand (a reseeded root lost what it took): each
        site's next pair taken is not held to ``PAIR_AHEAD`` and sets its watermark."""
        self._relearned = set()

    def _bounded(self, site: str) -> bool:
        return self._relearned is None or site in self._relearned

    def set_subtrees(self, subtrees: Mapping[str, Iterable[str]]) -> None:
        self._subtrees = {r: frozenset(s) for r, s in subtrees.items()}

    def declared(self, region: str) -> bool:
        return region in self._subtrees

    def sites(self, region: str) -> frozenset[str]:
        return self._subtrees.get(region, frozenset())

    def problem(self, region: str, pairs: Sequence[Pair], count: int) -> str | None:
        """Why a forward from ``region`` claiming ``pairs`` (of ``count`` site updates)
        must be refused, or None. The count first: then O(len(pairs)) <= O(count)."""
        if len(pairs) > count:
            return "pairs_exceed_count"
        sites = self._subtrees.get(region, frozenset())
        if any(site not in sites for site, _ in pairs):
            return "foreign_pairs"
        if len(set(pairs)) != len(pairs):
            return "duplicate_pairs"
        return None

    def take(self, pairs: Sequence[Pair]) -> tuple[Sequence[Pair], list[Pair]]:
        """Record the site updates of a forward taken, except those more than
        ``PAIR_AHEAD`` ahead (``far_ahead``), kept apart (``keep_far``). Returns the pairs
        recorded and the far ones."""
        far = self.far_ahead(pairs)
        if not far:
            self.record(pairs)
            return pairs, far
        near = [p for p in pairs if p not in far]
        self.record(near)
        self.keep_far(far)
        return near, far

    def keep_far(self, far: Iterable[Pair]) -> None:
        """Remember far pairs taken, so that a second delivery of one (a standby's, after a
        failover) is named taken, without moving any watermark: a site whose updates are
        all far (an honest straggler whose region decided a long run of them stale) keeps
        that protection for its latest ``FAR_KEPT``, which covers every update it may
        still hold (``MAX_HELD_LIMIT``)."""
        for site, seq in far:
            kept = self._far.setdefault(site, set())
            kept.add(seq)
            if len(kept) > FAR_KEPT:
                kept.discard(min(kept))

    def far_ahead(self, pairs: Iterable[Pair]) -> list[Pair]:
        """The pairs more than ``PAIR_AHEAD`` above their site's watermark (of a site being
        relearned, none)."""
        mark = self._mark
        return [p for p in pairs if p[1] > mark.get(p[0], 0) + PAIR_AHEAD and self._bounded(p[0])]

    def seen(self, site: str, seq: int) -> bool:
        if seq <= self._mark.get(site, 0):
            return True
        above = self._above.get(site)
        if above is not None and seq in above:
            return True
        far = self._far.get(site)
        return far is not None and seq in far

    def overlap(self, pairs: Iterable[Pair]) -> list[Pair]:
        """The pairs already taken."""
        return [p for p in pairs if self.seen(p[0], p[1])]

    def record(self, pairs: Iterable[Pair]) -> None:
        touched = set()
        relearned = self._relearned
        for site, seq in pairs:
            if relearned is not None and site not in relearned:
                # Its first pair since the reseed: the gap below it is given up as any
                # gap PAIR_BEHIND below the highest seq taken (``_advance``).
                relearned.add(site)
            if seq > self._mark.get(site, 0):
                self._above.setdefault(site, set()).add(seq)
                touched.add(site)
        for site in touched:
            self._advance(site)

    def _advance(self, site: str) -> None:
        above = self._above[site]
        mark = max(self._mark.get(site, 0), max(above) - PAIR_BEHIND)
        above.difference_update([s for s in above if s <= mark])
        while mark + 1 in above:
            mark += 1
            above.discard(mark)
        self._mark[site] = mark
        if not above:
            del self._above[site]

    def watermark(self, site: str) -> int:
        return self._mark.get(site, 0)

    def snapshot(self) -> dict[str, Any]:
        """``AppliedLedger``'s shape: ``{"mark": {site: seq}, "above": {site: [seq]}}``,
        and ``"relearned": [site]`` since a reseed."""
        snap: dict[str, Any] = {
            "mark": dict(self._mark),
            "above": {site: sorted(seqs) for site, seqs in self._above.items()},
        }
        if self._relearned is not None:
            snap["relearned"] = sorted(self._relearned)
        if self._far:
            snap["far"] = {site: sorted(seqs) for site, seqs in self._far.items()}
        return snap

    def restore(self, state: Mapping[str, Any] | None) -> None:
        state = state or {}
        self._mark = {str(k): int(v) for k, v in state.get("mark", {}).items()}
        self._above = {}
        self._relearned = None
        for site, seqs in state.get("above", {}).items():
            self.record((str(site), int(q)) for q in seqs)
        if "relearned" in state:
            self._relearned = {str(site) for site in state["relearned"]}
        self._far = {}
        for site, seqs in state.get("far", {}).items():
            self.keep_far((str(site), int(q)) for q in seqs)


@dataclass(frozen=True, slots=True)
class Contribution:
    """One child update inside a region's forward: enough to rebuild the aggregate."""

    src: str
    seq: int
    pairs: tuple[Pair, ...]  # the site updates it stands for
    delta: Weights | None  # as buffered (clipped); None until the flush
    s: float
    n_examples: int
    count: int


slot_init(Contribution)  # one per update a region applies (``algorithms.frozen``)


@dataclass(slots=True)
class _Forward:
    update: Update
    parts: list[Contribution]


# The region's rebuild: contributions -> (delta, n_examples, count), or None if not finite.
Rebuild = Callable[[list[Contribution]], tuple[Weights, int, int] | None]


class RegionForwards:
    """A region's forwards not yet settled, each with its contributions.

    ``note`` records a child update as it enters the buffer, ``flushed`` binds the buffered
    ones to the forward they became. A forward is settled by the parent's
    ``Incorporated`` (its children are told in turn) or rebuilt after an ``Overlap``.
    Memory: one forward's deltas times the forwards the outbox may hold.
    """

    __slots__ = ("_filling", "_forwards", "_unsettled")

    def __init__(self) -> None:
        self._filling: list[Contribution] = []
        self._forwards: dict[int, _Forward] = {}
        self._unsettled: dict[Pair, int] = {}  # child (src, seq) -> how many hold it

    def __len__(self) -> int:
        return len(self._forwards)

    def note(self, src: str, seq: int, pairs: Sequence[Pair], n_examples: int, count: int) -> None:
        c = Contribution(src, seq, tuple(pairs), None, 0.0, n_examples, count)
        self._filling.append(c)
        unsettled = self._unsettled  # _hold((src, seq), 1), inline: once per update
        key = (src, seq)
        unsettled[key] = unsettled.get(key, 0) + 1

    def flushed(
        self, entries: Sequence[tuple[Weights, float]], *, keep_deltas: bool = True
    ) -> list[Contribution]:
        """The buffer was flushed: its (delta, discount) entries, in order, complete the
        noted contributions, which are returned (a restored buffer from an older
        checkpoint has entries without notes: they carry no pairs). Without
        ``keep_deltas`` only who contributed is kept: the forward cannot be rebuilt."""
        filling, self._filling = self._filling, []
        n = len(entries)
        notes = filling[-n:] if n else []
        pad = [Contribution("", 0, (), None, 0.0, 0, 0)] * (n - len(notes))
        return [
            Contribution(
                c.src, c.seq, c.pairs, d if keep_deltas else None, s, c.n_examples, c.count
            )
            for c, (d, s) in zip(pad + notes, entries, strict=True)
        ]

    def add(self, update: Update, parts: list[Contribution]) -> None:
        self._forwards[update.seq] = _Forward(update, parts)

    def buffered(self, n: int) -> list[Contribution]:
        """The noted contributions of the ``n`` entries the buffer holds now (the last
        ``n`` notes: ``flushed`` binds the same ones)."""
        return self._filling[-n:] if n else []

    def settled_now(self, parts: Iterable[Contribution]) -> list[Pair]:
        """``parts`` will never be forwarded (dropped aggregate): release them."""
        out = []
        unsettled = self._unsettled
        for c in parts:
            if c.src:
                key = (c.src, c.seq)
                n = unsettled.get(key, 0) - 1  # _hold(key, -1), inline: once per update
                if n > 0:
                    unsettled[key] = n
                else:
                    unsettled.pop(key, None)
                out.append(key)
        return out

    def unsettled(self, src: str, seq: int) -> bool:
        return (src, seq) in self._unsettled

    def settle(self, seq: int) -> list[Pair] | None:
        """Forward ``seq`` is settled: the child updates now settled (None: unknown seq)."""
        fwd = self._forwards.pop(seq, None)
        if fwd is None:
            return None
        return self.settled_now(fwd.parts)

    def update(self, seq: int) -> Update | None:
        fwd = self._forwards.get(seq)
        return None if fwd is None else fwd.update

    def updates(self) -> list[Update]:
        return [f.update for f in self._forwards.values()]

    def rebuild(
        self, seq: int, taken: Iterable[Pair], build: Rebuild
    ) -> tuple[Update | None, list[Pair], list[Pair]] | None:
        """Forward ``seq`` without every contribution carrying a pair of ``taken``.

        Returns ``(new update or None if nothing is left, settled child updates, site
        pairs lost)``, or None when ``seq`` is not held. The new update keeps the seq and
        base version; its signature is made again when it is sent. When the rest cannot be
        aggregated (no deltas kept, or not finite) its pairs are lost too.
        """
        fwd = self._forwards.get(seq)
        if fwd is None:
            return None
        gone = set(taken)
        keep = [c for c in fwd.parts if not gone.intersection(c.pairs)]
        drop = [c for c in fwd.parts if gone.intersection(c.pairs)]
        lost = [p for c in drop for p in c.pairs if p not in gone]
        settled = self.settled_now(drop)
        built = build(keep) if keep else None
        if built is None:
            del self._forwards[seq]
            lost += [p for c in keep for p in c.pairs]
            settled += self.settled_now(keep)
            return None, settled, lost
        delta, n_examples, count = built
        old = fwd.update
        new = Update(
            src=old.src,
            seq=old.seq,
            base_version=old.base_version,
            delta=delta,
            n_examples=n_examples,
            count=count,
            task=old.task,
            metrics=old.metrics,
            pairs=tuple(p for c in keep for p in c.pairs),
        )
        self._forwards[seq] = _Forward(new, keep)
        return new, settled, lost

    def _hold(self, key: Pair, step: int) -> None:
        n = self._unsettled.get(key, 0) + step
        if n > 0:
            self._unsettled[key] = n
        else:
            self._unsettled.pop(key, None)

    # ---------------------------------------------------------- durability
    def snapshot(self) -> dict[str, Any]:
        return {
            "filling": [_plain(c) for c in self._filling],
            "forwards": [
                {"update": f.update, "parts": [_plain(c) for c in f.parts]}
                for f in self._forwards.values()
            ],
        }

    def restore(self, state: Mapping[str, Any] | None) -> None:
        state = state or {}
        self._filling = []
        self._forwards = {}
        self._unsettled = {}
        for raw in state.get("filling", ()):
            c = _contribution(raw)
            self._filling.append(c)
            self._hold((c.src, c.seq), 1)
        for raw in state.get("forwards", ()):
            parts = [_contribution(p) for p in raw["parts"]]
            self.add(raw["update"], parts)
            for c in parts:
                if c.src:
                    self._hold((c.src, c.seq), 1)


def _plain(c: Contribution) -> dict[str, Any]:
    return {
        "src": c.src,
        "seq": c.seq,
        "pairs": [list(p) for p in c.pairs],
        "delta": c.delta,
        "s": c.s,
        "n_examples": c.n_examples,
        "count": c.count,
    }


def _contribution(raw: Mapping[str, Any]) -> Contribution:
    return Contribution(
        str(raw["src"]),
        int(raw["seq"]),
        tuple((str(p[0]), int(p[1])) for p in raw["pairs"]),
        None if raw["delta"] is None else dict(raw["delta"]),
        float(raw["s"]),
        int(raw["n_examples"]),
        int(raw["count"]),
    )
