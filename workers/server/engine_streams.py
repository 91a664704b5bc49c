"""The caller-side halves of :class:`~workers.server.async_engine.AsyncEngine`'s streams and
the mailboxes between its engine thread and the event loops (the protocol is in that module's
docstring).

- :class:`Sink`: where the engine thread routes one request's outputs; :class:`RequestStream`
  reads a sink as an async iterator (pacing with ``hold_until``, abort on cancel or drop).
- :class:`CallbackSink` / :class:`Submission`: the callback form (``AsyncEngine.submit``),
  paced on the engine thread.
- :class:`Outbox` (engine thread, one iteration's results grouped by loop) and :class:`Inbox`
  (one per loop, at most one drain callback scheduled at a time).

Aborts go back to the engine through ``engine._submit(("abort", request_id, sink, None))``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
from collections.abc import Callable
from typing import Any, Protocol

from workers.engine.types import EngineRequest, RequestOutput

log = logging.getLogger(__name__)


class CommandTarget(Protocol):
    """What a stream needs of its AsyncEngine: a way to queue a command."""

    def _submit(self, cmd: tuple) -> bool: ...


def merge_outputs(outs: list[RequestOutput]) -> RequestOutput:
    """One delta with the tokens and text of ``outs``, the rest (and type) of the newest."""
    if len(outs) == 1:
        return outs[0]
    last = outs[-1]
    tokens = tuple(t for o in outs for t in o.new_token_ids)
    text = "".join(o.new_text for o in outs)
    return dataclasses.replace(last, new_token_ids=tokens, new_text=text)


class Sink:
    """Where the engine thread routes one request's outputs (the engine-side half of a stream).

    The engine thread holds sinks, never :class:`RequestStream` objects, so a stream its
    consumer dropped is garbage at once and its ``__del__`` aborts the request.
    """

    __slots__ = ("hold_until", "interval", "last", "loop", "num_prompt_tokens", "pending",
                 "request_id", "timer", "waiter")

    def __init__(self, request: EngineRequest, loop: asyncio.AbstractEventLoop,
                 interval: float = 0.0) -> None:
        self.request_id = request.request_id
        self.loop = loop
        self.num_prompt_tokens = len(request.prompt_token_ids)
        self.pending: list[Any] = []  # RequestOutput deltas, or one exception (loop thread)
        self.waiter: asyncio.Future | None = None  # the consumer waits on it (loop thread)
        self.last: RequestOutput | None = None  # newest routed output (engine thread)
        self.interval = interval  # min_interval_s of the stream (loop thread from here on)
        self.hold_until = 0.0  # loop.time() before which a non-final delta is held back
        self.timer: asyncio.TimerHandle | None = None  # wakes the waiter at hold_until

    def held(self) -> bool:
        """Pending deltas exist but must wait for ``hold_until`` (none of them is the last)."""
        last = self.pending[-1]
        return (self.hold_until > 0.0 and not isinstance(last, BaseException)
                and not last.finished and self.loop.time() < self.hold_until)

    def push(self, item: Any) -> None:  # loop thread
        self.pending.append(item)
        if self.waiter is None:
            return
        if self.hold_until > 0.0 and self.held():
            if self.timer is None:
                self.timer = self.loop.call_at(self.hold_until, self.wake)
            return
        self.wake()

    def wake(self) -> None:  # loop thread
        timer, self.timer = self.timer, None
        if timer is not None:
            timer.cancel()
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            if not waiter.done():
                waiter.set_result(None)


class CallbackSink(Sink):
    """A sink that hands each item to a callback (:meth:`AsyncEngine.submit`); paced on the
    engine thread (``held``, ``due``: engine thread only)."""

    __slots__ = ("callback", "due", "held")

    def __init__(self, request: EngineRequest, loop: asyncio.AbstractEventLoop,
                 callback: Callable[[Any], None], interval: float = 0.0) -> None:
        super().__init__(request, loop, interval)
        self.callback: Callable[[Any], None] | None = callback  # None once cancelled
        self.held: list[RequestOutput] = []  # deltas held back by pacing (engine thread)
        self.due = 0.0  # time.monotonic() from which the next delta may go (engine thread)

    def push(self, item: Any) -> None:  # loop thread
        callback = self.callback
        if callback is not None:
            if isinstance(item, BaseException) or item.finished:
                self.callback = None  # the last item: the request is over
            callback(item)


class Submission:
    """A request given to :meth:`AsyncEngine.submit`; :meth:`cancel` aborts it."""

    __slots__ = ("_aeng", "_sink")

    def __init__(self, aeng: CommandTarget, sink: CallbackSink) -> None:
        self._aeng = aeng
        self._sink = sink

    @property
    def request_id(self) -> str:
        return self._sink.request_id

    @property
    def done(self) -> bool:
        """The last item was delivered, or the request was cancelled."""
        return self._sink.callback is None

    def cancel(self) -> None:
        """Abort the request unless it already ended; nothing is delivered after this."""
        sink = self._sink
        if sink.callback is not None:
            sink.callback = None
            self._aeng._submit(("abort", sink.request_id, sink, None))


class RequestStream:
    """The outputs of one request, as an async iterator (see the module docstring)."""

    __slots__ = ("_aeng", "_closed", "_sink", "request")

    def __init__(self, aeng: CommandTarget, request: EngineRequest, sink: Sink) -> None:
        self._aeng = aeng
        self._sink = sink
        self._closed = False  # finished, failed or cancelled: no abort needed any more
        self.request = request

    @property
    def request_id(self) -> str:
        return self.request.request_id

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        sink = self._sink
        while not sink.pending or (sink.hold_until > 0.0 and sink.held()):
            if not sink.pending and self._closed:
                raise StopAsyncIteration
            waiter = sink.loop.create_future()
            sink.waiter = waiter
            if sink.pending and sink.timer is None:  # held: wake up when the hold ends
                sink.timer = sink.loop.call_at(sink.hold_until, sink.wake)
            try:
                await waiter
            except BaseException:  # cancelled consumer (client gone): free the request
                sink.waiter = None
                if sink.timer is not None:
                    sink.timer.cancel()
                    sink.timer = None
                self.cancel()
                raise
        if sink.interval:
            sink.hold_until = sink.loop.time() + sink.interval
        items = sink.pending
        sink.pending = []
        first = items[0]
        if isinstance(first, BaseException):
            self._closed = True
            raise first
        out = merge_outputs(items)
        if out.finished:
            self._closed = True
        return out

    def cancel(self) -> None:
        """Abort the request unless it already ended; no output is delivered after this."""
        if not self._closed:
            self._closed = True
            self._aeng._submit(("abort", self._sink.request_id, self._sink, None))

    async def aclose(self) -> None:
        self.cancel()

    def __del__(self) -> None:
        if not self._closed:
            try:
                self.cancel()
            except Exception as exc:  # noqa: BLE001 - interpreter shutdown
                log.debug("could not abort dropped stream %r: %s", self.request_id, exc)


class Inbox:
    """Results waiting for one event loop. At most one drain callback is scheduled at a time:
    while the loop lags, the engine thread's later iterations join the pending drain instead of
    costing another wakeup."""

    __slots__ = ("lock", "loop", "pushes", "replies", "scheduled")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.lock = threading.Lock()
        self.pushes: list[tuple[Sink, Any]] = []
        self.replies: list[tuple[asyncio.Future, Any, BaseException | None]] = []
        self.scheduled = False

    def post(self, pushes: list, replies: list) -> bool:  # engine thread
        """Queue results for the loop; False when the loop is closed (its consumers are gone)."""
        with self.lock:
            self.pushes.extend(pushes)
            self.replies.extend(replies)
            if self.scheduled:
                return True
            self.scheduled = True
        try:
            self.loop.call_soon_threadsafe(self.drain)
        except RuntimeError:
            return False
        return True

    def drain(self) -> None:  # loop thread
        with self.lock:
            pushes, self.pushes = self.pushes, []
            replies, self.replies = self.replies, []
            self.scheduled = False
        for sink, item in pushes:
            sink.push(item)
        for fut, value, exc in replies:
            if not fut.done():
                if exc is not None:
                    fut.set_exception(exc)
                else:
                    fut.set_result(value)


class Outbox:
    """What one engine-thread iteration delivers, grouped by event loop."""

    __slots__ = ("by_loop",)

    def __init__(self) -> None:
        self.by_loop: dict[asyncio.AbstractEventLoop, tuple[list, list]] = {}

    def _lists(self, loop: asyncio.AbstractEventLoop) -> tuple[list, list]:
        lists = self.by_loop.get(loop)
        if lists is None:
            lists = self.by_loop[loop] = ([], [])
        return lists

    def push(self, sink: Sink, item: Any) -> None:
        self._lists(sink.loop)[0].append((sink, item))

    def reply(self, loop: asyncio.AbstractEventLoop, fut: asyncio.Future, value: Any,
              exc: BaseException | None = None) -> None:
        self._lists(loop)[1].append((fut, value, exc))

    def flush(self, inboxes: dict[asyncio.AbstractEventLoop, Inbox]) -> None:
        for loop, (pushes, replies) in self.by_loop.items():
            inbox = inboxes.get(loop)
            if inbox is None:
                inbox = inboxes[loop] = Inbox(loop)
            if not inbox.post(pushes, replies):
                del inboxes[loop]
        self.by_loop = {}


__all__ = ["CallbackSink", "CommandTarget", "Inbox", "Outbox", "RequestStream", "Sink",
           "Submission", "merge_outputs"]
