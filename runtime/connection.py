"""One connection to one peer: wire messages over a link, keep-alives, progress time-outs.

A ``Connection`` owns a ``MessagePipe`` (whole wire messages in and out) and runs three
jobs for it in one ``TaskGroup``:

* the reader: decodes what arrives and hands it to ``deliver``; bad bytes from the peer
  (any ``ProtocolError``) end the connection with the reason logged and passed to
  ``on_rejected`` (the daemon's ``fedloom_input_rejected_total{reason}``);
* the writer: drains a per-connection send queue in order; when it has had nothing to
  send for ``keepalive_s`` it sends a keep-alive (a ``Heartbeat`` with ``step = -1``,
  swallowed by the receiving connection, never shown to the node);
* the watchdog: the connection is declared dead when *nothing* arrived (no frame of any
  message, no keep-alive) for ``down_after_s``. Progress is counted per frame, so a
  100 MB model crawling over a slow uplink keeps its connection alive as long as bytes
  move, while a silent peer is dropped after ``down_after_s``: no fixed transfer deadline.

With ``max_session_s`` the connection also has a maximum lifetime, so that no session
outlives the roster it was admitted under: once it is reached, the writer finishes the
message it is sending and the connection ends between two messages (the dialler then
reconnects with a fresh handshake against the current roster); if that takes longer than
``LIFETIME_GRACE`` more of the lifetime, it ends anyway. Nothing acknowledged is lost
either way: what was queued behind is resent after the next ``PeerUp``, as after any drop.

``abort(reason)`` (synchronous) closes the connection from outside; ``is_open()`` turns
false at once, which is what the driver uses to drop messages of a dead connection still
waiting in its inbox. Sending never blocks the node: ``send`` queues, and a peer that lets
``max_queue`` messages, or ``max_queue_bytes`` of their tensors, pile up is disconnected
(the protocols resend after ``PeerUp``): a peer that reads nothing cannot make this node
hold more than that for it, however large the messages routed to it (a relay's).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from fedloom.algorithms.warn_limit import WarnLimiter
from fedloom.runtime.signing import EndToEnd
from fedloom.transport import wire
from fedloom.transport.channel import ChannelTruncated, SecureChannel, tensor_bytes
from fedloom.transport.codec_policy import CodecPolicy
from fedloom.transport.error_text import describe
from fedloom.transport.errors import MalformedMessage, ProtocolError
from fedloom.transport.limits import Limits
from fedloom.transport.links import Link, LinkClosed
from fedloom.transport.wire import Heartbeat, Message, Relayed

RELAY_ROLE = "relay"  # the roster role of relays (``algorithms.relay``)

log = logging.getLogger("fedloom.runtime.connection")

KEEPALIVE_STEP = -1  # Heartbeat.step of a connection-level keep-alive
OFFLOAD_ABOVE = 64 * 1024  # tensor bytes above which encoding/decoding runs in a thread
DEFAULT_MAX_QUEUE = 256
# The peer set's default byte cap on a send queue, in messages of the link's size cap
# (``Limits.max_message_bytes``): a model broadcast and a task to one peer, with room to
# spare, fit; a peer that lets more pile up is disconnected.
QUEUE_MESSAGES_OF_CAP = 4
LIFETIME_GRACE = 0.1  # of max_session_s: how long a message in flight may delay the end

# A durable write in progress: a message sent "after" it may not be delivered before it.
Gate = asyncio.Future[None]


@dataclass(frozen=True, slots=True)
class Via:
    """``msg`` for (sending) or from (receiving) ``peer``, carried by a relay.

    Queued on the connection to the relay, it goes out as a signed ``Relayed`` envelope
    (``transport.relay``); a verified envelope from the relay comes back as a ``Via``
    naming its signer, and the peer set delivers it as a message from that peer.
    """

    peer: str
    msg: Message


Outgoing = Message | Via


def undecodable(peer: str, exc: Exception) -> ProtocolError:
    """The protocol error for an unexpected exception raised while decoding ``peer``'s
    bytes (a decoder bug, not a declared rejection): logged with its traceback, it ends
    that connection only, as bad bytes do."""
    log.warning(
        "unexpected %s while decoding a message from %s",
        type(exc).__name__,
        peer,
        exc_info=exc,
        extra={"peer": peer, "reason": "undecodable"},
    )
    return MalformedMessage(f"undecodable message ({type(exc).__name__}: {describe(exc)})")


# How many recent inter-frame gaps a link keeps (how long its peer stays silent between
# frames: its keep-alive interval, which may be longer than this node's).
RECENT_GAPS = 16


class ProgressLink:
    """A ``Link`` wrapper that stamps the (monotonic) time of every frame received, and
    keeps the last ``RECENT_GAPS`` gaps between frames (the peer's own pace)."""

    def __init__(self, link: Link) -> None:
        self.link = link
        self.last_progress = time.monotonic()
        self.gaps: collections.deque[float] = collections.deque(maxlen=RECENT_GAPS)
        self.bytes_in = 0
        self.bytes_out = 0

    @property
    def closed(self) -> bool:
        return self.link.closed

    async def send(self, data: bytes | bytearray | memoryview) -> None:
        await self.link.send(data)
        self.bytes_out += len(data)

    async def recv(self) -> bytes | memoryview:
        frame = await self.link.recv()
        now = time.monotonic()
        self.gaps.append(now - self.last_progress)
        self.last_progress = now
        self.bytes_in += len(frame)
        return frame

    async def close(self) -> None:
        await self.link.close()


class MessagePipe(Protocol):
    """Whole wire messages over one link; ``progress`` is the link it runs on."""

    @property
    def progress(self) -> ProgressLink: ...

    async def send(self, msg: Outgoing, after: Gate | None = None) -> None:
        """Send ``msg``; with ``after``, its last byte leaves only once ``after`` is done."""
        ...

    async def recv(self) -> Message | Via:
        """The next message; ``ProtocolError`` for bad bytes, ``LinkClosed`` at the end."""
        ...

    async def close(self) -> None: ...


class WirePipe:
    """Plain (unencrypted) wire envelopes over a link: in-process runs and tests."""

    def __init__(
        self, link: Link, *, codecs: CodecPolicy | None = None, limits: Limits | None = None
    ) -> None:
        self._progress = link if isinstance(link, ProgressLink) else ProgressLink(link)
        self._codecs = codecs if codecs is not None else CodecPolicy()
        self._limits = limits if limits is not None else Limits()

    @property
    def progress(self) -> ProgressLink:
        return self._progress

    async def send(self, msg: Outgoing, after: Gate | None = None) -> None:
        if isinstance(msg, Via):
            raise TypeError("plain wire pipes carry no relayed messages (daemons use channels)")
        spec = self._codecs.spec_for(msg)
        if tensor_bytes(msg) > OFFLOAD_ABOVE:
            data = await asyncio.to_thread(wire.encode, msg, spec)
        else:
            data = wire.encode(msg, spec)
        if after is not None:
            await asyncio.shield(after)  # not cancelled by us: others wait on it too
        await self._progress.send(data)

    async def recv(self) -> Message:
        data = await self._progress.recv()
        try:
            if len(data) > OFFLOAD_ABOVE:
                return await asyncio.to_thread(wire.decode, data, self._limits)
            return wire.decode(data, self._limits)
        except ProtocolError:
            raise
        except Exception as exc:  # not BaseException: a cancellation stays one
            raise undecodable("a plain link", exc) from exc

    async def close(self) -> None:
        await self._progress.close()


class ChannelPipe:
    """Wire messages over an authenticated, encrypted ``SecureChannel``.

    ``progress`` must be the ``ProgressLink`` the channel was built on, so that every
    record counts as progress (a large message is many records). With ``e2e`` (daemons
    always have one) updates and models are signed as they are sent and checked as they
    arrive, against the channel's authenticated peer (``runtime.signing``); a refused
    message raises its ``ProtocolError`` from ``recv``. Each message decodes under
    ``limits`` (None: the channel's own); the peer set tightens them to the model's size
    once it knows the model (``Limits.for_model``).
    """

    def __init__(
        self,
        channel: SecureChannel,
        progress: ProgressLink,
        *,
        codecs: CodecPolicy | None = None,
        limits: Limits | None = None,
        e2e: EndToEnd | None = None,
        warn: WarnLimiter | None = None,
    ) -> None:
        self.channel = channel
        self._progress = progress
        self._codecs = codecs if codecs is not None else CodecPolicy()
        self.limits = limits
        self.e2e = e2e
        # Dropped relayed envelopes: one line per relay and reason a minute (the node's
        # limiter, shared by its links; the e2e metrics count each one).
        self._warn = warn if warn is not None else WarnLimiter()

    @property
    def progress(self) -> ProgressLink:
        return self._progress

    async def send(self, msg: Outgoing, after: Gate | None = None) -> None:
        if isinstance(msg, Via):
            if self.e2e is None:
                raise TypeError("relaying needs end-to-end signing (an EndToEnd)")
            envelope = await self.e2e.seal_relayed(
                msg.peer, msg.msg, self._codecs.spec_for(msg.msg)
            )
            await self.channel.send_tensors(envelope, after=after)  # the payload is bytes
            return
        spec = self._codecs.spec_for(msg)
        if self.e2e is not None:
            msg = await self.e2e.seal(msg, self.channel.peer_id, spec)
        await self.channel.send_tensors(msg, spec, after=after)

    async def recv(self) -> Message | Via:
        try:
            return await self._recv()
        except (ProtocolError, LinkClosed):
            raise
        except Exception as exc:  # not BaseException: a cancellation stays one
            raise undecodable(self.channel.peer_id, exc) from exc

    async def _recv(self) -> Message | Via:
        while True:
            msg = await self.channel.recv_tensors(self.limits)
            if self.e2e is None:
                return msg
            if type(msg) is Relayed and self.channel.peer_role == RELAY_ROLE:
                # One bad envelope (a forging peer, a faulty relay) is dropped; the relay
                # link, which carries other peers' traffic too, stays up.
                try:
                    return Via(msg.src, await self.e2e.open_relayed(msg))
                except ProtocolError as exc:
                    relay = self.channel.peer_id
                    unlogged = self._warn.due(relay, exc.reason, time.monotonic())
                    if unlogged is not None:  # ``src`` is the sender's claim: not the key
                        log.warning(
                            "dropped a relayed message from %s via %s (%s): %s%s",
                            msg.src,
                            relay,
                            exc.reason,
                            exc,
                            f" ({unlogged} more dropped since the last line)" if unlogged else "",
                            extra={
                                "peer": msg.src,
                                "relay": relay,
                                "reason": exc.reason,
                                "unlogged_before": unlogged,
                            },
                        )
                    continue
            await self.e2e.check(msg, self.channel.peer_id)
            return msg

    async def close(self) -> None:
        await self.channel.close()


def check_timeouts(keepalive_s: float | None, down_after_s: float | None, max_queue: int) -> None:
    """Raise ``ValueError`` for connection settings that cannot work."""
    if keepalive_s is not None and not keepalive_s > 0:
        raise ValueError(f"keepalive_s must be > 0 or None, got {keepalive_s}")
    if down_after_s is not None and not down_after_s > 0:
        raise ValueError(f"down_after_s must be > 0 or None, got {down_after_s}")
    if keepalive_s is not None and down_after_s is not None and down_after_s <= keepalive_s:
        raise ValueError(
            f"down_after_s ({down_after_s}) must exceed keepalive_s ({keepalive_s}): "
            "an idle but live peer only sends keep-alives"
        )
    if max_queue < 1:
        raise ValueError(f"max_queue must be >= 1, got {max_queue}")


class _Ended(Exception):  # noqa: N818 - internal signal, not an error
    """Raised inside a connection's task group to end it; carries the reason."""


class _Expired:
    """Queued by the lifetime job: the writer ends the connection when it reaches it,
    i.e. between two messages."""


def queued_bytes(msg: Outgoing) -> int:
    """What ``msg`` counts against a send queue's byte cap: its tensors' bytes (messages
    that share arrays, one model sent as a broadcast and a task, count each time)."""
    return tensor_bytes(msg.msg if isinstance(msg, Via) else msg)


Deliver = Callable[["Connection", Message | Via], Awaitable[None]]


class Connection:
    """Reader, writer, keep-alive and progress watchdog for one peer (see module doc)."""

    def __init__(
        self,
        peer: str,
        pipe: MessagePipe,
        *,
        local_id: str,
        keepalive_s: float | None = None,
        down_after_s: float | None = None,
        max_queue: int = DEFAULT_MAX_QUEUE,
        max_session_s: float | None = None,
        max_queue_bytes: int | None = None,
        on_rejected: Callable[[str, str], None] | None = None,
    ) -> None:
        check_timeouts(keepalive_s, down_after_s, max_queue)
        if max_queue_bytes is not None and max_queue_bytes < 1:
            raise ValueError(f"max_queue_bytes must be >= 1 or None, got {max_queue_bytes}")
        if max_session_s is not None and not max_session_s > 0:
            raise ValueError(f"max_session_s must be > 0 or None, got {max_session_s}")
        self.peer = peer
        self.pipe = pipe
        self.local_id = local_id
        self.keepalive_s = keepalive_s
        self.down_after_s = down_after_s
        self.max_queue = max_queue
        self.max_session_s = max_session_s
        self.max_queue_bytes = max_queue_bytes  # may be changed while the connection runs
        self.queued_bytes = 0  # tensor bytes of the messages waiting in the queue
        self.reason: str | None = None  # why it ended (None while open)
        self.messages_in = 0
        self.messages_out = 0
        # Told (peer, reason) when bad bytes from the peer end the connection (a metric).
        self.on_rejected = on_rejected
        self._queue: asyncio.Queue[tuple[Outgoing | _Expired, Gate | None, int]] = asyncio.Queue()
        self._stop = asyncio.Event()

    def is_open(self) -> bool:
        return self.reason is None

    def send(self, msg: Outgoing, after: Gate | None = None) -> bool:
        """Queue ``msg``; False if the connection is closed (or just closed for overflow).

        With ``after`` (the driver's pending durable write), the message is encoded and
        streamed at once but its last record waits for ``after``: the peer cannot act on
        it before what precedes it is on disk, and a failed write breaks the connection.
        """
        if self.reason is not None:
            return False
        if self._queue.qsize() >= self.max_queue:
            self.abort(f"send queue overflow ({self.max_queue} messages waiting)")
            return False
        size = queued_bytes(msg)
        cap = self.max_queue_bytes
        # One message larger than the cap still goes out alone (it is the link's to refuse).
        if cap is not None and self._queue.qsize() and self.queued_bytes + size > cap:
            self.abort(f"send queue overflow ({self.queued_bytes} bytes waiting, limit {cap})")
            return False
        self.queued_bytes += size
        self._queue.put_nowait((msg, after, size))
        return True

    def abort(self, reason: str) -> None:
        """Close from outside (synchronous): stops delivering at once, tears down soon."""
        if self.reason is None:
            self.reason = reason
        self._stop.set()

    async def run(self, deliver: Deliver) -> str:
        """Run until the link ends, the peer misbehaves, or ``abort``; return the reason.

        A job that ends the connection records why and sets the stop event; it does not
        raise, so the task group never cancels this task on its own (which would blur a
        real cancellation of ``run`` with the connection ending by itself).
        """
        try:
            async with asyncio.TaskGroup() as tg:
                jobs = [
                    tg.create_task(self._until_ended(self._reader, deliver)),
                    tg.create_task(self._until_ended(self._writer)),
                ]
                if self.down_after_s is not None:
                    watchdog = self._until_ended(self._watchdog, self.down_after_s)
                    jobs.append(tg.create_task(watchdog))
                if self.max_session_s is not None:
                    lifetime = self._until_ended(self._lifetime, self.max_session_s)
                    jobs.append(tg.create_task(lifetime))
                await self._stop.wait()
                for job in jobs:
                    job.cancel()
        finally:
            if self.reason is None:
                self.reason = "cancelled"
            self._stop.set()
            await self.pipe.close()
        return self.reason

    async def _until_ended(self, job: Callable[..., Awaitable[None]], *args: Any) -> None:
        try:
            await job(*args)
        except _Ended as exc:
            self.abort(str(exc))
        except Exception as exc:  # a bug in one job ends this connection, not the process
            log.warning(
                "closing the connection to %s: unexpected %s",
                self.peer,
                type(exc).__name__,
                exc_info=exc,
                extra={"peer": self.peer, "reason": "unexpected_error"},
            )
            self.abort(f"unexpected {type(exc).__name__}: {describe(exc)}")

    async def _reader(self, deliver: Deliver) -> None:
        while True:
            try:
                msg = await self.pipe.recv()
            except ChannelTruncated as exc:  # a crash or a broken connection, not bad bytes
                raise _Ended(f"connection lost: {describe(exc)}") from None
            except ProtocolError as exc:
                reason = getattr(exc, "reason", type(exc).__name__)
                log.warning(
                    "closing the connection to %s: bad bytes (%s): %s",
                    self.peer,
                    reason,
                    exc,
                    extra={"peer": self.peer, "reason": reason},
                )
                if self.on_rejected is not None:
                    self.on_rejected(self.peer, reason)
                raise _Ended(f"bad bytes from the peer ({reason}): {describe(exc)}") from None
            except LinkClosed as exc:
                raise _Ended(f"link closed: {describe(exc)}") from None
            if type(msg) is Heartbeat and msg.step == KEEPALIVE_STEP:
                continue
            if self.reason is not None:
                return
            self.messages_in += 1
            await deliver(self, msg)

    async def _writer(self) -> None:
        keepalive = self.keepalive_s
        while True:
            msg: Outgoing | _Expired
            after: Gate | None = None
            try:
                async with asyncio.timeout(keepalive):
                    msg, after, size = await self._queue.get()
                self.queued_bytes -= size
            except TimeoutError:
                msg = Heartbeat(self.local_id, KEEPALIVE_STEP)
            else:
                if isinstance(msg, _Expired):
                    raise _Ended(f"session reached its maximum lifetime ({self.max_session_s} s)")
                self.messages_out += 1
            try:
                await self.pipe.send(msg, after)
            except LinkClosed as exc:
                raise _Ended(f"link closed while sending: {describe(exc)}") from None
            except Exception as exc:
                if (
                    after is None
                    or not after.done()
                    or after.cancelled()
                    or after.exception() is None
                ):
                    raise
                # The durable write this message waited for failed (a full disk): it must
                # not be sent, and the driver stops the node with the reason. Not a bug here.
                raise _Ended(f"not sent: the write it waited for failed: {describe(exc)}") from None

    async def _lifetime(self, max_session_s: float) -> None:
        await asyncio.sleep(max_session_s)
        self._queue.put_nowait((_Expired(), None, 0))  # after what is queued: sent first
        await asyncio.sleep(max_session_s * LIFETIME_GRACE)
        raise _Ended(
            f"session reached its maximum lifetime ({max_session_s} s) and a message in "
            f"flight held it open {max_session_s * LIFETIME_GRACE:.1f} s longer"
        )

    async def _watchdog(self, down_after_s: float) -> None:
        progress = self.pipe.progress
        while True:
            idle = time.monotonic() - progress.last_progress
            if idle >= down_after_s:
                raise _Ended(f"nothing received for {idle:.1f} s (limit {down_after_s} s)")
            await asyncio.sleep(down_after_s - idle)
