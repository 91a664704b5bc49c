"""``ferry serve --prefill-workers 1 --decode-workers 2`` end to end (a real local Ray, our own
nats-server, torch workers on a tiny random Llama in separate processes, KV moved between
them): greedy text equals ``ferry generate``'s, the prefill ran remotely (counted on /metrics),
the next turn of a chat is prefilled on the decode worker that holds the first one, a client
gone mid-stream and a prefill worker killed while requests run leave every surviving worker
with no block in use, and every request completes."""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time

import grpc
import httpx
import openai
import pytest

from ferry.v1 import worker_pb2, worker_pb2_grpc
from orchestrator.cli import main as ferry_cli
from tests.helpers.serve_process import ServeProcess, wait_gone
from tests.helpers.tiny_model import make_tiny_llama, write_hf_folder
from workers.engine.config import EngineConfig
from workers.engine.factory import build_torch_engine
from workers.engine.types import EngineRequest, SamplingParams

pytestmark = pytest.mark.timeout(600)

MODEL = "tiny-llama"
PROMPT = "the quick brown fox jumps over the lazy dog " * 3  # well over 32 tokens
LOCAL_LIMIT = 32  # --max-local-prefill-tokens


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_hf_folder(make_tiny_llama(max_position_embeddings=256),
                           tmp_path_factory.mktemp("tiny-disagg") / MODEL)


@pytest.fixture(scope="module")
def served(model_dir):
    serve = ServeProcess("--model", str(model_dir), "--prefill-workers", "1",
                         "--decode-workers", "2", "--num-blocks", "128", "--block-size", "4",
                         "--max-local-prefill-tokens", str(LOCAL_LIMIT))
    yield serve
    ours = {w["pid"] for w in serve.ready["workers"]}
    assert serve.stop() == 0
    assert wait_gone(ours) == set()


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served.http + "/v1", api_key="unused", max_retries=0)


def workers(served) -> dict[str, dict]:
    return {w["worker_id"]: w for w in served.ready["workers"]}


def stats(served, worker_ids=None) -> dict[str, worker_pb2.StatsResponse]:
    out = {}
    for wid, w in workers(served).items():
        if worker_ids is not None and wid not in worker_ids:
            continue
        with grpc.insecure_channel(w["address"]) as ch:
            out[wid] = worker_pb2_grpc.WorkerStub(ch).Stats(worker_pb2.StatsRequest(),
                                                             timeout=10)
    return out


def idle(served, worker_ids=None, timeout: float = 20.0) -> None:
    """No block in use or pinned, nothing running, integrity checked, on every worker asked."""
    deadline = time.monotonic() + timeout
    while True:
        now = stats(served, worker_ids)
        if all((s.kv_blocks_used, s.num_running, s.num_waiting) == (0, 0, 0)
               for s in now.values()) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert {w: (s.kv_blocks_used, s.num_running, s.num_waiting, s.integrity_ok)
            for w, s in now.items()} == {w: (0, 0, 0, True) for w in now}


def decisions(served) -> dict[tuple[str, str], float]:
    text = httpx.get(served.http + "/metrics", timeout=10).text
    found = re.findall(r'ferry_frontend_disagg_decisions_total\{choice="(\w+)",reason="(\w+)"\} '
                       r"([0-9.e+]+)", text)
    return {(c, r): float(v) for c, r, v in found if float(v)}


def complete(client, prompt: str = PROMPT, max_tokens: int = 10, **kw):
    return client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens,
                                     temperature=0, extra_body={"ignore_eos": True}, **kw)


def test_roles_and_greedy_text_equal_to_generate(served, client, model_dir, capsys):
    assert {w: v["role"] for w, v in workers(served).items()} == \
        {"p0": "prefill", "d0": "decode", "d1": "decode"}
    assert any("on 1 prefill + 2 decode workers" in line for line in served.lines)
    comp = complete(client)
    assert ferry_cli(["generate", "--model", str(model_dir), "--prompt", PROMPT,
                      "--max-tokens", "10", "--ignore-eos", "--json"]) == 0
    expected = json.loads(capsys.readouterr().out)
    assert comp.choices[0].text == expected["text"]
    assert comp.usage.prompt_tokens == len(expected["prompt_token_ids"]) > LOCAL_LIMIT
    assert decisions(served) == {("remote", "long_prefill"): 1}
    # the same prompt again, streamed: the same text; the decode worker holds the prompt now,
    # so it is prefilled there (as is a short prompt)
    time.sleep(1.0)  # its KV events reach the router
    streamed = "".join(c.choices[0].text for c in complete(client, stream=True))
    assert streamed == expected["text"]
    complete(client, prompt="hello", max_tokens=3)
    assert decisions(served) == {("remote", "long_prefill"): 1, ("local", "short_prefill"): 2}
    assert stats(served, ["p0"])["p0"].prefix_query_tokens == comp.usage.prompt_tokens
    idle(served)


