"""Load for benchmarks/serve_overhead.py: closed-loop streams over HTTP, gRPC or in-process.

``concurrency`` coroutines each send one streamed request (``max_tokens`` tokens, EOS
ignored), read it to its end, and send the next, until the measuring window closes:

    start ---- warmup ----> t0 ====== window (seconds) ======> t1 -- in-flight drain --> end

- throughput: requests that *ended* inside [t0, t1], divided by the window's length;
- latency: from sending a request to reading its last byte, for requests *started* inside
  [t0, t1] (no new request starts after t1; those in flight are awaited, each within
  ``request_timeout_s``);
- a request is an error unless it ended with exactly ``max_tokens`` tokens and no error.

Paced (``rate`` > 0, requests/s over all streams): stream ``i`` of ``n`` sends its ``k``-th
request when it is due, at ``start + (k * n + i) / rate``, or at once when its previous
request ended after that (it then catches up). Latency counts from the due time, not from
the (late) send, so a server that falls behind shows it in full (no coordinated omission);
requests still due when the window ends are not sent (the requests/s then fall short of
``rate``, which says the server did not keep up).

Paths: ``http`` (``POST /v1/completions`` or ``/v1/chat/completions`` with ``stream: true``;
one keep-alive connection per stream), ``grpc`` (ferry.v1 ``Ferry.Generate``; the streams
spread over ``channels`` separate HTTP/2 connections, so that frontends sharing a port with
SO_REUSEPORT all get some), and ``inprocess``
(:class:`~workers.server.async_engine.AsyncEngine` ``generate`` in this very process: the
engine alone, the baseline the other two are compared with). The clients: ``raw`` (default;
benchmarks/serve_clients.py, bare asyncio protocols costing about a tenth of the others) or
``lib`` (aiohttp's client, grpc.aio). Either reads every response to its end and checks it:
HTTP 200, SSE framing ending with ``[DONE]``, no error event, usage saying ``max_tokens``
completion tokens; gRPC: the messages' token ids add up to ``max_tokens`` and the last one
ends with FINISH_REASON_LENGTH and no error.

Run as a process (``python benchmarks/serve_load.py --path http --target HOST:PORT ...``) it
prints ``WINDOW start`` at t0 and ``WINDOW end`` at t1 on stdout (the parent samples the
servers' CPU time then), and at the end the :class:`LoadResult` as JSON: into the file named
by ``--result`` (written whole, then renamed into place), else as a ``RESULT <json>`` line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

_USAGE = re.compile(rb'"completion_tokens":\s*(\d+)')
_DONE = b"data: [DONE]\n\n"
PROMPT = "The quick brown fox jumps over the lazy dog. Tell me a story about it."


@dataclass
class LoadResult:
    latencies_ms: list[float] = field(default_factory=list)
    completed_in_window: int = 0
    window_s: float = 0.0
    errors: int = 0
    first_error: str = ""
    client_cpu_s: float = 0.0  # this process's CPU time inside the window
    messages: int = 0  # SSE events / gRPC messages / engine outputs read in the window
    started_in_window: int = 0

    @property
    def rps(self) -> float:
        return self.completed_in_window / self.window_s if self.window_s else 0.0

    @property
    def messages_per_request(self) -> float:
        return self.messages / self.started_in_window if self.started_in_window else 0.0


class _Window:
    def __init__(self, warmup_s: float, seconds: float, on_mark=None) -> None:
        now = time.perf_counter()
        self.start = now
        self.t0 = now + warmup_s
        self.t1 = self.t0 + seconds
        self.result = LoadResult(window_s=seconds)
        self._cpu0 = 0.0
        self._on_mark = on_mark or (lambda _what: None)

    async def marks(self) -> None:
        """Print the window's start and end marks (and read our CPU time) on time."""
        await asyncio.sleep(max(0.0, self.t0 - time.perf_counter()))
        self._cpu0 = time.process_time()
        self._on_mark("start")
        await asyncio.sleep(max(0.0, self.t1 - time.perf_counter()))
        self.result.client_cpu_s = time.process_time() - self._cpu0
        self._on_mark("end")

    def error(self, message: str) -> None:
        self.result.errors += 1
        if not self.result.first_error:
            self.result.first_error = message[:500]

    async def stream(self, one_request, timeout_s: float, index: int = 0, streams: int = 1,
                     rate: float = 0.0) -> None:
        """One stream until t1: closed loop (``rate`` 0), or paced (see the module docstring:
        this stream's k-th request is due at ``start + (k * streams + index) / rate``, and its
        latency counts from then)."""
        res = self.result
        due = self.start + index / rate if rate else 0.0
        period = streams / rate if rate else 0.0
        while True:
            if rate:
                wait = due - time.perf_counter()
                if wait > 0:
                    await asyncio.sleep(wait)
                elif time.perf_counter() >= self.t1:
                    return  # behind schedule at the window's end: no catching up after it
                start, due = due, due + period
            else:
                start = time.perf_counter()
            if start >= self.t1:
                return
            try:
                async with asyncio.timeout(timeout_s):
                    messages, problem = await one_request()
            except Exception as exc:  # noqa: BLE001 - a failed request is counted, not fatal
                messages, problem = 0, f"{type(exc).__name__}: {exc}"
            end = time.perf_counter()
            if start >= self.t0:
                res.started_in_window += 1
                res.messages += messages
                if problem is None:
                    res.latencies_ms.append((end - start) * 1000.0)
            if problem is not None:
                self.error(problem)
                await asyncio.sleep(0.01)  # do not spin on a broken server
            elif self.t0 <= end <= self.t1:
                res.completed_in_window += 1


