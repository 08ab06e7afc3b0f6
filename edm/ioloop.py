"""pika's IOLoop with ``flush()``: send what pika has queued now, not on the loop's next turn.

When pika queues a frame (an ack, say) it turns the socket's write handler on with
``update_handler(fd, READ | WRITE)``; the frame leaves once the next ``poll()`` reports the
socket writable and pika's writer runs. At prefetch 1 the broker sends nothing until it has
our ack, so that extra turn of the loop (an ``epoll_wait``, the dispatch, the timer checks)
sits between every message and the next. ``flush()`` runs the write handler of each socket
that has its write handler on, at once, as ``poll()`` would for a writable socket. If the
socket cannot take the data, pika's writer keeps it queued and its handler on, and the next
``poll()`` finishes the job: nothing is lost by calling ``flush()`` too early or twice.

Only ``IOLoop``'s public handler methods are overridden; the handler called is the one
pika registered.
"""

from __future__ import annotations

from collections.abc import Callable

from pika.adapters.select_connection import IOLoop

FdHandler = Callable[[int, int], None]


class FlushingIOLoop(IOLoop):  # type: ignore[misc]  # pika has no type hints for mypy
    def __init__(self) -> None:
        super().__init__()
        self._fd_handlers: dict[int, FdHandler] = {}
        self._writing: set[int] = set()  # fds whose write handler is on

    def add_handler(self, fd: int, handler: FdHandler, events: int) -> None:
        super().add_handler(fd, handler, events)
        self._fd_handlers[fd] = handler
        self._note(fd, events)

    def update_handler(self, fd: int, events: int) -> None:
        super().update_handler(fd, events)
        self._note(fd, events)

    def remove_handler(self, fd: int) -> None:
        super().remove_handler(fd)
        self._fd_handlers.pop(fd, None)
        self._writing.discard(fd)

    def flush(self) -> None:
        """Run the write handler of every socket that has data queued."""
        for fd in list(self._writing):
            handler = self._fd_handlers.get(fd)
            if handler is not None and fd in self._writing:
                handler(fd, self.WRITE)

    def _note(self, fd: int, events: int) -> None:
        if events & self.WRITE:
            self._writing.add(fd)
        else:
            self._writing.discard(fd)
