"""Node middleware: daemon-side services layered around a sans-I/O node.

Some of what a daemon does is not the federation protocol itself but sits beside it: the
audit log records what the node sent and applied, the status page watches who delivered
what, a site evaluates published models and answers statistics queries. Each is a
``Middleware`` and the daemon runs its node as ``LayeredNode(node, [m1, m2, ...])``, the
way ASGI middleware wraps an application:

* ``intercept(event, now)``: called first, in order; a middleware that returns a list has
  consumed the event (the node never sees it) and those are its effects. ``None``: not
  mine, pass it on. This is how messages the protocol node does not speak (``EvalReport``,
  ``StatsRequest``, ...) and a middleware's own ``ServiceEvent``s are handled;
* ``observe(event, effects, now)``: called after the node (or the middleware that
  consumed the event) handled it, in order, with the effects so far; it returns effects
  to add after them (usually none). It must not change ``effects``.

Middleware is sans-I/O like the node: it gets events and a ``now`` and returns effects
(``Send``, ``Log``, ``Metric``; never ``Persist`` or ``Train``, which belong to the node's
state machine). Work that must leave the event loop (evaluating a model, appending to a
file) is the middleware's own business: it runs it elsewhere and comes back with a
``ServiceEvent`` through ``post`` (the driver's ``post_nowait``), which its ``intercept``
then consumes. An exception out of a middleware is a bug, as it is out of a node.

``LayeredNode`` is a ``Node``: ``node_id`` and ``next_deadline`` are the node's, and any
other attribute is looked up on the node, so code that inspects the daemon's node (its
model, its snapshot) works on the layered one too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol, cast

from fedloom.algorithms.protocol import Effect, Event, Node

__all__ = ["LayeredNode", "Middleware", "Poster", "ServiceEvent"]


class ServiceEvent:
    """Base class of the events a middleware posts to itself (see the module docstring)."""

    __slots__ = ()


Poster = Callable[[ServiceEvent], None]


class Middleware(Protocol):
    def intercept(self, event: Event, now: float) -> list[Effect] | None: ...

    def observe(self, event: Event, effects: Sequence[Effect], now: float) -> list[Effect]: ...


class LayeredNode:
    """``node`` with ``middlewares`` around it (see the module docstring)."""

    def __init__(self, node: Node, middlewares: Sequence[Middleware] = ()) -> None:
        self.inner = node
        self.middlewares = list(middlewares)

    @property
    def node_id(self) -> str:
        return self.inner.node_id

    def next_deadline(self) -> float | None:
        return self.inner.next_deadline()

    def add(self, middleware: Middleware) -> None:
        self.middlewares.append(middleware)

    def handle(self, event: Event, now: float) -> list[Effect]:
        effects: list[Effect] | None = None
        for m in self.middlewares:
            effects = m.intercept(event, now)
            if effects is not None:
                break
        if effects is None:
            effects = self.inner.handle(event, now)
        for m in self.middlewares:
            more = m.observe(event, effects, now)
            if more:
                effects = [*effects, *more]
        return effects

    def __getattr__(self, name: str) -> Any:
        # Only called for names LayeredNode itself lacks: the node's own API.
        return getattr(self.inner, name)


def poster(post_nowait: Callable[[Event], None]) -> Poster:
    """A ``Poster`` over a driver's ``post_nowait`` (service events ride its inbox)."""

    def post(event: ServiceEvent) -> None:
        post_nowait(cast(Event, event))

    return post
