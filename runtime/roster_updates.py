"""A newer signed roster, installed into a running daemon (revocation without restarts).

Two ways in: ``fedloom run`` re-reads ``roster.path`` on SIGHUP, and a parent pushes every
roster it installs down the tree (``RosterUpdate``, handled by ``runtime.network_peers``). Where a
roster comes from vouches for nothing; ``RosterKeeper.install`` accepts one only if

1. it is signed by the consortium key this node was configured with;
2. it is newer than the roster in use (``RosterStore``: the same roster again is a no-op,
   an older one or another roster under the same version is refused);
3. it still lists this node with its key and role (a node cannot work under a roster
   that leaves it out: the consortium must issue it a new identity first).

An accepted roster is made durable in the state directory first (``ROSTER_SEEN_KEY``:
version, digest and text, so a restart never goes back to an older roster), then handed
to the peer set (``NetworkPeers.set_roster``): later handshakes and end-to-end signature
checks use it, every open session of a peer it no longer lists with the same key and
role is closed at once, and it is pushed to this node's children, which check it again.
Last, ``installed`` sees it (an aggregator takes the examples it declares for its sites).
A refused roster is a metric (``message_rejected``); the daemon keeps the roster it has
and serves on. Pushed rosters cost a parse each, so one parent's pushes are parsed at a
bounded rate (``PUSH_BURST`` at once, then one per ``PUSH_INTERVAL_S``: a parent pushes
once per roster it installs); the rest are refused unparsed. Refusals of pushed rosters
log one line per parent and reason a minute (``WarnLimiter``), with the count left out.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path

from fedloom.algorithms.protocol import Metric
from fedloom.algorithms.warn_limit import WarnLimiter
from fedloom.runtime.network_peers import NetworkPeers
from fedloom.transport.identity import Identity
from fedloom.transport.roster import Roster, RosterError, RosterStore, read_small_text
from fedloom.transport.wire import RosterUpdate

__all__ = ["PUSH_BURST", "PUSH_INTERVAL_S", "ROSTER_SEEN_KEY", "RosterKeeper"]

log = logging.getLogger("fedloom.roster")

ROSTER_SEEN_KEY = "roster-seen"  # the newest roster this node has used: version and digest

# One parent's pushes parsed: this many at once, then one per PUSH_INTERVAL_S (a token
# bucket), so that a parent pushing junk costs a parse every few seconds, not per message.
PUSH_BURST = 8
PUSH_INTERVAL_S = 5.0

# (roster, its signed text) -> durable when it returns (the daemon's state store).
Persist = Callable[[Roster, str], None]


class RosterKeeper:
    """The roster a running daemon uses, and the only way to change it (module doc)."""

    def __init__(
        self,
        identity: Identity,
        consortium_key: bytes,
        roster: Roster,
        text: str,
        *,
        persist: Persist,
        path: Path | None = None,
        installed: Callable[[Roster], None] | None = None,
    ) -> None:
        self.identity = identity
        self.consortium_key = consortium_key
        self.path = path
        self.text = text
        self.store = RosterStore(roster.version)
        self.store.accept(roster)
        self.peers: NetworkPeers | None = None
        self.refused = 0
        self.clock: Callable[[], float] = time.monotonic
        self._warn = WarnLimiter()  # refused pushes: a line per parent and reason a minute
        self._parses: dict[str, tuple[float, float]] = {}  # parent -> (tokens, at)
        self._persist = persist
        self._installed = installed
        self._lock = asyncio.Lock()  # one install at a time (SIGHUP and a push may race)

    @property
    def roster(self) -> Roster:
        assert self.store.current is not None
        return self.store.current

    def attach(self, peers: NetworkPeers) -> None:
        """Install into ``peers`` from now on, and take the rosters its parents push."""
        self.peers = peers
        peers.roster_text = self.text
        peers.on_roster = self.receive

    async def reload_file(self) -> Roster | None:
        """SIGHUP: install ``roster.path`` if it holds a newer roster (see ``install``)."""
        if self.path is None:
            return None
        try:
            text = await asyncio.to_thread(read_small_text, self.path)
        except RosterError as exc:
            self._refuse(str(self.path), str(exc))
            return None
        return await self.install(text, str(self.path))

    async def receive(self, peer: str, msg: RosterUpdate) -> None:
        """A roster pushed by ``peer`` (a parent): checked like any other, never trusted."""
        if not self._may_parse(peer):
            self._refuse(
                f"{peer} (pushed)",
                "pushed too often: not parsed",
                peer=peer,
                reason="roster_push_rate",
            )
            return
        try:
            await self.install(msg.text, f"{peer} (pushed)", claimed=msg.version, peer=peer)
        except Exception:  # a bug here must not end the parent's connection or the daemon
            log.exception("%s: installing a roster from %s failed", self.identity.node_id, peer)

    async def install(
        self, text: str, source: str, *, claimed: int | None = None, peer: str | None = None
    ) -> Roster | None:
        """Check ``text`` and use it if newer; the installed roster, or None (logged).
        ``peer``: the parent that pushed it (its refusals are rate-limited in the log)."""
        async with self._lock:
            try:
                roster = await asyncio.to_thread(Roster.loads, text, self.consortium_key)
                self._check(roster, claimed)
            except (RosterError, ValueError) as exc:
                self._refuse(source, str(exc), peer=peer)
                return None
            current = self.roster
            if roster.version == current.version and roster.digest == current.digest:
                log.info(
                    "%s: roster version %d from %s is the one in use",
                    self.identity.node_id,
                    roster.version,
                    source,
                    extra={"roster_version": roster.version, "source": source},
                )
                return None
            try:
                self.store.accept(roster)
            except RosterError as exc:
                self._refuse(source, str(exc), peer=peer)
                return None
            self._persist(roster, text)  # durable before anything acts on it
            self.text = text
            revoked = self.peers.set_roster(roster, text) if self.peers is not None else []
            if self._installed is not None:
                try:
                    self._installed(roster)
                except Exception:  # the roster is in use already; a bug here ends nothing
                    log.exception(
                        "%s: acting on roster version %d failed",
                        self.identity.node_id,
                        roster.version,
                    )
            log.warning(
                "%s: installed roster version %d from %s (was version %d); closed the "
                "sessions of: %s",
                self.identity.node_id,
                roster.version,
                source,
                current.version,
                ", ".join(revoked) or "none",
                extra={
                    "roster_version": roster.version,
                    "source": source,
                    "revoked": revoked,
                },
            )
            return roster

    def _check(self, roster: Roster, claimed: int | None) -> None:
        if claimed is not None and claimed != roster.version:
            raise RosterError(f"announced as version {claimed} but it is version {roster.version}")
        me = self.identity
        entry = roster.lookup(me.node_id)
        if entry is None or entry.public_key != me.public_key or entry.role != me.role:
            raise RosterError(
                f"roster version {roster.version} does not list {me.node_id!r} with this "
                f"node's key and role {me.role!r}; ask the consortium to list: "
                f"{me.public_line()}"
            )

    def _may_parse(self, peer: str) -> bool:
        """Take a parse from ``peer``'s bucket (``PUSH_BURST``, ``PUSH_INTERVAL_S``)."""
        now = self.clock()
        tokens, at = self._parses.get(peer, (float(PUSH_BURST), now))
        tokens = min(float(PUSH_BURST), tokens + (now - at) / PUSH_INTERVAL_S)
        if tokens < 1.0:
            self._parses[peer] = (tokens, now)
            return False
        self._parses[peer] = (tokens - 1.0, now)
        return True

    def _refuse(
        self, source: str, why: str, *, peer: str | None = None, reason: str = "roster_refused"
    ) -> None:
        """Count (and report) a refusal; log it, once a minute per parent and reason."""
        self.refused += 1
        report = self.peers.e2e.report if self.peers is not None else None
        if report is not None:
            report(Metric("message_rejected", 1.0, {"reason": reason}))
        unlogged = 0 if peer is None else self._warn.due(peer, reason, self.clock())
        if unlogged is None:
            return
        log.warning(
            "%s: refused a roster from %s: %s; keeping roster version %d%s",
            self.identity.node_id,
            source,
            why,
            self.roster.version,
            f" ({unlogged} more refused since the last line)" if unlogged else "",
            extra={
                "source": source,
                "reason": reason,
                "roster_version": self.roster.version,
                "unlogged_before": unlogged,
            },
        )
