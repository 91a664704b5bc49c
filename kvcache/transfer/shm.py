"""Shared-memory KV transport: on one host, the puller copies blocks straight out of the holder's
KV cache, one memory copy and no serialization.

Holder (prefill worker), when shared-memory transport is on:
- builds its KV caches with :meth:`SharedKvArena.create` instead of ``torch.zeros``: one
  ``/dev/shm/NAME`` file (mode 0600, its pages reserved at once, so a full /dev/shm is a
  ValueError here rather than a SIGBUS at the engine's first write) holding a 4 KiB header (magic, the creator's pid, the
  :class:`~kvcache.transfer.layout.KvLayout`) and then every layer's
  ``[2, num_blocks * block_size, num_kv_heads, head_dim]`` tensor, page-aligned. The engine
  uses ``arena.caches`` like any other cache list;
- advertises ``transport_address = arena.address(grpc_address)``, i.e.
  ``shm://NAME@host:port`` where ``host:port`` is its KvTransfer gRPC service (release, and a
  gRPC fallback for pullers on other hosts);
- unlinks the file on :meth:`SharedKvArena.close` (also at interpreter exit if not closed).
  Mappings made before the unlink stay valid until dropped; the memory returns to the OS with
  the last of them.

Puller (decode worker) on the same host: :func:`pull_shm` maps ``/dev/shm/NAME`` read-only
(mapped once per name and kept, so later pulls pay no page faults), checks the layout and
copies the handle's blocks into its own cache. An attacher never unlinks; it keeps its mapping
(and so the holder's memory) until a pull finds the segment gone, it attaches another segment
while this one is gone (unlinked or replaced), or it calls :func:`detach`. Ownership and
validation (the holder does not know a shared-memory read happens): the puller copies first
and then releases the handle through gRPC ``ReleaseHandle``; the copy is valid only if that
release returned ``released = true`` (the handle was still pinned throughout the copy, so no
block was reused). :func:`kvcache.transfer.puller.pull` does exactly that. A segment that does
not exist here raises :class:`SegmentNotFound` (the puller is on another host: fall back to
gRPC at the same address).

A holder that crashed leaves its file behind; :func:`remove_stale_segments` deletes Ferry
segments whose creator is no longer alive.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import struct
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Self

import torch

from kvcache.transfer.address import SHM, TransportAddress, parse_transport_address
from kvcache.transfer.errors import KvTransferError, TransportUnavailable
from kvcache.transfer.handles import KvHandleInfo
from kvcache.transfer.layout import KvCacheView, KvLayout, readonly_bytes_tensor
from kvcache.transfer.result import PullResult, check_pull_args

SHM_DIR = Path("/dev/shm")
MAGIC = b"FERRYKV1"
HEADER_BYTES = 4096
_PAGE = 4096
_LEN = struct.Struct("<I")


class SegmentNotFound(TransportUnavailable):
    """No such shared-memory segment on this host (the holder is elsewhere, or closed it)."""


def _layer_stride(layout: KvLayout) -> int:
    return -(-layout.layer_nbytes // _PAGE) * _PAGE


def _check_name(name: str) -> None:
    TransportAddress(SHM, "localhost:1", name)  # raises ValueError naming the allowed form


class SharedKvArena:
    """A holder's KV caches inside one shared-memory segment (see the module docstring)."""

    def __init__(self, name: str, path: Path, layout: KvLayout, caches: list[torch.Tensor],
                 mapping: mmap.mmap) -> None:
        self.name = name
        self.path = path
        self.layout = layout
        self.caches = caches
        self.view = KvCacheView(caches, layout.block_size, num_blocks=layout.num_blocks)
        self._mapping = mapping  # kept alive by the tensors too
        self._finalizer = weakref.finalize(self, _unlink_quietly, path)

    @classmethod
    def create(cls, name: str, layout: KvLayout) -> SharedKvArena:
        """Allocate zeroed caches for ``layout`` in ``/dev/shm/NAME`` (which must not exist)."""
        _check_name(name)
        stride = _layer_stride(layout)
        size = HEADER_BYTES + layout.num_layers * stride
        free = os.statvfs(SHM_DIR)
        if free.f_bavail * free.f_frsize < size:
            raise ValueError(
                f"/dev/shm has {free.f_bavail * free.f_frsize} bytes free, the KV arena needs "
                f"{size}: lower num_blocks or enlarge /dev/shm (docker: --shm-size)"
            )
        path = SHM_DIR / name
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise FileExistsError(
                f"shared-memory segment {path} exists (another worker uses the name, or one "
                "crashed: kvcache.transfer.shm.remove_stale_segments() deletes dead ones)"
            ) from None
        try:
            os.ftruncate(fd, size)
            try:  # reserve the pages now: a full /dev/shm then fails here, not with a
                # SIGBUS at the engine's first write into a page that cannot be had
                os.posix_fallocate(fd, 0, size)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                raise ValueError(
                    f"/dev/shm has no room for the KV arena's {size} bytes: lower num_blocks "
                    "or enlarge /dev/shm (docker: --shm-size)") from None
            mapping = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            os.unlink(path)
            raise
        os.close(fd)
        header = json.dumps({"pid": os.getpid(), "layout": layout.to_dict(),
                             "layer_stride": stride}).encode()
        if len(header) > HEADER_BYTES - len(MAGIC) - _LEN.size:
            raise ValueError("KV arena header too long")
        mapping[:len(MAGIC)] = MAGIC
        mapping[len(MAGIC):len(MAGIC) + _LEN.size] = _LEN.pack(len(header))
        start = len(MAGIC) + _LEN.size
        mapping[start:start + len(header)] = header
        caches = _layer_tensors(torch.frombuffer(mapping, dtype=torch.uint8), layout, stride)
        return cls(name, path, layout, caches, mapping)

    def address(self, grpc_address: str) -> str:
        """The handles' transport address: ``shm://NAME@host:port``."""
        return str(TransportAddress(SHM, grpc_address, self.name))

    def close(self) -> None:
        """Unlink the segment (idempotent). The caches stay usable in this process until
        dropped; no new puller can attach."""
        self._finalizer()

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _layer_tensors(buffer: torch.Tensor, layout: KvLayout, stride: int) -> list[torch.Tensor]:
    out = []
    for layer in range(layout.num_layers):
        start = HEADER_BYTES + layer * stride
        raw = buffer[start:start + layout.layer_nbytes]
        out.append(raw.view(layout.torch_dtype).view(layout.layer_shape))
    return out


