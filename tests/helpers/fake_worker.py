"""A fake ``ferry.v1.Worker`` (in-process grpc.aio server, deterministic tokens) and a serving
stack (tiny real tokenizer + fake worker + Frontend + FrontendServer) running on an event loop
in a background thread, so that tests can use blocking clients (openai, tritonclient, grpc).

The fake worker's output for every request is the token sequence ``reply_ids + [eos]``,
repeated. Generation ends like the engine's: a token in ``stop_token_ids`` (kept, STOP),
``max_tokens`` (LENGTH), the context length (LENGTH). It reports num_cached_tokens as the
longest full-block prefix of the prompt seen in an earlier request (at least one token is
always computed). It records every request: its prompt, its sampling, how it ended
("finished", "cancelled" by the caller, "aborted" through Abort) and the tokens it sent.
"""

from __future__ import annotations

import asyncio
import collections
import json
import threading
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from ferry.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from orchestrator.frontend import Frontend, FrontendConfig, FrontendServer
from tests.helpers.tiny_model import CHAT_TEMPLATE, build_tokenizer
from workers.tokenizer import Tokenizer

MODEL = "tiny-chat"
REPLY_TEXT = " Hello world, hello there! The quick brown fox."


def write_tokenizer_folder(folder: Path) -> Path:
    """tokenizer.json + tokenizer_config.json (ChatML template, eos <|im_end|>) of the tiny
    byte-level BPE of tests/helpers/tiny_model.py."""
    folder.mkdir(parents=True, exist_ok=True)
    build_tokenizer().save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "unk_token": "<|endoftext|>",
        "chat_template": CHAT_TEMPLATE}))
    return folder


@dataclass
class RequestRecord:
    request: worker_pb2.WorkerGenerateRequest
    outcome: str = "running"  # running, finished, cancelled, aborted, failed
    tokens_sent: list[int] = field(default_factory=list)
    ended: threading.Event = field(default_factory=threading.Event)

    @property
    def prompt(self) -> tuple[int, ...]:
        return tuple(self.request.prompt_token_ids)


