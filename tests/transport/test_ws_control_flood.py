"""A peer that packs more pings/pongs into one socket read than any heartbeat would is
failed with 1008, before its pings pile up in the message queue (one message object of
~140 bytes for every 2 bytes on the wire)."""

from __future__ import annotations

from typing import Any

import aiohttp

from fedloom.transport import ws
from fedloom.transport.ws_frames import CloseCode, FrameParser

PING = b"\x89\x00"  # an empty, unmasked PING (a server's)
PONG = b"\x8a\x00"
BINARY = b"\x82\x01x"


class Queue:
    def __init__(self) -> None:
        self.messages: list[Any] = []
        self.error: BaseException | None = None

    def feed_data(self, message: Any, size: int) -> None:
        self.messages.append(message)

    def set_exception(self, exc: BaseException) -> None:
        self.error = exc


def reader() -> tuple[Any, Queue]:
    queue = Queue()
    return ws._FrameReader(queue, FrameParser(1 << 20, require_mask=False)), queue


def test_a_flood_of_pings_in_one_read_fails_the_link_with_1008() -> None:
    frames, queue = reader()
    done, _ = frames.feed_data(PING * 100_000)
    assert done and isinstance(queue.error, aiohttp.WebSocketError)
    assert queue.error.code == CloseCode.POLICY_VIOLATION
    assert len(queue.messages) <= ws.MAX_CONTROLS_PER_READ
    assert frames.feed_data(BINARY) == (True, b"")  # nothing more is read from it


def test_as_many_as_the_budget_per_read_pass_and_the_count_starts_again_each_read() -> None:
    frames, queue = reader()
    each = (PING + PONG) * (ws.MAX_CONTROLS_PER_READ // 2)
    for _ in range(3):
        assert frames.feed_data(each + BINARY) == (False, b"")
    assert queue.error is None
    assert len(queue.messages) == 3 * (ws.MAX_CONTROLS_PER_READ + 1)
