"""Ferry's KV cache layer: block hashing, the block pool with its prefix cache, KV events and
the per-request KV cache manager. Imports nothing of Ferry's except ``proto``."""

from kvcache.block_pool import BlockPool, blocks_needed
from kvcache.events import AllBlocksCleared, BlockRemoved, BlockStored, KvEvent, KvEventBatch
from kvcache.hashing import BlockHashConfig, hash_block, hash_blocks
from kvcache.manager import ComputedPrefix, KVCacheManager, PrefixCacheStats

__all__ = [
    "AllBlocksCleared",
    "BlockHashConfig",
    "BlockPool",
    "BlockRemoved",
    "BlockStored",
    "ComputedPrefix",
    "KVCacheManager",
    "KvEvent",
    "KvEventBatch",
    "PrefixCacheStats",
    "blocks_needed",
    "hash_block",
    "hash_blocks",
]
