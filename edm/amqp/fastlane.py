"""A fast lane through pika for the steady state: a delivery in, an ack out.

At prefetch 1 the broker sends nothing until it has the ack, so every microsecond the client
spends per message is throughput. pika's generic path builds a frame object, a method object
and a properties object for each of a delivery's three frames and routes them through its
callback manager and the channel's content assembler; its ack builds a method and a frame
object to marshal 21 bytes. Measured on the bench machine that is most of the ~150 µs per
message pika costs over a plain socket loop.

``FastLaneConnection`` is pika's ``SelectConnection`` with one lane added. While a lane is
open (one channel, one consumer tag), a complete delivery at the head of the received data
(its method, header and body frames all there) is decoded here with ``struct`` and handed to
the lane's callback with its properties still encoded. Any other whole frame (another channel
or consumer, any other method such as a publisher confirm, a heartbeat) goes to pika alone,
and the lane resumes after it: pika is only ever handed whole frames, one at a time, so it
holds nothing half-decoded when the lane takes a delivery and the order of frames is kept. A
delivery cut short by the end of a read waits for the rest (up to ``HOLD_BYTES``).
The frames and bytes taken are counted as pika counts them: its heartbeat checker sees them.

``send_ack`` marshals a ``basic.ack`` with ``struct`` and, on a plain TCP connection with
nothing queued before it, sends it straight away; anything else takes pika's output path.
While the lane is open on a ``FlushingIOLoop``, the lane reads its socket's readable events
itself, one ``recv`` of up to 64 KiB each, without pika's transport in between; whatever it
hands on (the end of the stream, an error) pika's transport reads once per event too, instead
of 4 KiB at a time until a read fails.

The lane takes received data before pika's decoder, reads and sets pika's frame buffer and
two of its transport's read limits, and sends on the transport's socket: all of that through
``edm.amqp._pika_private``, which checks at import that those internals are there. Where they
are not, or ``amqp.fast_lane`` is false, ``connection_class()`` gives the plain
``LaneConnection`` (pika's public API alone). ``tests/test_fastlane.py`` checks the lane
against pika's own decoder, delivery for delivery.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable
from typing import Any

import pika.spec
from pika.adapters.select_connection import SelectConnection

from edm.amqp._pika_private import ConnectionHooks, fast_path
from edm.amqp.ioloop import FlushingIOLoop

log = logging.getLogger(__name__)

# (delivery tag, redelivered, routing key, encoded properties, body)
OnDelivery = Callable[[int, bool, str, bytes, bytes], None]

_METHOD, _HEADER, _BODY = 1, 2, 3
_FRAME_END = 0xCE
_DELIVER = (60 << 16) | 60  # basic.deliver: class 60, method 60
_ACK = struct.Struct(">BHIIQBB")  # type, channel, size 13, class+method, tag, multiple, end
_ACK_ID = (60 << 16) | 80
_FRAME = struct.Struct(">BHI")
RECV_BYTES = 65536
# The most of a delivery cut short by a read the lane keeps until the rest comes; a larger one
# goes to pika frame by frame as it arrives (pika's heartbeat checker sees it arrive).
HOLD_BYTES = 262144
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")


class Lane:
    """Where fast deliveries go: one consumer on one channel."""

    __slots__ = ("channel_number", "consumer_tag", "on_delivery")

    def __init__(self, channel_number: int, consumer_tag: str, on_delivery: OnDelivery) -> None:
        self.channel_number = channel_number
        self.consumer_tag = consumer_tag.encode()
        self.on_delivery = on_delivery


def _frame_end(data: bytes, pos: int, kind: int, channel: int, least: int) -> int:
    """The index of the end marker of the whole frame of ``kind`` on ``channel`` at ``pos``,
    its payload at least ``least`` bytes; -1 when what is there is not such a frame (yet)."""
    if len(data) - pos < 8 + least or data[pos] != kind:
        return -1
    _, on, size = _FRAME.unpack_from(data, pos)
    end: int = pos + 7 + size
    if on != channel or size < least or end >= len(data) or data[end] != _FRAME_END:
        return -1
    return end


def take_delivery(data: bytes, pos: int, lane: Lane) -> tuple[int, int]:
    """Decode one complete delivery for ``lane`` at ``data[pos:]`` and hand it over.

    Returns (the position after it, frames taken), or (pos, 0) when what is there is not a
    complete delivery for the lane: pika's generic path deals with it then.
    """
    channel = lane.channel_number
    end = _frame_end(data, pos, _METHOD, channel, 5)  # class, method, consumer tag's length
    if end < 0 or _U32.unpack_from(data, pos + 7)[0] != _DELIVER:
        return pos, 0
    # the arguments: consumer tag, delivery tag, redelivered, exchange, routing key
    p = pos + 11
    n = data[p]
    if data[p + 1 : p + 1 + n] != lane.consumer_tag or p + 1 + n + 10 > end:
        return pos, 0
    p += 1 + n
    delivery_tag = _U64.unpack_from(data, p)[0]
    redelivered = bool(data[p + 8] & 1)
    p += 9
    p += 1 + data[p]  # the exchange
    if p >= end or p + 1 + data[p] > end:
        return pos, 0  # a malformed method: pika raises its own error for it
    routing_key = data[p + 1 : p + 1 + data[p]]

    header = end + 1
    header_end = _frame_end(data, header, _HEADER, channel, 14)  # class, weight, size, flags
    if header_end < 0:
        return pos, 0
    left = _U64.unpack_from(data, header + 11)[0]
    properties = data[header + 19 : header_end]

    p = header_end + 1
    parts = []
    while left > 0:
        body_end = _frame_end(data, p, _BODY, channel, 0)
        if body_end < 0 or body_end - p - 7 > left:
            return pos, 0  # not there yet, or more body than announced (pika's error, not ours)
        parts.append(data[p + 7 : body_end])
        left -= body_end - p - 7
        p = body_end + 1
    body = parts[0] if len(parts) == 1 else b"".join(parts)
    try:
        key = routing_key.decode()
    except UnicodeDecodeError:
        return pos, 0  # pika hands such a key over as bytes; leave it to pika
    lane.on_delivery(delivery_tag, redelivered, key, properties, body)
    return p, 2 + len(parts)


def decode_properties(encoded: bytes) -> pika.BasicProperties:
    """The pika properties of a delivery the lane took."""
    properties = pika.spec.BasicProperties()
    properties.decode(encoded)
    return properties


class LaneConnection(SelectConnection):  # type: ignore[misc]  # pika has no type hints for mypy
    """pika's SelectConnection with the lane's interface on pika's public API alone: the
    plain path (``amqp.fast_lane`` off, or a pika without the internals the lane needs).

    ``open_lane`` takes note only (deliveries come through ``basic_consume``'s callback), and
    ``send_ack`` is the channel's ``basic_ack``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._lane: Lane | None = None
        self._edm_channels: dict[int, Any] = {}  # channel number -> the channel, for send_ack
        super().__init__(*args, **kwargs)

    def channel(self, channel_number: int | None = None, on_open_callback: Any = None) -> Any:
        opened = super().channel(channel_number, on_open_callback)
        self._edm_channels[opened.channel_number] = opened
        return opened

    def open_lane(self, lane: Lane) -> None:
        self._lane = lane

    def close_lane(self) -> None:
        self._lane = None

    def send_ack(self, channel_number: int, delivery_tag: int) -> None:
        """Ack a delivery, as ``channel.basic_ack(tag)`` (the caller checked the channel is open)."""
        self._edm_channels[channel_number].basic_ack(delivery_tag)


class FastLaneConnection(LaneConnection, ConnectionHooks):
    """A LaneConnection whose lane takes the deliveries itself (see the module); the pika
    internals it needs are ``ConnectionHooks``'."""

    def open_lane(self, lane: Lane) -> None:
        self._lane = lane
        if self.plain_socket() is not None:
            # One recv per readable event, of up to 64 KiB, instead of 4 KiB reads until one
            # fails with EAGAIN: that last recv and its exception were a syscall and ~10 us of
            # every message. The poller is level-triggered: data left unread is reported again.
            self.read_in_chunks_of(RECV_BYTES)
            ioloop = self.ioloop
            sock = self.plain_socket()
            if isinstance(ioloop, FlushingIOLoop) and sock is not None:
                ioloop.set_reader(sock.fileno(), self._read)

    def _read(self) -> bool:
        """The lane's own read of a readable socket: one recv, straight to the frames.

        False hands the event to pika's transport (no lane, the end of the stream, an error),
        which then meets the condition itself and closes the connection its own way.
        """
        sock = self.plain_socket()
        if self._lane is None or sock is None:
            return False
        try:
            data = sock.recv(RECV_BYTES)
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            return False
        if not data:
            return False
        try:
            self.on_data(data)
        except Exception as exc:  # as pika's transport does: log, abort the connection
            log.exception("Processing the data received failed; closing the connection.")
            self.abort_connection(exc)
        return True

    def send_ack(self, channel_number: int, delivery_tag: int) -> None:
        """Send a basic.ack, as ``channel.basic_ack(tag)`` would (the caller checked the channel).

        On a plain TCP socket with nothing queued before it, the frame goes straight to the
        socket; whatever the socket does not take (or any error) goes pika's way.
        """
        ack = _ACK.pack(_METHOD, channel_number, 13, _ACK_ID, delivery_tag, 0, _FRAME_END)
        sock = self.idle_socket()
        if sock is not None:
            try:
                sent = sock.send(ack)
            except OSError:
                sent = 0  # pika's writer meets the error again and handles it as its own
            if sent:
                self.bytes_sent += sent
                if sent == len(ack):
                    self.frames_sent += 1
                    return
                ack = ack[sent:]
        self.send_frames((ack,))

    def on_data(self, data_in: bytes) -> None:
        lane = self._lane
        if lane is None:
            self.pika_received(data_in)
            return
        buffered = self.frame_buffer
        data = buffered + data_in if buffered else data_in
        if buffered:
            self.frame_buffer = b""
        pos, frames, taken = feed(data, lane, self.pika_received, self._lane_is)
        if frames:
            self.frames_received += frames
            self.bytes_received += taken
        rest = data[pos:] if pos else data
        if rest:
            self.frame_buffer = rest
            if self._lane is not lane:
                self.pika_received(b"")  # the lane closed on the way: the rest is pika's

    def _lane_is(self, lane: Lane) -> bool:
        return self._lane is lane


def feed(
    data: bytes, lane: Lane, to_pika: Callable[[bytes], None], still_open: Callable[[Lane], bool]
) -> tuple[int, int, int]:
    """Hand the deliveries at the head of ``data`` to the lane, any other whole frame to pika.

    Returns (the position up to which ``data`` was used, frames the lane took, their bytes).
    What is left from that position is not whole yet (or the lane closed on the way): the
    caller keeps it for the next read. The lane resumes after each frame pika takes, so a
    publisher confirm, a qos-ok or a heartbeat among deliveries costs one frame's slow path,
    not that of every delivery after it. Pika is handed whole frames only, one at a time: its
    frame buffer is empty whenever the lane takes a delivery, so the order of frames is kept.
    """
    pos = frames = taken_bytes = 0
    size = len(data)
    while pos < size:
        after, taken = take_delivery(data, pos, lane)
        if taken:
            frames += taken
            taken_bytes += after - pos
            pos = after
            continue
        whole = frame_size(data, pos)
        if not whole or (size - pos <= HOLD_BYTES and cut_short(data, pos, lane)):
            break  # the rest comes with the next read
        to_pika(data[pos : pos + whole])
        pos += whole
        if not still_open(lane):
            break
    return pos, frames, taken_bytes


def frame_size(data: bytes, pos: int) -> int:
    """The length of the whole frame at ``data[pos:]``; 0 while part of it is still to come."""
    if len(data) - pos < 7:
        return 0
    size: int = 8 + _U32.unpack_from(data, pos + 3)[0]
    return size if pos + size <= len(data) else 0


def cut_short(data: bytes, pos: int, lane: Lane) -> bool:
    """Whether ``data[pos:]`` is the start of a delivery for ``lane`` whose other frames are
    still to come (the lane takes it whole once they are there)."""
    channel = lane.channel_number
    size = frame_size(data, pos)
    if size < 13 or data[pos] != _METHOD or _FRAME.unpack_from(data, pos)[1] != channel:
        return False
    n = data[pos + 11]
    if _U32.unpack_from(data, pos + 7)[0] != _DELIVER or data[pos + 12 : pos + 12 + n] != lane.consumer_tag:
        return False
    pos += size
    size = frame_size(data, pos)
    if not size:
        return True
    if size < 22 or data[pos] != _HEADER or _FRAME.unpack_from(data, pos)[1] != channel:
        return False
    left = _U64.unpack_from(data, pos + 11)[0]
    pos += size
    while left > 0:
        size = frame_size(data, pos)
        if not size:
            return True
        if data[pos] != _BODY or _FRAME.unpack_from(data, pos)[1] != channel:
            return False
        left -= size - 8
        pos += size
    return False  # all there, and still not the lane's: pika's


def connection_class(fast_lane: bool) -> type[LaneConnection]:
    """The consumer's connection: with ``amqp.fast_lane`` on (and the pika internals the lane
    needs there, see ``fast_path()``) a FastLaneConnection, else the plain LaneConnection."""
    return FastLaneConnection if fast_lane and fast_path() else LaneConnection
