"""An asyncio front for one LLMEngine: a dedicated thread steps the engine, coroutines stream.

The engine is not thread-safe, so exactly one thread (the *engine thread*, started by
:class:`AsyncEngine`) touches it. Everything else talks to that thread through a command list
guarded by one condition variable.

Protocol, caller side (an asyncio task on any event loop):

- ``stream = aeng.generate(request)`` queues an *add* command and returns a
  :class:`RequestStream` at once; ``async for out in stream`` yields
  :class:`~workers.engine.types.RequestOutput` deltas. When the consumer lags, the deltas
  queued for it are coalesced into one (tokens and text concatenated, counters and finish
  state from the newest). The last delta has ``finished`` set, then iteration stops.
- ``aeng.generate(request, min_interval_s=t)`` paces the stream: after a delta is taken, the
  next one is held back until ``t`` seconds have passed (what arrives meanwhile is coalesced
  into it), except the last one, which is delivered as soon as it exists. Streams whose
  tokens come slower than one per ``t`` are not delayed; fast ones cost fewer messages
  downstream (a worker sends one gRPC message per delta). The first delta is never held.
- A request the engine rejects (InvalidRequestError: empty prompt, bad id, ...) raises that
  error from the first ``__anext__``, before any output: nothing was added to the engine.
- Cancelling the consuming task while it waits, calling :meth:`RequestStream.cancel`, or
  dropping an unfinished stream queues an *abort*: the engine frees the request's blocks at
  once and nothing more is delivered to that stream.
- ``sub = aeng.submit(request, on_output, min_interval_s=t)`` is the callback form, for a
  caller that serves many requests at once (a worker's GenerateStream): ``on_output(item)``
  is called on the caller's event loop thread with each delta, the last one ``finished``, or
  with the InvalidRequestError that refused the request. Pacing is done on the engine thread
  here: after a delta went out, the request's next deltas are held there until ``t`` seconds
  have passed (checked after every step) and then go as one; the last one goes at once, and
  the first is never held. Held deltas cost the caller's loop no wakeup at all, which is the
  point: a fast engine steps far more often than anyone needs its tokens. ``sub.cancel()``
  aborts like cancelling a stream; nothing is delivered to ``on_output`` after it, not even
  what was already on its way.
- ``await aeng.abort(request_id)`` aborts on behalf of someone else (the Abort RPC): the stream
  stays attached and ends with a final output whose finish reason is ABORT.
- ``await aeng.call(fn)`` runs ``fn(engine)`` on the engine thread between two steps (exact
  reads such as integrity checks); ``aeng.stats()`` is the snapshot of the last step, no wait.

Protocol, engine thread: loop { take all queued commands; apply them in order (add, abort,
call); if the engine has unfinished work, run one ``step()``, call ``on_step(result)`` (on
this thread: it must be quick and may read the engine), and route the outputs to their
streams; hand everything this iteration produced to each event loop's inbox at once; sleep
on the condition when there is no work and no command }. Wakeups are batched: an inbox has
at most one drain callback scheduled (``call_soon_threadsafe``) at a time, so one step costs
one wakeup per loop whatever its number of outputs, and while a loop lags the following steps
join the drain already scheduled (their deltas are then coalesced per request as above).

Failures: an exception inside ``step()`` is logged and every attached stream gets a final
:class:`EngineFailureOutput` (finish reason ERROR, ``code`` "internal", a message); the
engine's copies of those requests are aborted so their blocks are freed, and the thread keeps
serving (backing off while steps keep failing). :meth:`AsyncEngine.shutdown` ends the thread
after the step in progress; attached and queued streams then end with ``code`` "shutdown".
Should the engine thread itself die (a bug outside ``step()``), every stream ends with
``code`` "internal" and later requests are refused like after a shutdown. A failure is always
a value in the stream, never a hung consumer.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from workers.engine.engine import EngineStats, LLMEngine, StepResult
from workers.engine.types import EngineRequest, FinishReason, RequestOutput
from workers.server.engine_streams import (
    CallbackSink,
    Inbox,
    Outbox,
    RequestStream,
    Sink,
    Submission,
    merge_outputs,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

SHUTDOWN_MESSAGE = "the worker is shutting down; send the request to another worker"
_MAX_BACKOFF_S = 0.5


@dataclass(frozen=True)
class EngineFailureOutput(RequestOutput):
    """A final ERROR output produced by the AsyncEngine itself rather than by the engine.

    ``code`` is "internal" (an engine step raised) or "shutdown" (the engine stopped first).
    """

    code: str = "internal"


def _failure(rid: str, num_prompt: int, last: RequestOutput | None, message: str,
             code: str) -> EngineFailureOutput:
    return EngineFailureOutput(
        request_id=rid, new_token_ids=(), new_text="", finished=True,
        finish_reason=FinishReason.ERROR, num_prompt_tokens=num_prompt,
        num_cached_tokens=last.num_cached_tokens if last is not None else 0,
        num_output_tokens=last.num_output_tokens if last is not None else 0,
        first_token_time=last.first_token_time if last is not None else None,
        arrival_time=last.arrival_time if last is not None else None,
        error=message, code=code)


def _check_interval(value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not 0.0 <= value < float("inf"):
        raise ValueError(f"min_interval_s must be a number of seconds >= 0, got {value!r}")


class AsyncEngine:
    """Steps one LLMEngine on a dedicated thread and streams outputs to asyncio callers."""

    def __init__(self, engine: LLMEngine,
                 on_step: Callable[[StepResult], None] | None = None) -> None:
        if not isinstance(engine, LLMEngine):
            raise TypeError(f"AsyncEngine wraps an LLMEngine, got {type(engine).__name__}")
        self.engine = engine
        self.on_step = on_step
        self._cond = threading.Condition(threading.RLock())
        self._commands: list[tuple] = []
        self._closing = False
        self._closed = False
        self._sinks: dict[str, Sink] = {}  # attached requests (engine thread only)
        self._held: list[CallbackSink] = []  # sinks with paced deltas held (engine thread)
        self._inboxes: dict[asyncio.AbstractEventLoop, Inbox] = {}  # engine thread only
        self._stats: EngineStats = engine.stats()
        self._failures = 0
        self._thread = threading.Thread(target=self._run, name="ferry-engine", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------- caller side

    def generate(self, request: EngineRequest, min_interval_s: float = 0.0) -> RequestStream:
        """Queue ``request``; iterate the returned stream for its outputs (paced by
        ``min_interval_s``: see the module docstring)."""
        if not isinstance(request, EngineRequest):
            raise TypeError(f"generate takes an EngineRequest, got {type(request).__name__}")
        _check_interval(min_interval_s)
        sink = Sink(request, asyncio.get_running_loop(), float(min_interval_s))
        if not self._submit(("add", sink, request)):
            sink.push(_failure(sink.request_id, sink.num_prompt_tokens, None, SHUTDOWN_MESSAGE,
                               "shutdown"))
        return RequestStream(self, request, sink)

    def submit(self, request: EngineRequest, on_output: Callable[[Any], None],
               min_interval_s: float = 0.0) -> Submission:
        """Queue ``request``; its outputs go to ``on_output`` on this event loop's thread,
        paced by ``min_interval_s`` (see the module docstring)."""
        if not isinstance(request, EngineRequest):
            raise TypeError(f"submit takes an EngineRequest, got {type(request).__name__}")
        _check_interval(min_interval_s)
        sink = CallbackSink(request, asyncio.get_running_loop(), on_output,
                             float(min_interval_s))
        if not self._submit(("add", sink, request)):
            failure = _failure(sink.request_id, sink.num_prompt_tokens, None, SHUTDOWN_MESSAGE,
                               "shutdown")
            sink.loop.call_soon(sink.push, failure)
        return Submission(self, sink)

    async def abort(self, request_id: str) -> bool:
        """Abort a request for someone else; its stream ends with ABORT. False: unknown id."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        if not self._submit(("abort", request_id, None, (loop, fut))):
            return False
        return await fut

    async def call(self, fn: Callable[[LLMEngine], T]) -> T:
        """Run ``fn(engine)`` on the engine thread between steps; return its result."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        if not self._submit(("call", fn, (loop, fut))):
            raise RuntimeError("the engine is shut down")
        return await fut

    def stats(self) -> EngineStats:
        """The engine's stats as of its last step, without waiting (exact: ``call``)."""
        return self._stats

    @property
    def is_running(self) -> bool:
        return not self._closed and self._thread.is_alive()

    def shutdown(self, timeout: float | None = 10.0) -> None:
        """Stop the engine thread after its current step; end every stream with an error."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("the engine thread is still in a step %s s after shutdown was asked",
                            timeout)

    def _submit(self, cmd: tuple) -> bool:
        with self._cond:
            if self._closing:
                return False
            self._commands.append(cmd)
            self._cond.notify()
        return True

    # ---------------------------------------------------------------- engine thread

    def _run(self) -> None:
        try:
            self._loop_forever()
        except BaseException:  # a bug: logged; no consumer may hang on it
            log.exception("the engine thread crashed; ending every request with an error")
            with self._cond:
                self._closing = True
                late, self._commands = self._commands, []
            out = Outbox()
            try:
                self._fail_all("the worker's engine thread crashed (see the worker log)",
                               "internal", out)
                for cmd in late:
                    self._apply(cmd, out, True)
            finally:
                out.flush(self._inboxes)
        finally:
            self._closed = True

    def _loop_forever(self) -> None:
        engine = self.engine
        has_work = False
        while True:
            with self._cond:
                if self._failures and has_work and not self._commands and not self._closing:
                    self._cond.wait(min(0.001 * 2 ** min(self._failures, 10), _MAX_BACKOFF_S))
                while not self._commands and not self._closing and not has_work:
                    self._cond.wait()
                cmds = self._commands
                self._commands = []
                closing = self._closing  # once set, _submit queues nothing more
            out = Outbox()
            for cmd in cmds:
                self._apply(cmd, out, closing)
            if closing:
                self._fail_all(SHUTDOWN_MESSAGE, "shutdown", out)
                out.flush(self._inboxes)
                return
            if engine.has_unfinished():
                self._step(out)
            if self._held:
                self._release_due(out)
            has_work = engine.has_unfinished()
            out.flush(self._inboxes)

    def _step(self, out: Outbox) -> None:
        try:
            result = self.engine.step()
        except Exception as exc:  # any failure must reach the clients
            self._failures += 1
            log.exception("engine step failed; ending %d request(s) with an error",
                          len(self._sinks))
            self._fail_all(f"the engine step failed: {type(exc).__name__}: {exc}",
                           "internal", out)
            try:
                self._stats = self.engine.stats()
            except Exception:
                log.exception("reading the engine's stats after the failure failed")
            return
        self._failures = 0
        self._stats = result.stats
        if self.on_step is not None:
            try:
                self.on_step(result)
            except Exception:  # a hook must not stop serving
                log.exception("on_step hook failed")
        sinks = self._sinks
        now = 0.0
        for o in result.outputs:
            sink = sinks.get(o.request_id)
            if sink is None:  # cancelled by its consumer
                continue
            sink.last = o
            if o.finished:
                del sinks[o.request_id]
            if type(sink) is CallbackSink and sink.interval:  # paced here
                now = now or time.monotonic()
                if not o.finished and now < sink.due:
                    if not sink.held:
                        self._held.append(sink)
                    sink.held.append(o)
                    continue
                if sink.held:
                    sink.held.append(o)
                    o = merge_outputs(sink.held)
                    sink.held = []
                sink.due = now + sink.interval
            out.push(sink, o)

    def _release_due(self, out: Outbox) -> None:
        """Send the held deltas whose time has come (paced callback sinks)."""
        now = time.monotonic()
        keep = []
        for sink in self._held:
            if not sink.held:  # sent with a later delta already
                continue
            if self._sinks.get(sink.request_id) is not sink:  # cancelled meanwhile
                sink.held = []
                continue
            if now < sink.due:
                keep.append(sink)
                continue
            out.push(sink, merge_outputs(sink.held))
            sink.held = []
            sink.due = now + sink.interval
        self._held = keep

    def _apply(self, cmd: tuple, out: Outbox, closing: bool) -> None:
        kind = cmd[0]
        if kind == "add":
            _, sink, request = cmd
            if closing:
                out.push(sink, _failure(sink.request_id, sink.num_prompt_tokens, None,
                                        SHUTDOWN_MESSAGE, "shutdown"))
                return
            try:
                self.engine.add_request(request)
            except Exception as exc:  # noqa: BLE001 - InvalidRequestError or a bug: to caller
                out.push(sink, exc)
                return
            self._sinks[sink.request_id] = sink
        elif kind == "abort":
            _, rid, sink, reply = cmd
            if sink is not None:  # its consumer left: abort that very request, if still on
                if self._sinks.get(rid) is not sink:
                    return
                del self._sinks[rid]
            try:
                found = self.engine.abort(rid)
            except Exception:
                log.exception("aborting request %r failed", rid)
                found = False
            if reply is not None:
                out.reply(reply[0], reply[1], found)
        elif kind == "call":
            _, fn, (loop, fut) = cmd
            if closing:
                out.reply(loop, fut, None, RuntimeError("the engine is shut down"))
                return
            try:
                value = fn(self.engine)
            except Exception as exc:  # noqa: BLE001 - belongs to the caller
                out.reply(loop, fut, None, exc)
            else:
                out.reply(loop, fut, value)
        else:  # pragma: no cover - internal
            raise AssertionError(f"unknown command {kind!r}")

    def _fail_all(self, message: str, code: str, out: Outbox) -> None:
        """End every attached stream with an error and free the engine's copies."""
        sinks, self._sinks = self._sinks, {}
        self._held = []
        for rid, sink in sinks.items():
            if type(sink) is CallbackSink and sink.held:  # tokens made before the failure
                out.push(sink, merge_outputs(sink.held))
                sink.held = []
            out.push(sink, _failure(rid, sink.num_prompt_tokens, sink.last, message, code))
            try:
                self.engine.abort(rid)
            except Exception:
                log.exception("aborting request %r after a failure failed", rid)


__all__ = ["SHUTDOWN_MESSAGE", "AsyncEngine", "EngineFailureOutput", "RequestStream", "Submission",
           "merge_outputs"]
