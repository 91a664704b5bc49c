"""Failures of a KV transfer, as one exception family the decode worker can catch.

Every failure a puller can meet at run time (the holder died, the handle is gone, the bytes
arrived damaged, the two workers' KV layouts differ, the deadline passed) raises a subclass of
:class:`KvTransferError`. Its ``code`` is the name of the matching ``ferry.v1.ErrorCode`` /
gRPC status (``"NOT_FOUND"``, ``"DATA_LOSS"`` travels as ``"INTERNAL"``, ...), so a worker can
put it on the wire unchanged. What the caller does with any of them is the same: treat every
destination block of the pull as garbage (free it without caching it) and prefill locally.

A caller's bug (a block id out of range, a destination list of the wrong length) is a plain
``ValueError`` instead: retrying elsewhere would not help.
"""

from __future__ import annotations


class KvTransferError(Exception):
    """A KV transfer failed; the destination blocks hold no usable data."""

    code = "INTERNAL"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""


class HandleNotFound(KvTransferError, KeyError):
    """The handle is unknown to the holder, was released, or passed its TTL."""

    code = "NOT_FOUND"

    def __str__(self) -> str:  # KeyError would quote the message
        return self.message


class KvLayoutMismatch(KvTransferError, ValueError):
    """The holder's and the puller's KV caches are not laid out alike (model, dtype, ...)."""

    code = "INVALID_ARGUMENT"


class TransferIntegrityError(KvTransferError):
    """Bytes arrived damaged or out of protocol (crc32 mismatch, wrong size, missing chunk)."""

    code = "INTERNAL"


class TransportUnavailable(KvTransferError):
    """The holder (its gRPC server, shared-memory segment or GPU memory) cannot be reached."""

    code = "UNAVAILABLE"


class TransferTimeout(KvTransferError):
    """The pull did not finish within its deadline."""

    code = "DEADLINE_EXCEEDED"