async def _run(window: _Window, make_request, concurrency: int, timeout_s: float,
               rate: float = 0.0) -> LoadResult:
    marks = asyncio.create_task(window.marks())
    await asyncio.gather(*(window.stream(make_request, timeout_s, i, concurrency, rate)
                           for i in range(concurrency)))
    await marks
    return window.result


# ---------------------------------------------------------------------- the three paths

def _http_body(max_tokens: int, chat: bool) -> tuple[str, bytes]:
    route = "/v1/chat/completions" if chat else "/v1/completions"
    body: dict = {"max_tokens": max_tokens, "ignore_eos": True, "stream": True,
                  "stream_options": {"include_usage": True}, "temperature": 0.0}
    if chat:
        body["messages"] = [{"role": "user", "content": PROMPT}]
    else:
        body["prompt"] = PROMPT
    return route, json.dumps(body).encode()


def check_sse(status: int, raw: bytes, max_tokens: int) -> tuple[int, str | None]:
    """(events, problem or None) of one streamed completion's response."""
    events = raw.count(b"data: ")
    if status != 200:
        return events, f"HTTP {status}: {bytes(raw[:300])!r}"
    usage = _USAGE.search(raw)
    if not raw.endswith(_DONE) or b'"error"' in raw or usage is None:
        return events, f"bad stream: {bytes(raw[-300:])!r}"
    if int(usage.group(1)) != max_tokens:
        return events, f"{usage.group(1).decode()} tokens, not {max_tokens}"
    return events, None


async def http_load_raw(target: str, concurrency: int, warmup_s: float, seconds: float,
                        max_tokens: int, chat: bool = False, timeout_s: float = 30.0,
                        on_mark=None, rate: float = 0.0) -> LoadResult:
    from serve_clients import SseConnection, http_post

    route, data = _http_body(max_tokens, chat)
    host, port = target.rsplit(":", 1)
    raw_request = http_post(host, int(port), route, data)
    conns = [await SseConnection.open(host, int(port)) for _ in range(concurrency)]
    free = list(conns)

    async def one() -> tuple[int, str | None]:
        conn = free.pop()
        try:
            if conn.lost is not None:  # reconnect once
                conn = await SseConnection.open(host, int(port))
            status, body = await conn.request(raw_request)
        finally:
            free.append(conn)
        return check_sse(status, body, max_tokens)

    try:
        window = _Window(warmup_s, seconds, on_mark)
        return await _run(window, one, concurrency, timeout_s, rate)
    finally:
        for c in conns + free:
            c.close()


