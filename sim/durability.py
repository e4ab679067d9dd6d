"""The daemons' durability and signing, run by the simulator (``SimDriver(state_dir=...,
signing=True)``; in a scenario, the ``[durability]`` table).

* **Recovery log** (``SimStores``): every node gets a real ``federation.store.StateStore``
  in ``<state_dir>/<node id>``, and each batch of ``Persist`` effects is written there
  (one frame, fsync and all) before the driver carries out the effects after it, as the
  daemon's driver does. The disk takes no virtual time. ``SimDriver.restart`` brings a
  node back from its store: load, ``restore(checkpoint, records)`` (the one
  ``algorithms.protocol.Restorable`` protocol), a fresh checkpoint (compaction).
* **End-to-end signing** (``SimSigning``): every node gets an Ed25519 identity of its
  role, all listed in one roster. What a node sends is signed as the daemon signs it
  (``federation.signing.EndToEndCore.seal_now``: a site's or region's update for its
  recipient over the delta as decoded, the root's model once per version, relayed by
  regions with the proof they verified); what arrives is checked first (``check_now``).
  A message that fails is dropped and counted (``SimStats.unverified``, and the
  receiver's ``update_rejected``/``message_rejected`` metric) where a daemon would close
  the connection. Signatures make the messages that carry them larger: their bytes are
  on the simulated links like any other.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from fedloom.algorithms.protocol import Metric, Node, Persist, Restorable
from fedloom.federation.signing import EndToEndCore, snapshot_guard
from fedloom.federation.store import CHECKPOINT_KEY, Recovery, StateStore
from fedloom.transport.errors import ProtocolError
from fedloom.transport.identity import Identity
from fedloom.transport.roster import Roster, RosterEntry
from fedloom.transport.tensors import CodecSpec
from fedloom.transport.wire import Message

__all__ = ["SimSigning", "SimStores", "restore"]


def restore(node: Node, recovery: Recovery) -> None:
    """Restore ``node`` (freshly built) from what its store recovered."""
    if not isinstance(node, Restorable):
        raise TypeError(f"{node.node_id} ({type(node).__name__}) keeps no state to restore")
    node.restore(recovery.checkpoint, recovery)


class SimStores:
    """One ``StateStore`` per node under ``root`` (each must start empty)."""

    def __init__(self, root: str | os.PathLike[str], node_ids: Iterable[str]) -> None:
        self.root = Path(root)
        self.stores: dict[str, StateStore] = {}
        self.commits = 0  # apply_many calls (one frame each)
        self.records = 0  # Persists written
        try:
            for node_id in node_ids:
                store = self.stores[node_id] = StateStore(self.root / node_id)
                found = store.load()
                if found.checkpoint is not None or found.logs or found.values:
                    raise ValueError(
                        f"{store.directory}: holds the state of an earlier run; give the "
                        "simulator a fresh state directory"
                    )
        except BaseException:
            self.close()
            raise

    def write(self, node_id: str, batch: list[Persist]) -> None:
        self.stores[node_id].apply_many(batch)
        self.commits += 1
        self.records += len(batch)

    def recover(self, node_id: str, make: Callable[[], Node]) -> Node:
        """``make()`` restored from ``node_id``'s store as a restarted daemon does: open
        the directory again, load, restore, write a fresh checkpoint."""
        old = self.stores[node_id]
        old.close()
        store = self.stores[node_id] = StateStore(old.directory)
        recovery = store.load()
        node = make()
        if node.node_id != node_id:
            raise ValueError(f"restart {node_id!r}: the new node is {node.node_id!r}")
        restore(node, recovery)
        if isinstance(node, Restorable):
            store.apply(Persist(CHECKPOINT_KEY, node.snapshot()))
        return node

    def close(self) -> None:
        for store in self.stores.values():
            store.close()


class SimSigning:
    """Identities, one roster and one ``EndToEndCore`` per node (module docstring).

    ``report(node_id, metric)`` gets each refused message's metric at its receiver.
    """

    def __init__(
        self,
        roles: Mapping[str, str],
        report: Callable[[str, Metric], None] | None = None,
    ) -> None:
        self.identities = {
            node_id: Identity.generate(node_id, role) for node_id, role in roles.items()
        }
        self.roster = Roster(
            1, [RosterEntry(i.node_id, i.role, i.public_key) for i in self.identities.values()]
        )
        self._report = report
        self.ends: dict[str, EndToEndCore] = {}
        for node_id in self.identities:
            self.ends[node_id] = self._end(node_id)
        self.unverified = 0
        self._retired = (0, 0)  # (signed, verified) by the ends of earlier incarnations

    def _end(self, node_id: str) -> EndToEndCore:
        hook = None if self._report is None else _reporter(self._report, node_id)
        return EndToEndCore(self.identities[node_id], self.roster, report=hook)

    def restarted(self, node: Node) -> None:
        """``node`` came back from its store: its signing state is the daemon's after a
        restart (nothing kept in memory; the version guard starts at its model). The guard
        is read from the restored state (``snapshot()``) by the node id's role, so a
        wrapper that restores the node (a test's recorder) gets the node's guard too."""
        node_id = node.node_id
        old = self.ends[node_id]
        self._retired = (self._retired[0] + old.signed, self._retired[1] + old.verified)
        end = self.ends[node_id] = self._end(node_id)
        if not isinstance(node, Restorable):
            return  # not restored (``SimStores.recover`` refuses it): a fresh guard
        guard = snapshot_guard(self.identities[node_id].role, node.snapshot())
        if guard is not None:
            end.guard = guard

    def seal(self, src: str, dst: str, msg: Message, spec: CodecSpec) -> Message:
        return self.ends[src].seal_now(msg, dst, spec)

    def check(self, src: str, dst: str, msg: Message) -> bool:
        """True if ``dst`` accepts ``msg`` from ``src`` (False: refused and counted)."""
        try:
            self.ends[dst].check_now(msg, src)
        except ProtocolError:
            self.unverified += 1
            return False
        return True

    @property
    def signed(self) -> int:
        return self._retired[0] + sum(e.signed for e in self.ends.values())

    @property
    def verified(self) -> int:
        return self._retired[1] + sum(e.verified for e in self.ends.values())


def _reporter(report: Callable[[str, Metric], None], node_id: str) -> Callable[[Metric], None]:
    def hook(metric: Metric) -> None:
        report(node_id, metric)

    return hook
