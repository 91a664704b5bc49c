"""Several frontend processes on the same ports (``ferry serve --frontends N``): the child
frontends of orchestrator/frontend_process.py without Ray (both processes hold client
connections and serve them; a child that cannot start is reported and reaped; a child whose
parent goes away stops), then ``ferry serve --runner mocker --frontends 2`` end to end (both
serve; SIGTERM leaves no process)."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time

import psutil
import pytest

from orchestrator.frontend.config import FrontendConfig
from orchestrator.frontend.core import Frontend
from orchestrator.frontend.server import FrontendServer
from orchestrator.frontend_process import FrontendProcesses, FrontendSpec
from orchestrator.serve import ServeConfig, served_name
from orchestrator.worker_actor import WorkerEndpoint
from tests.helpers.serve_process import ServeProcess, alive, wait_gone
from tests.helpers.tiny_model import make_tiny_llama, write_hf_folder
from workers.engine.config import EngineConfig
from workers.engine.engine import LLMEngine
from workers.loader.tokenizer_loader import load_model_info
from workers.mocker.runner import MockerRunner
from workers.server.worker import WorkerConfig, WorkerServer

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_hf_folder(make_tiny_llama(max_position_embeddings=256),
                           tmp_path_factory.mktemp("tiny-frontends") / "tiny-llama")


def completion_request(port: int, max_tokens: int = 5) -> bytes:
    body = json.dumps({"prompt": "hello there", "max_tokens": max_tokens, "stream": True,
                       "ignore_eos": True, "temperature": 0}).encode()
    return (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
            ).encode() + body


def read_response(sock: socket.socket) -> bytes:
    """One whole chunked response from a blocking socket."""
    data = b""
    while not data.endswith(b"\r\n0\r\n\r\n"):
        part = sock.recv(65536)
        assert part, f"the connection closed mid-response: {data[-300:]!r}"
        data += part
    return data


def owners(pids: list[int], port: int) -> dict[int, int]:
    """How many established TCP connections on local ``port`` each pid holds."""
    out = {}
    for pid in pids:
        conns = psutil.Process(pid).net_connections(kind="tcp")
        out[pid] = sum(1 for c in conns if c.laddr and c.laddr.port == port
                       and c.status == psutil.CONN_ESTABLISHED)
    return out


def serve_on_connections(port: int, pids: list[int], n: int = 24) -> dict[int, int]:
    """Open ``n`` connections, check that each pid holds some, stream a completion on each."""
    socks = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(n)]
    try:
        deadline = time.monotonic() + 10
        while sum((held := owners(pids, port)).values()) < n and time.monotonic() < deadline:
            time.sleep(0.05)  # the servers accept asynchronously
        for s in socks:
            s.sendall(completion_request(port))
        for s in socks:
            data = read_response(s)
            assert data.startswith(b"HTTP/1.1 200") and b"data: [DONE]" in data
        return held
    finally:
        for s in socks:
            s.close()


def test_child_frontends_share_the_ports_and_stop_with_their_parent(model_dir):
    info = load_model_info(str(model_dir))
    cfg = ServeConfig(model=str(model_dir), router="round_robin", runner="mocker", frontends=3,
                      http_port=0, grpc_port=0, kserve_grpc_port=0,
                      engine=EngineConfig(block_size=4, num_blocks=64))

    async def main():
        worker = WorkerServer(
            LLMEngine(MockerRunner(info.tokenizer.vocab_size, 256), cfg.engine),
            WorkerConfig(worker_id="w0", model=served_name(cfg.model)))
        address = await worker.start()
        endpoint = WorkerEndpoint("w0", address, os.getpid(), 4, cfg.engine.hash_seed, 64, 256)
        frontend = Frontend(info.tokenizer, FrontendConfig(model_name=served_name(cfg.model)))
        await frontend.add_worker("w0", address)
        server = FrontendServer(frontend, reuse_port=True)
        ports = await server.start()
        children = FrontendProcesses()
        try:
            specs = [FrontendSpec(cfg, info.tokenizer, (endpoint,), None, ports.http,
                                  ports.grpc, ports.kserve, i) for i in (1, 2)]
            pids = await asyncio.to_thread(children.start, specs, 120.0)
            assert len(pids) == 2 and alive(pids) == set(pids)
            held = await asyncio.to_thread(serve_on_connections, ports.http,
                                           [os.getpid(), *pids])
            assert all(n > 0 for n in held.values()), f"a frontend got no connection: {held}"

            # A child whose parent goes away (its stdin closes) stops by itself.
            orphan = children.procs[0]
            orphan.stdin.close()
            assert orphan.wait(30) == 0
            children.procs.remove(orphan)
            # The others stop on SIGTERM, by pid.
            await asyncio.to_thread(children.stop)
            assert wait_gone(pids) == set()

            # A child that cannot start (its worker does not answer) is reported and reaped.
            dead = WorkerEndpoint("w0", "127.0.0.1:1", 0, 4, cfg.engine.hash_seed, 64, 256)
            bad = FrontendSpec(cfg, info.tokenizer, (dead,), None, ports.http, ports.grpc,
                               ports.kserve, 1)
            with pytest.raises(RuntimeError, match="did not start") as raised:
                await asyncio.to_thread(children.start, [bad], 60.0)
            assert "did not answer Info" in str(raised.value)
            assert children.procs == []
        finally:
            await asyncio.to_thread(children.stop)
            await server.stop()
            await frontend.close()
            await worker.stop(0.5)

    asyncio.run(asyncio.wait_for(main(), 300))


def test_ferry_serve_with_two_frontends_serves_on_both_and_stops_clean(model_dir):
    serve = ServeProcess("--model", str(model_dir), "--workers", "1", "--runner", "mocker",
                         "--num-blocks", "64", "--block-size", "4", "--frontends", "2")
    try:
        (child,) = serve.ready["frontends"]
        assert child in serve.descendants
        assert any("frontends     2 processes" in line for line in serve.lines)
        port = int(serve.http.rsplit(":", 1)[1])
        held = serve_on_connections(port, [serve.proc.pid, child])
        assert all(n > 0 for n in held.values()), f"a frontend got no connection: {held}"
        ours = set(serve.descendants) | {w["pid"] for w in serve.ready["workers"]}
    finally:
        code = serve.stop()
    assert code == 0
    assert wait_gone(ours) == set()
    assert any("ferry: stopped" in line for line in serve.lines)