async def http_load(target: str, concurrency: int, warmup_s: float, seconds: float,
                    max_tokens: int, chat: bool = False, timeout_s: float = 30.0,
                    on_mark=None, rate: float = 0.0) -> LoadResult:
    import aiohttp

    route, data = _http_body(max_tokens, chat)
    url = f"http://{target}{route}"
    headers = {"Content-Type": "application/json"}
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    async with aiohttp.ClientSession(connector=connector) as session:
        async def one() -> tuple[int, str | None]:
            async with session.post(url, data=data, headers=headers) as resp:
                raw = bytearray()
                async for part in resp.content.iter_any():
                    raw += part
            return check_sse(resp.status, bytes(raw), max_tokens)

        window = _Window(warmup_s, seconds, on_mark)
        return await _run(window, one, concurrency, timeout_s, rate)


def _grpc_request(max_tokens: int):
    from ferry.v1 import client_pb2, common_pb2

    return client_pb2.GenerateRequest(
        text=PROMPT, sampling=common_pb2.SamplingParams(max_tokens=max_tokens, ignore_eos=True,
                                                        temperature=0.0))


def check_generate(messages: list, max_tokens: int) -> str | None:
    """The problem with one Ferry.Generate stream's messages (GenerateResponse), or None."""
    from ferry.v1 import common_pb2

    if not messages:
        return "empty stream (the call failed; see the server's log)"
    last = messages[-1]
    if last.finish_reason != common_pb2.FINISH_REASON_LENGTH or last.HasField("error"):
        return f"ended with {last.finish_reason}: {last.error.message}"
    n = sum(len(m.token_ids) for m in messages)
    if n != max_tokens:
        return f"{n} tokens, not {max_tokens}"
    return None


async def grpc_load_raw(target: str, concurrency: int, warmup_s: float, seconds: float,
                        max_tokens: int, channels: int = 4, timeout_s: float = 30.0,
                        on_mark=None, rate: float = 0.0) -> LoadResult:
    from serve_clients import GrpcConnection, grpc_headers

    from ferry.v1 import client_pb2

    parse = client_pb2.GenerateResponse.FromString
    message = _grpc_request(max_tokens).SerializeToString()
    headers = grpc_headers(target, "/ferry.v1.Ferry/Generate")
    host, port = target.rsplit(":", 1)
    conns = [await GrpcConnection.open(host, int(port))
             for _ in range(max(1, min(channels, concurrency)))]
    turn = iter(range(1 << 62))

    async def one() -> tuple[int, str | None]:
        i = next(turn) % len(conns)
        if conns[i].lost is not None:  # reconnect once
            conns[i] = await GrpcConnection.open(host, int(port))
        messages = [parse(m) for m in await conns[i].call(headers, message)]
        return len(messages), check_generate(messages, max_tokens)

    try:
        window = _Window(warmup_s, seconds, on_mark)
        return await _run(window, one, concurrency, timeout_s, rate)
    finally:
        for c in conns:
            c.close()