def read_header(path: Path) -> dict:
    """The JSON header of a Ferry segment (ValueError when the file is not one)."""
    with open(path, "rb") as f:
        head = f.read(HEADER_BYTES)
    if len(head) < len(MAGIC) + _LEN.size or not head.startswith(MAGIC):
        raise ValueError(f"{path} is not a Ferry KV segment")
    (length,) = _LEN.unpack_from(head, len(MAGIC))
    start = len(MAGIC) + _LEN.size
    return json.loads(head[start:start + length])


# -- attaching (puller side) ------------------------------------------------------------------

_attached: dict[str, tuple[int, KvCacheView]] = {}  # name -> (inode, read-only view)
_attach_lock = threading.Lock()


def attach(name: str) -> KvCacheView:
    """A read-only view of the holder's caches in ``/dev/shm/NAME``, mapped once and reused
    while the file is the same. Raises SegmentNotFound when there is no such segment."""
    _check_name(name)
    path = SHM_DIR / name
    try:
        inode = os.stat(path).st_ino
    except FileNotFoundError:
        with _attach_lock:
            _attached.pop(name, None)
        raise SegmentNotFound(f"no shared-memory KV segment {path} on this host") from None
    with _attach_lock:
        cached = _attached.get(name)
        if cached is not None and cached[0] == inode:
            return cached[1]
        _forget_gone_locked()
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise SegmentNotFound(f"no shared-memory KV segment {path} on this host") from None
        except PermissionError:  # another user's worker (mode 0600): gRPC still reaches it
            raise TransportUnavailable(
                f"shared-memory KV segment {path} is not readable by this user") from None
        try:
            size = os.fstat(fd).st_size
            mapping = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
        finally:
            os.close(fd)
        try:
            header = read_header(path)
            layout = KvLayout.from_dict(header["layout"])
            stride = int(header["layer_stride"])
        except (ValueError, KeyError, TypeError) as exc:
            raise KvTransferError(f"{path} is not a readable Ferry KV segment: {exc}") from exc
        if size < HEADER_BYTES + layout.num_layers * stride:
            raise KvTransferError(f"{path} is shorter than its header says")
        caches = _layer_tensors(readonly_bytes_tensor(mapping), layout, stride)
        view = KvCacheView(caches, layout.block_size, num_blocks=layout.num_blocks)
        _attached[name] = (inode, view)
        return view


