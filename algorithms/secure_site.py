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

Durable: which seq went to which cohort is logged (``UPLOADED_KEY``) before the upload is
sent, and the member's own records (one view signed, one reveal per cohort) ride in the
site's snapshot and log, so a restarted site neither re-joins with an uploaded update
nor signs a second view.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

from fedloom.algorithms.protocol import Effect, Log, Metric, Persist, Send
from fedloom.algorithms.secagg.keys import SecAggKeys
from fedloom.transport.wire import (
    MaskedUpdate,
    Message,
    SecAggAbort,
    SecAggJoin,
    SecAggSeal,
    SecAggUnmask,
    SecAggView,
    Update,
)

__all__ = ["SECAGG_TO_SITE", "UPLOADED_KEY", "SiteSecAgg"]

UPLOADED_KEY = "site/secagg"
SECAGG_TO_SITE = (SecAggSeal, SecAggView, SecAggUnmask, SecAggAbort)


def join_for(update: Update) -> SecAggJoin:
    """The join a secure site sends where it would send ``update``."""
    return SecAggJoin(
        src=update.src,
        seq=int(update.seq),
        base_version=int(update.base_version),
        task=int(update.task),
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
        noise: Callable[[np.random.Generator, float, int], Any] | None = None,
    ) -> None:
        from fedloom.algorithms.secagg.member import SecAggMember

        self.site_id = site_id
        self.keys = keys
        self.weighting = weighting
        self.lost_after_s = float(upload_timeout_s) + float(unmask_timeout_s)
        self.member = SecAggMember(site_id, keys, rng, min_cohort=min_cohort)
        self._noise = noise
        # seq -> (cohort id, when uploaded: None until the first event after a restore)
        self._uploaded: dict[int, tuple[bytes, float | None]] = {}
        self.lost = 0

    # ----------------------------------------------------------------- reading
    def uploaded(self, seq: int) -> bool:
        return seq in self._uploaded

    def next_deadline(self) -> float | None:
        times = [t + self.lost_after_s for _, t in self._uploaded.values() if t is not None]
        return min(times, default=None)

    # ----------------------------------------------------------------- sending
    def uplink(self, out: Iterable[Effect], parent: str) -> list[Effect]:
        """``out`` with every plain ``Update`` turned into its join (or dropped, when it
        was uploaded already: it is in a cohort, it never joins again)."""
        result: list[Effect] = []
        for e in out:
            if isinstance(e, Send) and isinstance(e.msg, Update):
                if e.msg.seq in self._uploaded:
                    continue
                result.append(Send(e.peer, join_for(e.msg)))
            else:
                result.append(e)
        return result

    # ----------------------------------------------------------------- events
    def on_message(
        self, peer: str, msg: Message, pending: list[Update], now: float
    ) -> tuple[list[Effect], list[int]]:
        """A cohort message from the parent. Returns effects and the seqs consumed (uploaded
        to a cohort that aborted: the site drops them from its outbox)."""
        if isinstance(msg, SecAggSeal):
            return self._on_seal(peer, msg, pending, now), []
        if isinstance(msg, SecAggView):
            return list(self.member.on_view(peer, msg)), []
        if isinstance(msg, SecAggUnmask):
            return list(self.member.on_unmask(peer, msg)), []
        if isinstance(msg, SecAggAbort):
            out = list(self.member.on_abort(peer, msg))
            consumed = [s for s, (c, _) in self._uploaded.items() if c == msg.cohort]
            if consumed:
                return out + self._lose(consumed, "aborted"), consumed
            # Not uploaded to it: every update not in a cohort joins again.
            out += [Send(peer, join_for(u)) for u in pending if u.seq not in self._uploaded]
            return out, []
        return [], []

    def _on_seal(
        self, peer: str, msg: SecAggSeal, pending: list[Update], now: float
    ) -> list[Effect]:
        from fedloom.algorithms.secagg.member import PendingUpdate

        update = next((u for u in pending if u.seq not in self._uploaded), None)
        if update is None:
            return [
                Metric("secagg_refused", 1.0, {"reason": "no_update"}),
                Log("info", "cohort seal with no update left to upload", {"peer": peer}),
            ]
        pu = PendingUpdate(
            seq=int(update.seq),
            base_version=int(update.base_version),
            delta=update.delta,
            n_examples=int(update.n_examples),
        )
        effects = list(self.member.on_seal(peer, msg, pu, self.weighting, self._noise))
        masked = [
            i
            for i, e in enumerate(effects)
            if isinstance(e, Send) and isinstance(e.msg, MaskedUpdate)
        ]
        if not masked:
            return effects  # refused (the member said why)
        # Durable before the upload leaves: this update never joins again.
        self._uploaded[int(update.seq)] = (msg.cohort, now)
        record = Persist(
            UPLOADED_KEY, {"op": "uploaded", "seq": int(update.seq), "cohort": msg.cohort}, True
        )
        return [*effects[: masked[0]], record, *effects[masked[0] :]]

    def acked(self, seq: int) -> list[Effect]:
        """The parent acknowledged ``seq`` (its cohort was applied)."""
        if self._uploaded.pop(seq, None) is None:
            return []
        return [Persist(UPLOADED_KEY, {"op": "done", "seq": seq}, True)]

    def touch(self, now: float) -> None:
        """After a restore the upload times are unknown: they count from the first event."""
        for seq, (cohort, at) in list(self._uploaded.items()):
            if at is None:
                self._uploaded[seq] = (cohort, now)

    def expired(self, now: float) -> list[int]:
        """Uploaded updates nothing was heard of for ``lost_after_s``: consumed."""
        return [
            s
            for s, (_, at) in self._uploaded.items()
            if at is not None and now >= at + self.lost_after_s
        ]

    def lose(self, seqs: list[int], why: str) -> list[Effect]:
        return self._lose(seqs, why)

    def _lose(self, seqs: list[int], why: str) -> list[Effect]:
        out: list[Effect] = []
        for seq in seqs:
            if self._uploaded.pop(seq, None) is None:
                continue
            self.lost += 1
            out.append(Persist(UPLOADED_KEY, {"op": "done", "seq": seq}, True))
            out.append(Metric("secagg_update_lost", 1.0, {"reason": why}))
            out.append(
                Log(
                    "warning",
                    "update uploaded to a cohort that was not applied: dropped (an update "
                    "is masked at most once)",
                    {"seq": seq, "reason": why},
                )
            )
        return out

    # ------------------------------------------------------------- durability
    def snapshot(self) -> dict[str, Any]:
        return {
            "uploaded": {int(s): c for s, (c, _) in self._uploaded.items()},
            "member": self.member.snapshot(),
        }

    def restore(
        self, state: Mapping[str, Any] | None, records: Iterable[Mapping[str, Any]]
    ) -> None:
        uploaded: dict[int, bytes] = {}
        if state is not None:
            uploaded = {int(s): bytes(c) for s, c in state.get("uploaded", {}).items()}
            self.member.restore(state.get("member"))
        for rec in records:
            if rec["op"] == "uploaded":
                uploaded[int(rec["seq"])] = bytes(rec["cohort"])
            elif rec["op"] == "done":
                uploaded.pop(int(rec["seq"]), None)
        self._uploaded = {s: (c, None) for s, c in uploaded.items()}
