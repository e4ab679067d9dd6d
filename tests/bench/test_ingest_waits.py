"""bench/ingest.py's wait for its child processes: a child that ends without sending what
the bench waits for is named at once with its exit code (not ``queue.Empty`` minutes
later), and what a child sent just before it ended is still taken."""

from __future__ import annotations

import multiprocessing as mp
import time
from typing import Any

import pytest

from tests.bench.loader import load_bench

ingest = load_bench("ingest")
CTX = mp.get_context("fork")


def _exit(code: int) -> None:
    raise SystemExit(code)


def _send_then_exit(queue: Any) -> None:
    queue.put({"applied": 1})


def test_a_child_that_ends_first_is_named_with_its_exit_code() -> None:
    queue: Any = CTX.Queue()
    child = CTX.Process(target=_exit, args=(3,), name="aggregator")
    child.start()
    started = time.monotonic()
    with pytest.raises(SystemExit, match=r"the aggregator process ended \(exit code 3\)"):
        ingest.wait_for(queue, 60.0, [child], "the results")
    assert time.monotonic() - started < 30.0  # not the whole time-out
    child.join()


def test_what_a_child_sent_before_it_ended_is_returned() -> None:
    queue: Any = CTX.Queue()
    child = CTX.Process(target=_send_then_exit, args=(queue,))
    child.start()
    child.join()
    assert ingest.wait_for(queue, 60.0, [child], "the results") == {"applied": 1}


def test_nothing_in_time_says_what_was_awaited() -> None:
    queue: Any = CTX.Queue()
    with pytest.raises(SystemExit, match=r"the aggregator's address did not come within 0\.2 s"):
        ingest.wait_for(queue, 0.2, [], "the aggregator's address")
