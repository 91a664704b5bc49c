"""The serving frontend: OpenAI HTTP, ferry.v1 gRPC and KServe v2 gRPC in front of workers.

:class:`Frontend` (core.py) holds the tokenizer, the worker pool and the worker picker and
turns a :class:`GenerateInput` into a stream of :class:`GenerateChunk`; openai_http.py,
grpc_api.py and kserve.py adapt it to their protocols; :class:`FrontendServer` runs them.
"""

from orchestrator.frontend.config import FrontendConfig
from orchestrator.frontend.core import Frontend, collect
from orchestrator.frontend.metrics import FrontendMetrics
from orchestrator.frontend.pickers import RandomPicker, RoundRobin, make_picker
from orchestrator.frontend.server import BoundPorts, FrontendServer
from orchestrator.frontend.types import (
    ChatMessage,
    Completion,
    ErrorCode,
    FrontendError,
    GenerateChunk,
    GenerateInput,
    InvalidArgument,
    ModelNotFound,
    RouteRequest,
    StreamError,
    Unavailable,
    Usage,
)
from orchestrator.frontend.worker_pool import WorkerHandle, WorkerPool, WorkerUnreachable

__all__ = [
    "BoundPorts",
    "ChatMessage",
    "Completion",
    "ErrorCode",
    "Frontend",
    "FrontendConfig",
    "FrontendError",
    "FrontendMetrics",
    "FrontendServer",
    "GenerateChunk",
    "GenerateInput",
    "InvalidArgument",
    "ModelNotFound",
    "RandomPicker",
    "RoundRobin",
    "RouteRequest",
    "StreamError",
    "Unavailable",
    "Usage",
    "WorkerHandle",
    "WorkerPool",
    "WorkerUnreachable",
    "collect",
    "make_picker",
]
