"""The ``ferry.v1.Ferry`` gRPC service (proto/ferry/v1/client.proto) over a :class:`Frontend`.

Generate follows client.proto's stream protocol: deltas, then one last chunk with finish
reason and usage. A request rejected before any token (bad value, prompt too long, unknown
model, no worker) is answered with one such last chunk carrying FINISH_REASON_ERROR and an
Error whose code is INVALID_ARGUMENT / NOT_FOUND / UNAVAILABLE; the RPC itself ends OK, so a
client reads every outcome from the stream. The unary RPCs (Tokenize, ...) fail with the
gRPC status of the same code instead. Cancelling a Generate call cancels the worker call.

How Generate is served (what it costs is most of the frontend's CPU per request; see
benchmarks/serve_overhead.py). On the wire a server-streaming call is the request, then the
response messages, then the status; the client cannot tell how the server's handler was
declared. grpc.aio sends every message of a streaming handler as one operation and the status
as one more, each a round trip through its completion-queue thread; a unary handler's message
goes out together with the status. So :func:`add_to_server` declares Generate unary: the
handler writes each chunk but the last with ``context.write`` (serialized here; the context of
a unary handler has no serializer) and returns the last one, which grpc.aio sends with the
status in one operation. Clients see exactly the stream client.proto describes (the tests read
it with the generated stub). The four methods are a generic handler only, not also
"registered methods" as the generated ``add_FerryServicer_to_server`` makes them: grpc.aio's
accept loop waits on one pending future per registered method (plus one for the rest) at every
call, and one is all a single service needs.
"""

from __future__ import annotations

from contextlib import aclosing

import grpc

from ferry.v1 import client_pb2, client_pb2_grpc, common_pb2
from orchestrator.frontend.core import Frontend
from orchestrator.frontend.types import (
    ChatMessage,
    FinishReason,
    FrontendError,
    GenerateChunk,
    GenerateInput,
    InvalidArgument,
    Usage,
)

_PB_FINISH = {
    FinishReason.STOP: common_pb2.FINISH_REASON_STOP,
    FinishReason.LENGTH: common_pb2.FINISH_REASON_LENGTH,
    FinishReason.ABORT: common_pb2.FINISH_REASON_ABORT,
    FinishReason.ERROR: common_pb2.FINISH_REASON_ERROR,
}
_STATUS = {code.value[0]: code for code in grpc.StatusCode}
_NO_LAST_CHUNK = "the generation stream ended without its last chunk"
_SERVICE = "ferry.v1.Ferry"


def grpc_status(code: int) -> grpc.StatusCode:
    """The gRPC status of an ErrorCode (same numbers)."""
    return _STATUS.get(int(code), grpc.StatusCode.INTERNAL)


def _messages(chat: client_pb2.ChatMessages) -> tuple[ChatMessage, ...]:
    return tuple(ChatMessage(m.role, m.content) for m in chat.messages)


def generate_input(request: client_pb2.GenerateRequest) -> GenerateInput:
    """A GenerateRequest as the frontend's typed input (unset sampling fields stay None)."""
    which = request.WhichOneof("prompt")
    if which is None:
        raise InvalidArgument("set one prompt: text, chat or token_ids", param="prompt")
    prompt: dict = {}
    if which == "text":
        prompt["prompt"] = request.text
    elif which == "chat":
        prompt["messages"] = _messages(request.chat)
    else:
        prompt["prompt_token_ids"] = tuple(request.token_ids.ids)
    s = request.sampling
    return GenerateInput(
        **prompt,
        model=request.model,
        request_id=request.request_id if request.HasField("request_id") else None,
        max_tokens=s.max_tokens if s.HasField("max_tokens") else None,
        temperature=s.temperature if s.HasField("temperature") else None,
        top_p=s.top_p if s.HasField("top_p") else None,
        top_k=s.top_k if s.HasField("top_k") else None,
        seed=s.seed if s.HasField("seed") else None,
        stop=tuple(s.stop), stop_token_ids=tuple(s.stop_token_ids), ignore_eos=s.ignore_eos)


def _usage(usage: Usage) -> common_pb2.Usage:
    return common_pb2.Usage(prompt_tokens=usage.prompt_tokens,
                            completion_tokens=usage.completion_tokens,
                            cached_tokens=usage.cached_tokens)


