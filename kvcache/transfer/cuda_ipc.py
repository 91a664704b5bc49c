"""CUDA-IPC KV transport: on one node, the puller copies blocks device to device out of the
holder's GPU caches, without a trip through host memory.

Holder (prefill worker) whose caches live on a CUDA device:
- :meth:`CudaIpcExport.create` (name, caches, block_size) exports every layer's cache tensor
  with CUDA IPC (``torch.multiprocessing.reductions.reduce_tensor``: a cudaIpcMemHandle of the
  allocation, torch's producer-side reference counter and an event) and writes the export as
  JSON into ``/dev/shm/NAME`` (mode 0600; no pickle, nothing executable);
- advertises ``transport_address = export.address(grpc_address)``, i.e.
  ``cuda-ipc://NAME@host:port`` (``host:port``: its KvTransfer service, for release and for a
  gRPC fallback);
- must have finished (synchronized) every write to a handle's blocks before creating the
  handle: sampling the first token on the host does that. The export's event covers only
  writes made before the export;
- keeps the cache tensors alive while exported, and :meth:`CudaIpcExport.close` deletes the
  ``/dev/shm`` file (idempotent; also at interpreter exit). Memory a puller has opened stays
  valid for it (torch's IPC reference counting) until it drops it.

Puller (decode worker, caches on a CUDA device of the same node): :func:`pull_cuda_ipc` opens
the export once per name (kept for later pulls; in the holder's own process it uses the
holder's tensors directly, since a process cannot open its own IPC handles), checks the
layout, copies the blocks with device-to-device copies (peer-to-peer when the devices differ)
and synchronizes before returning. Ownership and validation are the shared-memory transport's:
the copy counts only once the puller's ReleaseHandle returns ``released = true``.

Without CUDA (no GPU, a CPU-only torch build, caches on the CPU) every entry point raises
:class:`CudaIpcUnavailable` saying why; :func:`cuda_ipc_unavailable_reason` asks first.
"""

from __future__ import annotations

import base64
import json
import os
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Self

import torch

from kvcache.transfer.address import CUDA_IPC, TransportAddress, parse_transport_address
from kvcache.transfer.errors import KvTransferError, TransportUnavailable
from kvcache.transfer.handles import KvHandleInfo
from kvcache.transfer.layout import KvCacheView, KvLayout
from kvcache.transfer.result import PullResult, check_pull_args

SHM_DIR = Path("/dev/shm")
MAGIC = "ferry-cuda-ipc-1"
_PREFIX = b'{"magic": "' + MAGIC.encode() + b'"'  # how every export file starts


class CudaIpcUnavailable(TransportUnavailable):
    """CUDA IPC cannot be used here (no CUDA device, CPU caches, holder on another node)."""


def cuda_ipc_unavailable_reason(caches: Sequence[torch.Tensor] | None = None) -> str | None:
    """Why CUDA IPC cannot be used (None when it can): checks torch, the device and, when
    given, that ``caches`` live on a CUDA device."""
    if not torch.cuda.is_available():
        return ("CUDA IPC needs a CUDA device; torch.cuda is not available here (no GPU, or "
                "a CPU-only torch build): use the shm:// or gRPC transport")
    if caches is not None:
        devices = {c.device.type for c in caches}
        if devices - {"cuda"}:
            return (f"CUDA IPC exports GPU caches, these are on {sorted(devices)}: use the "
                    "shm:// or gRPC transport")
    return None


def _require(caches: Sequence[torch.Tensor] | None = None) -> None:
    reason = cuda_ipc_unavailable_reason(caches)
    if reason is not None:
        raise CudaIpcUnavailable(reason)


_local_exports: dict[str, KvCacheView] = {}  # exports of this process, by name
_local_lock = threading.Lock()


def _b64(value: bytes | None) -> str | None:
    return None if value is None else base64.b64encode(value).decode()


def _unb64(value: str | None) -> bytes | None:
    return None if value is None else base64.b64decode(value)


