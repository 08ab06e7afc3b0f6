"""pika's IOLoop with ``flush()``: send what pika has queued now, not on the loop's next turn.

When pika queues a frame (an ack, say) it turns the socket's write handler on with
``update_handler(fd, READ | WRITE)``; the frame leaves once the next ``poll()`` reports the
socket writable and pika's writer runs, which turns the handler off again. At prefetch 1 the
broker sends nothing until it has our ack, so that extra turn of the loop (an
``epoll_wait``, the dispatch, the timer checks) and the two ``epoll_ctl`` calls around it sat
between every message and the next.

Here turning the write handler on only takes note; ``flush()`` runs the write handler of each
such socket at once, as ``poll()`` would for a writable socket, and once pika has turned it
off again the poller never heard of it. A write handler that is still on when ``poll()``
comes (nobody flushed, or the socket could not take everything) is handed to the poller
first, so ``poll()`` finishes the job as it always did: nothing waits longer than it would
have without ``flush()``.

``set_reader`` lets a connection take its socket's read events first (the consumer's fast
lane reads them without pika's transport in between, see ``edm.amqp.fastlane``); it hands any
event it does not want on to pika's handler. When a poll returns that one event alone (the
steady state: the next delivery has arrived), ``poll()`` calls the reader straight away,
without the event map pika builds and walks; that and the consumer handling a delivery before
the loop's timers took the time from a delivery's arrival to its ack from 26.8 to 22.0 µs
(median, bench machine). That shortcut waits on pika's poller itself
(``IOLoopHooks.poll_events`` and ``dispatch_events``, in ``edm.amqp._pika_private``); where
that module's check failed, ``io_loop()`` gives pika's plain IOLoop instead.

Only ``IOLoop``'s public and extension methods are overridden; the handler called is the
one pika registered.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable

from pika.adapters.select_connection import IOLoop

from edm.amqp._pika_private import MISSING, IOLoopHooks, fast_path

log = logging.getLogger(__name__)

FdHandler = Callable[[int, int], None]
Reader = Callable[[], bool]


def io_loop(fast_lane: bool) -> IOLoop:
    """The consumer's I/O loop: a FlushingIOLoop with ``amqp.fast_lane`` on (and the pika
    internals it needs there, see ``fast_path()``), else pika's plain IOLoop."""
    if not fast_lane:
        log.info("amqp.fast_lane is false: the consumer runs on pika's plain SelectConnection and IOLoop.")
        return IOLoop()
    return FlushingIOLoop() if fast_path() else IOLoop()


class FlushingIOLoop(IOLoopHooks):
    def __init__(self) -> None:
        super().__init__()
        self._fd_handlers: dict[int, FdHandler] = {}
        self._readers: dict[int, Reader] = {}
        self._wanted: dict[int, int] = {}  # fd -> the events pika asked for
        self._watched: dict[int, int] = {}  # fd -> the events the poller watches

    def add_handler(self, fd: int, handler: FdHandler, events: int) -> None:
        self._fd_handlers[fd] = handler
        super().add_handler(fd, self._dispatch, events)
        self._wanted[fd] = self._watched[fd] = events

    def set_reader(self, fd: int, reader: Reader) -> None:
        """Offer the fd's read events to ``reader()`` first, until the fd's handler is removed;
        it returns False to hand an event on to the handler."""
        self._readers[fd] = reader

    def _dispatch(self, fd: int, events: int) -> None:
        reader = self._readers.get(fd)
        if reader is not None and events == self.READ and reader():
            return
        self._fd_handlers[fd](fd, events)

    def update_handler(self, fd: int, events: int) -> None:
        self._wanted[fd] = events
        if events == self._watched.get(fd):
            return
        writing = self.WRITE | self.ERROR  # what pika's adapter sets along with a write handler
        if events & ~writing == self._watched.get(fd, -1) & ~writing:
            return  # only the write handler changed: flush() or poll() takes care of it
        self._watch(fd, events)

    def remove_handler(self, fd: int) -> None:
        super().remove_handler(fd)
        self._fd_handlers.pop(fd, None)
        self._readers.pop(fd, None)
        self._wanted.pop(fd, None)
        self._watched.pop(fd, None)

    def flush(self) -> None:
        """Run the write handler of every connected socket that has data queued.

        Only sockets that are also read: a socket still connecting has its write handler
        alone on (pika learns of the connection when it turns writable), and calling that
        early would tell pika it is connected."""
        for fd, events in list(self._wanted.items()):
            handler = self._fd_handlers.get(fd)
            if events & self.WRITE and events & self.READ and handler is not None:
                handler(fd, self.WRITE)

    def poll(self) -> None:
        for fd, wanted in self._wanted.items():  # (_watch changes _watched only)
            if wanted != self._watched.get(fd):
                self._watch(fd, wanted)
        events = self.poll_events() if self._readers and not MISSING else None
        if events is None:
            super().poll()
            return
        # pika's poll() with a shortcut for the one event of the steady state, a reader's
        # socket turning readable: straight to the reader, without the event map pika
        # builds and walks for it. Anything else is dispatched as pika does.
        if len(events) == 1:
            fd, event = events[0]
            reader = self._readers.get(fd)
            if reader is not None and event == self.READ and self._watched.get(fd, 0) & self.READ:
                if not reader():
                    self._fd_handlers[fd](fd, event)
                return
        fd_events: defaultdict[int, int] = defaultdict(int)
        for fd, event in events:
            fd_events[fd] |= event
        self.dispatch_events(fd_events)

    def _watch(self, fd: int, events: int) -> None:
        super().update_handler(fd, events)
        self._watched[fd] = events
