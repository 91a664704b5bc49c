"""The ``ferry.v1.Ferry`` gRPC service (proto/ferry/v1/client.proto) over a :class:`Frontend`.

Generate follows client.proto's stream protocol: deltas, then one last chunk with finish
reason and usage. A request rejected before any token (bad value, prompt too long, unknown
model, no worker) is answered with one such last chunk carrying FINISH_REASON_ERROR and an
Error whose code is INVALID_ARGUMENT / NOT_FOUND / UNAVAILABLE; the RPC itself ends OK, so a
client reads every outcome from the stream. The unary RPCs (Tokenize, ...) fail with the
gRPC status of the same code instead. A request that does not parse as its message fails
with INVALID_ARGUMENT. Cancelling a Generate call (or its deadline passing) cancels the
worker call.

The service runs on :class:`ferry.rpc.GrpcServer` (what it costs per call is most
of the frontend's CPU per request, and grpc.aio's costs several times more: see server.py
there and benchmarks/serve_overhead.py). :meth:`FerryService.methods` gives its handlers by
path: each chunk of Generate but the last is written as it comes, the last goes out with the
status in one write.
"""

from __future__ import annotations

from contextlib import aclosing

import grpc
from google.protobuf.message import DecodeError

from ferry.rpc import GrpcError, Handler, ServerCall, Status
from ferry.v1 import client_pb2, common_pb2
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


def _parse(cls, data: bytes):
    try:
        return cls.FromString(data)
    except DecodeError:
        raise GrpcError(Status.INVALID_ARGUMENT, f"the request is not a valid "
                                                 f"{cls.DESCRIPTOR.full_name}") from None


class FerryService:
    """The service's handlers; serve them with ``GrpcServer(service.methods())``."""

    def __init__(self, frontend: Frontend) -> None:
        self.frontend = frontend

    def methods(self) -> dict[str, Handler]:
        return {f"/{_SERVICE}/{name}": handler for name, handler in (
            ("Generate", self.generate), ("Tokenize", self.tokenize),
            ("ListModels", self.list_models), ("Health", self.health))}

    async def generate(self, data: bytes, call: ServerCall) -> bytes:
        """Writes every chunk but the last; returns the last (module docstring)."""
        request = _parse(client_pb2.GenerateRequest, data)
        try:
            stream = await self.frontend.generate(generate_input(request))
        except FrontendError as e:
            return _error_message(request.request_id, int(e.code), e.message).SerializeToString()
        write = call.write
        async with aclosing(stream):
            async for chunk in stream:
                if chunk.finish_reason is not None:
                    return chunk_message(chunk).SerializeToString()
                await write(chunk_message(chunk).SerializeToString())
        return _error_message(request.request_id, common_pb2.ERROR_CODE_INTERNAL,
                              _NO_LAST_CHUNK).SerializeToString()

    async def tokenize(self, data: bytes, call: ServerCall) -> bytes:
        request = _parse(client_pb2.TokenizeRequest, data)
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
            raise GrpcError(int(e.code), e.message) from None
        return client_pb2.TokenizeResponse(token_ids=ids, prompt=text).SerializeToString()

    async def list_models(self, data: bytes, call: ServerCall) -> bytes:
        _parse(client_pb2.ListModelsRequest, data)
        f = self.frontend
        card = client_pb2.ModelCard(name=f.model_name, max_model_len=f.max_model_len or 0,
                                    num_ready_workers=f.num_ready_workers)
        return client_pb2.ListModelsResponse(models=[card]).SerializeToString()

    async def health(self, data: bytes, call: ServerCall) -> bytes:
        _parse(client_pb2.HealthRequest, data)
        f = self.frontend
        return client_pb2.HealthResponse(ready=f.ready, num_ready_workers=f.num_ready_workers,
                                         detail=f.health_detail()).SerializeToString()


__all__ = ["FerryService", "chunk_message", "generate_input", "grpc_status"]
