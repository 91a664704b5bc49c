"""The KServe v2 / Open Inference Protocol gRPC service over a :class:`Frontend`, so that
``tritonclient.grpc`` (and other KServe v2 clients) work unchanged.

Registered under the service name ``inference.GRPCInferenceService`` with generic handlers
built on the wire-compatible ``ferry.kserve.v2`` messages (see inference.proto for why).

The model's signature (ModelMetadata): one input ``text_input`` (BYTES, shape [1]: the prompt,
UTF-8, in ``raw_input_contents`` as a 4-byte little-endian length and the bytes, or in
``contents.bytes_contents``) and one output ``text_output`` (BYTES, shape [1]). Request
parameters: ``max_tokens``, ``temperature``, ``top_p``, ``top_k``, ``seed``, ``stop`` (a
string), ``ignore_eos``, and for ModelStreamInfer ``stream``. Responses carry the parameters
``finish_reason``, ``prompt_tokens``, ``completion_tokens`` and ``cached_tokens`` when the
generation ends.

ModelInfer: one response with the whole text; a bad request fails with INVALID_ARGUMENT /
NOT_FOUND, a failed generation with the error's status.

ModelStreamInfer (bidirectional): requests are served concurrently, each response echoes its
request's ``id``. With ``stream=true`` a request gets one response per text delta, the last one
with parameter ``triton_final_response=true``; without it, one response with the whole text
(also marked final). A failing request gets one ``error_message`` response; the stream stays
open for the others. Closing the call cancels every request still running.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from contextlib import aclosing

import grpc

from ferry.kserve.v2 import inference_pb2 as pb
from orchestrator.frontend.core import Frontend, collect
from orchestrator.frontend.grpc_api import grpc_status
from orchestrator.frontend.types import (
    FrontendError,
    GenerateInput,
    InvalidArgument,
    ModelNotFound,
    Usage,
)

log = logging.getLogger(__name__)

SERVICE = "inference.GRPCInferenceService"
INPUT, OUTPUT = "text_input", "text_output"
_VERSION = "1"
_LEN = struct.Struct("<I")
_DONE = object()


def _bytes_elements(raw: bytes) -> list[bytes]:
    """A raw BYTES tensor: elements as a 4-byte little-endian length and that many bytes."""
    out, pos = [], 0
    while pos < len(raw):
        if pos + 4 > len(raw):
            raise InvalidArgument(f"raw contents of {INPUT!r} end inside an element's length")
        (n,) = _LEN.unpack_from(raw, pos)
        pos += 4
        if pos + n > len(raw):
            raise InvalidArgument(f"raw contents of {INPUT!r} are shorter than the element "
                                  f"length {n} they announce")
        out.append(raw[pos:pos + n])
        pos += n
    return out


def _param(params, name: str, kind: type):
    if name not in params:
        return None
    p = params[name]
    which = p.WhichOneof("parameter_choice")
    value = None if which is None else getattr(p, which)
    if kind is bool and isinstance(value, bool):
        return value
    if kind is str and isinstance(value, str):
        return value
    if kind is int and not isinstance(value, bool):
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    expected = {bool: "a bool", str: "a string", int: "an integer", float: "a number"}[kind]
    raise InvalidArgument(f"parameter {name!r} must be {expected}, got {value!r}", param=name)


class KServeService:
    def __init__(self, frontend: Frontend, server_version: str = "0.1.0") -> None:
        self.frontend = frontend
        self.server_version = server_version

    # ------------------------------------------------------------------ health, metadata

    async def server_live(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def server_ready(self, request, context):
        return pb.ServerReadyResponse(ready=self.frontend.ready)

    async def model_ready(self, request, context):
        known = request.name == self.frontend.model_name and request.version in ("", _VERSION)
        return pb.ModelReadyResponse(ready=known and self.frontend.ready)

    async def server_metadata(self, request, context):
        return pb.ServerMetadataResponse(name="ferry", version=self.server_version,
                                         extensions=["model_stream_infer"])

    async def model_metadata(self, request, context):
        try:
            self._check_model(request.name, request.version)
        except FrontendError as e:
            await context.abort(grpc_status(e.code), e.message)
        response = pb.ModelMetadataResponse(name=self.frontend.model_name, versions=[_VERSION],
                                            platform="ferry")
        response.inputs.add(name=INPUT, datatype="BYTES", shape=[1])
        response.outputs.add(name=OUTPUT, datatype="BYTES", shape=[1])
        return response

    def _check_model(self, name: str, version: str) -> None:
        self.frontend.check_model(name)
        if version not in ("", _VERSION):
            raise ModelNotFound(
                f"model {name!r} has only version {_VERSION!r}, not {version!r}",
                param="model_version")

    # ------------------------------------------------------------------ inference

    def parse(self, request: pb.ModelInferRequest) -> tuple[GenerateInput, bool]:
        """The request's prompt and parameters; and whether it asks for streaming."""
        self._check_model(request.model_name, request.model_version)
        names = [t.name for t in request.inputs]
        if INPUT not in names:
            raise InvalidArgument(f"model {self.frontend.model_name!r} takes one BYTES input "
                                  f"named {INPUT!r}; the request has {names}", param=INPUT)
        index = names.index(INPUT)
        tensor = request.inputs[index]
        if tensor.datatype != "BYTES":
            raise InvalidArgument(f"input {INPUT!r} must have datatype BYTES, not "
                                  f"{tensor.datatype!r}", param=INPUT)
        if request.raw_input_contents:
            if len(request.raw_input_contents) != len(request.inputs):
                raise InvalidArgument("raw_input_contents must hold one entry per input "
                                      f"({len(request.inputs)}), got "
                                      f"{len(request.raw_input_contents)}")
            elements = _bytes_elements(request.raw_input_contents[index])
        else:
            elements = list(tensor.contents.bytes_contents)
        if len(elements) != 1:
            raise InvalidArgument(f"input {INPUT!r} must hold exactly one element (the "
                                  f"prompt, shape [1]), got {len(elements)}", param=INPUT)
        try:
            text = elements[0].decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidArgument(f"input {INPUT!r} is not valid UTF-8", param=INPUT) from None
        for out in request.outputs:
            if out.name != OUTPUT:
                raise InvalidArgument(f"unknown output {out.name!r}; the model has only "
                                      f"{OUTPUT!r}", param="outputs")
        p = request.parameters
        stop = _param(p, "stop", str)
        return GenerateInput(
            prompt=text, model=self.frontend.model_name, request_id=request.id or None,
            max_tokens=_param(p, "max_tokens", int), temperature=_param(p, "temperature", float),
            top_p=_param(p, "top_p", float), top_k=_param(p, "top_k", int),
            seed=_param(p, "seed", int), stop=(stop,) if stop else (),
            ignore_eos=bool(_param(p, "ignore_eos", bool))), bool(_param(p, "stream", bool))

    def _response(self, request_id: str, text: str, final: bool | None = None,
                  finish_reason: str | None = None, usage: Usage | None = None):
        response = pb.ModelInferResponse(model_name=self.frontend.model_name,
                                         model_version=_VERSION, id=request_id)
        response.outputs.add(name=OUTPUT, datatype="BYTES", shape=[1])
        data = text.encode()
        response.raw_output_contents.append(_LEN.pack(len(data)) + data)
        params = response.parameters
        if final is not None:
            params["triton_final_response"].bool_param = final
        if finish_reason is not None:
            params["finish_reason"].string_param = finish_reason
        if usage is not None:
            params["prompt_tokens"].int64_param = usage.prompt_tokens
            params["completion_tokens"].int64_param = usage.completion_tokens
            params["cached_tokens"].int64_param = usage.cached_tokens
        return response

    async def model_infer(self, request, context):
        try:
            inp, _ = self.parse(request)
            done = await self.frontend.complete(inp)
        except FrontendError as e:
            await context.abort(grpc_status(e.code), e.message)
        if done.error is not None:
            await context.abort(grpc_status(done.error.code), done.error.message)
        return self._response(request.id, done.text, None, done.finish_reason.value, done.usage)

    async def _infer_stream(self, request):
        """The stream responses of one request."""
        try:
            inp, streaming = self.parse(request)
            stream = await self.frontend.generate(inp)
        except FrontendError as e:
            yield pb.ModelStreamInferResponse(error_message=e.message)
            return
        if not streaming:
            done = await collect(stream)
            if done.error is not None:
                yield pb.ModelStreamInferResponse(error_message=done.error.message)
            else:
                yield pb.ModelStreamInferResponse(infer_response=self._response(
                    request.id, done.text, True, done.finish_reason.value, done.usage))
            return
        async with aclosing(stream):
            async for chunk in stream:
                if chunk.finish_reason is None:
                    if chunk.text:
                        yield pb.ModelStreamInferResponse(
                            infer_response=self._response(request.id, chunk.text, False))
                elif chunk.error is not None:
                    yield pb.ModelStreamInferResponse(error_message=chunk.error.message)
                else:
                    yield pb.ModelStreamInferResponse(infer_response=self._response(
                        request.id, chunk.text, True, chunk.finish_reason.value, chunk.usage))

    async def model_stream_infer(self, request_iterator, context):
        queue: asyncio.Queue = asyncio.Queue()
        tasks: set[asyncio.Task] = set()
        running = 0

        async def serve_one(request) -> None:
            try:
                async with aclosing(self._infer_stream(request)) as responses:
                    async for response in responses:
                        queue.put_nowait(response)
            except Exception:  # a bug of ours: answer this request, keep the stream
                log.exception("ModelStreamInfer request %r failed", request.id)
                queue.put_nowait(pb.ModelStreamInferResponse(
                    error_message=f"internal error serving request {request.id!r}"))
            finally:
                queue.put_nowait(_DONE)

        async def read_requests() -> None:
            nonlocal running
            try:
                async for request in request_iterator:
                    running += 1
                    task = asyncio.create_task(serve_one(request))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
            except grpc.aio.AioRpcError:
                pass  # the client went away; the handler is being cancelled too
            finally:
                queue.put_nowait(None)  # no more requests

        reader = asyncio.create_task(read_requests())
        reading = True
        try:
            while reading or running:
                item = await queue.get()
                if item is None:
                    reading = False
                elif item is _DONE:
                    running -= 1
                else:
                    yield item
        finally:
            reader.cancel()
            for task in list(tasks):
                task.cancel()

    # ------------------------------------------------------------------ registration

    def handler(self) -> grpc.GenericRpcHandler:
        def unary(fn, request_class, response_class):
            return grpc.unary_unary_rpc_method_handler(
                fn, request_deserializer=request_class.FromString,
                response_serializer=response_class.SerializeToString)

        return grpc.method_handlers_generic_handler(SERVICE, {
            "ServerLive": unary(self.server_live, pb.ServerLiveRequest, pb.ServerLiveResponse),
            "ServerReady": unary(self.server_ready, pb.ServerReadyRequest,
                                 pb.ServerReadyResponse),
            "ModelReady": unary(self.model_ready, pb.ModelReadyRequest, pb.ModelReadyResponse),
            "ServerMetadata": unary(self.server_metadata, pb.ServerMetadataRequest,
                                    pb.ServerMetadataResponse),
            "ModelMetadata": unary(self.model_metadata, pb.ModelMetadataRequest,
                                   pb.ModelMetadataResponse),
            "ModelInfer": unary(self.model_infer, pb.ModelInferRequest, pb.ModelInferResponse),
            "ModelStreamInfer": grpc.stream_stream_rpc_method_handler(
                self.model_stream_infer, request_deserializer=pb.ModelInferRequest.FromString,
                response_serializer=pb.ModelStreamInferResponse.SerializeToString),
        })


def add_to_server(frontend: Frontend, server: grpc.aio.Server,
                  server_version: str = "0.1.0") -> KServeService:
    service = KServeService(frontend, server_version)
    server.add_generic_rpc_handlers((service.handler(),))
    return service


__all__ = ["INPUT", "OUTPUT", "SERVICE", "KServeService", "add_to_server"]
