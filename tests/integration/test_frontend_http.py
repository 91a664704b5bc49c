"""The OpenAI-compatible HTTP API against a real FrontendServer and a fake worker: the official
``openai`` client for the happy paths, raw HTTP (httpx) for bad input and disconnects."""

from __future__ import annotations

import json
import re
import socket
import time

import httpx
import pytest

openai = pytest.importorskip("openai")

from tests.helpers.fake_worker import MODEL, REPLY_TEXT, ServingStack


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = ServingStack(tmp_path_factory.mktemp("tok")).start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(stack):
    with openai.OpenAI(base_url=stack.http_url + "/v1", api_key="unused", max_retries=0,
                       timeout=20) as c:
        yield c


def _chat_prompt_ids(stack, content: str) -> list[int]:
    text = stack.tokenizer.apply_chat_template([{"role": "user", "content": content}])
    return stack.tokenizer.encode(text, add_special_tokens=False)


def _wait_ended(stack, prompt_ids, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        records = stack.worker.find(prompt_ids)
        if records and records[-1].ended.wait(0.05):
            return records[-1]
        time.sleep(0.02)
    raise AssertionError("the worker never saw the request end")


# ---------------------------------------------------------------------- happy paths


def test_chat_non_streaming(client, stack):
    out = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Say hello"}], max_tokens=60,
        temperature=0.5, top_p=0.9, seed=7, extra_body={"top_k": 3})
    prompt = _chat_prompt_ids(stack, "Say hello")
    assert out.choices[0].message.content == REPLY_TEXT
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].finish_reason == "stop"
    assert out.model == MODEL and out.id.startswith("chatcmpl-")
    assert out.usage.prompt_tokens == len(prompt)
    assert out.usage.completion_tokens == len(stack.reply_ids) + 1  # the reply and EOS
    assert out.usage.total_tokens == len(prompt) + len(stack.reply_ids) + 1
    (record,) = stack.worker.find(prompt)
    s = record.request.sampling
    assert (s.max_tokens, s.temperature, s.top_p, s.top_k, s.seed) == (60, 0.5, 0.9, 3, 7)
    assert list(s.stop_token_ids) == [stack.eos_id] and not s.ignore_eos
    assert list(s.stop) == []  # stop strings stay in the frontend


def test_chat_streaming_with_usage_chunk(client, stack):
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Stream please"}], max_tokens=60,
        stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == REPLY_TEXT
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "stop" and set(finishes[:-1]) == {None}
    assert chunks[-1].choices == []
    usage = chunks[-1].usage
    assert usage.prompt_tokens == len(_chat_prompt_ids(stack, "Stream please"))
    assert usage.completion_tokens == len(stack.reply_ids) + 1
    assert len({c.id for c in chunks}) == 1


def test_completion_max_tokens(client, stack):
    out = client.completions.create(model=MODEL, prompt="Hello there", max_tokens=5)
    assert out.choices[0].text == stack.text(stack.reply_ids[:5])
    assert out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens == 5
    assert out.usage.prompt_tokens == len(stack.tokenizer.encode("Hello there"))


def test_completion_streaming_token_id_prompt(client, stack):
    prompt = [5, 6, 7, 8, 9]
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=7,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == stack.text(stack.reply_ids[:7])
    assert chunks[-1].choices[0].finish_reason == "length"
    assert [tuple(r.prompt) for r in stack.worker.find(prompt)] == [tuple(prompt)]


def test_stop_string_ends_the_stream_and_aborts_the_worker(client, stack):
    stack.worker.token_delay_s = 0.03
    try:
        chunks = list(client.completions.create(model=MODEL, prompt="Stop test", max_tokens=40,
                                                stop=["world"], stream=True))
    finally:
        stack.worker.token_delay_s = 0.0
    text = "".join(c.choices[0].text for c in chunks)
    assert text == REPLY_TEXT[:REPLY_TEXT.index("world")]
    assert chunks[-1].choices[0].finish_reason == "stop"
    record = _wait_ended(stack, stack.tokenizer.encode("Stop test"))
    assert record.outcome == "cancelled"
    assert len(record.tokens_sent) < len(stack.reply_ids)


def test_stop_list_non_streaming_and_ignore_eos(client, stack):
    out = client.completions.create(model=MODEL, prompt="Again", max_tokens=40,
                                    stop=["zzz", "fox"], extra_body={"ignore_eos": True})
    assert out.choices[0].text == REPLY_TEXT[:REPLY_TEXT.index("fox")]
    assert out.choices[0].finish_reason == "stop"
    longer = client.completions.create(model=MODEL, prompt="Twice", max_tokens=30,
                                       extra_body={"ignore_eos": True})
    cycle = stack.reply_ids + [stack.eos_id]
    assert longer.choices[0].text == stack.text((cycle * 2)[:30])  # EOS is not shown
    assert longer.choices[0].finish_reason == "length"
    (record,) = stack.worker.find(stack.tokenizer.encode("Twice"))
    assert record.request.sampling.ignore_eos and list(record.request.sampling.stop_token_ids) == []


