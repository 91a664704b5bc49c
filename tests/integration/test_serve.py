"""``ferry serve`` end to end: a real local Ray, our own nats-server, two torch workers on a
tiny random Llama, and the three client APIs, then a clean shutdown."""

from __future__ import annotations

import asyncio
import json
import time

import grpc
import httpx
import numpy as np
import openai
import pytest

from ferry.v1 import client_pb2, client_pb2_grpc, common_pb2, worker_pb2, worker_pb2_grpc
from orchestrator.cli import main as ferry_cli
from orchestrator.event_subscriber import EventSubscriber
from tests.helpers.serve_process import ServeProcess, wait_gone
from tests.helpers.tiny_model import make_tiny_llama, write_hf_folder

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_hf_folder(make_tiny_llama(max_position_embeddings=256),
                           tmp_path_factory.mktemp("tiny-serve") / "tiny-llama")


@pytest.fixture(scope="module")
def served(model_dir):
    serve = ServeProcess("--model", str(model_dir), "--workers", "2", "--num-blocks", "64",
                         "--block-size", "4")
    yield serve
    serve.stop()


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served.http + "/v1", api_key="unused", max_retries=0)


def worker_stats(served) -> list[worker_pb2.StatsResponse]:
    out = []
    for w in served.ready["workers"]:
        with grpc.insecure_channel(w["address"]) as ch:
            out.append(worker_pb2_grpc.WorkerStub(ch).Stats(worker_pb2.StatsRequest(), timeout=10))
    return out


