"""The ferry.v1.Ferry gRPC API against a real FrontendServer and fake workers, with the
generated client stub: streaming Generate, Tokenize, ListModels, Health; error chunks, worker
failures, retry on another worker, and cancellation."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from ferry.v1 import client_pb2, client_pb2_grpc, common_pb2
from tests.helpers.fake_worker import MODEL, REPLY_TEXT, FakeWorker, ServingStack

STOP, LENGTH, ERROR = (common_pb2.FINISH_REASON_STOP, common_pb2.FINISH_REASON_LENGTH,
                       common_pb2.FINISH_REASON_ERROR)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = ServingStack(tmp_path_factory.mktemp("tok")).start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def stub(stack):
    with grpc.insecure_channel(stack.grpc_address) as channel:
        yield client_pb2_grpc.FerryStub(channel)


def _chat(*pairs: tuple[str, str]) -> client_pb2.ChatMessages:
    return client_pb2.ChatMessages(
        messages=[client_pb2.ChatMessage(role=r, content=c) for r, c in pairs])


def _generate(stub, **fields) -> list[client_pb2.GenerateResponse]:
    return list(stub.Generate(client_pb2.GenerateRequest(**fields), timeout=20))


def _check_protocol(chunks) -> None:
    """client.proto: one last chunk with a finish reason, usage on it only."""
    assert chunks[-1].finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED
    assert all(c.finish_reason == common_pb2.FINISH_REASON_UNSPECIFIED for c in chunks[:-1])
    assert all(not c.HasField("usage") for c in chunks[:-1])
    assert chunks[-1].HasField("usage")


def test_generate_chat_streams_deltas(stub, stack):
    chunks = _generate(stub, model=MODEL, chat=_chat(("user", "Hi there")), request_id="mine-1",
                       sampling=common_pb2.SamplingParams(max_tokens=50, temperature=0.0))
    _check_protocol(chunks)
    assert len(chunks) > 5
    assert "".join(c.text for c in chunks) == REPLY_TEXT
    ids = [t for c in chunks for t in c.token_ids]
    assert ids == stack.reply_ids + [stack.eos_id]
    assert {c.request_id for c in chunks} == {"mine-1"}
    last = chunks[-1]
    assert last.finish_reason == STOP and not last.HasField("error")
    prompt_text = stack.tokenizer.apply_chat_template([{"role": "user", "content": "Hi there"}])
    prompt = stack.tokenizer.encode(prompt_text)
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (len(prompt), len(ids))
    (record,) = stack.worker.find(prompt)
    assert record.request.request_id != "mine-1"  # the worker sees the frontend's own id
    assert record.request.sampling.temperature == 0.0


def test_generate_token_ids_max_tokens_and_stop_string(stub, stack):
    chunks = _generate(stub, token_ids=client_pb2.TokenIds(ids=[3, 4, 5]),
                       sampling=common_pb2.SamplingParams(max_tokens=3))
    _check_protocol(chunks)
    assert [t for c in chunks for t in c.token_ids] == stack.reply_ids[:3]
    assert chunks[-1].finish_reason == LENGTH and chunks[-1].usage.completion_tokens == 3
    assert chunks[0].request_id  # assigned by the frontend
    stopped = _generate(stub, text="stop here", sampling=common_pb2.SamplingParams(
        max_tokens=40, stop=["there"]))
    _check_protocol(stopped)
    assert "".join(c.text for c in stopped) == REPLY_TEXT[:REPLY_TEXT.index("there")]
    assert stopped[-1].finish_reason == STOP


@pytest.mark.parametrize("fields,code,words", [
    ({"model": "other", "text": "x"}, common_pb2.ERROR_CODE_NOT_FOUND, "other"),
    ({"text": "x", "sampling": common_pb2.SamplingParams(top_p=2.0)},
     common_pb2.ERROR_CODE_INVALID_ARGUMENT, "top_p"),
    ({"text": "x", "sampling": common_pb2.SamplingParams(max_tokens=0)},
     common_pb2.ERROR_CODE_INVALID_ARGUMENT, "max_tokens"),
    ({"text": "hello " * 200}, common_pb2.ERROR_CODE_INVALID_ARGUMENT, "shorten the prompt"),
    ({"token_ids": client_pb2.TokenIds(ids=[10**6])}, common_pb2.ERROR_CODE_INVALID_ARGUMENT,
     "vocabulary"),
    ({"model": MODEL}, common_pb2.ERROR_CODE_INVALID_ARGUMENT, "prompt"),
    ({"chat": _chat(("robot", "x"))}, common_pb2.ERROR_CODE_INVALID_ARGUMENT, "robot"),
])
def test_rejected_request_is_one_error_chunk(stub, fields, code, words):
    (chunk,) = _generate(stub, request_id="bad-1", **fields)
    assert chunk.finish_reason == ERROR and chunk.request_id == "bad-1"
    assert chunk.error.code == code
    assert words in chunk.error.message


def test_worker_failure_is_a_final_error_chunk(stub, stack):
    stack.worker.failures.append((2, common_pb2.ERROR_CODE_INTERNAL, "the GPU caught fire"))
    chunks = _generate(stub, text="fail please", sampling=common_pb2.SamplingParams(
        max_tokens=20))
    _check_protocol(chunks)
    assert [t for c in chunks for t in c.token_ids] == stack.reply_ids[:2]
    last = chunks[-1]
    assert last.finish_reason == ERROR and last.error.code == common_pb2.ERROR_CODE_INTERNAL
    assert "the GPU caught fire" in last.error.message and "w0" in last.error.message
    assert last.usage.completion_tokens == 2
    health = stub.Health(client_pb2.HealthRequest())
    assert health.ready


def test_resource_exhausted_retries_on_another_worker(stub, stack):
    second = FakeWorker(stack.reply_ids, stack.eos_id, worker_id="w1",
                        vocab_size=stack.tokenizer.vocab_size)

    async def add():
        await stack.frontend.add_worker("w1", await second.start())

    async def remove():
        await stack.frontend.remove_worker("w1")
        await second.stop()

    stack.run(add())
    try:
        assert stub.Health(client_pb2.HealthRequest()).num_ready_workers == 2
        full = common_pb2.ERROR_CODE_RESOURCE_EXHAUSTED
        stack.worker.failures.append((0, full, "no free KV blocks"))
        for i in range(2):  # round robin: one of the two meets w0 first and is retried on w1
            chunks = _generate(stub, text=f"retry {i}",
                               sampling=common_pb2.SamplingParams(max_tokens=4))
            assert chunks[-1].finish_reason == LENGTH
            assert [t for c in chunks for t in c.token_ids] == stack.reply_ids[:4]
        prompts = [tuple(stack.tokenizer.encode(f"retry {i}", add_special_tokens=True))
                   for i in range(2)]
        failed = [r for r in list(stack.worker.records.values())
                  if r.outcome == "failed" and r.prompt in prompts]
        assert len(failed) == 1
        assert [r.outcome for r in second.find(failed[0].prompt)] == ["finished"]
        # Both refuse: the client gets UNAVAILABLE after both were tried.
        stack.worker.failures.append((0, full, "no free KV blocks"))
        second.failures.append((0, full, "no free KV blocks"))
        (chunk,) = _generate(stub, text="nobody", sampling=common_pb2.SamplingParams(
            max_tokens=4))
        assert chunk.error.code == common_pb2.ERROR_CODE_UNAVAILABLE
        assert "w0" in chunk.error.message and "w1" in chunk.error.message
    finally:
        stack.worker.failures.clear()
        stack.run(remove())
    assert stub.Health(client_pb2.HealthRequest()).num_ready_workers == 1


def worker_call_ended(stack, text: str, timeout_s: float = 10.0):
    """The fake worker's record of the call for ``text``, once that call has ended."""
    prompt = stack.tokenizer.encode(text, add_special_tokens=True)
    deadline = time.monotonic() + timeout_s
    while not stack.worker.find(prompt)[0].ended.is_set():
        assert time.monotonic() < deadline, "the worker call was not cancelled"
        time.sleep(0.02)
    return stack.worker.find(prompt)[0]


