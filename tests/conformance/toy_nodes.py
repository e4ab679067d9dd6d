"""Small sans-I/O nodes for testing drivers without the real algorithms.

``ToyAggregator`` is a minimal asynchronous aggregator (FedAsync with alpha = 1/K-ish
averaging): it hands out tasks, applies each (src, seq) once, persists before acking,
re-issues a task whose result did not come back by its deadline. ``ToySite`` trains on
request, keeps unacknowledged updates and resends them when its parent comes back.
``Pinger``/``Ponger`` bounce a counter. ``NoisyTrainer`` is a picklable, seeded trainer.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping
from typing import Any

import numpy as np

from fedloom.algorithms.protocol import (
    Deadline,
    Effect,
    Event,
    Log,
    Metric,
    PeerDown,
    PeerUp,
    Persist,
    Received,
    Send,
    Train,
    TrainDone,
    TrainFailed,
    TrainResult,
    Weights,
)
from fedloom.transport.wire import Ack, Heartbeat, TrainRequest, Update


class Pinger:
    """Sends Heartbeat(step=0) to ``peer`` when the link comes up; answers step+1 up to ``n``."""

    def __init__(self, node_id: str, peer: str, n: int) -> None:
        self._id = node_id
        self.peer = peer
        self.n = n
        self.seen: list[tuple[float, int]] = []

    @property
    def node_id(self) -> str:
        return self._id

    def handle(self, event: Event, now: float) -> list[Effect]:
        if isinstance(event, PeerUp) and event.peer == self.peer:
            return [Send(self.peer, Heartbeat(src=self._id, step=0))]
        if isinstance(event, Received) and isinstance(event.msg, Heartbeat):
            self.seen.append((now, event.msg.step))
            if event.msg.step < self.n:
                return [Send(event.peer, Heartbeat(src=self._id, step=event.msg.step + 1))]
        return []

    def next_deadline(self) -> float | None:
        return None


class Ponger(Pinger):
    def handle(self, event: Event, now: float) -> list[Effect]:
        if isinstance(event, PeerUp):
            return []
        return super().handle(event, now)


class ToyAggregator:
    """Holds a model; each applied delta is averaged in; one outstanding task per child."""

    def __init__(
        self,
        node_id: str,
        children: list[str],
        weights: Weights,
        *,
        task_timeout_s: float = 100.0,
        max_versions: int | None = None,
        mix: float = 0.5,
    ) -> None:
        self._id = node_id
        self.children = list(children)
        self.weights = {k: np.asarray(v, dtype=np.float32) for k, v in weights.items()}
        self.version = 0
        self.timeout = task_timeout_s
        self.max_versions = max_versions
        self.mix = mix
        self.applied: set[tuple[str, int]] = set()
        self.up: set[str] = set()
        self._task = 0
        self.outstanding: dict[str, tuple[int, float]] = {}  # child -> (task, deadline)
        self._deadlines: list[tuple[float, str, int]] = []  # lazy heap
        self.duplicates = 0
        self.timeouts = 0

    @property
    def node_id(self) -> str:
        return self._id

    def current_model(self) -> tuple[int, Weights]:
        return self.version, self.weights

    def _request(self, child: str, now: float) -> list[Effect]:
        if self.max_versions is not None and self.version >= self.max_versions:
            return []
        self._task += 1
        deadline = now + self.timeout
        self.outstanding[child] = (self._task, deadline)
        heapq.heappush(self._deadlines, (deadline, child, self._task))
        return [Send(child, TrainRequest(self._task, self.version, self.weights, {"lr": 0.1}))]

    def handle(self, event: Event, now: float) -> list[Effect]:
        if isinstance(event, PeerUp):
            self.up.add(event.peer)
            if event.peer not in self.outstanding:
                return self._request(event.peer, now)
            return []
        if isinstance(event, PeerDown):
            self.up.discard(event.peer)
            self.outstanding.pop(event.peer, None)
            return [Log("info", f"{event.peer} down")]
        if isinstance(event, Deadline):
            return self._expire(now)
        if isinstance(event, Received) and isinstance(event.msg, Update):
            return self._update(event.peer, event.msg, now)
        return []

    def _expire(self, now: float) -> list[Effect]:
        out: list[Effect] = []
        while self._deadlines and self._deadlines[0][0] <= now:
            _, child, task = heapq.heappop(self._deadlines)
            if self.outstanding.get(child, (None,))[0] == task:
                del self.outstanding[child]
                self.timeouts += 1
                out.append(Metric("job_timeout", labels={"site": child}))
                if child in self.up:
                    out += self._request(child, now)
        return out

    def _update(self, src: str, u: Update, now: float) -> list[Effect]:
        key = (u.src, u.seq)
        if key in self.applied:
            self.duplicates += 1
            return [
                Metric("update_duplicate", labels={"src": u.src, "seq": str(u.seq)}),
                Send(src, Ack(u.src, u.seq)),
            ]
        staleness = self.version - u.base_version
        self.weights = {
            k: (v + self.mix * u.delta[k]).astype(np.float32) for k, v in self.weights.items()
        }
        self.version += 1
        self.applied.add(key)
        out: list[Effect] = [
            Persist("updates", {"src": u.src, "seq": u.seq}, append=True),
            Persist("model", self.version),
            Metric("update_applied", float(staleness), {"src": u.src, "seq": str(u.seq)}),
            Metric("model_version", float(self.version)),
            Send(src, Ack(u.src, u.seq)),
        ]
        if self.outstanding.get(src, (None,))[0] == u.task:
            del self.outstanding[src]
        if src in self.up and src not in self.outstanding:
            out += self._request(src, now)
        return out

    def next_deadline(self) -> float | None:
        # Drop heap entries for tasks that are no longer outstanding (lazy deletion).
        while self._deadlines:
            deadline, child, task = self._deadlines[0]
            if self.outstanding.get(child, (None,))[0] == task:
                return deadline
            heapq.heappop(self._deadlines)
        return None


class ToySite:
    """Trains on request; resends unacknowledged updates after a reconnect."""

    def __init__(self, node_id: str, parent: str, n_examples: int = 10) -> None:
        self._id = node_id
        self.parent = parent
        self.n_examples = n_examples
        self.seq = 0
        self.unacked: dict[int, Update] = {}
        self.jobs: dict[int, TrainRequest] = {}
        self.failed = 0
        self.parent_up = False

    @property
    def node_id(self) -> str:
        return self._id

    def handle(self, event: Event, now: float) -> list[Effect]:
        if isinstance(event, Received):
            msg = event.msg
            if isinstance(msg, TrainRequest):
                self.jobs[msg.task] = msg
                return [Train(msg.task, msg.weights, dict(msg.config))]
            if isinstance(msg, Ack):
                self.unacked.pop(msg.seq, None)
            return []
        if isinstance(event, TrainDone):
            req = self.jobs.pop(event.job)
            self.seq += 1
            delta = {k: event.result.weights[k] - req.weights[k] for k in req.weights}
            u = Update(
                self._id,
                self.seq,
                req.version,
                delta,
                event.result.n_examples,
                task=req.task,
            )
            self.unacked[self.seq] = u
            return [Send(self.parent, u)] if self.parent_up else []
        if isinstance(event, TrainFailed):
            self.jobs.pop(event.job, None)
            self.failed += 1
            return [Log("warning", f"job {event.job} failed: {event.reason}")]
        if isinstance(event, PeerUp) and event.peer == self.parent:
            self.parent_up = True
            return [Send(self.parent, u) for _, u in sorted(self.unacked.items())]
        if isinstance(event, PeerDown) and event.peer == self.parent:
            self.parent_up = False
        return []

    def next_deadline(self) -> float | None:
        return None


class NoisyTrainer:
    """Moves every weight by ``step`` plus seeded noise; records nothing (picklable)."""

    def __init__(self, step: float = 0.1, n_examples: int = 10) -> None:
        self.step = step
        self.n_examples = n_examples

    def __call__(self, node_id: str, weights: Weights, config: Mapping[str, Any]) -> TrainResult:
        rng = np.random.default_rng(int(config["seed"]))
        out = {
            k: (v + self.step + 0.01 * rng.standard_normal(v.shape)).astype(np.float32)
            for k, v in weights.items()
        }
        return TrainResult(out, self.n_examples, {"loss": float(rng.random())})


def star(
    n_sites: int, weights: Weights | None = None, **agg_kwargs: Any
) -> tuple[dict[str, Any], dict[str, str], list[tuple[str, str]]]:
    """A root ``agg`` with ``n_sites`` toy sites: (nodes, roles, neighbour pairs)."""
    weights = weights if weights is not None else {"w": np.zeros((4, 3), dtype=np.float32)}
    sites = [f"site-{i:02d}" for i in range(n_sites)]
    nodes: dict[str, Any] = {"agg": ToyAggregator("agg", sites, weights, **agg_kwargs)}
    nodes.update({s: ToySite(s, "agg") for s in sites})
    roles = {"agg": "root", **{s: "site" for s in sites}}
    return nodes, roles, [("agg", s) for s in sites]
