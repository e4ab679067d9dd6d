"""End-to-end signatures on the wire: what a daemon signs as it sends and checks as it receives.

One ``EndToEnd`` per node: ``NetworkPeers`` builds it from the node's identity and roster
(it cannot be switched off) and hands it to the ``ChannelPipe`` of every authenticated
connection. The algorithms stay sans-I/O and unsigned; in-memory runs (``MemoryPeers``,
the simulator) do not sign. Envelopes and the digest: ``transport.e2e``.

Sending (``seal``; the recipient is the connection's authenticated peer):

* an ``Update`` whose ``src`` is this node (a site's delta, a region's aggregate): signed
  ``{src, seq, base_version, recipient, n_examples, digest}``, the digest taken over the
  delta as it goes on the wire, which fixes what the recipient decodes
  (``transport.e2e.update_digest_sent``: BLAKE3, float16 as float16; a lossy codec is
  applied first);
* a ``TrainRequest``/``ModelBroadcast`` of version v from the root: the root signs
  ``{v, parent, digest, settings}`` once per version and config (cached: one model goes
  to many children; ``parent`` is the previous version it signed, 0 at first;
  ``settings`` the ``settings_digest`` of the message's training config, which the
  message carries in its ``settings`` field);
* the same from a region: it relays the root's proof for v that it verified on receipt
  (kept for the newest few versions), with the root's settings digest; the region node
  sends the root's config (``algorithms.regional``), and a config that is not it is
  warned about once per version (its sites refuse it). Without a proof it sends the
  model unsigned and warns once per version: the receiver will refuse it.

Receiving (``check``) raises a ``ProtocolError`` subclass, so the connection ends with
the reason logged and the daemon lives on:

* ``Update``: ``src`` must be the authenticated peer (updates travel one hop), and the
  signature must verify with this node as recipient and the digest of the decoded delta
  (``transport.e2e.update_digest``: BLAKE3, tensors decoded from float16 hashed as that
  float16); one signed by an older fedloom is refused as ``old_update_version``;
* ``TrainRequest``/``ModelBroadcast``: signed by a root of the roster over the digest of
  the decoded weights and the settings digest; a broadcast whose config is not those
  settings is refused (``unsigned_settings``); then the node's ``ModelVersionGuard``
  refuses a version older than the newest accepted, or a different model under that
  version. A training request's config is checked by the site node before it trains: a
  mismatch is answered with ``TrainRefused(code="unsigned_settings")``, the connection
  stays up (``algorithms.site``).

The decisions and the state (proofs, guard, layout, counts) are sans-I/O and shared with
the simulator: ``federation.signing.EndToEndCore``, which ``EndToEnd`` extends with
hashing off the event loop, the one-per-version caches of futures and relayed envelopes.

Once the model's ``ModelLayout`` is known (``set_layout``: the daemon sets it at start
from its model or plan; a node without either, a fresh region, learns it from the first
model whose root signature verifies), an update's delta or a model's weights of other
names, shapes or dtypes is refused (``layout``) before it is hashed.

Replays need no guard here: a signed update can only be replayed identically, and the
aggregators' ledger applies each ``(src, seq)`` once and re-acks a duplicate.

Relayed gossip (``seal_relayed``/``open_relayed``): a share or heartbeat for a neighbour
reached through a relay is encrypted to that neighbour and signed by this node in a
``Relayed`` envelope; one that arrives from a relay is opened only if its signature,
destination, sequence number and ciphertext check out (``transport.relay``). The sequence
numbers, sent and accepted, are kept durably when ``relay_seq`` has a store
(``runtime.relay_seq``): an accepted envelope's floor is written before it is delivered.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

from fedloom.algorithms.protocol import Metric
from fedloom.federation.signing import (
    KEEP_VERSIONS,
    EndToEndCore,
    ModelMessage,
    ModelProof,
    Report,
)
from fedloom.runtime.relay_seq import RelaySeqState
from fedloom.transport.channel import offload, tensor_bytes
from fedloom.transport.e2e import (
    digest_as_received,
    tensors_digest,
    update_digest,
    update_digest_sent,
)
from fedloom.transport.errors import ProtocolError
from fedloom.transport.identity import Identity
from fedloom.transport.limits import Limits, ModelLayout
from fedloom.transport.relay import RelayInbox, RelaySender
from fedloom.transport.roster import Roster
from fedloom.transport.settings import settings_digest
from fedloom.transport.tensors import CodecSpec
from fedloom.transport.wire import (
    MaskedUpdate,
    Message,
    ModelBroadcast,
    Relayed,
    TrainRequest,
    Update,
)

__all__ = ["KEEP_VERSIONS", "EndToEnd", "ModelProof", "Report"]

INLINE_BELOW = 64 * 1024  # tensor bytes hashed on the event loop; more go to a thread

_V = TypeVar("_V")


def _nbytes(tensors: Mapping[str, npt.NDArray[Any]]) -> int:
    return sum(int(np.asarray(v).nbytes) for v in tensors.values())


async def _digest(tensors: Mapping[str, npt.NDArray[Any]], spec: CodecSpec | None) -> bytes:
    """Digest of ``tensors`` as decoded (``spec`` None: they are already the decoded ones)."""
    if spec is None:
        if _nbytes(tensors) < INLINE_BELOW:
            return tensors_digest(tensors)
        return await offload(tensors_digest, tensors)
    if _nbytes(tensors) < INLINE_BELOW:
        return digest_as_received(tensors, spec)
    return await offload(digest_as_received, tensors, spec)


async def _update_digest(delta: Mapping[str, npt.NDArray[Any]], spec: CodecSpec | None) -> bytes:
    """An update's digest: as sent with ``spec``, or (None) as received and decoded."""
    if spec is None:
        if _nbytes(delta) < INLINE_BELOW:
            return update_digest(delta)
        return await offload(update_digest, delta)
    if _nbytes(delta) < INLINE_BELOW:
        return update_digest_sent(delta, spec)
    return await offload(update_digest_sent, delta, spec)


