"""The KServe v2 gRPC API against a real FrontendServer and a fake worker, with the official
``tritonclient.grpc`` client (and raw calls for what tritonclient never sends)."""

from __future__ import annotations

import queue
import struct

import grpc
import numpy as np
import pytest

from ferry.kserve.v2 import inference_pb2 as pb

tritonclient_grpc = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException

from tests.helpers.fake_worker import MODEL, REPLY_TEXT, ServingStack

SERVICE = "/inference.GRPCInferenceService/"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = ServingStack(tmp_path_factory.mktemp("tok")).start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(stack):
    c = tritonclient_grpc.InferenceServerClient(stack.kserve_address)
    yield c
    c.close()


def _text_input(text: str, name: str = "text_input"):
    tensor = tritonclient_grpc.InferInput(name, [1], "BYTES")
    tensor.set_data_from_numpy(np.array([text.encode()], dtype=np.object_))
    return tensor


def test_health_and_metadata(client):
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready(MODEL)
    assert not client.is_model_ready("other-model")
    assert client.get_server_metadata().name == "ferry"
    meta = client.get_model_metadata(MODEL)
    assert meta.name == MODEL and list(meta.versions) == ["1"]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == \
        [("text_input", "BYTES", [1])]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == \
        [("text_output", "BYTES", [1])]
    with pytest.raises(InferenceServerException) as info:
        client.get_model_metadata("other-model")
    assert info.value.status() == "StatusCode.NOT_FOUND"


def test_model_infer(client, stack):
    result = client.infer(MODEL, [_text_input("Tell me")], request_id="r-1",
                          parameters={"max_tokens": 6, "temperature": 0.5, "top_p": 0.5,
                                      "seed": 3})
    (text,) = result.as_numpy("text_output")
    assert text.decode() == stack.text(stack.reply_ids[:6])
    response = result.get_response()
    assert response.id == "r-1" and response.model_name == MODEL
    assert response.parameters["finish_reason"].string_param == "length"
    assert response.parameters["completion_tokens"].int64_param == 6
    prompt = stack.tokenizer.encode("Tell me", add_special_tokens=True)
    assert response.parameters["prompt_tokens"].int64_param == len(prompt)
    (record,) = stack.worker.find(prompt)
    s = record.request.sampling
    assert (s.max_tokens, s.temperature, s.top_p, s.seed) == (6, 0.5, 0.5, 3)


def test_model_infer_with_typed_contents_and_stop(stack):
    """tritonclient always sends raw contents; other clients use contents.bytes_contents."""
    request = pb.ModelInferRequest(model_name=MODEL, id="typed")
    request.inputs.add(name="text_input", datatype="BYTES", shape=[1],
                       contents=pb.InferTensorContents(bytes_contents=[b"typed prompt"]))
    request.parameters["max_tokens"].int64_param = 40
    request.parameters["stop"].string_param = "fox"
    with grpc.insecure_channel(stack.kserve_address) as channel:
        infer = channel.unary_unary(SERVICE + "ModelInfer",
                                    request_serializer=pb.ModelInferRequest.SerializeToString,
                                    response_deserializer=pb.ModelInferResponse.FromString)
        response = infer(request, timeout=20)
    raw = response.raw_output_contents[0]
    (n,) = struct.unpack_from("<I", raw)
    assert raw[4:4 + n].decode() == REPLY_TEXT[:REPLY_TEXT.index("fox")]
    assert response.parameters["finish_reason"].string_param == "stop"


@pytest.mark.parametrize("model,inputs,parameters,status,words", [
    ("nope", None, {}, "StatusCode.NOT_FOUND", "nope"),
    (MODEL, "wrong_name", {}, "StatusCode.INVALID_ARGUMENT", "text_input"),
    (MODEL, None, {"max_tokens": -5}, "StatusCode.INVALID_ARGUMENT", "max_tokens"),
    (MODEL, None, {"temperature": "hot"}, "StatusCode.INVALID_ARGUMENT", "temperature"),
    (MODEL, "long", {}, "StatusCode.INVALID_ARGUMENT", "shorten the prompt"),
])
def test_model_infer_errors(client, model, inputs, parameters, status, words):
    if inputs == "wrong_name":
        tensors = [_text_input("x", name="prompt")]
    elif inputs == "long":
        tensors = [_text_input("hello " * 200)]
    else:
        tensors = [_text_input("x")]
    with pytest.raises(InferenceServerException) as info:
        client.infer(model, tensors, parameters=parameters)
    assert info.value.status() == status
    assert words in info.value.message()
    assert client.is_server_ready()