class FakeWorker(worker_pb2_grpc.WorkerServicer):
    def __init__(self, reply_ids: list[int], eos_id: int, *, worker_id: str = "w0",
                 model: str = MODEL, max_model_len: int = 128, block_size: int = 4,
                 num_blocks: int = 256, vocab_size: int = 384) -> None:
        self.reply_ids = list(reply_ids)
        self.eos_id = eos_id
        self.worker_id = worker_id
        self.model = model
        self.max_model_len = max_model_len
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.vocab_size = vocab_size
        self.token_delay_s = 0.0  # sleep between chunks
        self.tokens_per_chunk = 1
        # (after this many tokens, ErrorCode, message): the next Generate fails that way.
        self.failures: collections.deque[tuple[int, int, str]] = collections.deque()
        self.records: dict[str, RequestRecord] = {}
        self._aborted: set[str] = set()
        self._seen_prefixes: set[tuple[int, ...]] = set()
        self._server: grpc.aio.Server | None = None

    # ------------------------------------------------------------------ lifecycle

    async def start(self, host: str = "127.0.0.1") -> str:
        self._server = grpc.aio.server()
        worker_pb2_grpc.add_WorkerServicer_to_server(self, self._server)
        port = self._server.add_insecure_port(f"{host}:0")
        await self._server.start()
        return f"{host}:{port}"

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(0)

    def find(self, prompt: list[int] | tuple[int, ...]) -> list[RequestRecord]:
        return [r for r in list(self.records.values()) if r.prompt == tuple(prompt)]

    # ------------------------------------------------------------------ Worker service

    def _token(self, i: int) -> int:
        cycle = len(self.reply_ids) + 1
        return self.eos_id if i % cycle == len(self.reply_ids) else self.reply_ids[i % cycle]

    def _cached(self, prompt: tuple[int, ...]) -> int:
        bs, best = self.block_size, 0
        for k in range(1, (len(prompt) - 1) // bs + 1):
            if prompt[:k * bs] in self._seen_prefixes:
                best = k * bs
        for k in range(1, len(prompt) // bs + 1):
            self._seen_prefixes.add(prompt[:k * bs])
        return best

    async def Generate(self, request, context):
        rid = request.request_id
        record = RequestRecord(request)
        self.records[rid] = record
        prompt = tuple(request.prompt_token_ids)
        s = request.sampling
        max_tokens = s.max_tokens if s.HasField("max_tokens") else 16
        stop_ids = set(s.stop_token_ids)
        failure = self.failures.popleft() if self.failures else None
        cached = self._cached(prompt)
        base = {"request_id": rid, "num_prompt_tokens": len(prompt), "num_cached_tokens": cached}
        try:
            produced = 0
            while True:
                if failure is not None and produced >= failure[0]:
                    record.outcome = "failed"
                    yield worker_pb2.WorkerGenerateResponse(
                        **base, finished=True, finish_reason=common_pb2.FINISH_REASON_ERROR,
                        error=common_pb2.Error(code=failure[1], message=failure[2]))
                    return
                if self.token_delay_s:
                    await asyncio.sleep(self.token_delay_s)
                if rid in self._aborted:
                    record.outcome = "aborted"
                    yield worker_pb2.WorkerGenerateResponse(
                        **base, finished=True, finish_reason=common_pb2.FINISH_REASON_ABORT)
                    return
                new, reason = [], common_pb2.FINISH_REASON_UNSPECIFIED
                for _ in range(self.tokens_per_chunk):
                    token = self._token(produced)
                    new.append(token)
                    produced += 1
                    if token in stop_ids:
                        reason = common_pb2.FINISH_REASON_STOP
                    elif produced >= max_tokens or len(prompt) + produced >= self.max_model_len:
                        reason = common_pb2.FINISH_REASON_LENGTH
                    if reason:
                        break
                record.tokens_sent.extend(new)
                if reason:
                    record.outcome = "finished"
                yield worker_pb2.WorkerGenerateResponse(
                    **base, new_token_ids=new, finished=bool(reason), finish_reason=reason)
                if reason:
                    return
        except (asyncio.CancelledError, GeneratorExit):
            # grpc.aio ends a cancelled streaming handler with aclose() (GeneratorExit at the
            # pending yield) or by cancelling its task, depending on where it waits.
            record.outcome = "cancelled"
            raise
        finally:
            record.ended.set()

    async def Abort(self, request, context):
        record = self.records.get(request.request_id)
        found = record is not None and record.outcome == "running"
        if found:
            self._aborted.add(request.request_id)
        return worker_pb2.AbortResponse(found=found)

    async def Stats(self, request, context):
        running = [r for r in self.records.values() if r.outcome == "running"]
        used = sum(-(-(len(r.prompt) + len(r.tokens_sent)) // self.block_size) for r in running)
        return worker_pb2.StatsResponse(
            worker_id=self.worker_id, num_running=len(running), kv_blocks_used=used,
            kv_blocks_total=self.num_blocks, integrity_ok=True)

    async def Info(self, request, context):
        return worker_pb2.InfoResponse(
            worker_id=self.worker_id, model=self.model,
            role=common_pb2.WORKER_ROLE_AGGREGATED, block_size=self.block_size, hash_seed=0,
            num_blocks=self.num_blocks, max_model_len=self.max_model_len,
            vocab_size=self.vocab_size)


class ServingStack:
    """Tokenizer, fake worker, frontend and its servers on a loop in a background thread."""

    def __init__(self, folder: Path, *, max_model_len: int = 128, **server_kwargs) -> None:
        self.tokenizer = Tokenizer.from_hf_folder(write_tokenizer_folder(folder))
        self.reply_ids = self.tokenizer.encode(REPLY_TEXT)
        self.eos_id = self.tokenizer.eos_token_ids[0]
        self.worker = FakeWorker(self.reply_ids, self.eos_id, max_model_len=max_model_len,
                                 vocab_size=self.tokenizer.vocab_size)
        self.frontend = Frontend(self.tokenizer, FrontendConfig(model_name=MODEL))
        self._server_kwargs = {"stats_interval_s": 0.2, **server_kwargs}
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.server: FrontendServer | None = None

    def run(self, coro, timeout: float = 30.0):
        """Run a coroutine on the stack's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self) -> ServingStack:
        self._thread.start()
        self.run(self._start())
        return self

    async def _start(self) -> None:
        address = await self.worker.start()
        await self.frontend.add_worker(self.worker.worker_id, address)
        self.server = FrontendServer(self.frontend, **self._server_kwargs)
        await self.server.start()

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.server.ports.http}"

    @property
    def grpc_address(self) -> str:
        return f"127.0.0.1:{self.server.ports.grpc}"

    @property
    def kserve_address(self) -> str:
        return f"127.0.0.1:{self.server.ports.kserve}"

    def stop(self) -> None:
        async def _stop() -> None:
            if self.server is not None:
                await self.server.stop()
            await self.frontend.close()
            await self.worker.stop()

        try:
            self.run(_stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            self.loop.close()

    def text(self, ids) -> str:
        return self.tokenizer.decode(ids)


__all__ = ["MODEL", "REPLY_TEXT", "FakeWorker", "RequestRecord", "ServingStack",
           "write_tokenizer_folder"]