def test_cancelling_generate_cancels_the_worker_call(stub, stack):
    stack.worker.token_delay_s = 0.05
    try:
        call = stub.Generate(client_pb2.GenerateRequest(
            text="cancel me", sampling=common_pb2.SamplingParams(max_tokens=100,
                                                                  ignore_eos=True)))
        first = next(call)
        assert first.token_ids == stack.reply_ids[:1]
        call.cancel()
        record = worker_call_ended(stack, "cancel me")
    finally:
        stack.worker.token_delay_s = 0.0
    assert record.outcome == "cancelled" and len(record.tokens_sent) < 100


def test_deadline_ends_generate_and_cancels_the_worker_call(stub, stack):
    stack.worker.token_delay_s = 0.05
    try:
        call = stub.Generate(client_pb2.GenerateRequest(
            text="deadline me", sampling=common_pb2.SamplingParams(max_tokens=100,
                                                                    ignore_eos=True)),
            timeout=0.5)
        with pytest.raises(grpc.RpcError) as raised:
            list(call)
        assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        record = worker_call_ended(stack, "deadline me")
    finally:
        stack.worker.token_delay_s = 0.0
    assert record.outcome == "cancelled" and 0 < len(record.tokens_sent) < 100


def test_an_async_client_reads_chunks_as_they_come(stack):
    """Generate is served as a unary method (grpc_api.py): a grpc.aio client still gets a
    server stream, each chunk as the worker makes it, then status OK."""
    stack.worker.token_delay_s = 0.05

    async def read() -> tuple[list, list[float], grpc.StatusCode]:
        async with grpc.aio.insecure_channel(stack.grpc_address) as channel:
            call = client_pb2_grpc.FerryStub(channel).Generate(client_pb2.GenerateRequest(
                text="one by one", sampling=common_pb2.SamplingParams(max_tokens=4)),
                timeout=20)
            chunks, times = [], []
            async for chunk in call:
                chunks.append(chunk)
                times.append(time.monotonic())
            return chunks, times, await call.code()

    try:
        chunks, times, code = asyncio.run(read())
    finally:
        stack.worker.token_delay_s = 0.0
    assert code == grpc.StatusCode.OK
    _check_protocol(chunks)
    assert [t for c in chunks for t in c.token_ids] == stack.reply_ids[:4]
    assert len(chunks) >= 2 and chunks[-1].finish_reason == LENGTH
    assert times[-1] - times[0] > 0.1  # streamed, not gathered and sent at the end


