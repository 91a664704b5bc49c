"""HPACK decoding (RFC 7541) with whole header blocks remembered: a client sends the same
header block call after call, and decoding one with the pure-Python ``hpack`` costs more than
the rest of a small call's parsing.

Decoding is a function of the block's bytes and the dynamic table; a block whose decoding left
the table as it was decodes the same way until the table changes. So such a block's headers
are kept by its bytes, and everything kept is dropped whenever the table changes (an entry
added, or a size update): a block that adds entries is never kept, and a kept one is only
used while the table is exactly the one it was decoded against.
"""

from __future__ import annotations

import hpack
from hpack.table import HeaderTable

MAX_KEPT = 256  # header blocks kept per connection


class _CountingTable(HeaderTable):
    """A header table that counts its changes."""

    def __init__(self) -> None:
        super().__init__()
        self.changes = 0

    def add(self, name: bytes, value: bytes) -> None:
        self.changes += 1
        super().add(name, value)

    @property
    def maxsize(self) -> int:
        return HeaderTable.maxsize.fget(self)

    @maxsize.setter
    def maxsize(self, newmax: int) -> None:
        self.changes += 1
        HeaderTable.maxsize.fset(self, newmax)


class BlockDecoder:
    """``decode(block) -> [(name, value), ...]`` (str); raises ``hpack.HPACKError``."""

    def __init__(self, max_header_list_size: int) -> None:
        self._decoder = hpack.Decoder(max_header_list_size=max_header_list_size)
        self._table = _CountingTable()
        self._decoder.header_table = self._table
        self._kept: dict[bytes, list] = {}

    def decode(self, block: bytes) -> list:
        headers = self._kept.get(block)
        if headers is not None:
            return headers
        changes = self._table.changes
        headers = self._decoder.decode(block)
        if self._table.changes != changes:
            self._kept.clear()
        elif len(self._kept) < MAX_KEPT:
            self._kept[block] = headers
        return headers


__all__ = ["MAX_KEPT", "BlockDecoder"]
