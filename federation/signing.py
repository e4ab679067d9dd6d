"""End-to-end signatures, the sans-I/O part both drivers share.

What a node signs as it sends and checks as it receives (the rules are in
``runtime.signing``'s docstring; the envelopes and the digest in ``transport.e2e``):

* an ``Update`` whose ``src`` is this node is signed for its recipient over the digest of
  the delta as it goes on the wire (``transport.e2e.update_digest_sent``: BLAKE3, float16
  as float16), which fixes what the recipient decodes; a received one must come from its
  signer (updates travel one hop) and verify with this node as recipient over the digest
  of what it decoded (``update_digest``); one signed by an older fedloom is refused as
  ``old_update_version``;
* a model (``TrainRequest``/``ModelBroadcast``) of version v is signed by the root once
  per version and settings (``{v, parent, digest, settings}``, parent the previous version
  it signed, settings the ``settings_digest`` of the message's training config, carried in
  its ``settings`` field) and relayed by a region with the proof it verified on receipt; a
  received one must verify against a root of the roster, and then ``ModelVersionGuard``
  refuses an older version or another model under the same version. A broadcast whose
  config is not the signed settings is refused (``unsigned_settings``); a training
  request's config is checked by the site node itself, which answers a mismatch with
  ``TrainRefused`` (``algorithms.site``). An empty ``settings`` field stands for the
  digest of the message's own config;
* once the model's layout is known, tensors of another layout are refused unhashed;
* a ``MaskedUpdate`` (secure aggregation) is signed and checked like an ``Update``, its
  payload digest being ``masked_digest`` (cohort id, masked data and share bundles), so
  the coordinator's host only hands verified uploads to the coordinator.

``EndToEndCore`` holds that state and those decisions with the digests passed in, so
nothing here does I/O or blocks on a large hash: ``runtime.signing.EndToEnd`` (the
daemon's) subclasses it and computes large digests in a thread; the simulator calls
``seal_now``/``check_now``, which hash inline.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeAlias

import msgpack
import numpy.typing as npt

from fedloom.algorithms.protocol import Metric, Node
from fedloom.algorithms.regional import RegionalAggregator
from fedloom.algorithms.secagg.cohort import digest as secagg_digest
from fedloom.algorithms.site import SiteNode
from fedloom.transport.e2e import (
    MODEL_SIGNER_ROLES,
    ModelVersionGuard,
    SenderMismatchError,
    UnsignedError,
    UnsignedSettingsError,
    as_received,
    check_layout,
    digest_as_received,
    previous_update_digests,
    sign_model,
    sign_update,
    tensors_digest,
    update_digest,
    update_digest_sent,
    verify_model,
    verify_update,
)
from fedloom.transport.errors import ProtocolError
from fedloom.transport.half import forget_halves
from fedloom.transport.identity import Identity
from fedloom.transport.limits import ModelLayout
from fedloom.transport.roster import Roster
from fedloom.transport.settings import NO_SETTINGS, settings_digest
from fedloom.transport.tensors import CodecSpec
from fedloom.transport.wire import MaskedUpdate, Message, ModelBroadcast, TrainRequest, Update

__all__ = [
    "KEEP_VERSIONS",
    "EndToEndCore",
    "ModelMessage",
    "ModelProof",
    "Report",
    "model_floor",
    "model_floor_digest",
    "restarted_guard",
    "signed_settings",
    "snapshot_guard",
]

log = logging.getLogger("fedloom.runtime.signing")  # the name operators filter on

KEEP_VERSIONS = 4  # model versions whose proofs (and signatures) are kept

ModelMessage: TypeAlias = TrainRequest | ModelBroadcast
Report = Callable[[Metric], None]
_FP32 = CodecSpec(kind="fp32")


@dataclass(frozen=True, slots=True)
class ModelProof:
    """The root's signature of one model version, as carried by a model message:
    ``digest`` of the weights, ``settings`` the digest of the training config signed."""

    signer: str
    version: int
    parent: int
    sig: bytes
    digest: bytes
    settings: bytes = NO_SETTINGS


def signed_settings(msg: ModelMessage) -> bytes:
    """The settings digest ``msg``'s signature covers: its ``settings`` field, or (empty)
    the digest of its own config (``TypeError``/``ValueError`` if that cannot be hashed)."""
    return bytes(msg.settings) if msg.settings else settings_digest(msg.config)


def masked_digest(msg: MaskedUpdate) -> bytes:
    """The payload digest a masked upload is signed over: BLAKE2b-256 of a labelled
    msgpack of its cohort id, the SHA-256 of its data and the BLAKE2b-256 of its bundles.
    The label's ``-v2`` marks the data digest's change from BLAKE2b to SHA-256: a member
    on older code signs another payload, which never verifies here."""
    data = secagg_digest(bytes(msg.data))  # SHA-256; the member's own digest reused
    bundles = hashlib.blake2b(
        msgpack.packb([[str(r), bytes(b)] for r, b in msg.bundles], use_bin_type=True),
        digest_size=32,
    ).digest()
    packed = msgpack.packb(["fedloom/secagg/masked-v2", bytes(msg.cohort), data, bundles])
    return hashlib.blake2b(packed, digest_size=32).digest()


def held_digest(tensors: Mapping[str, npt.NDArray[Any]]) -> bytes:
    """Digest of tensors a receiver holds after decoding: every float tensor is float32
    once decoded (a simulator may hand over the sender's arrays for a lossless codec)."""
    return tensors_digest(as_received(tensors, _FP32))


def model_floor(node: Node) -> int | None:
    """The newest global model version a restored site or region has held (None: none)."""
    if isinstance(node, SiteNode):
        return node.newest_version if node.newest_version >= 0 else None
    if isinstance(node, RegionalAggregator):
        model = node.current_model()
        return None if model is None else int(model[0])
    return None


def model_floor_digest(node: Node, floor: int) -> bytes | None:
    """The digest of the model a restored site or region holds at version ``floor``, so
    that a second, different model under that number is noticed after a restart too
    (metric ``message_rejected{reason="model_conflict"}`` and a warning); None if its
    weights are not kept."""
    model = node.current_model() if isinstance(node, SiteNode | RegionalAggregator) else None
    if model is None or int(model[0]) != floor:
        return None
    return tensors_digest(model[1])


def restarted_guard(node: Node) -> ModelVersionGuard | None:
    """The version guard a node restored from its store starts with (None: a fresh one):
    no rollback to a model older than one held before the restart, nor another model
    under the version held."""
    floor = model_floor(node)
    if floor is None:
        return None
    return ModelVersionGuard(floor, model_floor_digest(node, floor))


def snapshot_guard(role: str, state: Mapping[str, Any]) -> ModelVersionGuard | None:
    """``restarted_guard`` read from a restored node's state (``Restorable.snapshot()``)
    and its roster role, so that whatever a driver runs (the node, or a wrapper that
    restores it) gets the same guard: a site's newest version and the model it holds
    there, a region's relayed global model; None for other roles or state without one."""
    if role == "site":
        newest = state.get("newest_version")
        floor = int(newest) if isinstance(newest, int) and newest >= 0 else None
        model = state.get("model")
    elif role == "region":
        model = state.get("global")
        floor = None if model is None else int(model[0])
    else:
        return None
    if floor is None:
        return None
    if model is None or int(model[0]) != floor:
        return ModelVersionGuard(floor)  # the model itself is not kept: the version is
    return ModelVersionGuard(floor, tensors_digest(model[1]))


class EndToEndCore:
    """One node's end-to-end signing state and decisions (module docstring).

    ``report`` (optional) gets a ``Metric("update_rejected" | "message_rejected",
    labels={"reason": ...})`` for every refused message; ``rejected`` counts them too.
    """

    def __init__(
        self,
        identity: Identity,
        roster: Roster,
        *,
        keep_versions: int = KEEP_VERSIONS,
        report: Report | None = None,
    ) -> None:
        if keep_versions < 1:
            raise ValueError(f"keep_versions must be >= 1, got {keep_versions}")
        self.identity = identity
        self.roster = roster
        self.report = report
        self.keep_versions = keep_versions
        self.guard = ModelVersionGuard()
        self.rejected: Counter[str] = Counter()
        self.unsigned_sent = 0
        self.signed = 0  # signatures made
        self.verified = 0  # signatures checked and found good
        self._proofs: dict[int, ModelProof] = {}  # verified models, relayed by a region
        self._warned: set[int] = set()
        self._warned_settings: set[int] = set()
        # seal_now's caches (the daemon's async subclass keeps its own, of futures).
        self._own_proofs: dict[tuple[int, bytes], ModelProof] = {}
        self._relay_fits: dict[tuple[int, CodecSpec], bool] = {}
        # The model's layout once known (``set_layout``); ``on_layout`` is told of it.
        self.layout: ModelLayout | None = None
        self.on_layout: Callable[[ModelLayout], None] | None = None

    @property
    def node_id(self) -> str:
        return self.identity.node_id

    @property
    def signs_models(self) -> bool:
        return self.identity.role in MODEL_SIGNER_ROLES

    def use_roster(self, roster: Roster) -> None:
        """Check signatures against ``roster`` from now on (a newer one was installed)."""
        self.roster = roster

    def set_layout(self, layout: ModelLayout) -> None:
        """Check received updates and models against ``layout`` before hashing them."""
        self.layout = layout
        if self.on_layout is not None:
            self.on_layout(layout)

    # ------------------------------------------------------------------ sending

    def signed_update(self, msg: Update, peer: str, digest: bytes) -> Update:
        """``msg`` (this node's own update) signed for ``peer`` over ``digest``."""
        sig = sign_update(
            self.identity, msg.src, msg.seq, msg.base_version, peer, msg.n_examples, digest
        )
        self.signed += 1
        return dataclasses.replace(msg, sig=sig)

    def signed_masked(self, msg: MaskedUpdate, peer: str) -> MaskedUpdate:
        """``msg`` (this node's own masked upload) signed for ``peer``."""
        sig = sign_update(
            self.identity,
            msg.src,
            msg.seq,
            msg.base_version,
            peer,
            msg.n_examples,
            masked_digest(msg),
        )
        self.signed += 1
        return dataclasses.replace(msg, sig=sig)

    def check_masked(self, msg: MaskedUpdate, peer: str) -> None:
        """A masked upload must come from its signer, signed for this node."""
        if msg.src != peer:
            raise SenderMismatchError(
                f"masked update {msg.seq} claims to come from {msg.src!r} but {peer!r} sent it"
            )
        if not msg.sig:
            raise UnsignedError(f"masked update {msg.seq} from {peer!r} is not signed")
        verify_update(
            self.roster,
            msg.sig,
            msg.src,
            msg.seq,
            msg.base_version,
            self.node_id,
            msg.n_examples,
            masked_digest(msg),
        )
        self.verified += 1

    def new_model_proof(
        self, version: int, parent: int, digest: bytes, settings: bytes = NO_SETTINGS
    ) -> ModelProof:
        """The root's proof of model ``version`` (derived from ``parent``, 0 at first)
        sent with the training config whose digest is ``settings``."""
        sig = sign_model(self.identity, version, parent, digest, settings)
        self.signed += 1
        return ModelProof(self.node_id, version, parent, sig, digest, settings)

    def relayed_proof(self, version: int) -> ModelProof | None:
        """The root's proof of ``version`` this node verified on receipt, if kept."""
        return self._proofs.get(version)

    @staticmethod
    def with_proof(msg: ModelMessage, proof: ModelProof) -> ModelMessage:
        return dataclasses.replace(
            msg, signer=proof.signer, parent=proof.parent, sig=proof.sig, settings=proof.settings
        )

    def check_relayed_settings(self, msg: ModelMessage, proof: ModelProof) -> None:
        """Warn (once per version) when this region relays the root's proof of ``msg``'s
        version with a training config the root did not sign: its children refuse it
        (``unsigned_settings``). The message still goes out, so the refusal is visible."""
        try:
            same = settings_digest(msg.config) == proof.settings
        except (TypeError, ValueError):
            same = False
        if same or proof.version in self._warned_settings:
            return
        self._warned_settings.add(proof.version)
        while len(self._warned_settings) > self.keep_versions:
            self._warned_settings.discard(min(self._warned_settings))
        log.warning(
            "%s: the training config sent with model version %d is not the one %s signed "
            "with it: its children will refuse the tasks (unsigned_settings)",
            self.node_id,
            proof.version,
            proof.signer,
            extra={"version": proof.version, "reason": "unsigned_settings"},
        )

    def unsignable(self, msg: Message, peer: str, exc: Exception) -> None:
        log.error(
            "%s: cannot sign a %s for %s (%s); sending it unsigned, %s will refuse it",
            self.node_id,
            type(msg).__name__,
            peer,
            exc,
            peer,
            extra={"peer": peer, "reason": "unsignable"},
        )

    def warn_unsigned(self, version: int) -> None:
        self.unsigned_sent += 1
        if version in self._warned:
            return
        self._warned.add(version)
        while len(self._warned) > self.keep_versions:
            self._warned.discard(min(self._warned))
        log.warning(
            "%s: no root signature for model version %d (not received from the parent "
            "yet, or too old); sending it unsigned: the receiver will refuse it",
            self.node_id,
            version,
            extra={"version": version, "reason": "no_model_proof"},
        )

    def warn_codec_alters_model(self, proof: ModelProof, spec: CodecSpec) -> None:
        log.warning(
            "%s: the %s down codec changes model version %d signed by %s: children will "
            "refuse it (relay models with fp32 or with the root's own codec)",
            self.node_id,
            spec.kind,
            proof.version,
            proof.signer,
            extra={"version": proof.version, "reason": "codec_alters_model"},
        )

    def seal_now(self, msg: Message, peer: str, spec: CodecSpec) -> Message:
        """``msg`` with its signature fields filled in for ``peer``, hashing inline (the
        simulator's; the daemon's ``seal`` hashes large tensors in a thread). Never
        raises for the content: an unsignable message goes out unsigned, logged."""
        try:
            if type(msg) is Update:
                if msg.src != self.node_id:
                    return msg  # not ours: sent as is, and refused by a verifying peer
                return self.signed_update(msg, peer, update_digest_sent(msg.delta, spec))
            if type(msg) is MaskedUpdate:
                return self.signed_masked(msg, peer) if msg.src == self.node_id else msg
            if type(msg) is TrainRequest or type(msg) is ModelBroadcast:
                return self._seal_model_now(msg, spec)
        except (ValueError, TypeError) as exc:
            self.unsignable(msg, peer, exc)
        return msg

    def _seal_model_now(self, msg: ModelMessage, spec: CodecSpec) -> Message:
        version = msg.version
        if self.signs_models:
            settings = settings_digest(msg.config)
            proof = self._own_proofs.get((version, settings))
            if proof is None:
                parent = max((v for v, _ in self._own_proofs if v < version), default=0)
                digest = digest_as_received(msg.weights, spec)
                proof = self.new_model_proof(version, parent, digest, settings)
                self._own_proofs[(version, settings)] = proof
                while len(self._own_proofs) > self.keep_versions:
                    del self._own_proofs[min(self._own_proofs)]
            return self.with_proof(msg, proof)
        found = self.relayed_proof(version)
        if found is None:
            if not msg.sig:
                self.warn_unsigned(version)
            return msg  # (or the node carried the proof itself: a region after a restart)
        if spec.kind != "fp32":  # a lossy codec may alter the root's weights
            key = (version, spec)
            fits = self._relay_fits.get(key)
            if fits is None:
                fits = digest_as_received(msg.weights, spec) == found.digest
                if not fits:
                    self.warn_codec_alters_model(found, spec)
                self._relay_fits[key] = fits
                while len(self._relay_fits) > self.keep_versions:
                    del self._relay_fits[min(self._relay_fits, key=lambda k: k[0])]
            if not fits:
                return msg  # sent as relayed; the receiver refuses it
        self.check_relayed_settings(msg, found)
        return self.with_proof(msg, found)

    # ---------------------------------------------------------------- receiving

    def precheck_update(self, msg: Update, peer: str) -> None:
        """What is refused before the delta is hashed (sender, signature, layout)."""
        if msg.src != peer:
            raise SenderMismatchError(
                f"update {msg.seq} claims to come from {msg.src!r} but {peer!r} sent it "
                "(updates are accepted from their signer only)"
            )
        if not msg.sig:
            raise UnsignedError(f"update {msg.seq} from {peer!r} is not signed")
        if self.layout is not None:
            check_layout(self.layout, msg.delta, f"update {msg.seq} from {peer!r}")

    def verify_update(self, msg: Update, digest: bytes) -> None:
        """Check ``msg``'s signature, for this node, over ``digest`` of the delta held."""
        verify_update(
            self.roster,
            msg.sig,
            msg.src,
            msg.seq,
            msg.base_version,
            self.node_id,
            msg.n_examples,
            digest,
            # only to name an old peer's refusal (computed once the signature failed)
            old_hashes=lambda: previous_update_digests(msg.delta),
        )
        self.verified += 1

    def precheck_model(self, msg: ModelMessage, peer: str) -> None:
        """What is refused before the weights are hashed (no signature, layout)."""
        what = "model broadcast" if type(msg) is ModelBroadcast else "training request"
        if not msg.sig:
            raise UnsignedError(
                f"{what} of model version {msg.version} from {peer!r} carries no root signature"
            )
        if self.layout is not None:
            check_layout(self.layout, msg.weights, f"{what} of model version {msg.version}")

    def accept_model(self, msg: ModelMessage, digest: bytes) -> None:
        """Verify the root's signature over ``digest`` of the weights held and the
        settings digest (``signed_settings``), refuse a broadcast whose config is not
        those settings, pass the version guard, learn the layout (a node without a model)
        and keep the proof. (A training request's config is the site node's to check: it
        answers the aggregator with a ``TrainRefused``.)"""
        try:
            settings = signed_settings(msg)
        except (TypeError, ValueError) as exc:
            raise UnsignedSettingsError(
                f"model version {msg.version}: its training config cannot be hashed ({exc})"
            ) from None
        verify_model(self.roster, msg.signer, msg.sig, msg.version, msg.parent, digest, settings)
        self.verified += 1
        forget_halves(msg.weights)  # hashed as float32: its float16 is not needed
        if type(msg) is ModelBroadcast and msg.settings:
            try:
                same = settings_digest(msg.config) == settings
            except (TypeError, ValueError):
                same = False
            if not same:
                raise UnsignedSettingsError(
                    f"model broadcast of version {msg.version}: its training config is not "
                    f"the one {msg.signer!r} signed with it"
                )
        self.guard.accept(msg.version, digest)
        if self.layout is None:  # a node with no model of its own (a region) learns it here
            self.set_layout(ModelLayout.of(msg.weights))
        self._proofs[msg.version] = ModelProof(
            msg.signer, msg.version, msg.parent, msg.sig, digest, settings
        )
        while len(self._proofs) > self.keep_versions:
            del self._proofs[min(self._proofs)]

    def refused(self, msg: Message, exc: ProtocolError) -> None:
        """Count a refused message (and report it)."""
        self.rejected[exc.reason] += 1
        if self.report is not None:
            name = "update_rejected" if type(msg) in (Update, MaskedUpdate) else "message_rejected"
            self.report(Metric(name, 1.0, {"reason": exc.reason}))

    def check_now(self, msg: Message, peer: str) -> None:
        """Raise a ``ProtocolError`` subclass unless ``msg`` from ``peer`` is acceptable,
        hashing inline (the simulator's; the daemon's ``check`` hashes in a thread)."""
        try:
            if type(msg) is Update:
                self.precheck_update(msg, peer)
                self.verify_update(msg, update_digest(msg.delta))
            elif type(msg) is MaskedUpdate:
                self.check_masked(msg, peer)
            elif type(msg) is TrainRequest or type(msg) is ModelBroadcast:
                self.precheck_model(msg, peer)
                self.accept_model(msg, held_digest(msg.weights))
        except ProtocolError as exc:
            self.refused(msg, exc)
            raise