def test_the_next_turn_is_prefilled_on_the_decode_worker_holding_the_first(served, client):
    first = [{"role": "user", "content": "tell me about the quick brown fox and the lazy dog "
                                         "that sleeps all day long"}]
    before = stats(served)
    one = client.chat.completions.create(model=MODEL, messages=first, max_tokens=6,
                                         temperature=0, extra_body={"ignore_eos": True})
    assert one.usage.prompt_tokens > LOCAL_LIMIT
    middle = stats(served)
    grew = [w for w in ("d0", "d1")
            if middle[w].prefix_query_tokens > before[w].prefix_query_tokens]
    assert len(grew) == 1, (before, middle)
    holder = grew[0]
    other = "d1" if holder == "d0" else "d0"
    time.sleep(1.0)  # the holder's KV events reach the router
    turn2 = first + [{"role": "assistant", "content": one.choices[0].message.content},
                     {"role": "user", "content": "and?"}]
    two = client.chat.completions.create(model=MODEL, messages=turn2, max_tokens=4,
                                         temperature=0, extra_body={"ignore_eos": True})
    after = stats(served)
    assert after[other].prefix_query_tokens == middle[other].prefix_query_tokens
    assert after["p0"].prefix_query_tokens == middle["p0"].prefix_query_tokens  # local
    cached = two.usage.prompt_tokens_details.cached_tokens
    assert cached >= (one.usage.prompt_tokens // 4) * 4  # at least the first turn's blocks
    assert after[holder].prefix_hit_tokens - middle[holder].prefix_hit_tokens == cached
    assert after[holder].prefix_query_tokens - middle[holder].prefix_query_tokens == \
        two.usage.prompt_tokens
    idle(served)


def test_a_client_gone_mid_stream_leaves_no_block_in_use(served):
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 200, "temperature": 0,
            "stream": True, "ignore_eos": True}
    with httpx.stream("POST", served.http + "/v1/completions", json=body, timeout=30) as r:
        for n, _ in enumerate(r.iter_lines()):
            if n >= 4:
                break  # leave while the decode worker streams
    idle(served)


def test_killing_the_prefill_worker_while_requests_run(served, client, model_dir):
    # distinct long prompts: each one is prefilled remotely while the prefill worker lives
    prompts = [f"request number {i} asks: " + PROMPT for i in range(12)]
    built = build_torch_engine(str(model_dir), EngineConfig(block_size=4, num_blocks=256))
    tok = built.loaded.tokenizer
    outs = built.engine.generate([
        EngineRequest(request_id=f"ref-{i}", prompt_token_ids=tuple(tok.encode(p, True)),
                      sampling=SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))
        for i, p in enumerate(prompts)])
    expected = {o.request_id: o.text for o in outs}
    before = decisions(served)
    results: list[str] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            for p in prompts:
                results.append(complete(client, prompt=p, max_tokens=16).choices[0].text)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + 60
    while len(results) < 2 and time.monotonic() < deadline and not errors:
        time.sleep(0.002)
    os.kill(workers(served)["p0"]["pid"], signal.SIGKILL)  # while the next ones run
    thread.join(240)
    assert not errors, errors
    assert results == [expected[f"ref-{i}"] for i in range(12)]  # every one completed
    idle(served, ["d0", "d1"])
    after = decisions(served)
    assert after[("remote", "long_prefill")] - before.get(("remote", "long_prefill"), 0) >= 2
    assert after.get(("local", "prefill_failed"), 0) + \
        after.get(("local", "no_prefill_worker"), 0) >= 1


def test_smollm2_disaggregated_greedy_equals_generate(capsys):
    serve = ServeProcess("--model", "smollm2", "--prefill-workers", "1", "--decode-workers", "1",
                         "--max-local-prefill-tokens", "0", "--kv-cache-memory-mib", "64")
    try:
        client = openai.OpenAI(base_url=serve.http + "/v1", api_key="unused", max_retries=0)
        question = "What is the capital of France?"
        chat = client.chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": question}], max_tokens=24,
            temperature=0)
        assert decisions(serve) == {("remote", "long_prefill"): 1}
        assert ferry_cli(["generate", "--chat", "--prompt", question, "--max-tokens", "24",
                          "--json"]) == 0
        expected = json.loads(capsys.readouterr().out)["text"]
        assert chat.choices[0].message.content == expected
        assert "Paris" in expected
        idle(serve)
    finally:
        assert serve.stop() == 0