def _forget_gone_locked() -> None:
    """Drop attachments whose segment was unlinked or replaced (its holder stopped, or was
    killed and its file removed as stale): their memory goes back to the OS with the mapping,
    instead of staying mapped here for good because no later pull names them."""
    for name, (inode, _view) in list(_attached.items()):
        try:
            same = os.stat(SHM_DIR / name).st_ino == inode
        except OSError:
            same = False
        if not same:
            del _attached[name]


def attached_names() -> list[str]:
    """Names of the segments this process keeps mapped (tests, diagnostics)."""
    with _attach_lock:
        return sorted(_attached)


def detach(name: str) -> None:
    """Forget the cached attachment of ``name`` (a holder that is gone: its memory is freed
    once this process drops the mapping). A pull that finds the segment gone does this too."""
    with _attach_lock:
        _attached.pop(name, None)


def detach_all() -> None:
    """Forget every cached attachment (the mappings go with their last tensor)."""
    with _attach_lock:
        _attached.clear()


def pull_shm(
    handle: KvHandleInfo,
    dest_view: KvCacheView,
    dest_block_ids: Sequence[int],
    *,
    src_block_ids: Sequence[int] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> PullResult:
    """Copy the handle's blocks (or ``src_block_ids``) from the holder's segment named in
    ``handle.transport_address`` into ``dest_block_ids``. Blocking (one memory copy); does not
    release: the copy counts only once the release succeeds (see the module docstring).
    ``should_stop`` is polled between copies; when it returns True this raises
    KvTransferError(CANCELLED)."""
    address = parse_transport_address(handle.transport_address)
    if address.scheme != SHM:
        raise ValueError(f"not a shared-memory address: {handle.transport_address!r}")
    src, dst = check_pull_args(handle, dest_view, dest_block_ids, src_block_ids)
    started = time.perf_counter()
    source = attach(address.name)
    copied = dest_view.copy_blocks_from(source, src, dst, should_stop=should_stop)
    if copied < 0:
        raise KvTransferError(f"shared-memory pull of {handle.handle_id!r} cancelled",
                              code="CANCELLED")
    return PullResult(nbytes=copied, blocks=len(dst), seconds=time.perf_counter() - started,
                      transport=SHM)


def remove_stale_segments(prefix: str = "") -> list[str]:
    """Delete Ferry segments (arenas and CUDA-IPC exports) in /dev/shm whose names start with
    ``prefix`` and whose creator process is gone; returns their names."""
    from kvcache.transfer.cuda_ipc import read_export_pid

    removed = []
    for path in SHM_DIR.glob(f"{prefix}*"):
        try:
            if not path.is_file():
                continue
            try:
                pid = int(read_header(path)["pid"])
            except ValueError:
                pid = read_export_pid(path)
        except (OSError, KeyError, TypeError, ValueError):
            continue
        if pid is None or _pid_alive(pid):
            continue
        try:
            _unlink_quietly(path)
        except OSError:  # not ours to remove (another user's, in a sticky /dev/shm)
            continue
        removed.append(path.name)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


__all__ = ["SHM", "SegmentNotFound", "SharedKvArena", "attach", "attached_names", "detach",
           "detach_all",
           "pull_shm", "read_header", "remove_stale_segments"]