async def grpc_load(target: str, concurrency: int, warmup_s: float, seconds: float,
                    max_tokens: int, channels: int = 4, timeout_s: float = 30.0,
                    on_mark=None, rate: float = 0.0) -> LoadResult:
    import grpc

    from ferry.v1 import client_pb2_grpc

    request = _grpc_request(max_tokens)
    # A local subchannel pool per channel: each channel gets its own TCP connection.
    chans = [grpc.aio.insecure_channel(target, options=(("grpc.use_local_subchannel_pool", 1),))
             for _ in range(max(1, min(channels, concurrency)))]
    stubs = [client_pb2_grpc.FerryStub(c) for c in chans]
    try:
        for c in chans:
            await asyncio.wait_for(c.channel_ready(), 10.0)
        turn = iter(range(1 << 62))

        async def one() -> tuple[int, str | None]:
            stub = stubs[next(turn) % len(stubs)]
            messages = [m async for m in stub.Generate(request)]
            return len(messages), check_generate(messages, max_tokens)

        window = _Window(warmup_s, seconds, on_mark)
        return await _run(window, one, concurrency, timeout_s, rate)
    finally:
        for c in chans:
            await c.close()


async def inprocess_load(engine, prompt_ids: tuple[int, ...], concurrency: int,
                         warmup_s: float, seconds: float, max_tokens: int,
                         timeout_s: float = 30.0, rate: float = 0.0,
                         on_mark=None) -> LoadResult:
    """The same closed loop on an AsyncEngine in this process (it is shut down after)."""
    from workers.engine.types import EngineRequest, FinishReason, SamplingParams
    from workers.server.async_engine import AsyncEngine

    aeng = AsyncEngine(engine)
    sampling = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0.0)
    ids = iter(range(1 << 62))
    try:
        async def one() -> tuple[int, str | None]:
            n = messages = 0
            last = None
            async for last in aeng.generate(EngineRequest(f"b{next(ids)}", prompt_ids, sampling)):
                messages += 1
                n += len(last.new_token_ids)
            if last is None or last.finish_reason is not FinishReason.LENGTH:
                return messages, f"ended with {last and last.finish_reason}"
            if n != max_tokens:
                return messages, f"{n} tokens, not {max_tokens}"
            return messages, None

        window = _Window(warmup_s, seconds, on_mark)
        return await _run(window, one, concurrency, timeout_s, rate)
    finally:
        await asyncio.to_thread(aeng.shutdown)


# ---------------------------------------------------------------------- as a process

def _main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="one load generator of serve_overhead.py")
    p.add_argument("--path", choices=("http", "grpc"), required=True)
    p.add_argument("--target", required=True, help="host:port")
    p.add_argument("--concurrency", type=int, required=True)
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--chat", action="store_true")
    p.add_argument("--channels", type=int, default=4)
    p.add_argument("--loop", choices=("serve", "asyncio", "uvloop"), default="serve",
                   help="serve or uvloop: uvloop where installed (a cheaper client)")
    p.add_argument("--result", type=Path, default=None,
                   help="write the LoadResult JSON here (default: a RESULT line on stdout)")
    p.add_argument("--rate", type=float, default=0.0,
                   help="requests/s over all streams (paced); 0: closed loop")
    p.add_argument("--client", choices=("raw", "lib"), default="raw",
                   help="raw: benchmarks/serve_clients.py; lib: aiohttp / grpc.aio")
    args = p.parse_args(argv)

    def mark(what: str) -> None:
        sys.stdout.write(f"WINDOW {what}\n")
        sys.stdout.flush()

    raw = args.client == "raw"
    if args.path == "http":
        coro = (http_load_raw if raw else http_load)(
            args.target, args.concurrency, args.warmup, args.seconds, args.max_tokens,
            chat=args.chat, on_mark=mark, rate=args.rate)
    else:
        coro = (grpc_load_raw if raw else grpc_load)(
            args.target, args.concurrency, args.warmup, args.seconds, args.max_tokens,
            channels=args.channels, on_mark=mark, rate=args.rate)
    try:
        import uvloop
    except ImportError:
        uvloop = None
    if args.loop == "asyncio" or uvloop is None:
        result = asyncio.run(coro)
    else:
        result = uvloop.run(coro)
    if args.result is not None:
        tmp = args.result.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(result)))
        tmp.replace(args.result)  # complete or absent
    else:
        sys.stdout.write("RESULT " + json.dumps(asdict(result)) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    _main()
