"""OpenAI request bodies -> :class:`GenerateInput`, and the JSON / SSE the answers are made of.

Parsing checks every field's type and range and raises :class:`InvalidArgument` naming the
field (OpenAI's ``param``). Fields that change the output in a way Ferry does not implement
(``n`` > 1, ``logprobs``, ``echo``, penalties, tools, ...) are refused rather than ignored;
fields that do not change the output (``user``, ``metadata``, ``store``, ...) are ignored.

Streaming: every event is ``data: <json>\\n\\n`` and the stream ends with ``data: [DONE]``.
The JSON of a delta event is a per-request constant prefix and suffix around the
JSON-escaped text, so a token costs one string escape, not a ``json.dumps`` of a dict.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from json.encoder import encode_basestring_ascii as _escape
from typing import Any

from orchestrator.frontend.types import (
    ChatMessage,
    FinishReason,
    GenerateInput,
    InvalidArgument,
    Usage,
)

_MISSING = object()
_MAX_STOP = 16


@dataclass(frozen=True)
class ParsedRequest:
    input: GenerateInput
    stream: bool
    include_usage: bool  # stream_options.include_usage


def _type_name(value: Any) -> str:
    return "null" if value is None else {bool: "boolean", int: "integer", float: "number",
                                         str: "string", list: "array", dict: "object"}.get(
        type(value), type(value).__name__)


def _bad_type(name: str, expected: str, value: Any) -> InvalidArgument:
    return InvalidArgument(f"'{name}' must be {expected}, got {_type_name(value)}", param=name,
                           kind="invalid_type")


def _int(body: dict, name: str, low: int | None = None, high: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad_type(name, "an integer", value)
    if low is not None and value < low:
        raise InvalidArgument(f"'{name}' must be at least {low}, got {value}", param=name,
                              kind="invalid_value")
    if high is not None and value > high:
        raise InvalidArgument(f"'{name}' must be at most {high}, got {value}", param=name,
                              kind="invalid_value")
    return value


def _float(body: dict, name: str) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _bad_type(name, "a number", value)
    if not math.isfinite(value):
        raise InvalidArgument(f"'{name}' must be a finite number", param=name,
                              kind="invalid_value")
    return float(value)


def _bool(body: dict, name: str, default: bool = False) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _bad_type(name, "a boolean", value)
    return value


def _unsupported(name: str, why: str) -> InvalidArgument:
    return InvalidArgument(f"'{name}' is not supported: {why}", param=name,
                           kind="unsupported_parameter")


def _common(body: dict) -> dict:
    """Fields chat and completions share; refuses what Ferry cannot honour."""
    n = _int(body, "n", low=1)
    if n is not None and n > 1:
        raise _unsupported("n", f"Ferry returns one choice per request (got n={n}); send n "
                           "separate requests with different seeds instead")
    for name in ("presence_penalty", "frequency_penalty"):
        if _float(body, name):
            raise _unsupported(name, "leave it unset or 0")
    if body.get("logit_bias"):
        raise _unsupported("logit_bias", "leave it unset")
    stop = body.get("stop")
    if stop is None:
        stop = ()
    elif isinstance(stop, str):
        stop = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stop = tuple(stop)
    else:
        raise _bad_type("stop", "a string or an array of strings", stop)
    if any(not s for s in stop):
        raise InvalidArgument("'stop' strings must not be empty", param="stop",
                              kind="invalid_value")
    if len(stop) > _MAX_STOP:
        raise InvalidArgument(f"'stop' takes at most {_MAX_STOP} strings, got {len(stop)}",
                              param="stop", kind="invalid_value")
    stop_ids = body.get("stop_token_ids")
    if stop_ids is None:
        stop_ids = ()
    elif not isinstance(stop_ids, list) or any(
            isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in stop_ids):
        raise _bad_type("stop_token_ids", "an array of non-negative integers", stop_ids)
    model = body.get("model", "")
    if model is None:
        model = ""
    if not isinstance(model, str):
        raise _bad_type("model", "a string", model)
    stream = _bool(body, "stream")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not isinstance(options, dict):
            raise _bad_type("stream_options", "an object", options)
        include_usage = _bool(options, "include_usage")
    return {
        "model": model, "temperature": _float(body, "temperature"),
        "top_p": _float(body, "top_p"), "top_k": _top_k(body),
        "seed": _int(body, "seed", -(2**63), 2**63 - 1), "stop": stop,
        "stop_token_ids": tuple(stop_ids), "ignore_eos": _bool(body, "ignore_eos"),
        "stream": stream, "include_usage": include_usage}


def _top_k(body: dict) -> int | None:
    top_k = _int(body, "top_k", low=-1)
    return 0 if top_k == -1 else top_k  # vLLM's -1 also means "off"


def _split(fields: dict, **prompt: Any) -> ParsedRequest:
    stream, include_usage = fields.pop("stream"), fields.pop("include_usage")
    return ParsedRequest(GenerateInput(**prompt, **fields), stream, include_usage)


def _message_content(content: Any, index: int) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or \
                    not isinstance(part.get("text"), str):
                raise InvalidArgument(
                    f"messages[{index}].content: only text parts ({{\"type\": \"text\", "
                    "\"text\": ...}) are supported", param=f"messages[{index}].content",
                    kind="invalid_value")
            parts.append(part["text"])
        return "".join(parts)
    raise _bad_type(f"messages[{index}].content", "a string or an array of text parts",
                    content)


def parse_chat(body: dict) -> ParsedRequest:
    messages = body.get("messages", _MISSING)
    if messages is _MISSING:
        raise InvalidArgument("'messages' is required", param="messages", kind="missing")
    if not isinstance(messages, list):
        raise _bad_type("messages", "an array of messages", messages)
    if not messages:
        raise InvalidArgument("'messages' must not be empty", param="messages",
                              kind="invalid_value")
    parsed = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise _bad_type(f"messages[{i}]", "an object", message)
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise _bad_type(f"messages[{i}].role", "a non-empty string", role)
        parsed.append(ChatMessage(role, _message_content(message.get("content"), i)))
    if _bool(body, "logprobs") or body.get("top_logprobs"):
        raise _unsupported("logprobs", "Ferry does not return log probabilities")
    for name in ("tools", "functions"):
        if body.get(name):
            raise _unsupported(name, "Ferry does not call tools")
    fmt = body.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        raise _unsupported("response_format", "only {\"type\": \"text\"} is available")
    max_tokens = _int(body, "max_completion_tokens", low=1)
    if max_tokens is None:
        max_tokens = _int(body, "max_tokens", low=1)
    fields = _common(body)
    return _split(fields, messages=tuple(parsed), max_tokens=max_tokens)


def parse_completion(body: dict) -> ParsedRequest:
    prompt = body.get("prompt", _MISSING)
    if prompt is _MISSING or prompt is None:
        raise InvalidArgument("'prompt' is required", param="prompt", kind="missing")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        given = {"prompt": prompt}
    elif isinstance(prompt, list) and prompt and all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        given = {"prompt_token_ids": tuple(prompt)}
    elif isinstance(prompt, list) and len(prompt) > 1 and all(
            isinstance(p, (str, list)) for p in prompt):
        raise _unsupported("prompt", "send one prompt per request, not a batch of "
                           f"{len(prompt)}")
    else:
        raise _bad_type("prompt", "a string or a non-empty array of token ids", prompt)
    if body.get("logprobs") is not None:
        raise _unsupported("logprobs", "Ferry does not return log probabilities")
    if _bool(body, "echo"):
        raise _unsupported("echo", "the prompt is not repeated in the answer")
    if body.get("suffix"):
        raise _unsupported("suffix", "Ferry does not insert text")
    best_of = _int(body, "best_of", low=1)
    if best_of is not None and best_of > 1:
        raise _unsupported("best_of", "Ferry generates one sequence per request")
    fields = _common(body)
    return _split(fields, max_tokens=_int(body, "max_tokens", low=1), **given)


# ---------------------------------------------------------------------- answers

def finish_reason_text(reason: FinishReason | None) -> str | None:
    return None if reason is None else reason.value


def usage_json(usage: Usage) -> dict:
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.total_tokens,
            "prompt_tokens_details": {"cached_tokens": usage.cached_tokens}}


def error_json(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> bytes:
    return json.dumps({"error": {"message": message, "type": type_, "param": param,
                                 "code": code}}).encode()


class SSEWriter:
    """Builds the SSE events of one streamed request (chat or completions)."""

    def __init__(self, chat: bool, request_id: str, created: int, model: str) -> None:
        self.chat = chat
        obj = "chat.completion.chunk" if chat else "text_completion"
        self._head = (f'data: {{"id":{_escape(request_id)},"object":"{obj}",'
                      f'"created":{created},"model":{_escape(model)},"choices":')
        if chat:
            self._open = self._head + '[{"index":0,"delta":{'
        else:
            self._open = self._head + '[{"index":0,"text":'

    def first(self) -> bytes:
        """Chat streams open with the assistant role; completions have no such event."""
        return (self._open + '"role":"assistant","content":""},"logprobs":null,'
                '"finish_reason":null}]}\n\n').encode()

    def delta(self, text: str, finish_reason: str | None = None) -> bytes:
        reason = "null" if finish_reason is None else f'"{finish_reason}"'
        tail = f',"logprobs":null,"finish_reason":{reason}}}]}}\n\n'
        if self.chat:
            body = f'"content":{_escape(text)}' if text else ""
            return f"{self._open}{body}}}{tail}".encode()
        return f"{self._open}{_escape(text)}{tail}".encode()

    def usage(self, usage: Usage) -> bytes:
        return f'{self._head}[],"usage":{json.dumps(usage_json(usage))}}}\n\n'.encode()

    @staticmethod
    def error(message: str, type_: str, code: str | None) -> bytes:
        return b"data: " + error_json(message, type_, None, code) + b"\n\n"

    DONE = b"data: [DONE]\n\n"


def chat_response(request_id: str, created: int, model: str, text: str,
                  finish_reason: FinishReason, usage: Usage) -> dict:
    return {"id": request_id, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "logprobs": None, "finish_reason": finish_reason_text(finish_reason)}],
            "usage": usage_json(usage)}


def completion_response(request_id: str, created: int, model: str, text: str,
                        finish_reason: FinishReason, usage: Usage) -> dict:
    return {"id": request_id, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None,
                         "finish_reason": finish_reason_text(finish_reason)}],
            "usage": usage_json(usage)}


__all__ = [
    "ParsedRequest",
    "SSEWriter",
    "chat_response",
    "completion_response",
    "error_json",
    "parse_chat",
    "parse_completion",
    "usage_json",
]
