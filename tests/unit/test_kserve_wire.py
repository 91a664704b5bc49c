"""ferry.kserve.v2 is wire-compatible with the KServe v2 / Triton `inference` package that
tritonclient ships: same field numbers and types, bytes interchangeable both ways, and a
tritonclient client works against handlers registered as `inference.GRPCInferenceService`
with our messages."""

from __future__ import annotations

import queue
import struct
from concurrent import futures

import grpc
import numpy as np
import pytest
from google.protobuf import descriptor_pb2, json_format, text_format

from ferry.kserve.v2 import inference_pb2 as ours

tritonclient_grpc = pytest.importorskip("tritonclient.grpc")
from tritonclient.grpc import service_pb2 as theirs

SERVICE = "inference.GRPCInferenceService"


def _normalized(message_descriptor) -> descriptor_pb2.DescriptorProto:
    """The message's schema with our package name rewritten to theirs."""
    proto = descriptor_pb2.DescriptorProto()
    message_descriptor.CopyToProto(proto)
    text = str(proto).replace(".ferry.kserve.v2.", ".inference.")
    return text_format.Parse(text, descriptor_pb2.DescriptorProto())


def test_every_message_has_tritonclients_exact_schema():
    names = sorted(ours.DESCRIPTOR.message_types_by_name)
    assert len(names) == 15
    for name in names:
        mine = _normalized(ours.DESCRIPTOR.message_types_by_name[name])
        reference = _normalized(theirs.DESCRIPTOR.message_types_by_name[name])
        assert mine == reference, name


def test_service_methods_match_tritonclients():
    mine = ours.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    reference = theirs.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert reference.full_name == SERVICE
    assert len(mine.methods) == 7
    for method in mine.methods:
        other = reference.methods_by_name[method.name]
        assert (method.input_type.name, method.output_type.name) == \
            (other.input_type.name, other.output_type.name), method.name
        assert (method.client_streaming, method.server_streaming) == \
            (other.client_streaming, other.server_streaming), method.name


def _round_trip(their_message, our_class):
    """theirs -> bytes -> ours -> bytes -> theirs; returns our parsed message."""
    wire = their_message.SerializeToString()
    mine = our_class.FromString(wire)
    # Every field was understood (a field we lacked would be missing here, kept as unknown).
    assert json_format.MessageToDict(mine) == json_format.MessageToDict(their_message)
    assert type(their_message).FromString(mine.SerializeToString()) == their_message
    assert mine.SerializeToString(deterministic=True) == \
        their_message.SerializeToString(deterministic=True)
    return mine


def _bytes_element(text: bytes) -> bytes:
    return struct.pack("<I", len(text)) + text


def _all_typed_contents(module):
    return module.InferTensorContents(
        bool_contents=[True, False], int_contents=[-3, 2**31 - 1], int64_contents=[-(2**40)],
        uint_contents=[2**32 - 1], uint64_contents=[2**64 - 1], fp32_contents=[0.5, -1.25],
        fp64_contents=[1e-300], bytes_contents=[b"\x00\xff", b"ok"])


def _set_all_parameter_kinds(parameters) -> None:
    parameters["stream"].bool_param = True
    parameters["max_tokens"].int64_param = -(2**40)
    parameters["note"].string_param = "h\u00e9llo"
    parameters["temperature"].double_param = 0.25
    parameters["seed"].uint64_param = 2**63 + 5


def test_model_infer_request_round_trips():
    request = theirs.ModelInferRequest(model_name="tiny", model_version="2", id="req-7")
    _set_all_parameter_kinds(request.parameters)
    ids = request.inputs.add(name="input_ids", datatype="INT32", shape=[1, 4])
    ids.parameters["binary_data_size"].int64_param = 16
    request.inputs.add(name="text_input", datatype="BYTES", shape=[1])
    # Typed contents next to raw contents is not a valid inference request, but every field
    # must survive the wire.
    request.inputs.add(name="typed", datatype="INT64", shape=[-1, 2],
                       contents=_all_typed_contents(theirs))
    out = request.outputs.add(name="text_output")
    out.parameters["binary_data"].bool_param = True
    request.raw_input_contents.append(np.array([1, 2, 3, 4], "<i4").tobytes())
    request.raw_input_contents.append(_bytes_element(b"hello"))

    mine = _round_trip(request, ours.ModelInferRequest)
    assert mine.parameters["seed"].WhichOneof("parameter_choice") == "uint64_param"
    assert mine.parameters["seed"].uint64_param == 2**63 + 5
    assert mine.parameters["max_tokens"].int64_param == -(2**40)
    assert list(mine.inputs[2].shape) == [-1, 2]
    assert list(mine.inputs[2].contents.uint64_contents) == [2**64 - 1]
    assert mine.inputs[0].parameters["binary_data_size"].int64_param == 16
    assert mine.outputs[0].parameters["binary_data"].bool_param is True
    assert np.frombuffer(mine.raw_input_contents[0], "<i4").tolist() == [1, 2, 3, 4]
    assert mine.raw_input_contents[1] == b"\x05\x00\x00\x00hello"


