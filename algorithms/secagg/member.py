"""The site side of cohort-sealed secure aggregation: ``SecAggMember`` (pure, sans-I/O).

A site that finished training joins a cohort (``SecAggJoin``, sent by its host). When the
aggregator seals a cohort (``SecAggSeal``) the member checks the seal, encodes its clipped,
weighted delta into Z_2^32, masks it with a fresh self mask PRG(b_i) and one pairwise mask
±PRG(s_ij) per other member, Shamir-shares b_i and every s_ij (threshold t), seals one
share bundle to each other member, records the upload and sends ``MaskedUpdate``. Later it
signs the aggregator's view (``SecAggView`` -> ``SecAggViewSig``) and reveals shares for a
view that at least t members signed (``SecAggUnmask`` -> ``SecAggShares``).

Security argument (the aggregator may be malicious, with at most c = ``max_colluders``
colluding members; everyone else honest):

* t = max(min_cohort, (N + c) // 2 + 1). The member refuses a seal with more than
  ``max_cohort`` members (checked first, before any cryptography), that does not name
  it, names its sender (``aggregator_member``: the aggregator's own identity would sign
  views as a colluder) or a member the roster lists as anything but a site
  (``member_role``), has fewer than 2 members, a threshold below its own floor t (with
  ITS ``min_cohort`` and c) or above N, parameters that could overflow the ring, or a
  member whose key the roster lacks (``unknown_key``).
* It refuses a view with |U| < t, U ∩ D ≠ ∅ or U ∪ D ≠ members; it signs at most ONE view
  per cohort and reveals only for that same view, carrying ≥ t valid member signatures on
  exactly it; both are recorded (``Persist``) before the signature or the shares are sent.
  Two different views with t signatures each share 2t - N ≥ c + 1 signers, at least one
  honest, who signs only one: so every honest revealer answers the same (U, D).
* Everything it signs and every pair seed it derives is bound to the digest of the seal
  IT accepted (``cohort.seal_digest``: members, seqs, threshold, clip, precision_bits,
  weight_cap, noise_sigma). An aggregator that gives members different seals (say, a
  weight_cap that makes every contribution but the victim's vanish) gets pair masks that
  never cancel across the two groups and signatures that verify only within each group.
* Inherent bound: the aggregator with t - 1 colluding members learns the victim's update
  from a sum over t (it can always claim the others dropped).
* It reveals shares of b_j only for j ∈ U and of s_ij only for i ∈ U, j ∈ D. For j ∈ D the
  aggregator gets s_ij but never b_j: claiming a live site dropped strips its pair masks
  and still leaves PRG(b_j). For j ∈ U it gets b_j, but y_j's pair masks cancel only in the
  sum over U. So the aggregator learns Σ_{i∈U} v_i with |U| ≥ t ≥ min_cohort, nothing else.
* Pair seeds come from the roster's identity keys (X25519 from Ed25519) and are bound to
  the aggregator, the cohort id, both members and both members' sealed update seqs
  (``cohort.member_pair_context``). Each update (seq) is masked and uploaded at most once,
  and b_i is fresh per upload, so no two uploads ever share masks: an aggregator that
  replays a cohort id (even after the member's bounded records forgot it) gets masks that
  differ from the first ones.
* An uploaded update is consumed: if its cohort aborts, or the view puts the member in D,
  the update is dropped (outcome ``lost``, metric ``secagg_update_lost``), never re-joined.
  A crash between recording the upload (``Persist``) and sending it loses that update the
  same way: it is never uploaded twice.
* Weight: ``min(n, weight_cap) / weight_cap`` with the seal's cap and the n it joined with
  (the coordinator checks the sum of the weights against the joins exactly).

State kept: one record per cohort the member uploaded to (aggregator, seq, members, t, its
own index, digest of what it uploaded, its own shares of b_i and s_ij, the one view it
signed or revealed for), the last ``max_records`` cohorts (default 64; a cohort older than
that is unknown: views, unmasks and aborts for it are refused, which is safe because no
seal can revive it: its seq is consumed). Every change is a ``Persist`` to the log
``MEMBER_LOG_KEY`` before any message that depends on it; ``snapshot()`` / ``restore()``
carry the records through the host's checkpoint.

What the host (the site) reads back: ``take_outcomes()`` — ``uploaded`` (seq is consumed;
keep it until Ack), ``lost`` (drop it: its cohort aborted after the upload, or it was
counted as dropped), ``refused`` (the seal was refused; the update was not uploaded),
``rejoin`` (the cohort whose seal was refused has moved on without it — a view, unmask or
abort of it arrived — so the update should join again now; joining again at ``refused``
would only get the same seal back while that cohort waits for uploads).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from fedloom.algorithms.dp.release import member_noise_sigma
from fedloom.algorithms.protocol import Effect, Log, Metric, Persist, Send, Weights
from fedloom.algorithms.secagg.bundle import BundleError, pack_bundle, unpack_bundle
from fedloom.algorithms.secagg.cohort import (
    DEFAULT_MAX_COHORT,
    DEFAULT_MAX_COLLUDERS,
    MIN_COHORT_FLOOR,
    byte_stream,
    check_view,
    digest,
    member_pair_context,
    refused,
    seal_digest,
    threshold,
    view_message,
)
from fedloom.algorithms.secagg.field import (
    FieldSpec,
    check_capacity,
    encode,
    member_weight,
    template_size,
)
from fedloom.algorithms.secagg.keys import SecAggCryptoError, SecAggKeys
from fedloom.algorithms.secagg.masking import add_pair_masks, mask
from fedloom.algorithms.secagg.shamir import split_many
from fedloom.transport.wire import (
    MAX_COHORT,
    MaskedUpdate,
    SecAggAbort,
    SecAggSeal,
    SecAggShares,
    SecAggUnmask,
    SecAggView,
    SecAggViewSig,
)

__all__ = [
    "DEFAULT_MAX_RECORDS",
    "MAX_PREMASKED",
    "MEMBER_LOG_KEY",
    "EncodeParams",
    "MemberOutcome",
    "NoiseFn",
    "PendingUpdate",
    "SecAggMember",
    "seal_seq",
]

MEMBER_LOG_KEY = "secagg/member"
DEFAULT_MAX_RECORDS = 64
# Pre-masked vectors kept at once (one per pending joined update; the outbox is bounded
# too): the oldest is forgotten first, and a seal for it then masks from scratch.
MAX_PREMASKED = 8

# (sigma, n) -> n integer noise samples (discrete Gaussian, ``algorithms.dp``).
NoiseFn = Callable[[float, int], npt.NDArray[np.int64]]


@dataclass(frozen=True, slots=True)
class PendingUpdate:
    """A finished training result waiting for a cohort."""

    seq: int
    base_version: int
    delta: Weights
    n_examples: int


@dataclass(frozen=True, slots=True)
class EncodeParams:
    """What a seal fixes of a member's encoding: a vector pre-masked for these is used
    only by a seal with exactly these (``SecAggMember.premask``)."""

    clip: float
    precision_bits: int
    weight_cap: int
    noise_sigma: float

    @classmethod
    def of(cls, msg: SecAggSeal) -> EncodeParams:
        return cls(msg.clip, msg.precision_bits, msg.weight_cap, msg.noise_sigma)


@dataclass(frozen=True, slots=True)
class _Premasked:
    """``vec = encode(update) + PRG(self_seed)`` for ``update`` under ``params``."""

    update: PendingUpdate
    params: EncodeParams
    self_seed: bytes
    vec: npt.NDArray[np.uint32]


@dataclass(frozen=True, slots=True)
class MemberOutcome:
    """What became of update ``seq`` in ``cohort``: ``uploaded``, ``lost``, ``refused`` or
    ``rejoin`` (see the module docstring)."""

    kind: str
    cohort: bytes
    seq: int


def seal_seq(msg: SecAggSeal, me: str) -> int | None:
    """The seq ``msg`` seals for member ``me`` (None if ``me`` is not sealed in it): the
    host looks up which pending update to pass to ``on_seal``."""
    if len(msg.seqs) != len(msg.members) or me not in msg.members:
        return None
    return msg.seqs[msg.members.index(me)]


def _same_update(a: PendingUpdate, b: PendingUpdate) -> bool:
    """The same update: same seq, base, count and the very same tensors (identity: a
    pre-masked vector is used only for the arrays it was encoded from)."""
    if (a.seq, a.base_version, a.n_examples) != (b.seq, b.base_version, b.n_examples):
        return False
    if a.delta is b.delta:
        return True
    return a.delta.keys() == b.delta.keys() and all(a.delta[k] is b.delta[k] for k in a.delta)


def _view_key(survivors: Sequence[str], dropped: Sequence[str]) -> tuple[tuple[str, ...], ...]:
    return (tuple(sorted(survivors)), tuple(sorted(dropped)))


class SecAggMember:
    """One site's member side of secure aggregation (see the module docstring)."""

    def __init__(
        self,
        node_id: str,
        keys: SecAggKeys,
        rng: np.random.Generator,
        *,
        min_cohort: int = MIN_COHORT_FLOOR,
        min_noise_sigma: float = 0.0,
        min_noise_multiplier: float = 0.0,
        max_records: int = DEFAULT_MAX_RECORDS,
        max_colluders: int = DEFAULT_MAX_COLLUDERS,
        max_cohort: int = DEFAULT_MAX_COHORT,
    ) -> None:
        if not node_id:
            raise ValueError("node_id must be non-empty")
        if isinstance(min_cohort, bool) or not isinstance(min_cohort, int):
            raise ValueError(f"min_cohort must be an int, got {min_cohort!r}")
        if min_cohort < MIN_COHORT_FLOOR:
            raise ValueError(f"min_cohort must be >= {MIN_COHORT_FLOOR}, got {min_cohort}")
        if not (math.isfinite(min_noise_sigma) and min_noise_sigma >= 0):
            raise ValueError(f"min_noise_sigma must be finite and >= 0, got {min_noise_sigma}")
        if not (math.isfinite(min_noise_multiplier) and min_noise_multiplier >= 0):
            raise ValueError(
                f"min_noise_multiplier must be finite and >= 0, got {min_noise_multiplier}"
            )
        if max_records < 1:
            raise ValueError(f"max_records must be >= 1, got {max_records}")
        for name, v in (("max_colluders", max_colluders), ("max_cohort", max_cohort)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be an int >= 0, got {v!r}")
        if not 2 <= max_cohort <= MAX_COHORT:
            raise ValueError(f"max_cohort must be from 2 to {MAX_COHORT}, got {max_cohort}")
        self.node_id = node_id
        self._keys = keys
        self._rng = rng
        self.min_cohort = min_cohort
        self.min_noise_sigma = float(min_noise_sigma)
        # Central DP (this site's own [privacy] z): a seal's noise must give the cohort's
        # sum at least z·Δ of noise over its t members, whatever the aggregator says.
        self.min_noise_multiplier = float(min_noise_multiplier)
        self.max_records = max_records
        # c: two views with t signatures share >= c + 1 signers (``cohort.threshold``).
        self.max_colluders = max_colluders
        # The most members this site accepts in one seal (refused before any crypto).
        self.max_cohort = max_cohort
        self._records: OrderedDict[bytes, dict[str, Any]] = OrderedDict()
        self._outcomes: list[MemberOutcome] = []
        # Cohorts whose seal this member refused: cohort -> (aggregator, seq).
        self._refused: OrderedDict[bytes, tuple[str, int]] = OrderedDict()
        # seq -> its pre-masked vector (in memory only, never persisted; see ``premask``).
        self._premasked: OrderedDict[int, _Premasked] = OrderedDict()

    # ------------------------------------------------------------------ queries

    def take_outcomes(self) -> list[MemberOutcome]:
        """Outcomes since the last call (oldest first)."""
        out, self._outcomes = self._outcomes, []
        return out

    def consumed(self, seq: int) -> bool:
        """Whether update ``seq`` was uploaded to some cohort this member still records."""
        return any(r["seq"] == seq for r in self._records.values())

    def cohorts(self) -> list[bytes]:
        """The cohort ids this member records, oldest first."""
        return list(self._records)

    # ----------------------------------------------------------------- pre-mask

    def premask(
        self, update: PendingUpdate, params: EncodeParams, noise_fn: NoiseFn | None = None
    ) -> bool:
        """Do the seal-independent half of masking ``update`` now (when it joins): encode
        it for the expected ``params`` (clip, precision, the seal's weight cap, noise) and
        add the self mask PRG(b_i) of a fresh b_i. A seal for ``update.seq`` with exactly
        these params then adds only the pair masks (and shares b_i); any other seal masks
        from scratch. Returns whether a vector is now held for ``update.seq``.

        b_i stays fresh per upload: it is drawn here, held only in memory (a restart
        forgets it; nothing persisted changes), taken out by the first seal for this seq
        whatever that seal's outcome, and never drawn for a seq already uploaded. One
        vector per pending update, at most ``MAX_PREMASKED``."""
        held = self._premasked.get(update.seq)
        if held is not None and _same_update(held.update, update) and held.params == params:
            return True
        self._premasked.pop(update.seq, None)
        if self.consumed(update.seq):
            return False
        if params.noise_sigma > 0 and noise_fn is None:
            return False
        try:
            spec = FieldSpec(params.clip, params.precision_bits, params.weight_cap)
            weight = member_weight(update.n_examples, "examples", params.weight_cap)
            noise = None
            if params.noise_sigma > 0 and noise_fn is not None:
                noise = noise_fn(params.noise_sigma, template_size(update.delta))
            vec = encode(update.delta, weight, spec, self._rng, noise)
        except ValueError:
            return False  # the seal refuses it with the reason
        self_seed = self._keys.fresh_secret()
        self._premasked[update.seq] = _Premasked(
            update, params, self_seed, mask(vec, self_seed, {}, self.node_id, in_place=True)
        )
        while len(self._premasked) > MAX_PREMASKED:
            self._premasked.popitem(last=False)
        return True

    def forget_premasked(self, keep: Callable[[int], bool]) -> None:
        """Drop every pre-masked vector whose seq ``keep`` rejects (acked, lost, gone)."""
        for seq in [s for s in self._premasked if not keep(s)]:
            del self._premasked[seq]

    def premasked(self) -> list[int]:
        """The seqs a pre-masked vector is held for, oldest first."""
        return list(self._premasked)

    # -------------------------------------------------------------------- seal

    def on_seal(
        self,
        peer: str,
        msg: SecAggSeal,
        update: PendingUpdate,
        weighting: str,
        noise_fn: NoiseFn | None = None,
    ) -> list[Effect]:
        """Check ``msg`` (from aggregator ``peer``) and, if it is acceptable, upload
        ``update`` masked for it: ``[Persist(record), Send(MaskedUpdate), Metric]``."""
        me = self.node_id
        fields = {"aggregator": peer, "cohort": msg.cohort.hex(), "seq": update.seq}

        def refuse(reason: str, text: str) -> list[Effect]:
            self._outcomes.append(MemberOutcome("refused", msg.cohort, update.seq))
            if msg.cohort not in self._records:
                self._refused[msg.cohort] = (peer, update.seq)
                while len(self._refused) > self.max_records:
                    self._refused.popitem(last=False)
            return refused(reason, f"secure aggregation: seal refused: {text}", fields)

        members = tuple(msg.members)
        n = len(members)
        if n > self.max_cohort:  # before anything costs more than this comparison
            return refuse(
                "cohort_size",
                f"{n} members; this site accepts at most max_cohort = {self.max_cohort}",
            )
        if me not in members:
            return refuse("not_member", "this site is not one of its members")
        if peer in members:
            # The aggregator's own identity as a member would sign views as a colluder.
            return refuse("aggregator_member", f"it names its sender {peer!r} as a member")
        if len(set(members)) != n or not all(isinstance(m, str) and m for m in members):
            return refuse("members", "its member list repeats a member")
        if len(msg.seqs) != n:
            return refuse("seal_shape", f"{len(msg.seqs)} seqs for {n} members")
        if not 2 <= n <= MAX_COHORT:
            return refuse("cohort_size", f"{n} members (2 to {MAX_COHORT} allowed)")
        t = msg.threshold
        floor = threshold(n, self.min_cohort, self.max_colluders)
        if isinstance(t, bool) or not isinstance(t, int) or t < floor or t > n:
            return refuse(
                "threshold",
                f"threshold {t} for {n} members; this site needs {floor} <= t <= {n} "
                f"(more than half of the members plus max_colluders = {self.max_colluders}, "
                f"and at least min_cohort = {self.min_cohort})",
            )
        x = members.index(me) + 1
        if msg.seqs[x - 1] != update.seq:
            return refuse("seq_mismatch", f"it seals seq {msg.seqs[x - 1]}, not {update.seq}")
        record = self._records.get(msg.cohort)
        if record is not None:
            if record["agg"] == peer and record["seq"] == update.seq:
                # The same seal again (a resend after a reconnect): already uploaded.
                return [Metric("secagg_duplicate", 1.0, {"kind": "seal"})]
            return refuse("cohort_reused", "this site already uploaded under that cohort id")
        if self.consumed(update.seq):
            return refuse("update_consumed", f"update {update.seq} was already uploaded")
        try:
            spec = FieldSpec(msg.clip, msg.precision_bits, msg.weight_cap)
            check_capacity(n, msg.clip, msg.precision_bits, msg.noise_sigma)
        except ValueError as exc:
            return refuse("capacity", str(exc))
        if msg.noise_sigma < self.min_noise_sigma:
            return refuse(
                "noise_too_low",
                f"noise_sigma {msg.noise_sigma} below this site's {self.min_noise_sigma}",
            )
        if self.min_noise_multiplier > 0:
            # σ_member ≥ z·(C·2^f + √d)/√t with the seal's own C, f and t: the view this
            # member signs has ≥ t survivors, each adding σ_member, so the sum carries
            # ≥ z·Δ of noise, Δ the sensitivity of one member's encoded vector.
            least = member_noise_sigma(
                self.min_noise_multiplier,
                msg.clip,
                msg.precision_bits,
                template_size(update.delta),
                msg.threshold,
            )
            if msg.noise_sigma < least:
                return refuse(
                    "noise_too_low",
                    f"noise_sigma {msg.noise_sigma:g} gives less than this site's noise "
                    f"multiplier {self.min_noise_multiplier:g} (needs >= {least:g} for "
                    f"clip {msg.clip:g}, precision_bits {msg.precision_bits}, threshold "
                    f"{msg.threshold})",
                )
        if msg.noise_sigma > 0 and noise_fn is None:
            return refuse("no_noise", "it asks for noise and this site has no noise source")
        others = [m for m in members if m != me]
        seq_of = dict(zip(members, msg.seqs, strict=True))
        sealed = seal_digest(peer, msg)
        try:
            roles = {j: self._keys.role(j) for j in others}
            not_sites = sorted(j for j, r in roles.items() if r is not None and r != "site")
            if not_sites:
                return refuse(
                    "member_role",
                    f"it names {', '.join(map(repr, not_sites[:8]))}, not site(s) in the roster",
                )
            pair_seeds = {
                j: self._keys.pair_seed(
                    j, member_pair_context(peer, msg.cohort, me, update.seq, j, seq_of[j], sealed)
                )
                for j in others
            }
        except SecAggCryptoError as exc:  # SecAggKeyError: a member the roster lacks
            return refuse("unknown_key", str(exc))
        # The seal's cap decides (1: every member with an example weighs 1): the
        # coordinator checks the sum of the weights against the joins' n_examples.
        member_weight(update.n_examples, weighting, msg.weight_cap)  # validates weighting
        # A vector pre-masked at join is taken out now whatever happens next: its b_i
        # serves this one seal at most.
        held = self._premasked.pop(update.seq, None)
        if (
            held is not None
            and _same_update(held.update, update)
            and held.params == EncodeParams.of(msg)
        ):
            self_seed, vec = held.self_seed, held.vec  # vec already carries PRG(b_i)
        else:
            weight = member_weight(update.n_examples, "examples", msg.weight_cap)
            noise = None
            if msg.noise_sigma > 0 and noise_fn is not None:
                noise = noise_fn(msg.noise_sigma, template_size(update.delta))
            try:
                vec = encode(update.delta, weight, spec, self._rng, noise)
            except ValueError as exc:
                return refuse("bad_update", str(exc))
            self_seed = self._keys.fresh_secret()
            vec = mask(vec, self_seed, {}, me, in_place=True)
        randbytes = byte_stream(self._keys.fresh_secret())
        b_shares, *pair_shares = split_many(
            [self_seed, *(pair_seeds[j] for j in others)], n, t, randbytes
        )
        s_shares = dict(zip(others, pair_shares, strict=True))
        bundles: list[tuple[str, bytes]] = []
        try:
            for k, m in enumerate(members):
                if m == me:
                    continue
                plain = pack_bundle(
                    msg.cohort, me, m, k + 1, b_shares[k], {j: s_shares[j][k] for j in others}
                )
                bundles.append((m, self._keys.seal_to(m, plain)))
        except SecAggCryptoError as exc:
            return refuse("unknown_key", str(exc))
        # vec is this seal's alone (a fresh encoding, or the pre-masked one taken out
        # above), so the pair masks go into it.
        masked = add_pair_masks(vec, pair_seeds, me, in_place=True)
        data = masked.astype("<u4", copy=False).tobytes()
        record = {
            "cohort": msg.cohort,
            "agg": peer,
            "seq": update.seq,
            "members": members,
            "t": t,
            "x": x,
            "digest": digest(data),
            "seal": sealed,
            "b": b_shares[x - 1],
            "s": {j: s_shares[j][x - 1] for j in others},
            "view": None,
            "signed": False,
            "lost": False,
        }
        self._remember(record)
        self._outcomes.append(MemberOutcome("uploaded", msg.cohort, update.seq))
        return [
            Persist(MEMBER_LOG_KEY, {"op": "upload", **record}, append=True),
            Send(
                peer,
                MaskedUpdate(
                    src=me,
                    seq=update.seq,
                    cohort=msg.cohort,
                    base_version=update.base_version,
                    n_examples=update.n_examples,
                    data=data,
                    bundles=tuple(bundles),
                ),
            ),
            Metric("secagg_uploaded", 1.0),
            Log("info", "secure aggregation: masked update uploaded", {**fields, "members": n}),
        ]

    # -------------------------------------------------------------------- view

    def _record_for(
        self, peer: str, cohort: bytes, what: str
    ) -> tuple[dict[str, Any] | None, list[Effect]]:
        record = self._records.get(cohort)
        fields = {"aggregator": peer, "cohort": cohort.hex()}
        refusal = self._refused.get(cohort)
        if record is None and refusal is not None and refusal[0] == peer:
            # This member refused the seal: it has nothing to sign, reveal or drop. The
            # cohort went on without it, so its update may join again (once).
            del self._refused[cohort]
            self._outcomes.append(MemberOutcome("rejoin", cohort, refusal[1]))
            return None, [Metric("secagg_ignored", 1.0, {"kind": what})]
        if record is None:
            return None, refused(
                "unknown_cohort",
                f"secure aggregation: {what} for a cohort never uploaded to",
                fields,
            )
        if record["agg"] != peer:
            return None, refused(
                "wrong_aggregator", f"secure aggregation: {what} from another aggregator", fields
            )
        return record, []

    def _check_view(
        self, record: dict[str, Any], survivors: Sequence[str], dropped: Sequence[str], what: str
    ) -> list[Effect]:
        fields = {"aggregator": record["agg"], "cohort": record["cohort"].hex()}
        reason = check_view(record["members"], record["t"], survivors, dropped)
        if reason is not None:
            return refused(
                reason,
                f"secure aggregation: {what} refused: survivors {len(survivors)}, dropped "
                f"{len(dropped)}, threshold {record['t']} of {len(record['members'])}",
                fields,
            )
        key = _view_key(survivors, dropped)
        if record["view"] is not None and tuple(map(tuple, record["view"])) != key:
            return refused(
                "second_view",
                f"secure aggregation: {what} refused: another view of this cohort was "
                "already signed or revealed for",
                fields,
            )
        return []

    def _lost_if_dropped(self, record: dict[str, Any], dropped: Sequence[str]) -> list[Effect]:
        if self.node_id not in dropped or record["lost"]:
            return []
        record["lost"] = True
        self._outcomes.append(MemberOutcome("lost", record["cohort"], record["seq"]))
        return [
            Metric("secagg_update_lost", 1.0, {"reason": "dropped"}),
            Log(
                "warning",
                "secure aggregation: this site's upload was counted as dropped; update lost",
                {"cohort": record["cohort"].hex(), "seq": record["seq"]},
            ),
        ]

    def on_view(self, peer: str, msg: SecAggView) -> list[Effect]:
        """Sign ``msg`` if it is acceptable and no other view of its cohort was signed."""
        record, bad = self._record_for(peer, msg.cohort, "view")
        if record is None:
            return bad
        bad = self._check_view(record, msg.survivors, msg.dropped, "view")
        if bad:
            return bad
        vm = view_message(peer, msg.cohort, msg.survivors, msg.dropped, record["seal"])
        out: list[Effect] = []
        if record["signed"]:
            out.append(Metric("secagg_duplicate", 1.0, {"kind": "view"}))
        else:
            record["view"] = list(_view_key(msg.survivors, msg.dropped))
            record["signed"] = True
            out.append(
                Persist(
                    MEMBER_LOG_KEY,
                    {"op": "sign", "cohort": msg.cohort, "view": record["view"]},
                    append=True,
                )
            )
        out.append(Send(peer, SecAggViewSig(cohort=msg.cohort, sig=self._keys.sign(vm))))
        out.extend(self._lost_if_dropped(record, msg.dropped))
        return out

    # ------------------------------------------------------------------ unmask

    def on_unmask(self, peer: str, msg: SecAggUnmask) -> list[Effect]:
        """Reveal shares for ``msg``'s view if ≥ t members signed exactly it and it is the
        one view this member signs or reveals for."""
        record, bad = self._record_for(peer, msg.cohort, "unmask")
        if record is None:
            return bad
        bad = self._check_view(record, msg.survivors, msg.dropped, "unmask")
        if bad:
            return bad
        fields = {"aggregator": peer, "cohort": msg.cohort.hex()}
        members = record["members"]
        vm = view_message(peer, msg.cohort, msg.survivors, msg.dropped, record["seal"])
        valid: set[str] = set()
        for signer, sig in msg.sigs:
            if signer not in members or signer in valid:
                continue
            try:
                ok = self._keys.verify(signer, vm, sig)
            except SecAggCryptoError:
                ok = False
            if ok:
                valid.add(signer)
        if len(valid) < record["t"]:
            return refused(
                "too_few_signatures",
                f"secure aggregation: unmask refused: {len(valid)} valid signatures of the "
                f"view, {record['t']} needed",
                fields,
            )
        out: list[Effect] = []
        if record["view"] is None:
            record["view"] = list(_view_key(msg.survivors, msg.dropped))
            out.append(
                Persist(
                    MEMBER_LOG_KEY,
                    {"op": "reveal", "cohort": msg.cohort, "view": record["view"]},
                    append=True,
                )
            )
        survivors, dropped = set(msg.survivors), list(msg.dropped)
        me, x = self.node_id, record["x"]
        self_shares: list[tuple[str, bytes]] = []
        pair_shares: list[tuple[str, str, bytes]] = []
        if me in survivors:
            self_shares.append((me, record["b"]))
            pair_shares.extend((me, j, record["s"][j]) for j in dropped)
        bad_bundles = 0
        for owner, boxed in msg.bundles:
            # Only survivors' bundles are opened: nothing of a dropped member's b_j leaves.
            if owner == me or owner not in survivors:
                continue
            try:
                bundle = unpack_bundle(
                    self._keys.open_from(owner, boxed),
                    cohort=msg.cohort,
                    owner=owner,
                    recipient=me,
                    x=x,
                    members=members,
                )
            except (SecAggCryptoError, BundleError) as exc:
                bad_bundles += 1
                out.extend(
                    refused(
                        "bad_bundle",
                        f"secure aggregation: a share bundle does not open: {exc}",
                        {**fields, "owner": owner},
                    )
                )
                continue
            self_shares.append((owner, bundle.self_share))
            pair_shares.extend((owner, j, bundle.pair_shares[j]) for j in dropped)
        out.append(
            Send(
                peer,
                SecAggShares(
                    cohort=msg.cohort,
                    self_shares=tuple(self_shares),
                    pair_shares=tuple(pair_shares),
                ),
            )
        )
        out.append(Metric("secagg_revealed", 1.0))
        out.extend(self._lost_if_dropped(record, msg.dropped))
        return out

    # ------------------------------------------------------------------- abort

    def on_abort(self, peer: str, msg: SecAggAbort) -> list[Effect]:
        """The cohort ended without a sum: an uploaded update is consumed and dropped."""
        record, bad = self._record_for(peer, msg.cohort, "abort")
        if record is None:
            return bad
        if record["lost"]:
            return [Metric("secagg_duplicate", 1.0, {"kind": "abort"})]
        record["lost"] = True
        self._outcomes.append(MemberOutcome("lost", msg.cohort, record["seq"]))
        return [
            Persist(MEMBER_LOG_KEY, {"op": "lost", "cohort": msg.cohort}, append=True),
            Metric("secagg_update_lost", 1.0, {"reason": "aborted"}),
            Log(
                "warning",
                "secure aggregation: cohort aborted after this site uploaded; update lost "
                "(an uploaded update is never masked twice)",
                {
                    "aggregator": peer,
                    "cohort": msg.cohort.hex(),
                    "seq": record["seq"],
                    "why": msg.reason[:200],
                },
            ),
        ]

    # ------------------------------------------------------------- durability

    def _remember(self, record: dict[str, Any]) -> None:
        self._records[record["cohort"]] = record
        self._records.move_to_end(record["cohort"])
        while len(self._records) > self.max_records:
            self._records.popitem(last=False)

    def snapshot(self) -> dict[str, Any]:
        """The records, oldest first (what the host's checkpoint stores)."""
        return {"records": [dict(r) for r in self._records.values()]}

    def restore(
        self, state: Mapping[str, Any] | None, log: Sequence[Mapping[str, Any]] = ()
    ) -> None:
        """Load ``snapshot()``'s ``state`` (None: none), then replay the ``MEMBER_LOG_KEY``
        records written after it. ValueError for records this member cannot have written."""
        self._records.clear()
        try:
            for rec in (state or {}).get("records", ()):
                self._remember(_plain_record(rec))
            for entry in log:
                op = entry["op"]
                if op == "upload":
                    self._remember(_plain_record({k: v for k, v in entry.items() if k != "op"}))
                    continue
                record = self._records.get(entry["cohort"])
                if record is None:
                    continue  # forgotten since (bounded records)
                if op in ("sign", "reveal"):
                    record["view"] = [list(v) for v in entry["view"]]
                    record["signed"] = record["signed"] or op == "sign"
                elif op == "lost":
                    record["lost"] = True
                else:
                    raise ValueError(f"unknown secure-aggregation member record {op!r}")
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"secure-aggregation member state is malformed: {exc}") from None


_RECORD_KEYS = frozenset(
    (
        "cohort",
        "agg",
        "seq",
        "members",
        "t",
        "x",
        "digest",
        "seal",
        "b",
        "s",
        "view",
        "signed",
        "lost",
    )
)


def _plain_record(rec: Mapping[str, Any]) -> dict[str, Any]:
    # A record written before seals were digested has no "seal": its views can no longer
    # verify (the coordinator signs under the digest), so its cohort aborts; nothing leaks.
    keys = set(rec) | {"seal"}
    if keys != _RECORD_KEYS:
        raise ValueError(f"secure-aggregation member record has keys {sorted(rec)}")
    out = dict(rec)
    out["seal"] = bytes(rec.get("seal", b""))
    out["members"] = tuple(rec["members"])
    out["s"] = dict(rec["s"])
    if rec["view"] is not None:
        out["view"] = [list(v) for v in rec["view"]]
    return out