def chunk_message(chunk: GenerateChunk) -> client_pb2.GenerateResponse:
    message = client_pb2.GenerateResponse(request_id=chunk.request_id,
                                          token_ids=chunk.token_ids, text=chunk.text)
    if chunk.finish_reason is not None:
        message.finish_reason = _PB_FINISH[chunk.finish_reason]
        if chunk.usage is not None:
            message.usage.CopyFrom(_usage(chunk.usage))
        if chunk.error is not None:
            message.error.code = int(chunk.error.code)
            message.error.message = chunk.error.message
    return message


def _error_message(request_id: str, code: int, message: str) -> client_pb2.GenerateResponse:
    return client_pb2.GenerateResponse(
        request_id=request_id, finish_reason=common_pb2.FINISH_REASON_ERROR,
        usage=common_pb2.Usage(), error=common_pb2.Error(code=code, message=message))


class FerryServicer(client_pb2_grpc.FerryServicer):
    """The service; serve it with :func:`add_to_server` (Generate is declared unary there)."""

    def __init__(self, frontend: Frontend) -> None:
        self.frontend = frontend

    async def Generate(self, request, context) -> client_pb2.GenerateResponse:
        """Writes every chunk but the last; returns the last (module docstring)."""
        try:
            stream = await self.frontend.generate(generate_input(request))
        except FrontendError as e:
            return _error_message(request.request_id, int(e.code), e.message)
        write = context.write
        async with aclosing(stream):
            async for chunk in stream:
                if chunk.finish_reason is not None:
                    return chunk_message(chunk)
                await write(chunk_message(chunk).SerializeToString())
        return _error_message(request.request_id, common_pb2.ERROR_CODE_INTERNAL, _NO_LAST_CHUNK)

    async def Tokenize(self, request, context):
        try:
            self.frontend.check_model(request.model)
            which = request.WhichOneof("input")
            if which == "chat":
                ids, text = self.frontend.tokenize(
                    messages=_messages(request.chat),
                    add_generation_prompt=request.add_generation_prompt)
            elif which == "text":
                ids, text = self.frontend.tokenize(text=request.text)
            else:
                raise InvalidArgument("set one input: text or chat", param="input")
        except FrontendError as e:
            await context.abort(grpc_status(e.code), e.message)
        return client_pb2.TokenizeResponse(token_ids=ids, prompt=text)

    async def ListModels(self, request, context):
        f = self.frontend
        card = client_pb2.ModelCard(name=f.model_name, max_model_len=f.max_model_len or 0,
                                    num_ready_workers=f.num_ready_workers)
        return client_pb2.ListModelsResponse(models=[card])

    async def Health(self, request, context):
        f = self.frontend
        return client_pb2.HealthResponse(ready=f.ready, num_ready_workers=f.num_ready_workers,
                                         detail=f.health_detail())


def method_handlers(servicer: FerryServicer) -> dict[str, grpc.RpcMethodHandler]:
    """The service's method handlers by name, Generate declared unary (module docstring)."""
    unary = grpc.unary_unary_rpc_method_handler
    pb = client_pb2
    return {
        "Generate": unary(servicer.Generate, request_deserializer=pb.GenerateRequest.FromString,
                          response_serializer=pb.GenerateResponse.SerializeToString),
        "Tokenize": unary(servicer.Tokenize, request_deserializer=pb.TokenizeRequest.FromString,
                          response_serializer=pb.TokenizeResponse.SerializeToString),
        "ListModels": unary(servicer.ListModels,
                            request_deserializer=pb.ListModelsRequest.FromString,
                            response_serializer=pb.ListModelsResponse.SerializeToString),
        "Health": unary(servicer.Health, request_deserializer=pb.HealthRequest.FromString,
                        response_serializer=pb.HealthResponse.SerializeToString),
    }


def add_to_server(frontend: Frontend, server: grpc.aio.Server) -> FerryServicer:
    servicer = FerryServicer(frontend)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(_SERVICE, method_handlers(servicer)),))
    return servicer


__all__ = ["FerryServicer", "add_to_server", "chunk_message", "generate_input", "grpc_status",
           "method_handlers"]