def test_openai_chat_and_completions(served, client, model_dir, capsys):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny-llama"]
    chat = client.chat.completions.create(
        model="tiny-llama", messages=[{"role": "user", "content": "hello there"}],
        max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
    assert chat.choices[0].finish_reason == "length"
    assert chat.usage.completion_tokens == 8

    # streaming gives the same text, with usage in the last chunk
    chunks = list(client.chat.completions.create(
        model="tiny-llama", messages=[{"role": "user", "content": "hello there"}],
        max_tokens=8, temperature=0, stream=True, stream_options={"include_usage": True},
        extra_body={"ignore_eos": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == chat.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == 8

    # greedy completion text equals `ferry generate`
    comp = client.completions.create(model="tiny-llama", prompt="the quick brown", max_tokens=10,
                                     temperature=0, extra_body={"ignore_eos": True})
    assert ferry_cli(["generate", "--model", str(model_dir), "--prompt", "the quick brown",
                      "--max-tokens", "10", "--ignore-eos", "--json"]) == 0
    assert comp.choices[0].text == json.loads(capsys.readouterr().out)["text"]

    # a stop string cuts the text before it
    stop_at = comp.choices[0].text[3:5]
    if stop_at:
        cut = client.completions.create(model="tiny-llama", prompt="the quick brown",
                                        max_tokens=10, temperature=0, stop=[stop_at],
                                        extra_body={"ignore_eos": True})
        assert cut.choices[0].text == comp.choices[0].text[:comp.choices[0].text.index(stop_at)]
        assert cut.choices[0].finish_reason == "stop"


def test_seed_reproducible(client):
    def sample():
        return client.completions.create(model="tiny-llama", prompt="one two", max_tokens=12,
                                         temperature=1.0, seed=7,
                                         extra_body={"ignore_eos": True}).choices[0].text
    assert sample() == sample()


def test_ferry_grpc_and_kserve(served):
    with grpc.insecure_channel(served.ready["grpc"]) as ch:
        stub = client_pb2_grpc.FerryStub(ch)
        models = stub.ListModels(client_pb2.ListModelsRequest(), timeout=10)
        assert [m.name for m in models.models] == ["tiny-llama"]
        tok = stub.Tokenize(client_pb2.TokenizeRequest(model="tiny-llama", text="hello"),
                            timeout=10)
        assert len(tok.token_ids) > 0
        req = client_pb2.GenerateRequest(
            model="tiny-llama", text="hello",
            sampling=common_pb2.SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))
        chunks = list(stub.Generate(req, timeout=60))
        assert sum(len(c.token_ids) for c in chunks) == 5
        assert chunks[-1].usage.completion_tokens == 5

    import tritonclient.grpc as tc

    triton = tc.InferenceServerClient(served.ready["kserve_grpc"])
    assert triton.is_server_ready() and triton.is_model_ready("tiny-llama")
    inp = tc.InferInput("text_input", [1], "BYTES")
    inp.set_data_from_numpy(np.array([b"hello"], dtype=np.object_))
    res = triton.infer("tiny-llama", [inp], parameters={"max_tokens": 5, "temperature": 0})
    assert res.get_response().parameters["completion_tokens"].int64_param == 5


def test_kv_events_reach_nats_per_worker(served, client):
    got: dict[str, list[int]] = {}

    async def collect():
        sub = EventSubscriber(served.ready["nats"],
                              on_kv=lambda wid, b: got.setdefault(wid, []).append(b.seq),
                              on_load=lambda r: None)
        assert await sub.start(timeout=10)
        deadline = time.monotonic() + 20
        while len(got) < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        await sub.close()

    for i in range(4):  # round robin: both workers prefill full blocks
        client.completions.create(model="tiny-llama", prompt=f"events {i} " * 4, max_tokens=2,
                                  temperature=0)
    asyncio.run(collect())
    assert sorted(got) == ["w0", "w1"]
    for seqs in got.values():  # each worker numbers its own batches 0, 1, 2, ...
        assert seqs == list(range(len(seqs)))


@pytest.mark.parametrize(("body", "status"), [
    (b"{not json", 400),
    (b'{"model": "nope", "prompt": "x"}', 404),
    (b'{"model": "tiny-llama", "prompt": 5}', 400),
    (b'{"model": "tiny-llama", "prompt": "x", "max_tokens": -1}', 400),
    (b'{"model": "tiny-llama", "prompt": "' + b"hello " * 400 + b'"}', 400),
    (b'{"model": "tiny-llama", "prompt": "x", "n": 1000000000}', 400),
])
def test_bad_input_is_4xx_and_server_stays_healthy(served, body, status):
    r = httpx.post(served.http + "/v1/completions", content=body,
                   headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == status
    assert r.json()["error"]["message"]
    assert httpx.get(served.http + "/health", timeout=10).status_code == 200


def test_disconnect_mid_stream_frees_blocks(served):
    body = {"model": "tiny-llama", "prompt": "a long story", "max_tokens": 200,
            "temperature": 0, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", served.http + "/v1/completions", json=body, timeout=30) as r:
        for n, _ in enumerate(r.iter_lines()):
            if n >= 6:
                break  # leave with the request still generating
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        stats = worker_stats(served)
        if all(s.kv_blocks_used == 0 and s.num_running == 0 for s in stats):
            break
        time.sleep(0.2)
    assert [(s.kv_blocks_used, s.num_running, s.integrity_ok) for s in stats] == \
        [(0, 0, True), (0, 0, True)]


def test_shutdown_leaves_no_process(model_dir):
    serve = ServeProcess("--model", str(model_dir), "--workers", "1", "--num-blocks", "32")
    ours = set(serve.descendants) | {w["pid"] for w in serve.ready["workers"]}
    assert ours, "ferry serve started no child process"
    assert serve.stop() == 0
    assert wait_gone(ours) == set()
    assert any("ferry: stopped" in line for line in serve.lines)


def test_smollm2_served_greedy_equals_generate(capsys):
    serve = ServeProcess("--model", "smollm2", "--workers", "1", "--kv-cache-memory-mib", "64")
    try:
        client = openai.OpenAI(base_url=serve.http + "/v1", api_key="unused", max_retries=0)
        question = "What is the capital of France?"
        chat = client.chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": question}], max_tokens=24,
            temperature=0)
        assert ferry_cli(["generate", "--chat", "--prompt", question, "--max-tokens", "24",
                          "--json"]) == 0
        expected = json.loads(capsys.readouterr().out)["text"]
        assert chat.choices[0].message.content == expected
        assert "Paris" in expected
    finally:
        assert serve.stop() == 0
