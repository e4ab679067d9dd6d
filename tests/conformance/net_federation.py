"""``Federation`` as the daemons run it: real WebSockets on 127.0.0.1, secure channels,
end-to-end signatures.

Each node gets an Ed25519 identity in one roster and runs under an ``AsyncDriver`` with
a ``NetworkPeers`` (``runtime.network_peers``): links are loopback WebSockets (``transport.ws``),
each authenticated by the signed handshake and encrypted in records
(``transport.channel``), and every update and model is signed and checked end to end
(``runtime.signing``), exactly as ``fedloom serve`` wires them. Who dials whom follows the
daemons: a child dials its parent (sites their region or root, regions the root); of two
gossip peers that both listen the smaller id dials; a peer that accepts no inbound
connections dials, and reaches a neighbour like itself through a relay node
(``routes``, sealed ``Relayed`` envelopes). Node time is sped up as in
``async_federation``; the peer sets' own timers (keep-alives, back-off) are short real
times.

Faults act where the daemons meet them: a partition drops the links of the pairs it cuts
and makes every dial across it fail until it heals (diallers keep redialling with
back-off); a kill or restart stops the node's driver, which closes its connections and
listener. ``inject`` sends bytes as one message on the sender's authenticated, encrypted
channel (a modified peer's output: the receiver decodes and checks it).
"""

from __future__ import annotations

import functools
import random
from collections.abc import Iterable, Mapping
from typing import Any

from fedloom.algorithms.protocol import Metric, Node
from fedloom.federation.signing import restarted_guard
from fedloom.runtime.connection import ChannelPipe
from fedloom.runtime.network_peers import Backoff, DialTarget, NetworkPeers
from fedloom.runtime.peer_table import PeerSet
from fedloom.transport import ws
from fedloom.transport.codec_policy import CodecPolicy
from fedloom.transport.identity import Identity
from fedloom.transport.limits import ModelLayout
from fedloom.transport.links import Link
from fedloom.transport.roster import Roster, RosterEntry
from tests.conformance.async_federation import AsyncFederation

SCHEME = "fed://"  # dial targets name a node; the URL it listens at is looked up per dial
# Parents listen, children dial (a lower rank is nearer the root); equal ranks: see below.
RANK = {"root": 0, "relay": 0, "region": 1, "site": 2, "peer": 3}
LISTENING_ROLES = ("root", "region", "relay", "peer")


async def _serve(host: str, port: int, on_link: Any) -> ws.WsServer:
    return await ws.serve(host, port, on_link, close_timeout=0.5)