def test_cached_tokens_reported(client, stack):
    messages = [{"role": "user", "content": "The same prompt, twice over"}]
    first = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2)
    second = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2)
    n = first.usage.prompt_tokens
    # The first shares only the template's system prompt with earlier requests.
    assert first.usage.prompt_tokens_details.cached_tokens < (n - 1) // 4 * 4
    assert second.usage.prompt_tokens_details.cached_tokens == (n - 1) // 4 * 4


def test_models_and_health(client, stack):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    health = httpx.get(stack.http_url + "/health")
    assert health.status_code == 200 and health.json()["num_ready_workers"] == 1


# ---------------------------------------------------------------------- bad input

LONG_TEXT = "hello " * 200
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
HI = [{"role": "user", "content": "hi"}]


def _chat(**extra):
    return {"model": MODEL, "messages": HI, **extra}


BAD_REQUESTS = [
    # (path, body, status, param, words the message must contain)
    (CHAT, b"{not json", 400, None, "not valid JSON"),
    (CHAT, b"[1, 2]", 400, None, "JSON object"),
    (CHAT, _chat(model="gpt-17"), 404, "model", "gpt-17"),
    (CHAT, {"model": MODEL, "messages": "hi"}, 400, "messages", "array"),
    (CHAT, {"model": MODEL}, 400, "messages", "required"),
    (CHAT, {"model": MODEL, "messages": []}, 400, "messages", "empty"),
    (CHAT, {"model": MODEL, "messages": [{"role": "user", "content": {"x": 1}}]}, 400,
     "messages[0].content", "string"),
    (CHAT, _chat(temperature="hot"), 400, "temperature", "number"),
    (CHAT, _chat(max_tokens=-1), 400, "max_tokens", "at least 1"),
    (CHAT, _chat(max_completion_tokens=0), 400, "max_completion_tokens", "at least 1"),
    (CHAT, _chat(max_tokens="5"), 400, "max_tokens", "integer"),
    (CHAT, _chat(n=10**9), 400, "n", "n separate requests"),
    (CHAT, _chat(n=2), 400, "n", "one choice"),
    (CHAT, _chat(n=0), 400, "n", "at least 1"),
    (CHAT, _chat(logprobs=True), 400, "logprobs", "not supported"),
    (CHAT, _chat(stream="yes"), 400, "stream", "boolean"),
    (CHAT, _chat(stop=5), 400, "stop", "string"),
    (CHAT, _chat(top_p=0), 400, "top_p", "(0, 1]"),
    (CHAT, _chat(temperature=-1), 400, "temperature", ">= 0"),
    (CHAT, _chat(seed=2**70), 400, "seed", "at most"),
    (CHAT, _chat(max_tokens=10**12), 400, "max_tokens", "lower max_tokens to at most"),
    (CHAT, {"model": MODEL, "messages": [{"role": "user", "content": LONG_TEXT}]}, 400,
     "messages", "shorten the prompt"),
    (COMPLETIONS, {"model": MODEL, "prompt": LONG_TEXT}, 400, "prompt", "shorten the prompt"),
    (COMPLETIONS, {"model": MODEL, "prompt": [1, 10**6]}, 400, "prompt", "vocabulary"),
    (COMPLETIONS, {"model": MODEL, "prompt": 12}, 400, "prompt", "string"),
    (COMPLETIONS, {"model": MODEL, "prompt": ["a", "b"]}, 400, "prompt", "one prompt"),
    (COMPLETIONS, {"model": MODEL, "prompt": "x", "echo": True}, 400, "echo", "not supported"),
    (COMPLETIONS, {"model": MODEL, "prompt": "x", "logprobs": 2}, 400, "logprobs",
     "not supported"),
]


@pytest.mark.parametrize("path,body,status,param,words", BAD_REQUESTS,
                         ids=[str(i) for i in range(len(BAD_REQUESTS))])
def test_bad_request_gets_a_clear_error(stack, path, body, status, param, words):
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    response = httpx.post(stack.http_url + path, timeout=10, **kwargs)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert words in error["message"]
    if status == 404:
        assert error["code"] == "model_not_found"