class _Once:
    """One computation per key (in flight or done), for the newest ``keep`` versions."""

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self.tasks: dict[Any, asyncio.Future[Any]] = {}

    def versions(self) -> list[int]:
        return [_version_of(key) for key in self.tasks]

    async def get(self, key: Any, make: Callable[[], Awaitable[_V]]) -> _V:
        task = self.tasks.get(key)
        if task is None or (task.done() and (task.cancelled() or task.exception() is not None)):
            task = self.tasks[key] = asyncio.ensure_future(make())
            while len(self.tasks) > self.keep:
                del self.tasks[min(self.tasks, key=_version_of)]
        # Shielded: one caller going away (its connection closed) must not cancel the
        # computation the others are waiting for.
        result: _V = await asyncio.shield(task)
        return result


def _version_of(key: Any) -> int:
    """Keys are a version or a (version, ...) tuple."""
    return int(key[0]) if isinstance(key, tuple) else int(key)


class EndToEnd(EndToEndCore):
    """One node's signing of what it sends and checking of what it receives (module doc).

    ``report`` (optional) gets a ``Metric("update_rejected" | "message_rejected",
    labels={"reason": ...})`` for every refused message; ``rejected`` counts them too.
    ``relay_seq`` keeps the relayed envelopes' numbers (default: in memory only).
    """

    def __init__(
        self,
        identity: Identity,
        roster: Roster,
        *,
        keep_versions: int = KEEP_VERSIONS,
        report: Report | None = None,
        relay_seq: RelaySeqState | None = None,
    ) -> None:
        super().__init__(identity, roster, keep_versions=keep_versions, report=report)
        self._signed = _Once(keep_versions)  # root: (version, settings) -> its ModelProof
        self._relay_ok = _Once(keep_versions)  # region: (version, spec) -> digest matches
        self.relay_seq = relay_seq if relay_seq is not None else RelaySeqState()
        self._relay_out = RelaySender(identity, roster, last=self.relay_seq.sent)
        self._relay_in = RelayInbox(identity, roster, floors=self.relay_seq.seen)
        self.relay_seq.bind(self._relay_in.floors)

    def use_roster(self, roster: Roster) -> None:
        """Check signatures against ``roster`` from now on (a newer one was installed)."""
        super().use_roster(roster)
        self._relay_in.roster = roster
        self._relay_out.roster = roster  # envelopes are sealed to listed keys only

    def set_layout(self, layout: ModelLayout) -> None:
        """Check received updates and models against ``layout`` before hashing them,
        decode relayed messages under ``Limits.for_model(layout)``, tell ``on_layout``."""
        self._relay_in.limits = Limits.for_model(layout, base=self._relay_in.limits)
        super().set_layout(layout)

    # ------------------------------------------------------------------ sending

    async def seal(self, msg: Message, peer: str, spec: CodecSpec) -> Message:
        """``msg`` with its signature fields filled in for ``peer`` (unchanged if not ours
        to sign). Never raises for the message's content: a message that cannot be
        signed goes out unsigned, with an error logged (the receiver refuses it)."""
        try:
            if type(msg) is Update:
                if msg.src != self.node_id:
                    return msg  # not ours: sent as is, and refused by a verifying peer
                return self.signed_update(msg, peer, await _update_digest(msg.delta, spec))
            if type(msg) is MaskedUpdate:  # secure aggregation: signed like an update
                return self.signed_masked(msg, peer) if msg.src == self.node_id else msg
            if type(msg) is TrainRequest or type(msg) is ModelBroadcast:
                return await self._seal_model(msg, spec)
        except (ValueError, TypeError) as exc:
            self.unsignable(msg, peer, exc)
        return msg

    async def _seal_model(self, msg: ModelMessage, spec: CodecSpec) -> Message:
        version = msg.version
        if self.signs_models:
            settings = settings_digest(msg.config)
            proof = await self._signed.get(
                (version, settings),
                lambda: self._sign_model(version, msg.weights, spec, settings),
            )
        else:
            found = self.relayed_proof(version)
            if found is None:
                if msg.sig:  # the node carried the proof itself (a region after a restart)
                    return msg
                self.warn_unsigned(version)
                return msg
            proof = found
            if spec.kind != "fp32":  # a lossy codec may alter the root's weights
                ok = await self._relay_ok.get(
                    (version, spec), lambda: self._relay_check(proof, msg, spec)
                )
                if not ok:
                    return msg  # (warned once) sent as relayed; the receiver refuses it
            self.check_relayed_settings(msg, proof)
        return self.with_proof(msg, proof)

    async def _sign_model(
        self,
        version: int,
        weights: Mapping[str, npt.NDArray[Any]],
        spec: CodecSpec,
        settings: bytes,
    ) -> ModelProof:
        # The previous version this root signed (kept in the cache), 0 at first.
        parent = max((v for v in self._signed.versions() if v < version), default=0)
        return self.new_model_proof(version, parent, await _digest(weights, spec), settings)

    async def _relay_check(self, proof: ModelProof, msg: ModelMessage, spec: CodecSpec) -> bool:
        if await _digest(msg.weights, spec) == proof.digest:
            return True
        self.warn_codec_alters_model(proof, spec)
        return False

    def own_proof(self, version: int) -> ModelProof | None:
        """This root's proof of model ``version`` once it has signed it (the newest few
        versions are kept; the settings digest is ``proof.settings``), else None."""
        for key, task in list(self._signed.tasks.items()):
            if _version_of(key) != version or not task.done() or task.cancelled():
                continue
            if task.exception() is None:
                proof: ModelProof = task.result()
                return proof
        return None

    def keep_relay_seq(self, state: RelaySeqState) -> None:
        """Keep the relayed envelopes' numbers in ``state`` from now on (durably if it has
        a store; the daemon's is its state directory): resume from what it recovered."""
        self.relay_seq = state
        self._relay_out.last = max(self._relay_out.last, state.sent)
        self._relay_in.restore(state.seen)
        state.bind(self._relay_in.floors)

    async def seal_relayed(self, dst: str, msg: Message, spec: CodecSpec) -> Relayed:
        """``msg`` for ``dst`` in an envelope encrypted to ``dst`` and signed by this node
        (sent via a relay); its number is durably reserved before it goes out."""
        seq = self._relay_out.next_seq()  # numbered on the loop: in the order sent
        await self.relay_seq.reserve(seq)
        seal = functools.partial(self._relay_out.seal, dst, msg, spec, seq=seq)
        if tensor_bytes(msg) < INLINE_BELOW:
            return seal()
        return await offload(seal)

    # ---------------------------------------------------------------- receiving

    async def open_relayed(self, env: Relayed) -> Message:
        """The verified message inside ``env`` (a ``ProtocolError`` subclass if not),
        returned once its sequence number is durably recorded as seen."""
        try:
            if tensor_bytes(env) < INLINE_BELOW:
                inner = self._relay_in.unseal(env)
            else:
                inner = await offload(self._relay_in.unseal, env)
            # Check-and-set on the loop (atomic against other relay links), written
            # before delivery: a restart cannot accept this envelope again.
            self._relay_in.admit(env.src, env.seq)
            await self.relay_seq.persist()
            return inner
        except ProtocolError as exc:
            self.rejected[exc.reason] += 1
            if self.report is not None:
                self.report(Metric("message_rejected", 1.0, {"reason": exc.reason}))
            raise

    async def check(self, msg: Message, peer: str) -> None:
        """Raise a ``ProtocolError`` subclass unless ``msg`` from ``peer`` is acceptable."""
        try:
            if type(msg) is Update:
                self.precheck_update(msg, peer)
                self.verify_update(msg, await _update_digest(msg.delta, None))
            elif type(msg) is MaskedUpdate:
                self.check_masked(msg, peer)
            elif type(msg) is TrainRequest or type(msg) is ModelBroadcast:
                self.precheck_model(msg, peer)
                self.accept_model(msg, await _digest(msg.weights, None))
        except ProtocolError as exc:
            self.refused(msg, exc)
            raise