class CudaIpcExport:
    """The holder's exported GPU caches (see the module docstring)."""

    def __init__(self, name: str, path: Path, view: KvCacheView) -> None:
        self.name = name
        self.path = path
        self.view = view
        self._finalizer = weakref.finalize(self, _forget, name, path)

    @classmethod
    def create(cls, name: str, caches: Sequence[torch.Tensor], block_size: int, *,
               num_blocks: int | None = None) -> CudaIpcExport:
        TransportAddress(CUDA_IPC, "localhost:1", name)  # checks the name
        view = KvCacheView(caches, block_size, num_blocks=num_blocks)
        if view.caches:
            _require(view.caches)
        from torch.multiprocessing.reductions import reduce_tensor

        layers = []
        for cache in view.caches:
            _rebuild, args = reduce_tensor(cache)
            (_tcls, size, stride, offset, _scls, _dtype, device, handle, size_bytes,
             offset_bytes, _grad, ref_handle, ref_offset, event_handle, event_sync) = args
            layers.append({
                "size": list(size), "stride": list(stride), "offset": offset,
                "device": device, "handle": _b64(handle), "size_bytes": size_bytes,
                "offset_bytes": offset_bytes, "ref_counter_handle": _b64(ref_handle),
                "ref_counter_offset": ref_offset, "event_handle": _b64(event_handle),
                "event_sync_required": bool(event_sync),
            })
        text = json.dumps({"magic": MAGIC, "pid": os.getpid(),
                           "layout": view.layout.to_dict(), "layers": layers})
        path = SHM_DIR / name
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise FileExistsError(
                f"{path} exists (another worker uses the name, or one crashed: "
                "kvcache.transfer.shm.remove_stale_segments() deletes dead ones)"
            ) from None
        with os.fdopen(fd, "w") as f:
            f.write(text)
        with _local_lock:
            _local_exports[name] = view
        return cls(name, path, view)

    def address(self, grpc_address: str) -> str:
        """The handles' transport address: ``cuda-ipc://NAME@host:port``."""
        return str(TransportAddress(CUDA_IPC, grpc_address, self.name))

    def close(self) -> None:
        self._finalizer()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _forget(name: str, path: Path) -> None:
    with _local_lock:
        _local_exports.pop(name, None)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def read_export_pid(path: Path) -> int | None:
    """The creator pid of a CUDA-IPC export file, None when the file is not one."""
    try:
        with open(path, "rb") as f:
            if f.read(len(_PREFIX)) != _PREFIX:  # cheap check before reading a whole file
                return None
            data = json.loads(_PREFIX + f.read(16 << 20))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return int(data["pid"]) if isinstance(data, dict) else None


_opened: dict[str, tuple[int, KvCacheView]] = {}
_open_lock = threading.Lock()


def open_export(name: str) -> KvCacheView:
    """The holder's GPU caches exported under ``name``, opened in this process (once per name
    and export file). Raises CudaIpcUnavailable when CUDA or the export is not there."""
    TransportAddress(CUDA_IPC, "localhost:1", name)
    with _local_lock:
        local = _local_exports.get(name)
    if local is not None:
        return local
    path = SHM_DIR / name
    try:
        inode = os.stat(path).st_ino
    except FileNotFoundError:
        raise CudaIpcUnavailable(f"no CUDA-IPC export {path} on this node") from None
    _require()
    with _open_lock:
        cached = _opened.get(name)
        if cached is not None and cached[0] == inode:
            return cached[1]
        try:
            data = json.loads(path.read_text())
            if data.get("magic") != MAGIC:
                raise ValueError("wrong magic")
            layout = KvLayout.from_dict(data["layout"])
            layers = data["layers"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise KvTransferError(f"{path} is not a readable CUDA-IPC export: {exc}") from exc
        from torch.multiprocessing.reductions import rebuild_cuda_tensor

        caches = []
        try:
            for meta in layers:
                caches.append(rebuild_cuda_tensor(
                    torch.Tensor, torch.Size(meta["size"]), tuple(meta["stride"]),
                    meta["offset"], torch.TypedStorage, layout.torch_dtype, meta["device"],
                    _unb64(meta["handle"]), meta["size_bytes"], meta["offset_bytes"], False,
                    _unb64(meta["ref_counter_handle"]), meta["ref_counter_offset"],
                    _unb64(meta["event_handle"]), meta["event_sync_required"],
                ))
        except RuntimeError as exc:  # e.g. the holder's GPU is not visible from here
            raise CudaIpcUnavailable(f"opening CUDA-IPC export {name!r} failed: {exc}") from exc
        view = KvCacheView(caches, layout.block_size, num_blocks=layout.num_blocks)
        _opened[name] = (inode, view)
        return view


def forget_opened() -> None:
    """Drop this process's opened exports (their memory is released to the holder)."""
    with _open_lock:
        _opened.clear()


def pull_cuda_ipc(
    handle: KvHandleInfo,
    dest_view: KvCacheView,
    dest_block_ids: Sequence[int],
    *,
    src_block_ids: Sequence[int] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> PullResult:
    """Copy the handle's blocks (or ``src_block_ids``) device to device into
    ``dest_block_ids`` of a CUDA ``dest_view``. Blocking; synchronizes the destination device
    before returning; does not release (see the module docstring)."""
    address = parse_transport_address(handle.transport_address)
    if address.scheme != CUDA_IPC:
        raise ValueError(f"not a CUDA-IPC address: {handle.transport_address!r}")
    src, dst = check_pull_args(handle, dest_view, dest_block_ids, src_block_ids)
    if dest_view.caches:
        _require(dest_view.caches)
    started = time.perf_counter()
    source = open_export(address.name)
    copied = dest_view.copy_blocks_from(source, src, dst, should_stop=should_stop)
    if copied < 0:
        raise KvTransferError(f"CUDA-IPC pull of {handle.handle_id!r} cancelled",
                              code="CANCELLED")
    return PullResult(nbytes=copied, blocks=len(dst), seconds=time.perf_counter() - started,
                      transport=CUDA_IPC)
