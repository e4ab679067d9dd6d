"""Decentralised gossip peer: asynchronous D-PSGD or push-sum (SGP) mixing with liveness.

Two mixing rules, chosen by ``mode``:

* ``"dpsgd"`` — D-PSGD (Lian et al. 2017, arXiv 1705.09056), made asynchronous. The peer
  keeps the latest model received from each neighbour and, at each step, mixes
  ``x ← W_ii·x + Σ_j W_ij·x_j`` over the neighbours it holds a model from; the weight of a
  neighbour it has not heard from yet, or has pruned or been told is down, goes to
  ``W_ii`` so the row stays stochastic. With training, the mixed model is trained locally
  (a ``Train`` job) and on ``TrainDone`` the new model is sent to every live neighbour as
  ``GossipShare(src, step, x, w=1.0)``, then mixed again and trained again. Without
  training (pure consensus) the peer mixes and sends every ``gossip_interval_s``.
  Shares that arrive out of order (older ``step`` than the one held) are ignored.

* ``"pushsum"`` — push-sum (Kempe et al. 2003) / Stochastic Gradient Push (Assran et al.
  2019, arXiv 1811.10792, Alg. 1). The peer holds ``(x, w)`` and its model is ``x / w``.
  At each step it keeps the fraction ``W_ii`` (plus the weight of every neighbour it does
  not send to) and sends ``GossipShare(x=W_ij·x, w=W_ij·w)`` to each live neighbour ``j``.
  The out-fractions are the peer's own plan weights: they sum to one, so each send
  conserves mass whatever the graph; for the plan's symmetric Metropolis–Hastings W they
  are exactly column ``i`` of W (column-stochastic, as SGP requires). Received shares are
  summed in, in any order, so the network-wide sums of ``x`` and ``w`` (counting shares in
  flight) are invariant and the average of ``x/w`` converges to the initial average.
  With training, SGP's step ``x ← x − γ∇F(z)`` is applied as ``x ← x + (z' − z)`` where
  ``z`` is the model handed to ``Train`` and ``z'`` the trained one. Mass carried by a
  share is lost only if the share is lost on a link that was up (a lossy codec also
  perturbs it); nothing is sent to a neighbour before its first ``PeerUp``.

Trust nothing a neighbour sends (issue 10). A rostered neighbour can still send anything,
so what it sends is bounded by what the receiver can check:

* D-PSGD mixes by ClippedGossip (He, Karimireddy & Jaggi 2022, arXiv 2202.01545):
  ``x ← x + Σ_j W_ij·clip(x_j − x, τ)`` with ``clip(z, τ) = z·min(1, τ/‖z‖)``; with nothing
  clipped this is exactly the D-PSGD mix above, and one neighbour moves the model by at
  most ``W_ij·τ`` per step whatever it sends. τ is ``clip`` (``"auto"`` by default:
  ``algorithms.gossip_mixing.DistanceClip`` says how it follows honest distances).
* Push-sum: a share's weight is refused above ``max_share_weight`` (the factories pass the
  number of gossip peers, the network's whole mass; a peer built without it takes 1.0,
  one peer's starting mass), and a neighbour may push at most ``max_share_weight`` of
  weight per ``gossip_interval_s`` in all (a token bucket of twice that, so that shares
  bunched up by the network still pass): many legal shares cannot pile weight onto this
  peer. Refused, not clamped: a clamped share would change the mass without anyone
  knowing. So that an honest peer never sends what its neighbour refuses, whatever weight
  it received, the sender paces itself with the same rate and half the burst: a share to
  ``j`` carries ``W_ij`` of ``(x, w)`` or, if that weighs more than ``j``'s budget has room
  for, only as much as fits (none when nothing fits), and the peer keeps the rest. Keeping
  mass is allowed in push-sum (each sender's column still sums to one), so conservation
  and the average are unchanged; only the pace of mixing is. The share's model
  ``x_s/w_s`` is then clipped like a D-PSGD neighbour's, to within τ of this peer's model
  (``x_s ← w_s·(z + clip(x_s/w_s − z, τ))``), so summing it in moves ``x/w`` by at most
  ``w_s/(w + w_s)·τ``. Weight stays conserved exactly; a clipped share changes the
  network's sum of ``x`` by what was cut off, which shifts the consensus point by a
  bounded amount instead of letting one share set it. Honest shares are rarely clipped (τ
  is a multiple of the honest distances).
* Push-sum mass sink: a neighbour that takes shares and never sends one back (heartbeats
  keep it alive) used to drain this peer's ``w`` geometrically: the share's ``x`` travels in
  the model dtype, so once it underflows ``x/w`` is noise, then Inf; under SGP a small ``w``
  also multiplies every local step by ``1/w``. So the peer keeps per neighbour ``owed``, the
  weight sent to it minus the weight taken from it, and while it holds less than its
  starting mass (``w < 1``) a neighbour may owe at most ``UNANSWERED_SHARES`` (3) shares'
  worth, ``3·W_ij·w``: what would go past that stays with the peer, as for a pruned
  neighbour (mass conserved), until the neighbour gives mass back
  (``Metric("gossip_share_withheld")``, a log line a minute). Weight is counted, not
  messages, so tiny shares buy a sink nothing, and nothing is forgiven with time, so a
  sink takes a bounded amount in all instead of a fraction of ``w`` every interval.
  Between honest peers ``owed`` is antisymmetric (what one sends the other takes): one of
  a pair may wait, only until the other's next share. A peer above its starting mass
  sends freely, so a neighbour pumping weight in cannot make honest peers withhold from
  each other. Shares lost on the way (a partition) count as owed; an edge both ends of
  which lost three shares' worth idles until one of them holds its starting mass again.
  As a floor, no share is lighter than ``MIN_SHARE_WEIGHT``, and a push-sum self weight
  below a few thousand ulps of the model dtype (``_min_keep``: a plan's 1e-9 left only
  rounding in the kept ``x``, a zero model) is raised, the neighbour weights scaled down
  to keep the row summing to one. D-PSGD shares carry no mass: none of this applies.
* A share whose norm (or distance, or ``x/w``) is not finite in float64 is refused, so a
  finite-but-huge tensor cannot overflow the sums; with the bounds turned off, a share
  that would still make ``x`` or ``w`` non-finite is refused too.

Each refusal is a ``Metric("update_rejected")``, and a ``Log`` once per neighbour and reason
per minute (``algorithms.warn_limit``: a neighbour's flood of bad messages is not a flood of
log lines); each clipped neighbour model a ``Metric("gossip_clipped")``, each share paced
down a ``Metric("gossip_share_paced")``.

Liveness: every message from a neighbour refreshes its last-seen time. A ``Heartbeat`` is
sent to a live neighbour when nothing has been sent to it for ``heartbeat_interval_s``
(heartbeats due within half an interval are batched into the same wake-up). A neighbour
silent for ``suspect_after_s`` is suspected (``Metric("peer_suspected")``); silent for
``prune_after_s`` it is pruned: dropped from the mixing, its ``W_ij`` moved to the self
weight (rows stay stochastic; when both ends prune each other — they see the same
silence — W stays symmetric and therefore doubly stochastic), ``Metric("peer_pruned")``
and a ``Log``. A pruned neighbour is still probed with a ``Heartbeat`` every
``prune_after_s`` so that a healed partition re-forms the graph, and any message from it
re-admits it. ``PeerDown(j)`` takes ``j`` out of mixing and sending at once, until
``PeerUp(j)`` restores it (re-admitting it if pruned; its weight returns with it). Every
neighbour starts down, a fresh peer's and a restored one's alike: nothing is sent to it
before the driver's first ``PeerUp(j)`` says a link exists (a real peer set drops what it
cannot carry). Under push-sum the share a down neighbour would have had stays with the
peer (its column still sums to one), so start-up loses no mass, as after a ``PeerDown``.

Before the first event ``next_deadline()`` is ``0.0`` (start me now); the first event,
whatever it is, starts the timers at its ``now``. The first pure-consensus step comes at
a random phase within one interval (from ``rng``) so peers do not step in lock-step.

Durability (``durable=True``, as daemons run it; issue 13 item 5): the peer keeps its
model, step, clip history and, under push-sum, its mass ``(x, w)`` and what each neighbour
owes across a restart. Each step ends with ``Persist(CHECKPOINT_KEY, snapshot())`` *before*
the step's shares are sent, so a share never leaves while the mass it took away could
still come back after a crash (that would create mass); each push-sum share taken in is
appended to ``GOSSIP_IN_KEY`` (the ``x`` and ``w`` summed in), which ``restore`` adds back
on top of the checkpoint. So a restart conserves the network's mass except for what was
in flight: shares sent but not yet durably taken in (as for a share lost on a link). The
neighbours' D-PSGD models, liveness and rate budgets are not kept: they come back within a
gossip interval.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from enum import Enum
from typing import Any

import numpy as np

from fedloom.algorithms.gossip_mixing import (
    DistanceClip,
    FlatLayout,
    ShareRejectedError,
    Vector,
    WeightBudget,
    clip_step,
    finite_norm,
)
from fedloom.algorithms.protocol import (
    NO_RECORDS,
    Deadline,
    Effect,
    Event,
    Log,
    Metric,
    PeerDown,
    PeerUp,
    Persist,
    ProtocolMisuseError,
    Received,
    RecordSource,
    Send,
    Train,
    TrainDone,
    TrainFailed,
    TrainResult,
    Weights,
)
from fedloom.algorithms.warn_limit import WarnLimiter
from fedloom.transport.wire import GossipShare, Heartbeat

# Plan weights are floats read from TOML/JSON: accept rows that sum to one within this.
_ROW_TOLERANCE = 1e-6
# A paced share lighter than this fraction of the budget is not worth a message.
_MIN_SHARE_FRACTION = 1e-9
# Push-sum: a neighbour may hold at most this many of our shares' weight (W_ij·w each)
# more than it has sent us; past that, what we would send it stays with us.
UNANSWERED_SHARES = 3.0
# Push-sum: no share lighter than this (a peer starts with weight 1), so w stays far
# above the range where the share's x (in the model dtype) underflows and x/w is noise.
MIN_SHARE_WEIGHT = 1e-6
# Push-sum keeps at least this many ulps' worth of its mass (see ``_min_keep``).
_KEEP_ULPS = 8192.0
# Durable state (``durable=True``): the whole peer, and the push-sum shares taken since.
CHECKPOINT_KEY = "checkpoint"
GOSSIP_IN_KEY = "gossip_in"


def share_weight_bound(setting: float | str | None, n_peers: int) -> float | None:
    """``max_share_weight`` from a config setting: "auto" is the number of gossip peers.

    Every peer starts with push-sum weight 1, so ``n_peers`` is the network's whole mass
    and no honest share can weigh more; None (``"off"``) takes any finite weight.
    """
    if setting == "auto":
        return float(max(n_peers, 1))
    if setting is None or isinstance(setting, float | int):
        return None if setting is None else float(setting)
    raise ValueError(f'max share weight must be "auto", "off" or a number, not {setting!r}')


def _min_keep(dtypes: tuple[np.dtype[Any], ...]) -> float:
    """The smallest fraction of its mass a push-sum peer may keep at a step.

    What is kept is ``x`` minus the shares as they leave (rounded to the model dtype), so
    its error is about ``eps`` of ``x`` and its model ``x/w`` is off by ``eps/kept``: with a
    self weight of 1e-9 and float32 the kept model is pure rounding noise (zero).
    """
    eps = max(float(np.finfo(d).eps) for d in dtypes)
    return min(0.5, _KEEP_ULPS * eps)


class GossipMode(Enum):
    DPSGD = "dpsgd"
    PUSHSUM = "pushsum"


class PeerState(Enum):
    ALIVE = "alive"
    SUSPECTED = "suspected"  # silent for suspect_after_s; still mixed and sent to
    PRUNED = "pruned"  # silent for prune_after_s; out of the mixing, probed rarely
    DOWN = "down"  # the driver said the link is gone; nothing is sent until PeerUp


_SENDABLE = (PeerState.ALIVE, PeerState.SUSPECTED)


class _Neighbour:
    """Mutable per-neighbour bookkeeping (the neighbour count is small, so scans are fine)."""

    __slots__ = (
        "inbound",
        "last_seen",
        "last_sent",
        "model",
        "model_step",
        "outbound",
        "owed",
        "state",
        "was_up",
        "weight",
    )

    def __init__(self, weight: float, inbound: WeightBudget | None, outbound: WeightBudget | None):
        self.weight = weight
        self.inbound = inbound  # push-sum: the weight this neighbour may still push to us
        self.outbound = outbound  # push-sum: what we may send it without being refused
        # Down until the driver's first PeerUp: a share sent before the link exists would
        # be dropped by a real peer set, and under push-sum its mass with it.
        self.state = PeerState.DOWN
        self.was_up = False  # whether a PeerUp has come yet (the first one is not news)
        self.last_seen = 0.0
        self.last_sent = 0.0
        self.model: Vector | None = None  # D-PSGD only: latest model received
        self.model_step = -1
        self.owed = 0.0  # push-sum: weight sent to it minus weight taken from it


class GossipPeer:
    """One gossip peer; see the module docstring for the algorithm."""

    def __init__(
        self,
        node_id: str,
        neighbours: Mapping[str, float],
        self_weight: float,
        weights: Weights,
        *,
        mode: str = "dpsgd",
        train_config: Mapping[str, Any] | None = None,
        gossip_interval_s: float = 1.0,
        heartbeat_interval_s: float = 2.0,
        suspect_after_s: float = 6.0,
        prune_after_s: float = 15.0,
        clip: object = "auto",
        max_share_weight: float | None = 1.0,
        rng: np.random.Generator,
        durable: bool = False,
    ) -> None:
        if not isinstance(node_id, str) or not node_id:
            raise ValueError("node_id must be a non-empty string")
        try:
            self._mode = GossipMode(mode)
        except ValueError:
            raise ValueError(f"mode must be 'dpsgd' or 'pushsum', not {mode!r}") from None
        if node_id in neighbours:
            raise ValueError(f"peer {node_id!r} lists itself as a neighbour")
        for peer, w in neighbours.items():
            if not isinstance(peer, str) or not peer:
                raise ValueError(f"neighbour ids must be non-empty strings, not {peer!r}")
            if not math.isfinite(w) or w <= 0.0:
                raise ValueError(f"mixing weight for {peer!r} must be finite and > 0, not {w}")
        if not math.isfinite(self_weight) or self_weight < 0.0:
            raise ValueError(f"self_weight must be finite and >= 0, not {self_weight}")
        if self._mode is GossipMode.PUSHSUM and self_weight <= 0.0:
            raise ValueError("push-sum needs self_weight > 0 (the peer must keep some mass)")
        row = self_weight + math.fsum(neighbours.values())
        if abs(row - 1.0) > _ROW_TOLERANCE:
            raise ValueError(f"self_weight + neighbour weights must sum to 1, not {row}")
        for name, value in (
            ("gossip_interval_s", gossip_interval_s),
            ("heartbeat_interval_s", heartbeat_interval_s),
            ("suspect_after_s", suspect_after_s),
            ("prune_after_s", prune_after_s),
        ):
            if not math.isfinite(value) or value <= 0.0:
                raise ValueError(f"{name} must be finite and > 0, not {value}")
        if not heartbeat_interval_s < suspect_after_s < prune_after_s:
            raise ValueError(
                "need heartbeat_interval_s < suspect_after_s < prune_after_s "
                f"(got {heartbeat_interval_s}, {suspect_after_s}, {prune_after_s})"
            )
        if not isinstance(rng, np.random.Generator):
            raise ValueError("rng must be a numpy.random.Generator")
        if max_share_weight is not None and not (
            math.isfinite(max_share_weight) and max_share_weight > 0.0
        ):
            raise ValueError(f"max_share_weight must be finite and > 0, not {max_share_weight}")

        self._id = node_id
        self._layout = FlatLayout.of(weights)
        self._x: Vector = self._layout.flatten(weights)
        self._w = 1.0  # push-sum weight; stays 1.0 for D-PSGD
        self._kept_floor: float | None = None  # set when a tiny self weight was raised
        if self._mode is GossipMode.PUSHSUM:
            keep = _min_keep(self._layout.dtypes)
            if self_weight < keep:  # raise it; the out-fractions still sum to one
                scale = (1.0 - keep) / (1.0 - self_weight)
                neighbours = {peer: w * scale for peer, w in neighbours.items()}
                self._kept_floor, self_weight = self_weight, keep
        self._clip = DistanceClip(clip, self._x, neighbours)
        self._max_share_w = None if max_share_weight is None else float(max_share_weight)
        self._self_weight = float(self_weight)
        self._nbrs = {
            peer: _Neighbour(float(w), *self._budgets(gossip_interval_s))
            for peer, w in neighbours.items()
        }
        self._warn = WarnLimiter()
        self._train_config = dict(train_config) if train_config is not None else None
        self._interval = float(gossip_interval_s)
        self._hb = float(heartbeat_interval_s)
        self._suspect = float(suspect_after_s)
        self._prune = float(prune_after_s)
        self._rng = rng

        self._started = False
        self._step = 0
        self._next_step: float | None = None  # consensus tick, or retry after a failed job
        self._job = 0
        self._job_running = False
        self._job_base: Vector | None = None  # push-sum: the z handed to the running job
        self._deadline: float | None = 0.0
        self._model_cache: Weights | None = None
        self.durable = durable

    def _budgets(self, interval_s: float) -> tuple[WeightBudget | None, WeightBudget | None]:
        """A neighbour's (inbound, outbound) push-sum budgets: ``max_share_weight`` per
        interval, twice that in a burst inbound and once outbound (see the docstring)."""
        bound = self._max_share_w
        if self._mode is not GossipMode.PUSHSUM or bound is None:
            return None, None
        rate = bound / interval_s
        return WeightBudget(2.0 * bound, rate), WeightBudget(bound, rate)

    # ------------------------------------------------------------------ observation

    @property
    def node_id(self) -> str:
        return self._id

    @property
    def mode(self) -> str:
        return self._mode.value

    def current_model(self) -> tuple[int, Weights]:
        """``(local step, model)``; the model is ``x / w`` under push-sum."""
        if self._model_cache is None:
            vec = self._x / self._w if self._mode is GossipMode.PUSHSUM else self._x
            self._model_cache = self._layout.unflatten(vec)
        return self._step, self._model_cache

    def mass(self) -> tuple[float, Weights]:
        """Push-sum ``(w, x)`` (for D-PSGD ``(1.0, model)``): what conservation is about."""
        return self._w, self._layout.unflatten(self._x)

    def clip_radius(self) -> float | None:
        """The ClippedGossip radius τ the next mix or share is clipped to (None: off)."""
        return self._clip.bound()

    def peer_states(self) -> dict[str, PeerState]:
        return {peer: n.state for peer, n in self._nbrs.items()}

    def next_deadline(self) -> float | None:
        return self._deadline

    # --------------------------------------------------------------------- events

    def handle(self, event: Event, now: float) -> list[Effect]:
        out: list[Effect] = []
        if not self._started:
            self._start(now, out)
        if isinstance(event, Received):
            self._on_received(event.peer, event, now, out)
        elif isinstance(event, TrainDone):
            self._check_job(event.job)
            result = event.result
            if not isinstance(result, TrainResult):  # a TrainedDelta: only for a site
                raise ProtocolMisuseError(f"GossipPeer needs a TrainResult, got {result!r:.80}")
            self._on_train_done(result.weights, now, out)
        elif isinstance(event, TrainFailed):
            self._check_job(event.job)
            self._on_train_failed(event.reason, now, out)
        elif isinstance(event, PeerUp):
            self._on_peer_up(event.peer, now, out)
        elif isinstance(event, PeerDown):
            self._on_peer_down(event.peer, out)
        elif isinstance(event, Deadline):
            self._on_timers(now, out)
        else:
            raise ProtocolMisuseError(f"GossipPeer cannot handle {type(event).__name__}")
        self._deadline = self._compute_deadline()
        return out

    def _start(self, now: float, out: list[Effect]) -> None:
        self._started = True
        for n in self._nbrs.values():
            n.last_seen = now
            # Stagger heartbeats so a peer's beacons do not all fall on one instant.
            n.last_sent = now - float(self._rng.uniform(0.0, self._hb))
        if self._train_config is None:
            self._next_step = now + float(self._rng.uniform(0.0, self._interval))
        else:
            self._begin_training_round(out)
        if self._kept_floor is not None:
            out.append(
                Log(
                    "warning",
                    f"gossip peer {self._id}: push-sum self weight {self._kept_floor:.3g} "
                    f"raised to {self._self_weight:.3g} (below it x/w is rounding noise)",
                    {"self_weight": self._kept_floor},
                )
            )

    def _check_job(self, job: int) -> None:
        if not self._job_running or job != self._job:
            raise ProtocolMisuseError(f"peer {self._id}: no training job {job} is running")
        self._job_running = False

    # --------------------------------------------------------------- messages in

    def _reject(self, out: list[Effect], peer: str, reason: str, now: float) -> None:
        out.append(Metric("update_rejected", labels={"reason": reason}))
        unlogged = self._warn.due(peer, reason, now)
        if unlogged is not None:  # one line per neighbour and reason per interval
            out.append(
                Log(
                    "warning",
                    f"gossip peer {self._id} rejected a message from {peer}: {reason}",
                    {"peer": peer, "reason": reason, "unlogged_before": unlogged},
                )
            )

    def _on_received(self, peer: str, event: Received, now: float, out: list[Effect]) -> None:
        n = self._nbrs.get(peer)
        if n is None:
            self._reject(out, peer, "unknown peer", now)
            return
        msg = event.msg
        if not isinstance(msg, GossipShare | Heartbeat):
            self._reject(out, peer, "unexpected message", now)
            return
        if msg.src != peer:
            self._reject(out, peer, "src mismatch", now)
            return
        # Any authenticated message from a neighbour proves it is alive.
        self._refresh(peer, n, now, out)
        if isinstance(msg, GossipShare):
            self._on_share(peer, n, msg, now, out)

    def _on_share(
        self, peer: str, n: _Neighbour, msg: GossipShare, now: float, out: list[Effect]
    ) -> None:
        step = msg.step
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            self._reject(out, peer, "bad step", now)
            return
        w = msg.w
        if not isinstance(w, float | int) or isinstance(w, bool) or not math.isfinite(w):
            self._reject(out, peer, "bad weight", now)
            return
        if self._mode is GossipMode.PUSHSUM and w <= 0.0:
            self._reject(out, peer, "bad weight", now)
            return
        if (
            self._mode is GossipMode.PUSHSUM
            and self._max_share_w is not None
            and w > self._max_share_w
        ):
            self._reject(out, peer, "share weight over bound", now)
            return
        if n.inbound is not None and w > n.inbound.available(now):
            self._reject(out, peer, "share weight over budget", now)
            return
        try:
            x = self._layout.flatten_untrusted(msg.x)
        except ShareRejectedError as err:
            self._reject(out, peer, err.reason, now)
            return
        if finite_norm(x) == math.inf:
            self._reject(out, peer, "norm not finite", now)
            return
        if self._mode is GossipMode.PUSHSUM:
            if self._take_mass(peer, x, float(w), now, out):
                n.owed -= float(w)  # mass given back: we may send it as much again
                if n.inbound is not None:
                    n.inbound.spend(float(w))
        elif n.state is not PeerState.DOWN and step >= n.model_step:
            n.model = x
            n.model_step = step

    def _take_mass(self, peer: str, x: Vector, w: float, now: float, out: list[Effect]) -> bool:
        """Sum a push-sum share in, its model ``x/w`` clipped to within τ of ours (True: taken)."""
        z = self._x / self._w
        with np.errstate(over="ignore", invalid="ignore"):
            d = x / w - z  # a tiny w can make x/w overflow
        dist = finite_norm(d)
        if dist == math.inf:
            self._reject(out, peer, "norm not finite", now)
            return False
        tau = self._clip.bound()
        self._clip.observe(peer, dist)
        d, clipped = clip_step(d, dist, tau)
        if clipped:
            x = w * (z + d)
            out.append(Metric("gossip_clipped", labels={"peer": peer}))
        # Mass is additive: sum it in whatever the order, even from a peer marked down.
        with np.errstate(over="ignore", invalid="ignore"):
            new_x = self._x + x
        if not (np.isfinite(new_x).all() and math.isfinite(self._w + w)):
            # Reachable only with the bounds turned off: never hold a non-finite mass.
            self._reject(out, peer, "norm not finite", now)
            return False
        self._x = new_x
        self._w += w
        self._model_cache = None
        if self.durable:  # before anything this mass could leave in: the next step's shares
            out.append(Persist(GOSSIP_IN_KEY, {"peer": peer, "x": x, "w": w}, append=True))
        return True

    def _refresh(self, peer: str, n: _Neighbour, now: float, out: list[Effect]) -> None:
        n.last_seen = max(n.last_seen, now)
        if n.state is PeerState.SUSPECTED:
            n.state = PeerState.ALIVE
            out.append(
                Log("info", f"gossip peer {self._id}: {peer} is alive again", {"peer": peer})
            )
        elif n.state is PeerState.PRUNED:
            self._readmit(peer, n, now, out, "message received")

    def _readmit(self, peer: str, n: _Neighbour, now: float, out: list[Effect], why: str) -> None:
        n.state = PeerState.ALIVE
        n.last_seen = max(n.last_seen, now)
        out.append(Metric("peer_readmitted", labels={"peer": peer}))
        out.append(
            Log(
                "info",
                f"gossip peer {self._id} re-admitted {peer} ({why})",
                {"peer": peer, "weight": n.weight},
            )
        )

    # ---------------------------------------------------------------- link events

    def _on_peer_up(self, peer: str, now: float, out: list[Effect]) -> None:
        n = self._nbrs.get(peer)
        if n is None:
            out.append(Log("debug", f"gossip peer {self._id}: PeerUp for non-neighbour {peer}"))
            return
        if n.state is PeerState.PRUNED:
            self._readmit(peer, n, now, out, "peer up")
        elif n.state is PeerState.DOWN:
            n.state = PeerState.ALIVE
            n.last_seen = max(n.last_seen, now)
            level = "info" if n.was_up else "debug"  # the first link of a run is no news
            out.append(Log(level, f"gossip peer {self._id}: {peer} is up", {"peer": peer}))
        else:
            n.last_seen = max(n.last_seen, now)
        n.was_up = True

    def _on_peer_down(self, peer: str, out: list[Effect]) -> None:
        n = self._nbrs.get(peer)
        if n is None:
            out.append(Log("debug", f"gossip peer {self._id}: PeerDown for non-neighbour {peer}"))
            return
        if n.state is not PeerState.DOWN:
            n.state = PeerState.DOWN
            n.model = None  # stale by the time it comes back; wait for a fresh share
            n.model_step = -1
            out.append(Log("info", f"gossip peer {self._id}: {peer} is down", {"peer": peer}))

    # ------------------------------------------------------------------- training

    def _on_train_done(self, trained: Weights, now: float, out: list[Effect]) -> None:
        try:
            z_new = self._layout.flatten_untrusted(trained)
        except ShareRejectedError as err:
            self._on_train_failed(f"unusable result: {err.reason}", now, out)
            return
        if self._mode is GossipMode.PUSHSUM:
            assert self._job_base is not None
            update = z_new - self._job_base
            self._x += update  # SGP: the local step moves x, not x/w
            self._job_base = None
        else:
            update = z_new - self._x  # D-PSGD trains the mixed model itself
            self._x = z_new
        self._clip.own_step(finite_norm(update))
        self._model_cache = None
        self._step += 1
        self._share(now, out)
        out.append(Metric("model_version", float(self._step)))  # after the step's checkpoint
        self._begin_training_round(out)

    def _on_train_failed(self, reason: str, now: float, out: list[Effect]) -> None:
        self._job_base = None
        out.append(Metric("train_failed", labels={"peer": self._id}))
        out.append(
            Log("warning", f"gossip peer {self._id}: training failed: {reason}", {"reason": reason})
        )
        # Retry one gossip interval later rather than spinning on a failing job.
        self._next_step = now + self._interval

    def _begin_training_round(self, out: list[Effect]) -> None:
        assert self._train_config is not None
        if self._mode is GossipMode.DPSGD:
            self._mix(out)
        self._job += 1
        self._job_running = True
        config = dict(self._train_config)
        # Each job gets its own seed (from the peer's rng, or offset from a fixed one) so
        # successive rounds do not replay the same minibatch order.
        if "seed" in config:
            config["seed"] = int(config["seed"]) + self._job
        else:
            config["seed"] = int(self._rng.integers(0, 2**31 - 1))
        if self._mode is GossipMode.PUSHSUM:
            self._job_base = self._x / self._w
        _, model = self.current_model()
        out.append(Train(self._job, model, config))

    # --------------------------------------------------------------------- mixing

    def _mix(self, out: list[Effect]) -> None:
        """ClippedGossip: x + Σ W_ij·clip(x_j − x, τ) over neighbours we hold a live model from.

        A neighbour without a model (or not live) contributes nothing, which is D-PSGD's
        moving its weight to W_ii; τ is fixed before this mix's distances are learnt.
        """
        tau = self._clip.bound()
        step = np.zeros_like(self._x)
        moved = False
        for peer, n in self._nbrs.items():
            if n.model is None or n.state not in _SENDABLE:
                continue
            d = n.model - self._x
            dist = finite_norm(d)
            if dist == math.inf:  # unreachable after the receipt check; never sum an inf
                continue
            self._clip.observe(peer, dist)
            d, clipped = clip_step(d, dist, tau)
            if clipped:
                out.append(Metric("gossip_clipped", labels={"peer": peer}))
            step += n.weight * d
            moved = True
        if moved:
            self._x = self._x + step
            self._model_cache = None

    def _share(self, now: float, out: list[Effect]) -> None:
        """Send this step's share to every live neighbour (after the step's checkpoint,
        when durable: see the module docstring)."""
        sends: list[Effect] = []
        self._make_shares(now, out, sends)
        if self.durable:
            out.append(Persist(CHECKPOINT_KEY, self.snapshot()))
        out.extend(sends)

    def _make_shares(self, now: float, out: list[Effect], sends: list[Effect]) -> None:
        """The step's ``Send`` effects into ``sends``; (x, w) keeps what does not leave."""
        if self._mode is GossipMode.DPSGD:
            _, model = self.current_model()
            for peer, n in self._nbrs.items():
                if n.state in _SENDABLE:
                    sends.append(Send(peer, GossipShare(self._id, self._step, model, 1.0)))
                    n.last_sent = now
            return
        kept_x = self._x.copy()
        kept_w = self._w
        for peer, n in self._nbrs.items():
            if n.state not in _SENDABLE:
                continue
            share_w = self._w * n.weight
            if n.outbound is not None:  # never more than the neighbour's budget takes
                room = n.outbound.available(now)
                if share_w > room:
                    out.append(Metric("gossip_share_paced", labels={"peer": peer}))
                    share_w = room if room > _MIN_SHARE_FRACTION * n.outbound.capacity else 0.0
            # A neighbour that takes mass and gives none back (a sink) gets no more once
            # this peer holds less than its starting mass (a peer with more can give).
            room = UNANSWERED_SHARES * n.weight * self._w - n.owed
            if self._w < 1.0 and share_w > room:
                self._withhold(peer, n, now, out)
                share_w = max(room, 0.0)
            if share_w < MIN_SHARE_WEIGHT:
                continue  # keep it all, send next step
            fraction = n.weight if share_w == self._w * n.weight else share_w / self._w
            share = self._layout.unflatten(self._x * fraction)
            # Subtract what actually leaves (after the cast to the model dtype) so the
            # network-wide mass is conserved to float64 rounding, not float32.
            kept_x -= self._layout.flatten(share)
            if n.outbound is not None:
                n.outbound.spend(share_w)
            n.owed += share_w
            kept_w -= share_w
            sends.append(Send(peer, GossipShare(self._id, self._step, share, share_w)))
            n.last_sent = now
        self._x = kept_x
        self._w = kept_w
        self._model_cache = None

    def _withhold(self, peer: str, n: _Neighbour, now: float, out: list[Effect]) -> None:
        out.append(Metric("gossip_share_withheld", labels={"peer": peer}))
        unlogged = self._warn.due(peer, "gives no mass back", now)
        if unlogged is not None:
            out.append(
                Log(
                    "warning",
                    f"gossip peer {self._id} withholds shares from {peer}: it holds "
                    f"{n.owed:.3g} of our weight more than it sent us",
                    {"peer": peer, "owed": n.owed, "unlogged_before": unlogged},
                )
            )

    # ----------------------------------------------------------------- durability

    def snapshot(self) -> dict[str, Any]:
        """The peer's durable state (arrays copied: the store encodes it later)."""
        return {
            "kind": "gossip",
            "node_id": self._id,
            "mode": self._mode.value,
            "x": self._x.copy(),
            "w": self._w,
            "step": self._step,
            "job": self._job,
            "owed": {peer: n.owed for peer, n in self._nbrs.items()},
            "clip": self._clip.snapshot(),
        }

    def restore(
        self, checkpoint: Mapping[str, Any] | None, records: RecordSource = NO_RECORDS
    ) -> None:
        """Load ``snapshot()`` output (None: this fresh peer's own), then add back the
        push-sum shares taken in after it (``GOSSIP_IN_KEY`` records;
        ``algorithms.protocol.Restorable``). ValueError for state this peer cannot have
        written."""
        state = self.snapshot() if checkpoint is None else checkpoint
        if state.get("kind") != "gossip" or state.get("node_id") != self._id:
            raise ValueError(f"not a gossip snapshot of {self._id!r}")
        if state.get("mode") != self._mode.value:
            raise ValueError(f"a {state.get('mode')!r} snapshot, but this peer runs {self.mode!r}")
        x = self._vector(state["x"], "x")
        w = float(state["w"])
        if not (math.isfinite(w) and (w > 0.0 or self._mode is GossipMode.DPSGD)):
            raise ValueError(f"push-sum weight must be finite and > 0, got {w!r}")
        owed = {str(p): float(v) for p, v in dict(state.get("owed", {})).items()}
        if not all(math.isfinite(v) for v in owed.values()):
            raise ValueError("owed weights must be finite")
        self._clip.restore(state.get("clip", {}))
        for rec in records.records(GOSSIP_IN_KEY):
            # Mass taken in stays mass, even from a peer no longer listed as a neighbour.
            peer = str(rec["peer"])
            taken_w = float(rec["w"])
            if not (math.isfinite(taken_w) and taken_w > 0.0):
                raise ValueError(f"a share record from {peer!r} of weight {taken_w!r}")
            x = x + self._vector(rec["x"], "a share record's x")
            w += taken_w
            owed[peer] = owed.get(peer, 0.0) - taken_w
        self._x, self._w = x, w
        self._step = max(0, int(state["step"]))
        self._job = max(0, int(state.get("job", 0)))
        for peer, n in self._nbrs.items():
            n.owed = owed.get(peer, 0.0)
        self._model_cache = None

    def _vector(self, value: object, what: str) -> Vector:
        arr = np.asarray(value, dtype=np.float64)
        if arr.shape != (self._layout.size,) or not np.isfinite(arr).all():
            raise ValueError(f"{what}: expected {self._layout.size} finite values")
        return arr

    # --------------------------------------------------------------------- timers

    def _on_timers(self, now: float, out: list[Effect]) -> None:
        self._check_liveness(now, out)
        if self._next_step is not None and now >= self._next_step:
            if self._train_config is None:
                nxt = self._next_step + self._interval
                self._next_step = nxt if nxt > now else now + self._interval
                if self._mode is GossipMode.DPSGD:
                    self._mix(out)
                self._step += 1
                self._clip.own_step(None)
                self._model_cache = None
                self._share(now, out)
                out.append(Metric("model_version", float(self._step)))
            elif not self._job_running:
                self._next_step = None
                self._begin_training_round(out)
        self._send_heartbeats(now, out)

    def _check_liveness(self, now: float, out: list[Effect]) -> None:
        for peer, n in self._nbrs.items():
            if n.state is PeerState.ALIVE and now >= n.last_seen + self._suspect:
                n.state = PeerState.SUSPECTED
                out.append(Metric("peer_suspected", labels={"peer": peer}))
                out.append(
                    Log(
                        "warning",
                        f"gossip peer {self._id} suspects {peer}",
                        {"peer": peer, "silent_s": now - n.last_seen},
                    )
                )
            if n.state is PeerState.SUSPECTED and now >= n.last_seen + self._prune:
                n.state = PeerState.PRUNED
                n.model = None
                n.model_step = -1
                out.append(Metric("peer_pruned", labels={"peer": peer}))
                out.append(
                    Log(
                        "warning",
                        f"gossip peer {self._id} pruned {peer}; its weight "
                        "moves to the self weight",
                        {"peer": peer, "weight": n.weight, "silent_s": now - n.last_seen},
                    )
                )

    def _send_heartbeats(self, now: float, out: list[Effect]) -> None:
        due = any(
            n.state in _SENDABLE and now >= n.last_sent + self._hb for n in self._nbrs.values()
        )
        half = 0.5 * self._hb
        for peer, n in self._nbrs.items():
            if n.state in _SENDABLE:
                send = due and now >= n.last_sent + half
            elif n.state is PeerState.PRUNED:
                send = now >= n.last_sent + self._prune  # a rare probe
            else:
                send = False
            if send:
                out.append(Send(peer, Heartbeat(self._id, self._step)))
                n.last_sent = now

    def _compute_deadline(self) -> float | None:
        best = math.inf
        if self._next_step is not None and not self._job_running:
            best = self._next_step
        for n in self._nbrs.values():
            if n.state is PeerState.ALIVE:
                best = min(best, n.last_seen + self._suspect, n.last_sent + self._hb)
            elif n.state is PeerState.SUSPECTED:
                best = min(best, n.last_seen + self._prune, n.last_sent + self._hb)
            elif n.state is PeerState.PRUNED:
                best = min(best, n.last_sent + self._prune)
        return None if best == math.inf else best
