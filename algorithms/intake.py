"""What an aggregator will believe of a child's claims, and how many updates it takes from one.

Claims. An update's weight in the mean is its ``count`` ("uniform" weighting) or its
``n_examples`` ("examples"), both written by the sender. ``ClaimBounds`` turns them into
numbers the aggregator can check:

* a site's update counts once: ``count`` must be 1 (the site code never sends anything else,
  so another value is a malformed update and is rejected: its delta is not used at all);
* a region's ``count`` is at most what its subtree could produce in one flush
  (``region_counts[child]``, which the node factory derives from the topology, else
  ``max_region_count``); a larger claim is clamped to it;
* ``n_examples`` is at most the examples declared for that site (``site_examples``, else
  ``max_examples_per_site``), or for a region its count bound times that cap; a larger claim
  is clamped. Clamping rather than rejecting: the bound is an operator's declaration that
  may lag a growing site, and a clamped honest update still trains while an inflated one
  weighs no more than an honest maximum.

Every clamp is reported (metric ``update_claim_clamped`` and a warning) and the clamped
values are what the aggregator records, forwards and replays.

Refusals. A region relays its sites' ``TrainRefused``; without ``[subtrees]`` the site it
names is believed only if it is one of the roster's sites (``roster_sites``) and not one of
the aggregator's own children (see ``AggregatorBase``).

Quota. ``intake_quota`` is how many updates one child may have decided per aggregation
epoch (a buffer flush, a round, ``concurrency`` FedAsync steps): its fair share of the
epoch among itself and the other children that are active (up and heard from lately), at
least one. Under the mean the answers to tasks the aggregator gave a site are not counted;
under median / trimmed mean they are. See ``AggregatorBase`` for what counts when, what
"active" means and what happens to updates over it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from fedloom.transport.wire import Update

__all__ = [
    "DEFAULT_MAX_EXAMPLES_PER_SITE",
    "DEFAULT_MAX_REGION_COUNT",
    "ClaimBounds",
    "intake_quota",
]

DEFAULT_MAX_REGION_COUNT = 100
DEFAULT_MAX_EXAMPLES_PER_SITE = 1_000_000


@dataclass(frozen=True, slots=True)
class ClaimBounds:
    """Upper bounds on the ``count`` and ``n_examples`` a child may claim."""

    max_region_count: int = DEFAULT_MAX_REGION_COUNT
    max_examples_per_site: int = DEFAULT_MAX_EXAMPLES_PER_SITE
    region_counts: Mapping[str, int] = field(default_factory=dict)
    site_examples: Mapping[str, int] = field(default_factory=dict)
    # The site ids of the signed roster (None: no roster known, as in an in-memory run): a
    # region child's relayed refusal may name one of them only (``aggregator_base``).
    roster_sites: frozenset[str] | None = None

    def __post_init__(self) -> None:
        if self.max_region_count < 1:
            raise ValueError(f"max_region_count must be >= 1, got {self.max_region_count}")
        if self.max_examples_per_site < 0:
            raise ValueError(
                f"max_examples_per_site must be >= 0, got {self.max_examples_per_site}"
            )
        for name, bounds in (
            ("region_counts", self.region_counts),
            ("site_examples", self.site_examples),
        ):
            for child, value in bounds.items():
                if value < (1 if name == "region_counts" else 0):
                    raise ValueError(f"{name}[{child!r}] = {value} is out of range")

    def count_bound(self, child: str, role: str) -> int:
        if role == "site":
            return 1
        return self.region_counts.get(child, self.max_region_count)

    def examples_bound(self, child: str, role: str) -> int:
        if role == "site":
            return self.site_examples.get(child, self.max_examples_per_site)
        return self.count_bound(child, role) * self.max_examples_per_site

    def check(self, child: str, role: str, msg: Update) -> tuple[Update, str | None, list[str]]:
        """``(update to use, rejection reason or None, names of the clamped fields)``.

        ``msg`` has passed ``validation.check_update`` (count ≥ 1, n_examples ≥ 0).
        """
        if role == "site" and msg.count != 1:
            return msg, "bad_count", []
        count = min(msg.count, self.count_bound(child, role))
        n_examples = min(msg.n_examples, self.examples_bound(child, role))
        if count == msg.count and n_examples == msg.n_examples:
            return msg, None, []  # the usual case, without building the list below
        clamped = [
            name
            for name, changed in (
                ("count", count != msg.count),
                ("n_examples", n_examples != msg.n_examples),
            )
            if changed
        ]
        if not clamped:
            return msg, None, []
        return dataclasses.replace(msg, count=count, n_examples=n_examples), None, clamped


def intake_quota(epoch_size: int, children_up: int) -> int:
    """Updates per child per epoch (see the module docstring): a fair share, at least one."""
    return max(1, math.ceil(epoch_size / max(1, children_up)))
