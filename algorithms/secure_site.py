"""A site's secure uplink: its finished updates reach the parent only masked, in cohorts.

``SiteNode`` keeps each finished update in its ``Outbox`` as before (numbered, persisted,
kept until the parent's ``Ack``, backpressure); with secure aggregation every copy the
outbox would send as a plain ``Update`` leaves as a ``SecAggJoin`` naming it instead
(``uplink``: the one place a site's sends pass, so no plain update ever leaves a secure
site, whatever its parent asks). The parent seals a cohort; the site's ``SecAggMember``
(``algorithms.secagg.member``) masks the OLDEST pending update not yet uploaded and
uploads it (``MaskedUpdate``), then answers the view and unmask rounds.

Each update is masked and uploaded at most once (the spec's rule):

* uploaded, then the cohort is applied: the parent's ``Ack`` ends it as for a plain one;
* uploaded, then the cohort aborts (or nothing is heard of it for ``upload_timeout_s +
  unmask_timeout_s`` after the upload, e.g. the parent lost it in a restart): the update is
  consumed, dropped from the outbox (metric ``secagg_update_lost``, a warning), never
  joined again: a second masking of the same vector under another cohort could let an
  aggregator difference two sums;
* never uploaded (the cohort aborted before, the seal was refused, the link dropped): the
  update joins again (on the abort, and on every reconnect as the outbox resends).

An uploaded update does not join again even on a reconnect, so an ``Ack`` lost with its
link leaves it to the no-outcome timeout: it is then counted lost although its cohort was
applied (the metric errs that way; nothing is applied twice or masked twice).

Durable: the member logs each upload (``MEMBER_LOG_KEY``) before it is sent, and its
records (the one view signed, the one reveal per cohort) ride in the site's snapshot and
log; a restarted site rebuilds which pending updates were uploaded from them, so it
neither re-joins with an uploaded update nor signs a second view.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from fedloom.algorithms.protocol import Effect, Log, Metric, Send
from fedloom.algorithms.secagg.cohort import DEFAULT_MAX_COHORT, DEFAULT_MAX_COLLUDERS
from fedloom.algorithms.secagg.keys import SecAggKeys
from fedloom.algorithms.secagg.member import (
    MAX_PREMASKED,
    MEMBER_LOG_KEY,
    EncodeParams,
    PendingUpdate,
    SecAggMember,
    seal_seq,
)
from fedloom.transport.wire import (
    Message,
    SecAggAbort,
    SecAggJoin,
    SecAggSeal,
    SecAggUnmask,
    SecAggView,
    Update,
)

__all__ = ["MEMBER_LOG_KEY", "SECAGG_TO_SITE", "SiteSecAgg", "join_for"]

SECAGG_TO_SITE = (SecAggSeal, SecAggView, SecAggUnmask, SecAggAbort)
NoiseSource = Callable[[np.random.Generator, float, int], npt.NDArray[np.int64]]


def join_for(update: Update) -> SecAggJoin:
    """The join a secure site sends where it would send ``update``."""
    return SecAggJoin(
        src=update.src,
        seq=int(update.seq),
        base_version=int(update.base_version),
        task=int(update.task),
        n_examples=int(update.n_examples),
    )


def _pending(update: Update) -> PendingUpdate:
    return PendingUpdate(
        seq=int(update.seq),
        base_version=int(update.base_version),
        delta=update.delta,
        n_examples=int(update.n_examples),
    )


class SiteSecAgg:
    """The secure-aggregation half of one site (held by ``SiteNode``)."""

    def __init__(
        self,
        site_id: str,
        keys: SecAggKeys,
        *,
        rng: np.random.Generator,
        min_cohort: int,
        weighting: str = "uniform",
        upload_timeout_s: float = 300.0,
        unmask_timeout_s: float = 60.0,
        noise: NoiseSource | None = None,
        min_noise_multiplier: float = 0.0,
        max_colluders: int = DEFAULT_MAX_COLLUDERS,
        max_cohort: int = DEFAULT_MAX_COHORT,
    ) -> None:
        self.site_id = site_id
        self.keys = keys
        self.weighting = weighting
        # Uploaded, and neither acked nor aborted after this long: the cohort is gone.
        self.lost_after_s = float(upload_timeout_s) + 2.0 * float(unmask_timeout_s)
        self._rng = rng
        # With this site's own [privacy] (central DP): the least noise it accepts in a
        # seal, so that no aggregator can shrink the noise it calibrated (``SecAggMember``).
        self.member = SecAggMember(
            site_id,
            keys,
            rng,
            min_cohort=min_cohort,
            min_noise_multiplier=min_noise_multiplier,
            max_colluders=max_colluders,
            max_cohort=max_cohort,
        )
        self._noise = noise
        # Pending seqs uploaded to a cohort -> when (None until the first event after a
        # restore: the clock is not durable).
        self._uploaded: dict[int, float | None] = {}
        self.lost = 0
        # The encoding the parent's last seal asked for: a joining update is pre-masked
        # for it (the member's ``premask``); None until a first seal arrives.
        self._expect: EncodeParams | None = None
        # Joined updates to pre-mask, done at the next deadline (asked for "now"), so the
        # join leaves before the work starts; the latest event's time.
        self._to_premask: dict[int, Update] = {}
        self._now: float | None = None

    # ----------------------------------------------------------------- reading
    def uploaded(self, seq: int) -> bool:
        return seq in self._uploaded

    def next_deadline(self) -> float | None:
        times = [t + self.lost_after_s for t in self._uploaded.values() if t is not None]
        if self._to_premask and self._now is not None:
            times.append(self._now)  # pre-mask the joined updates right after this step
        return min(times, default=None)

    def touch(self, now: float) -> None:
        """After a restore the upload times are unknown: they count from the first event."""
        self._now = now
        for seq, at in self._uploaded.items():
            if at is None:
                self._uploaded[seq] = now

    # ----------------------------------------------------------------- sending
    def uplink(self, out: Iterable[Effect]) -> list[Effect]:
        """``out`` with every plain ``Update`` turned into its join (or dropped, when it
        was uploaded already: it is in a cohort, it never joins again)."""
        result: list[Effect] = []
        for e in out:
            if isinstance(e, Send) and isinstance(e.msg, Update):
                if e.msg.seq in self._uploaded:
                    continue
                result.append(Send(e.peer, join_for(e.msg)))
                if self._expect is not None:
                    # Finished training, joining: the seal-independent masking is done
                    # at the next deadline, once the join has left (``expired``).
                    self._to_premask.pop(e.msg.seq, None)
                    self._to_premask[e.msg.seq] = e.msg
                    while len(self._to_premask) > MAX_PREMASKED:
                        del self._to_premask[next(iter(self._to_premask))]
            else:
                result.append(e)
        return result

    # ----------------------------------------------------------------- events
    def on_message(
        self, peer: str, msg: Message, pending: Sequence[Update], now: float
    ) -> tuple[list[Effect], list[int]]:
        """A cohort message from the parent. Returns effects and the seqs to drop from the
        outbox (uploaded to a cohort that ended without them: consumed)."""
        out: list[Effect] = []
        if isinstance(msg, SecAggSeal):
            out = self._on_seal(peer, msg, pending)
        elif isinstance(msg, SecAggView):
            out = self.member.on_view(peer, msg)
        elif isinstance(msg, SecAggUnmask):
            out = self.member.on_unmask(peer, msg)
        rejoin: list[Update] = []
        if isinstance(msg, SecAggAbort):
            out = self.member.on_abort(peer, msg)
            if msg.cohort not in self.member.cohorts():
                # It aborted before this site uploaded: every update not in a cohort
                # joins again (the parent ignores a join it still holds).
                rejoin = [u for u in pending if u.seq not in self._uploaded]
        lost, again = self._outcomes(now)
        # A cohort whose seal this site refused moved on without it: that update joins again.
        seqs = {u.seq for u in rejoin}
        rejoin += [u for u in pending if u.seq in again and u.seq not in seqs]
        out += [Send(peer, join_for(u)) for u in rejoin if u.seq not in self._uploaded]
        waiting = {u.seq for u in pending}
        self.member.forget_premasked(lambda q: q in waiting and q not in self._uploaded)
        for q in [q for q in self._to_premask if q not in waiting or q in self._uploaded]:
            del self._to_premask[q]
        return out, lost

    def _on_seal(self, peer: str, msg: SecAggSeal, pending: Sequence[Update]) -> list[Effect]:
        self._expect = EncodeParams.of(msg)  # what the parent's cohorts encode with
        seq = seal_seq(msg, self.site_id)
        if seq is not None:
            self._to_premask.pop(seq, None)  # sealed before it was pre-masked: from scratch
        update = next((u for u in pending if u.seq == seq), None)
        if update is None or seq in self._uploaded:
            return [
                Metric("secagg_refused", 1.0, {"reason": "no_update"}),
                Log("info", "cohort seal for no update waiting here", {"peer": peer, "seq": seq}),
            ]
        return self.member.on_seal(peer, msg, _pending(update), self.weighting, self._noise_fn())

    def _noise_fn(self) -> Callable[[float, int], npt.NDArray[np.int64]] | None:
        source, rng = self._noise, self._rng
        if source is None:
            return None
        return lambda sigma, n: source(rng, sigma, n)

    def _outcomes(self, now: float) -> tuple[list[int], set[int]]:
        """(seqs lost, seqs to join again) from the member's outcomes."""
        lost: list[int] = []
        again: set[int] = set()
        for o in self.member.take_outcomes():
            if o.kind == "uploaded":
                self._uploaded[o.seq] = now
            elif o.kind == "lost" and self._uploaded.pop(o.seq, "gone") != "gone":
                self.lost += 1
                lost.append(o.seq)
            elif o.kind == "rejoin":
                again.add(o.seq)
        return lost, again

    def acked(self, seq: int) -> None:
        """The parent acknowledged ``seq`` (its cohort was applied)."""
        self._uploaded.pop(seq, None)
        self._to_premask.pop(seq, None)
        self.member.forget_premasked(lambda q: q != seq)

    def expired(self, now: float) -> tuple[list[Effect], list[int]]:
        """Uploaded updates nothing was heard of for ``lost_after_s`` (the parent lost the
        cohort, e.g. in a restart): consumed, never joined again. Also pre-masks the
        updates that joined since the last step (``premask``)."""
        todo, self._to_premask = self._to_premask, {}
        if self._expect is not None:
            for update in todo.values():
                if update.seq not in self._uploaded:
                    self.member.premask(_pending(update), self._expect, self._noise_fn())
        late = [
            s
            for s, at in self._uploaded.items()
            if at is not None and now >= at + self.lost_after_s
        ]
        out: list[Effect] = []
        for seq in late:
            del self._uploaded[seq]
            self.lost += 1
            out.append(Metric("secagg_update_lost", 1.0, {"reason": "no_outcome"}))
            out.append(
                Log(
                    "warning",
                    "secure aggregation: no outcome for an uploaded update; dropped (an "
                    "update is masked at most once)",
                    {"seq": seq},
                )
            )
        self.member.forget_premasked(lambda q: q not in late)
        return out, late

    # ------------------------------------------------------------- durability
    def snapshot(self) -> dict[str, Any]:
        return {"member": self.member.snapshot()}

    def restore(
        self,
        state: Mapping[str, Any] | None,
        records: Sequence[Mapping[str, Any]],
        pending: Iterable[int],
    ) -> None:
        """Load the member's records, then mark which ``pending`` seqs were uploaded."""
        self.member.restore(None if state is None else state.get("member"), records)
        self.member.take_outcomes()
        self._uploaded = {int(s): None for s in pending if self.member.consumed(int(s))}
