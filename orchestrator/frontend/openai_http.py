"""OpenAI-compatible HTTP API (aiohttp) over a :class:`Frontend`.

Routes: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /v1/models``,
``GET /v1/models/{model}``, ``GET /health``, ``GET /metrics``.

Errors are OpenAI-shaped: ``{"error": {"message", "type", "param", "code"}}`` with HTTP 400
for a request to change (the message says what), 404 for an unknown model, 503 while no
worker is ready, 500 for a failure of ours. A failure after a stream started is one
``data: {"error": ...}`` event followed by ``data: [DONE]``.

Writes: a streamed response costs one socket send per SSE write, which is most of what a
token costs here, so the headers go out with the first event and the last delta, the usage
event and ``[DONE]`` with the end of the chunked body, all in one write.

Client disconnects: the app must run with ``handler_cancellation=True`` (FrontendServer does):
aiohttp then cancels the handler when the client goes away, which cancels the generation
stream and with it the worker call, even while no token is being written.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import time
from collections.abc import Callable
from contextlib import aclosing

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from orchestrator.frontend.core import Frontend, collect
from orchestrator.frontend.openai_protocol import (
    ParsedRequest,
    SSEWriter,
    chat_response,
    completion_response,
    error_json,
    parse_chat,
    parse_completion,
)
from orchestrator.frontend.types import ErrorCode, FrontendError, InvalidArgument

log = logging.getLogger(__name__)

_SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no"}


def _error_type(code: ErrorCode) -> str:
    if code is ErrorCode.UNAVAILABLE:
        return "service_unavailable"
    return "invalid_request_error" if code.http_status < 500 else "server_error"


def _error_response(status: int, message: str, type_: str, param: str | None = None,
                    code: str | None = None) -> web.Response:
    return web.Response(status=status, body=error_json(message, type_, param, code),
                        content_type="application/json")


def _frontend_error(e: FrontendError) -> web.Response:
    return _error_response(e.code.http_status, e.message, _error_type(e.code), e.param,
                           e.kind or e.code.name.lower())


def _json(obj: object, status: int = 200) -> web.Response:
    return web.Response(status=status, body=json.dumps(obj).encode(),
                        content_type="application/json")


class _SSEResponse(web.StreamResponse):
    """A streamed response whose status line and headers wait for the first event and go
    out in the same write (one send less per request; aiohttp's own Response does the same)."""

    _send_headers_immediately = False


@web.middleware
async def _errors_as_json(request: web.Request, handler):
    try:
        return await handler(request)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        return _error_response(e.status, e.reason or e.text or "error",
                               "invalid_request_error" if e.status < 500 else "server_error")
    except Exception:
        log.exception("unexpected failure serving %s %s", request.method, request.path)
        return _error_response(500, "internal error in the frontend (see its log)",
                               "server_error", code="internal")


class OpenAIHttpApi:
    def __init__(self, frontend: Frontend) -> None:
        self.frontend = frontend
        self._prefix = os.urandom(4).hex()
        self._counter = itertools.count()

    def app(self) -> web.Application:
        app = web.Application(middlewares=[_errors_as_json],
                              client_max_size=self.frontend.config.max_request_bytes)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/v1/models/{model}", self.model)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics)
        return app

    # ------------------------------------------------------------------ generation

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, parse_chat, chat=True)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, parse_completion, chat=False)

    async def _generate(self, request: web.Request, parse: Callable[[dict], ParsedRequest],
                        chat: bool) -> web.StreamResponse:
        try:
            parsed = parse(await self._body(request))
            stream = await self.frontend.generate(parsed.input)
        except FrontendError as e:
            return _frontend_error(e)
        request_id = f"{'chatcmpl' if chat else 'cmpl'}-{self._prefix}{next(self._counter):x}"
        created = int(time.time())
        model = self.frontend.model_name
        if not parsed.stream:
            done = await collect(stream)
            if done.error is not None:
                return _error_response(done.error.code.http_status, done.error.message,
                                       _error_type(done.error.code),
                                       code=done.error.code.name.lower())
            build = chat_response if chat else completion_response
            return _json(build(request_id, created, model, done.text, done.finish_reason,
                               done.usage))
        sse = SSEWriter(chat, request_id, created, model)
        response = _SSEResponse(headers=_SSE_HEADERS)
        ended = False
        try:
            async with aclosing(stream):
                await response.prepare(request)  # the headers go out with the first event
                if chat:
                    await response.write(sse.first())
                async for chunk in stream:
                    if chunk.finish_reason is None:
                        if chunk.text:
                            await response.write(sse.delta(chunk.text))
                        continue
                    if chunk.error is not None:
                        last = sse.error(chunk.error.message, _error_type(chunk.error.code),
                                         chunk.error.code.name.lower())
                    else:
                        last = sse.delta(chunk.text, chunk.finish_reason.value)
                        if parsed.include_usage:
                            last += sse.usage(chunk.usage)
                    ended = True
                    await response.write_eof(last + SSEWriter.DONE)  # one write for the end
            if not ended:
                await response.write_eof()
        except ConnectionResetError:
            pass  # the client went away; the stream (and the worker call) is closed above
        return response

    @staticmethod
    async def _body(request: web.Request) -> dict:
        raw = await request.read()
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise InvalidArgument(f"the request body is not valid JSON: {e}",
                                  kind="invalid_json") from None
        if not isinstance(body, dict):
            raise InvalidArgument("the request body must be a JSON object", kind="invalid_json")
        return body

    # ------------------------------------------------------------------ the rest

    def _card(self) -> dict:
        return {"id": self.frontend.model_name, "object": "model",
                "created": self.frontend.created, "owned_by": "ferry",
                "max_model_len": self.frontend.max_model_len}

    async def models(self, request: web.Request) -> web.Response:
        return _json({"object": "list", "data": [self._card()]})

    async def model(self, request: web.Request) -> web.Response:
        try:
            self.frontend.check_model(request.match_info["model"])
        except FrontendError as e:
            return _frontend_error(e)
        return _json(self._card())

    async def health(self, request: web.Request) -> web.Response:
        f = self.frontend
        body = {"status": "ok" if f.ready else "unavailable", "model": f.model_name,
                "num_ready_workers": f.num_ready_workers}
        if not f.ready:
            body["detail"] = f.health_detail()
        return _json(body, 200 if f.ready else 503)

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=self.frontend.metrics.render(),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})


__all__ = ["OpenAIHttpApi"]