def _their_response():
    response = theirs.ModelInferResponse(model_name="tiny", model_version="2", id="req-7")
    _set_all_parameter_kinds(response.parameters)
    tokens = response.outputs.add(name="output_ids", datatype="INT32", shape=[1, 3])
    tokens.parameters["sequence_end"].bool_param = False
    response.outputs.add(name="typed", datatype="FP32", shape=[2],
                         contents=_all_typed_contents(theirs))
    response.raw_output_contents.append(np.array([7, 8, 9], "<i4").tobytes())
    return response


def test_model_infer_response_round_trips():
    mine = _round_trip(_their_response(), ours.ModelInferResponse)
    assert [o.name for o in mine.outputs] == ["output_ids", "typed"]
    assert list(mine.outputs[1].contents.fp32_contents) == [0.5, -1.25]
    assert np.frombuffer(mine.raw_output_contents[0], "<i4").tolist() == [7, 8, 9]


def test_model_stream_infer_response_round_trips():
    mine = _round_trip(theirs.ModelStreamInferResponse(infer_response=_their_response()),
                       ours.ModelStreamInferResponse)
    assert mine.error_message == "" and mine.infer_response.id == "req-7"
    failed = _round_trip(theirs.ModelStreamInferResponse(error_message="model 'x' is unknown"),
                         ours.ModelStreamInferResponse)
    assert failed.error_message == "model 'x' is unknown"
    assert not failed.HasField("infer_response")


def test_metadata_messages_round_trip():
    metadata = theirs.ModelMetadataResponse(name="tiny", versions=["1", "2"], platform="ferry")
    metadata.inputs.add(name="text_input", datatype="BYTES", shape=[-1])
    metadata.outputs.add(name="output_ids", datatype="INT32", shape=[1, -1])
    assert list(_round_trip(metadata, ours.ModelMetadataResponse).outputs[0].shape) == [1, -1]
    server = theirs.ServerMetadataResponse(name="ferry", version="0.1.0",
                                           extensions=["model_stream"])
    _round_trip(server, ours.ServerMetadataResponse)
    _round_trip(theirs.ModelReadyRequest(name="tiny", version="2"), ours.ModelReadyRequest)
    _round_trip(theirs.ModelReadyResponse(ready=True), ours.ModelReadyResponse)


# --- a real tritonclient against handlers registered under the `inference` service name -----

def _doubled(request) -> ours.ModelInferResponse:
    values = np.frombuffer(request.raw_input_contents[0], "<i4")
    response = ours.ModelInferResponse(model_name=request.model_name, id=request.id)
    response.outputs.add(name="doubled", datatype="INT32", shape=list(request.inputs[0].shape))
    response.raw_output_contents.append((values * 2).astype("<i4").tobytes())
    return response


def _stream(requests, context):
    for request in requests:
        yield ours.ModelStreamInferResponse(infer_response=_doubled(request))
        yield ours.ModelStreamInferResponse(error_message=f"no more for {request.id}")


def _start_server() -> tuple[grpc.Server, int]:
    def unary(fn, request_class, response_class):
        return grpc.unary_unary_rpc_method_handler(
            fn, request_deserializer=request_class.FromString,
            response_serializer=response_class.SerializeToString)

    handlers = {
        "ServerLive": unary(lambda request, context: ours.ServerLiveResponse(live=True),
                            ours.ServerLiveRequest, ours.ServerLiveResponse),
        "ModelInfer": unary(lambda request, context: _doubled(request),
                            ours.ModelInferRequest, ours.ModelInferResponse),
        "ModelStreamInfer": grpc.stream_stream_rpc_method_handler(
            _stream, request_deserializer=ours.ModelInferRequest.FromString,
            response_serializer=ours.ModelStreamInferResponse.SerializeToString),
    }
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


def _int32_input(values: list[int]):
    tensor = tritonclient_grpc.InferInput("x", [1, len(values)], "INT32")
    tensor.set_data_from_numpy(np.array([values], dtype=np.int32))
    return tensor


def test_tritonclient_talks_to_handlers_built_on_our_messages():
    server, port = _start_server()
    client = tritonclient_grpc.InferenceServerClient(f"127.0.0.1:{port}")
    try:
        assert client.is_server_live()
        result = client.infer("tiny", [_int32_input([1, 2, 3])], request_id="r9")
        assert result.as_numpy("doubled").tolist() == [[2, 4, 6]]
        assert result.get_response().id == "r9"

        received: queue.Queue = queue.Queue()
        client.start_stream(callback=lambda result, error: received.put((result, error)))
        client.async_stream_infer("tiny", [_int32_input([5, -1])], request_id="s1")
        first, error = received.get(timeout=10)
        assert error is None and first.as_numpy("doubled").tolist() == [[10, -2]]
        result, error = received.get(timeout=10)
        assert result is None and "no more for s1" in str(error)
        client.stop_stream()
    finally:
        client.close()
        server.stop(None)
