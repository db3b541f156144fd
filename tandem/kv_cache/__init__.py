"""KV-cache bookkeeping: which physical KV blocks hold which request's tokens. No torch.

Owns block ids and their reference counts, never the tensors: the model runner allocates
`num_blocks` blocks of `block_size` slots and reads the block tables handed to it in the
`StepPlan`.

    block_pool.py      BlockPool: ids 0..num_blocks-1, ref counts, free list in eviction
                       (LRU) order, hash -> block map of the prefix cache
    block_manager.py   KVCacheManager: per-request block lists, chained block hashes,
                       prefix-cache lookup, allocation, registration, prefix-cache stats

Data flow, all driven by the scheduler:

    get_computed_blocks(req) -> cached leading blocks -> allocate_slots(req, n, hits)
        -> block_table(req_id) into the StepPlan -> runner writes K/V into those blocks
        -> cache_full_blocks(req) after the step -> free(req) on finish/abort/preemption
"""

from tandem.kv_cache.block_manager import KVCacheManager, hash_block_tokens
from tandem.kv_cache.block_pool import BlockPool

__all__ = ["BlockPool", "KVCacheManager", "hash_block_tokens"]