def _collect(received: queue.Queue, request_id: str) -> tuple[list, list]:
    """Responses for one request id, up to its final one (or an error)."""
    results, errors = [], []
    while True:
        result, error = received.get(timeout=20)
        if error is not None:
            errors.append(error)
            return results, errors
        response = result.get_response()
        assert response.id == request_id
        results.append(result)
        if response.parameters["triton_final_response"].bool_param:
            return results, errors


def test_model_stream_infer(client, stack):
    received: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: received.put((result, error)))
    try:
        client.async_stream_infer(MODEL, [_text_input("stream it")], request_id="s1",
                                  parameters={"stream": True, "max_tokens": 8})
        results, errors = _collect(received, "s1")
        assert errors == []
        texts = [r.as_numpy("text_output")[0].decode() for r in results]
        assert len(texts) > 2 and "".join(texts) == stack.text(stack.reply_ids[:8])
        finals = [r.get_response().parameters["triton_final_response"].bool_param
                  for r in results]
        assert finals == [False] * (len(results) - 1) + [True]
        last = results[-1].get_response().parameters
        assert last["finish_reason"].string_param == "length"
        assert last["completion_tokens"].int64_param == 8

        # Not streaming: one response with the whole text.
        client.async_stream_infer(MODEL, [_text_input("whole")], request_id="s2",
                                  parameters={"max_tokens": 60})
        results, errors = _collect(received, "s2")
        assert errors == [] and len(results) == 1
        assert results[0].as_numpy("text_output")[0].decode() == REPLY_TEXT

        # A bad request gets an error; the stream stays usable.
        client.async_stream_infer("nope", [_text_input("x")], request_id="s3")
        results, errors = _collect(received, "s3")
        assert results == [] and "nope" in str(errors[0])
        client.async_stream_infer(MODEL, [_text_input("after")], request_id="s4",
                                  parameters={"stream": True, "max_tokens": 3})
        results, errors = _collect(received, "s4")
        assert errors == [] and "".join(
            r.as_numpy("text_output")[0].decode() for r in results) == \
            stack.text(stack.reply_ids[:3])
    finally:
        client.stop_stream()


def test_concurrent_requests_on_one_stream(client, stack):
    received: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: received.put((result, error)))
    stack.worker.token_delay_s = 0.01
    try:
        for i in range(4):
            client.async_stream_infer(MODEL, [_text_input(f"many {i}")], request_id=f"c{i}",
                                      parameters={"stream": True, "max_tokens": 5})
        texts: dict[str, str] = {}
        done: set[str] = set()
        while len(done) < 4:
            result, error = received.get(timeout=20)
            assert error is None
            response = result.get_response()
            texts[response.id] = texts.get(response.id, "") + \
                result.as_numpy("text_output")[0].decode()
            if response.parameters["triton_final_response"].bool_param:
                done.add(response.id)
    finally:
        stack.worker.token_delay_s = 0.0
        client.stop_stream()
    assert texts == {f"c{i}": stack.text(stack.reply_ids[:5]) for i in range(4)}


def test_closing_the_stream_cancels_running_requests(client, stack):
    received: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: received.put((result, error)))
    stack.worker.token_delay_s = 0.05
    try:
        client.async_stream_infer(MODEL, [_text_input("cut short")], request_id="x1",
                                  parameters={"stream": True, "max_tokens": 100,
                                              "ignore_eos": True})
        result, error = received.get(timeout=20)
        assert error is None and result.get_response().id == "x1"
        client.stop_stream(cancel_requests=True)
        (record,) = stack.worker.find(stack.tokenizer.encode("cut short"))
        assert record.ended.wait(10), "the worker call was not cancelled"
    finally:
        stack.worker.token_delay_s = 0.0
    assert record.outcome == "cancelled" and len(record.tokens_sent) < 100
