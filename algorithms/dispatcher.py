"""Keeps up to ``concurrency`` training tasks in flight across an aggregator's sites.

Bookkeeping only (no effects): the owning node turns started tasks into ``TrainRequest``s
and timeouts into ``Metric("job_timeout")``.

* Up-and-idle sites live in a list with an index dict, so a uniformly random pick (with the
  node's ``numpy.random.Generator``) and removal by id are O(1) (swap-remove).
* In-flight tasks: ``task -> (site, deadline)``; deadlines in a min-heap with lazy deletion
  (entries of completed or cancelled tasks are skipped when they surface), so completion,
  expiry and ``next_deadline`` are O(log n) amortised.
* A timed-out task frees its slot; the site stays eligible (it may be slow, not dead).
  A site going down cancels its task. A site holds at most one task of this dispatcher.
* A benched site (``bench``) gets no new task until ``unbench``: an aggregator benches a
  site that has used its share of an aggregation epoch, so that an honest fast site waits
  for the next epoch rather than answering a task whose answer would have to be held.
* A suspended site (``suspend``) gets no new task until ``resume`` or its ``mark_down``,
  whatever ``unbench`` does: an aggregator suspends a site that refused a task for a
  backoff (``algorithms.refusals``).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable

import numpy as np

__all__ = ["TaskDispatcher"]


class TaskDispatcher:
    """Up/idle/in-flight tracking with random fill to a concurrency target."""

    def __init__(
        self,
        sites: Iterable[str],
        *,
        concurrency: int,
        task_timeout_s: float | None,
        rng: np.random.Generator,
    ) -> None:
        if concurrency < 0:
            raise ValueError(f"concurrency must be >= 0, got {concurrency}")
        if task_timeout_s is not None and not task_timeout_s > 0.0:
            raise ValueError(f"task_timeout_s must be > 0 or None, got {task_timeout_s}")
        self.concurrency = concurrency
        self.task_timeout_s = task_timeout_s
        self._rng = rng
        self._sites = frozenset(sites)
        self._up: set[str] = set()
        self._idle: list[str] = []
        self._idle_pos: dict[str, int] = {}
        self._tasks: dict[int, tuple[str, float]] = {}  # task -> (site, deadline)
        self._task_of: dict[str, int] = {}  # site -> its in-flight task
        self._given: dict[str, float] = {}  # site -> when its in-flight task was given
        self._heap: list[tuple[float, int]] = []
        self._benched: set[str] = set()
        self._suspended: set[str] = set()
        self.next_task = 1

    # ------------------------------------------------------------------ queries
    def knows(self, site: str) -> bool:
        return site in self._sites

    def is_up(self, site: str) -> bool:
        return site in self._up

    @property
    def up_count(self) -> int:
        return len(self._up)

    @property
    def idle_count(self) -> int:
        """Sites that are up and hold no task of ours."""
        return len(self._idle)

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    def task_site(self, task: int) -> str | None:
        entry = self._tasks.get(task)
        return None if entry is None else entry[0]

    def tasks(self) -> list[int]:
        return list(self._tasks)

    def given(self) -> dict[str, float]:
        """When each site holding a task was given it (a view: do not modify)."""
        return self._given

    # ------------------------------------------------------------- idle set ops
    def _push_idle(self, site: str) -> None:
        if site in self._suspended:
            return
        if site not in self._idle_pos and site not in self._benched:
            self._idle_pos[site] = len(self._idle)
            self._idle.append(site)

    def _drop_idle(self, site: str) -> None:
        pos = self._idle_pos.pop(site, None)
        if pos is None:
            return
        last = self._idle.pop()
        if last != site:
            self._idle[pos] = last
            self._idle_pos[last] = pos

    def _release(self, task: int) -> str:
        site, _ = self._tasks.pop(task)
        if self._task_of.get(site) == task:
            del self._task_of[site]
            self._given.pop(site, None)
            if site in self._up:
                self._push_idle(site)
        return site

    # ------------------------------------------------------------------ events
    def mark_up(self, site: str) -> bool:
        """The site introduced itself and is eligible for a task; False if it was up already.

        A site is up from its Hello until ``mark_down`` (its ``PeerDown``), and the runtime
        ends an older connection (``PeerDown``) before it reports a new one. A Hello from a
        site that is up was therefore sent on the session that carries its task, which
        cannot have lost the request: it changes nothing (no cancelled task, no new
        request, so a stream of Hellos buys no models; a request lost all the same is
        covered by ``task_timeout_s``).
        """
        if site not in self._sites or site in self._up:
            return False
        self._up.add(site)
        self._push_idle(site)
        return True

    def mark_down(self, site: str) -> int | None:
        """The site is unreachable; return the task this cancels, if any."""
        self._benched.discard(site)
        self._suspended.discard(site)
        if site not in self._up:
            return None
        self._up.discard(site)
        self._drop_idle(site)
        task = self._task_of.pop(site, None)
        self._given.pop(site, None)
        if task is not None:
            del self._tasks[task]
        return task

    def bench(self, site: str) -> None:
        """Give ``site`` no new task until ``unbench`` (a task in flight stays)."""
        if site in self._sites:
            self._benched.add(site)
            self._drop_idle(site)

    def suspend(self, site: str) -> None:
        """Give ``site`` no new task until ``resume`` (or it goes down); ``unbench`` does
        not lift it."""
        if site in self._sites:
            self._suspended.add(site)
            self._drop_idle(site)

    def resume(self, site: str) -> None:
        """Lift ``suspend``: the site is eligible again if up, idle and not benched."""
        if site in self._suspended:
            self._suspended.discard(site)
            if site in self._up and site not in self._task_of:
                self._push_idle(site)

    def unbench(self) -> None:
        """Every benched site that is up and holds no task is eligible again."""
        benched, self._benched = self._benched, set()
        for site in benched:
            if site in self._up and site not in self._task_of:
                self._push_idle(site)

    def complete(self, task: int, site: str) -> bool:
        """``site`` answered ``task``; free its slot. False if not in flight for that site."""
        entry = self._tasks.get(task)
        if entry is None or entry[0] != site:
            return False
        # self._release(task), inline: once per update
        del self._tasks[task]
        if self._task_of.get(site) == task:
            del self._task_of[site]
            self._given.pop(site, None)
            if site in self._up:
                self._push_idle(site)
        return True

    def cancel(self, task: int) -> str | None:
        """Forget an in-flight task (its answer, if any, will be late); return its site."""
        if task not in self._tasks:
            return None
        return self._release(task)

    def start(
        self, now: float, limit: int | None = None, rng: np.random.Generator | None = None
    ) -> list[tuple[int, str]]:
        """Start tasks on random idle up sites until ``concurrency`` are in flight.

        ``limit`` caps how many are started by this call; ``rng`` draws them instead of the
        dispatcher's own generator (a private sync root's secret draw). Returns ``(task,
        site)`` pairs.
        """
        draw = self._rng if rng is None else rng
        room = self.concurrency - len(self._tasks)
        if limit is not None:
            room = min(room, limit)
        started: list[tuple[int, str]] = []
        timeout = self.task_timeout_s
        deadline = math.inf if timeout is None else now + timeout
        idle, idle_pos = self._idle, self._idle_pos
        while room > 0 and idle:
            # rng.random() is several times cheaper than rng.integers() per scalar draw.
            n = len(idle)
            i = int(draw.random() * n)
            if i >= n:  # min(i, n - 1), without the builtin's call
                i = n - 1
            site = idle[i]
            # self._drop_idle(site), inline (once per task): swap-remove from the idle list
            pos = idle_pos.pop(site)
            last = idle.pop()
            if last != site:
                idle[pos] = last
                idle_pos[last] = pos
            task = self.next_task
            self.next_task = task + 1
            self._tasks[task] = (site, deadline)
            self._task_of[site] = task
            self._given[site] = now
            if timeout is not None:
                heapq.heappush(self._heap, (deadline, task))
            started.append((task, site))
            room -= 1
        return started

    def expire(self, now: float) -> list[tuple[int, str]]:
        """Time out every task whose deadline is ≤ ``now``; return ``(task, site)`` pairs."""
        expired: list[tuple[int, str]] = []
        heap = self._heap
        while heap and heap[0][0] <= now:
            deadline, task = heapq.heappop(heap)
            entry = self._tasks.get(task)
            if entry is None or entry[1] != deadline:
                continue  # completed or cancelled earlier: a lazily deleted entry
            expired.append((task, self._release(task)))
        return expired

    def next_deadline(self) -> float | None:
        heap = self._heap
        while heap:
            deadline, task = heap[0]
            entry = self._tasks.get(task)
            if entry is not None and entry[1] == deadline:
                return deadline
            heapq.heappop(heap)  # drop a lazily deleted entry
        return None
