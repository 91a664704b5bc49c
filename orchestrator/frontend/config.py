"""The frontend's configuration: a frozen dataclass validated when built."""

from __future__ import annotations

from dataclasses import dataclass


def _positive_int(name: str, value: object, hint: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}; {hint}")


@dataclass(frozen=True)
class FrontendConfig:
    """
    - ``model_name``: the name clients pass as ``model``.
    - ``max_model_len``: longest sequence (prompt + completion). None: the smallest
      ``max_model_len`` of the registered workers (from their Info).
    - ``default_max_tokens``: completion length when a request gives none. None: the rest of
      the context.
    - ``max_attempts``: workers tried for one request when a worker answers "no capacity"
      (RESOURCE_EXHAUSTED) or cannot be reached before the first token.
    - ``worker_timeout_s``: deadline of the unary calls to a worker (Info, Stats).
    - ``max_request_bytes``: largest HTTP request body accepted.
    """

    model_name: str
    max_model_len: int | None = None
    default_max_tokens: int | None = None
    max_attempts: int = 3
    worker_timeout_s: float = 5.0
    max_request_bytes: int = 32 * 1024 * 1024

    def __post_init__(self) -> None:
        if not isinstance(self.model_name, str) or not self.model_name:
            raise ValueError(f"model_name must be a non-empty string, got {self.model_name!r}")
        if self.max_model_len is not None:
            _positive_int("max_model_len", self.max_model_len,
                          "give the model's context length, or None to take the workers'")
        if self.default_max_tokens is not None:
            _positive_int("default_max_tokens", self.default_max_tokens,
                          "or None for the rest of the context")
        _positive_int("max_attempts", self.max_attempts, "1 means no retry on another worker")
        _positive_int("max_request_bytes", self.max_request_bytes, "e.g. 33554432 (32 MiB)")
        if not isinstance(self.worker_timeout_s, (int, float)) or not self.worker_timeout_s > 0:
            raise ValueError(f"worker_timeout_s must be > 0 seconds, got {self.worker_timeout_s!r}")