def test_server_still_serves_after_bad_requests(stack, client):
    for _, body, *_ in BAD_REQUESTS[:6]:
        kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
        httpx.post(stack.http_url + CHAT, timeout=10, **kwargs)
    assert httpx.get(stack.http_url + "/health").json()["status"] == "ok"
    out = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=3)
    assert out.choices[0].finish_reason == "length"


def test_unknown_route_is_a_json_404(stack):
    response = httpx.get(stack.http_url + "/v1/nothing")
    assert response.status_code == 404 and "error" in response.json()


# ---------------------------------------------------------------------- disconnects


def test_stream_disconnect_cancels_the_worker_call(stack):
    prompt = "Disconnect me"
    stack.worker.token_delay_s = 0.05
    try:
        with httpx.stream("POST", stack.http_url + COMPLETIONS, timeout=10, json={
                "model": MODEL, "prompt": prompt, "max_tokens": 100, "stream": True,
                "ignore_eos": True}) as response:
            events = 0
            for line in response.iter_lines():
                if line.startswith("data: "):
                    events += 1
                if events == 2:
                    break  # leaving the block closes the connection mid-stream
        record = _wait_ended(stack, stack.tokenizer.encode(prompt))
    finally:
        stack.worker.token_delay_s = 0.0
    assert record.outcome == "cancelled"
    assert len(record.tokens_sent) < 100


def test_non_streaming_disconnect_cancels_the_worker_call(stack):
    prompt = "Hang up early"
    body = json.dumps({"model": MODEL, "prompt": prompt, "max_tokens": 100,
                       "ignore_eos": True}).encode()
    stack.worker.token_delay_s = 0.05
    try:
        with socket.create_connection(("127.0.0.1", stack.server.ports.http)) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                         b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            deadline = time.monotonic() + 5
            while not stack.worker.find(stack.tokenizer.encode(prompt)):
                assert time.monotonic() < deadline
                time.sleep(0.02)
        record = _wait_ended(stack, stack.tokenizer.encode(prompt))
    finally:
        stack.worker.token_delay_s = 0.0
    assert record.outcome == "cancelled"


# ---------------------------------------------------------------------- metrics


def _sample(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert match, name
    return float(match.group(1))


def test_metrics(stack, client):
    client.chat.completions.create(model=MODEL, messages=HI, max_tokens=4)
    httpx.post(stack.http_url + CHAT, json=_chat(n=3))
    time.sleep(0.3)  # one stats poll
    text = httpx.get(stack.http_url + "/metrics").text
    assert _sample(text, 'ferry_frontend_requests_total{status="ok"}') >= 1
    assert _sample(text, 'ferry_frontend_requests_total{status="invalid_argument"}') >= 1
    assert _sample(text, "ferry_frontend_time_to_first_token_seconds_count") >= 1
    assert _sample(text, "ferry_frontend_inter_token_latency_seconds_count") >= 1
    assert _sample(text, "ferry_frontend_generation_tokens_total") >= 4
    assert _sample(text, "ferry_frontend_prompt_tokens_total") >= 1
    assert _sample(text, 'ferry_frontend_kv_blocks_total{worker="w0"}') == 256
    assert _sample(text, 'ferry_frontend_kv_blocks_used{worker="w0"}') == 0
    assert _sample(text, "ferry_frontend_requests_in_flight") == 0
    rate = _sample(text, "ferry_frontend_prefix_cache_hit_rate")
    assert 0 <= rate < 1


# ---------------------------------------------------------------------- the server itself


def test_no_worker_means_503_and_busy_ports_are_refused(stack):
    from orchestrator.frontend import Frontend, FrontendConfig, FrontendServer

    lonely = Frontend(stack.tokenizer, FrontendConfig(model_name=MODEL))
    server = FrontendServer(lonely, grpc_port=None, kserve_port=None, stats_interval_s=None)
    ports = stack.run(server.start())
    try:
        assert ports.http > 0 and ports.grpc is None and ports.kserve is None
        url = f"http://127.0.0.1:{ports.http}"
        health = httpx.get(url + "/health")
        assert health.status_code == 503 and "no worker" in health.json()["detail"]
        response = httpx.post(url + CHAT, json=_chat())
        assert response.status_code == 503
        assert response.json()["error"]["type"] == "service_unavailable"
    finally:
        stack.run(server.stop())
    for taken in ({"http_port": stack.server.ports.http, "grpc_port": None},
                  {"http_port": None, "grpc_port": stack.server.ports.grpc}):
        clash = FrontendServer(lonely, kserve_port=None, stats_interval_s=None, **taken)
        with pytest.raises(OSError):
            stack.run(clash.start())
    with pytest.raises(ValueError, match="http_port"):
        FrontendServer(lonely, http_port=70000)