def test_tokenize(stub, stack):
    text = stub.Tokenize(client_pb2.TokenizeRequest(text="Hello world"))
    assert list(text.token_ids) == stack.tokenizer.encode("Hello world", add_special_tokens=True)
    assert text.prompt == "Hello world"
    chat = stub.Tokenize(client_pb2.TokenizeRequest(
        model=MODEL, chat=_chat(("system", "Be brief."), ("user", "Hi")),
        add_generation_prompt=True))
    rendered = stack.tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    assert chat.prompt == rendered and rendered.endswith("<|im_start|>assistant\n")
    assert list(chat.token_ids) == stack.tokenizer.encode(rendered)
    no_prompt = stub.Tokenize(client_pb2.TokenizeRequest(chat=_chat(("user", "Hi"))))
    assert not no_prompt.prompt.endswith("assistant\n")


@pytest.mark.parametrize("request_,status", [
    (client_pb2.TokenizeRequest(model="nope", text="x"), grpc.StatusCode.NOT_FOUND),
    (client_pb2.TokenizeRequest(model=MODEL), grpc.StatusCode.INVALID_ARGUMENT),
    (client_pb2.TokenizeRequest(chat=_chat(("alien", "x"))), grpc.StatusCode.INVALID_ARGUMENT),
])
def test_tokenize_errors(stub, request_, status):
    with pytest.raises(grpc.RpcError) as info:
        stub.Tokenize(request_)
    assert info.value.code() == status and info.value.details()


def test_list_models_and_health(stub):
    (card,) = stub.ListModels(client_pb2.ListModelsRequest()).models
    assert (card.name, card.max_model_len, card.num_ready_workers) == (MODEL, 128, 1)
    health = stub.Health(client_pb2.HealthRequest())
    assert health.ready and health.num_ready_workers == 1 and health.detail == ""


def test_a_worker_of_another_model_or_unreachable_is_refused(stub, stack):
    from orchestrator.frontend import WorkerUnreachable

    stranger = FakeWorker(stack.reply_ids, stack.eos_id, worker_id="w9", model="other")

    async def register():
        address = await stranger.start()
        try:
            with pytest.raises(ValueError, match="serves model 'other'"):
                await stack.frontend.add_worker("w9", address)
        finally:
            await stranger.stop()
        stack.frontend.pool.timeout_s = 0.5
        try:
            with pytest.raises(WorkerUnreachable, match="w8"):
                await stack.frontend.add_worker("w8", address)  # nobody listens there now
        finally:
            stack.frontend.pool.timeout_s = 5.0

    stack.run(register())
    assert "w9" not in stack.frontend.pool and "w8" not in stack.frontend.pool
    assert stub.Health(client_pb2.HealthRequest()).num_ready_workers == 1
