"""Where to pull a handle from: the ``transport_address`` of a ``ferry.v1.KvHandle``.

Formats (the holder writes one; the puller parses it and picks the transport):

| address | transport | release goes to |
|---|---|---|
| ``host:port`` or ``grpc://host:port`` | gRPC stream from the holder's KvTransfer service | ``host:port`` |
| ``shm://NAME@host:port`` | copy from the holder's shared-memory KV arena ``/dev/shm/NAME`` (same host) | ``host:port`` (KvTransfer.ReleaseHandle) |
| ``cuda-ipc://NAME@host:port`` | device-to-device copy from the holder's GPU caches, exported under ``NAME`` (same node) | ``host:port`` |

``host:port`` is always the holder's KvTransfer gRPC address: the shared-memory and CUDA-IPC
transports release (and fall back to a gRPC pull, when the puller is not on the holder's
host) through it. ``NAME`` is letters, digits, ``.``, ``_`` and ``-``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

GRPC = "grpc"
SHM = "shm"
CUDA_IPC = "cuda-ipc"
SCHEMES = (GRPC, SHM, CUDA_IPC)

_NAME = re.compile(r"[A-Za-z0-9._-]{1,200}")
_HOSTPORT = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+):([0-9]{1,5})")


@dataclass(frozen=True)
class TransportAddress:
    """A parsed transport address. ``name`` is None for plain gRPC."""

    scheme: str
    grpc_address: str
    name: str | None = None

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise ValueError(f"unknown KV transport {self.scheme!r}; use one of {SCHEMES}")
        match = _HOSTPORT.fullmatch(self.grpc_address)
        if not match or not 0 < int(match.group(2)) < 65536:
            raise ValueError(
                f"KV transport needs the holder's gRPC address as host:port, got "
                f"{self.grpc_address!r}"
            )
        if (self.name is None) != (self.scheme == GRPC):
            raise ValueError(f"a {self.scheme} address {'needs' if self.name is None else 'takes no'}"
                             " segment name")
        if self.name is not None and not _NAME.fullmatch(self.name):
            raise ValueError(
                f"KV transport name {self.name!r} must be 1-200 letters, digits, '.', '_', '-'"
            )

    def __str__(self) -> str:
        if self.scheme == GRPC:
            return self.grpc_address
        return f"{self.scheme}://{self.name}@{self.grpc_address}"


def parse_transport_address(address: str) -> TransportAddress:
    """Parse a handle's ``transport_address``; ValueError naming the expected forms."""
    if not isinstance(address, str) or not address:
        raise ValueError(f"empty KV transport address {address!r}")
    scheme, sep, rest = address.partition("://")
    if not sep:
        return TransportAddress(GRPC, address)
    if scheme == GRPC:
        return TransportAddress(GRPC, rest)
    if scheme in (SHM, CUDA_IPC):
        name, at, grpc_address = rest.partition("@")
        if not at:
            raise ValueError(
                f"KV transport address {address!r} lacks the holder's gRPC address: write "
                f"{scheme}://NAME@host:port"
            )
        return TransportAddress(scheme, grpc_address, name)
    raise ValueError(
        f"unknown KV transport in {address!r}; use host:port, grpc://host:port, "
        "shm://NAME@host:port or cuda-ipc://NAME@host:port"
    )