class NetFederation(AsyncFederation):
    """``Federation`` on ``AsyncDriver`` + ``NetworkPeers`` (see the module docstring)."""

    name = "net"
    exact_timing = False
    signs = True

    def __init__(self, *, speed: float = 20.0, train_time_s: float = 1.0) -> None:
        super().__init__(speed=speed, train_time_s=train_time_s)
        self.identities: dict[str, Identity] = {}
        self.roster: Roster | None = None
        self.peer_sets: dict[str, NetworkPeers] = {}
        self._roles: dict[str, str] = {}
        self._codecs: CodecPolicy | None = None
        self._dials: dict[str, list[str]] = {}
        self._listens: set[str] = set()
        self._accept: dict[str, set[str]] = {}
        self._routes: dict[str, dict[str, str]] = {}
        self._cut_pairs: set[frozenset[str]] = set()
        self._gone: set[str] = set()

    # -- peer sets

    def _prepare(
        self,
        nodes: Mapping[str, Node],
        roles: Mapping[str, str],
        neighbours: list[tuple[str, str]],
        codecs: CodecPolicy | None,
        relays: dict[tuple[str, str], str],
    ) -> None:
        self._roles = dict(roles)
        self._codecs = codecs
        self.identities = {n: Identity.generate(n, roles[n]) for n in nodes}
        self.roster = Roster(
            1, [RosterEntry(i.node_id, i.role, i.public_key) for i in self.identities.values()]
        )
        firewalled = {n for pair in relays for n in pair}
        self._listens = {n for n in nodes if roles[n] in LISTENING_ROLES and n not in firewalled}
        self._dials = {n: [] for n in nodes}
        self._accept = {n: set() for n in nodes}
        self._routes = {n: {} for n in nodes}
        for (a, b), relay in relays.items():
            for me, other in ((a, b), (b, a)):
                self._routes[me][other] = relay
                if relay not in self._dials[me]:
                    self._dials[me].append(relay)
        for a, b in neighbours:
            if (a, b) in relays or (b, a) in relays:
                continue
            dialler, listener = self._who_dials(a, b)
            self._dials[dialler].append(listener)
            self._accept[listener].add(dialler)

    def _who_dials(self, a: str, b: str) -> tuple[str, str]:
        ra, rb = RANK[self._roles[a]], RANK[self._roles[b]]
        if ra != rb:
            return (a, b) if ra > rb else (b, a)
        la, lb = a in self._listens, b in self._listens
        if la and lb:
            return (a, b) if a < b else (b, a)  # as runtime.network_peers.gossip_dial_targets
        if la or lb:
            return (b, a) if la else (a, b)
        raise ValueError(f"neither {a} nor {b} listens: give their pair a relay")

    def _peers(self, node_id: str) -> PeerSet:
        assert self.roster is not None
        role = self._roles[node_id]
        peers = NetworkPeers(
            self.identities[node_id],
            self.roster,
            dial=[DialTarget(p, SCHEME + p) for p in self._dials[node_id]],
            listen=("127.0.0.1", 0) if node_id in self._listens else None,
            accept_from=None if role == "relay" else self._accept[node_id],
            allowed_roles=("peer",) if role == "relay" else None,
            routes=self._routes[node_id],
            codecs=self._codecs,
            keepalive_s=0.5,
            down_after_s=5.0,
            backoff=Backoff(base_s=0.05, cap_s=0.2),
            connect=functools.partial(self._connect, node_id),
            serve=_serve,
            rng=random.Random(node_id),
        )
        peers.e2e.report = functools.partial(self._report, node_id)
        model = getattr(self._nodes[node_id], "current_model", None)
        current = model() if model is not None else None
        if current is not None:  # as the daemons do where the model is known at start
            peers.e2e.set_layout(ModelLayout.of(current[1]))
        guard = restarted_guard(self._nodes[node_id])
        if guard is not None:  # a restored site or region: no rollback past what it held
            peers.e2e.guard = guard
        self.peer_sets[node_id] = peers
        return peers

    def _report(self, node_id: str, metric: Metric) -> None:
        """A refused signature: journaled as the node's metric, as the daemon's sink."""
        self.journal.record(node_id, self.now, [metric])

    async def _connect(self, local: str, url: str) -> Link:
        target = url.removeprefix(SCHEME)
        if local in self._gone or target in self._gone:
            raise OSError(f"{target} is not running")
        if frozenset((local, target)) in self._cut_pairs:
            raise OSError(f"partitioned from {target}")
        real = self.peer_sets[target].listen_url
        if real is None:
            raise OSError(f"{target} is not listening yet")
        return await ws.connect(real, close_timeout=0.5)

    def _pairs_of(self, group: set[str]) -> list[tuple[str, str]]:
        out = []
        for a in sorted(group):
            linked = set(self._dials[a]) | self._accept[a]
            linked |= {n for n in self._dials if a in self._dials[n]}
            out += [(a, b) for b in sorted(linked) if b not in group]
        return out

    def _drop(self, a: str, b: str, reason: str) -> None:
        for local, peer in ((a, b), (b, a)):
            peers = self.peer_sets.get(local)
            conn = peers.table.get(peer) if peers is not None else None
            if peers is not None and conn is not None:
                peers.table.drop(conn, reason)

    def _cut(self, nodes: Iterable[str]) -> Any:
        pairs = self._pairs_of(set(nodes))
        for a, b in pairs:
            self._cut_pairs.add(frozenset((a, b)))
            self._drop(a, b, "link cut (partition)")
        return pairs

    def _heal(self, pairs: Any) -> None:
        for a, b in pairs:
            self._cut_pairs.discard(frozenset((a, b)))

    def _down(self, node_id: str, *, forever: bool) -> Any:
        self._gone.add(node_id)  # stopping its driver closes its links and listener
        return None

    def _up(self, node_id: str, back: Any) -> None:
        self._gone.discard(node_id)

    def inject(self, src: str, dst: str, data: bytes) -> None:
        conn = self.peer_sets[src].table.get(dst)
        if conn is None or not isinstance(conn.pipe, ChannelPipe):
            raise RuntimeError(f"inject: {src} has no channel to {dst}")
        self._loop.run_until_complete(conn.pipe.channel.send_message(data))

    def input_rejections(self) -> dict[str, int]:
        return super().input_rejections()
