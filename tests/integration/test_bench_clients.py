"""The serving benchmark's cheap clients (benchmarks/serve_clients.py) against a real
FrontendServer with a fake worker: they read exactly what httpx and the grpc stub read
(streamed SSE over HTTP/1.1 keep-alive, ferry.v1 Generate over HTTP/2 with many concurrent
streams), report errors, and the load generator's checks pass only on complete streams."""

from __future__ import annotations

import asyncio
import json
import re
import sys
from pathlib import Path

import grpc
import httpx
import pytest

from ferry.v1 import client_pb2, client_pb2_grpc, common_pb2
from tests.helpers.fake_worker import MODEL, ServingStack

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from serve_clients import (
    GrpcConnection,
    HttpError,
    SseConnection,
    dechunk,
    grpc_headers,
    http_post,
)
from serve_load import check_generate, check_sse


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = ServingStack(tmp_path_factory.mktemp("tok")).start()
    yield s
    s.stop()


def normalized(sse: bytes) -> bytes:
    """An SSE body without what differs between two requests (id, created)."""
    return re.sub(rb'"(id|created)":("[^"]*"|\d+)', b"", sse)


def completion_body(max_tokens: int = 6, **extra) -> bytes:
    return json.dumps({"model": MODEL, "prompt": "hello", "max_tokens": max_tokens,
                       "stream": True, "ignore_eos": True, "temperature": 0.0,
                       "stream_options": {"include_usage": True}, **extra}).encode()


def test_sse_connection_reads_what_httpx_reads(stack):
    port = stack.server.ports.http
    body = completion_body()
    with httpx.Client(timeout=20) as client:
        want = client.post(stack.http_url + "/v1/completions", content=body,
                           headers={"content-type": "application/json"}).content

    async def main():
        conn = await SseConnection.open("127.0.0.1", port)
        try:
            request = http_post("127.0.0.1", port, "/v1/completions", body)
            results = [await conn.request(request) for _ in range(3)]  # one keep-alive socket
            bad = await conn.request(http_post("127.0.0.1", port, "/v1/completions",
                                               completion_body(model="nope")))
        finally:
            conn.close()
        return results, bad

    results, (status, error_body) = asyncio.run(main())
    for status_ok, raw in results:
        assert status_ok == 200
        assert normalized(raw) == normalized(want) and raw.endswith(b"data: [DONE]\n\n")
        assert check_sse(status_ok, raw, 6) == (raw.count(b"data: "), None)
    assert status == 404 and json.loads(error_body)["error"]["code"] == "model_not_found"
    _, problem = check_sse(status, error_body, 6)
    assert problem.startswith("HTTP 404")
    # a stream cut short does not pass the load generator's check
    assert check_sse(200, results[0][1][: -len(b"data: [DONE]\n\n")], 6)[1] is not None


def test_dechunk_checks_the_framing():
    assert dechunk(b"HEAD5\r\nhello\r\n1\r\n!\r\n0\r\n\r\n", 4) == b"hello!"
    for broken in (b"5\r\nhelloX\r\n0\r\n\r\n", b"5\r\nhello\r\n0\r\nX", b"zz\r\n"):
        with pytest.raises((HttpError, ValueError)):
            dechunk(broken, 0)


def test_grpc_connection_reads_what_the_grpc_stub_reads(stack):
    host, port = stack.grpc_address.rsplit(":", 1)
    request = client_pb2.GenerateRequest(
        text="hello", model=MODEL,
        sampling=common_pb2.SamplingParams(max_tokens=7, ignore_eos=True, temperature=0.0))
    with grpc.insecure_channel(stack.grpc_address) as channel:
        want = list(client_pb2_grpc.FerryStub(channel).Generate(request, timeout=20))

    async def main():
        conn = await GrpcConnection.open(host, int(port))
        headers = grpc_headers(stack.grpc_address, "/ferry.v1.Ferry/Generate")
        try:
            many = await asyncio.gather(*(conn.call(headers, request.SerializeToString())
                                          for _ in range(40)))
            bad = client_pb2.GenerateRequest(text="hello", model="nope")
            refused = await conn.call(headers, bad.SerializeToString())
        finally:
            conn.close()
        return many, refused

    many, refused = asyncio.run(main())
    parse = client_pb2.GenerateResponse.FromString
    for raw in many:
        got = [parse(m) for m in raw]
        assert [(m.token_ids, m.text, m.finish_reason) for m in got] == \
            [(m.token_ids, m.text, m.finish_reason) for m in want]
        assert check_generate(got, 7) is None
    (error,) = [parse(m) for m in refused]
    assert error.error.code == common_pb2.ERROR_CODE_NOT_FOUND
    assert "nope" in check_generate([error], 7)
    assert check_generate([parse(m) for m in many[0][:-1]], 7) is not None  # no last message
