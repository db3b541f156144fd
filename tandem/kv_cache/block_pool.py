"""`BlockPool`: the fixed set of KV block ids, their reference counts and the prefix-cache map.

A block is in exactly one of two states:

    used   ref_cnt > 0   held by one or more live requests (shared when a prefix hit reuses it)
    free   ref_cnt == 0  in the free list, in eviction order (front = evicted first)

A free block that carries a `block_hash` still holds valid K/V: it stays findable through
`get_cached_block` and a prefix hit revives it with `touch`. It loses its hash only when
`get_new_blocks` hands it out again (eviction). So the prefix cache costs no memory of its
own: it is the free list's tail, in LRU order.

    free list:  [ 7  3 | 9  4  12 ]      get_new_blocks(2) -> [7, 3]
                 no hash  hashed, oldest first

Blocks freed without a hash go to the FRONT (their content is worthless, reuse them first);
hashed blocks go to the BACK. Callers free a request's blocks tail-first, so a prompt's last
blocks (shared by fewer requests) are evicted before its first ones.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable


class BlockPool:
    def __init__(self, num_blocks: int, enable_caching: bool) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.ref_cnt: list[int] = [0] * num_blocks  # per block id: live requests holding it
        self.block_hash: list[int | None] = [None] * num_blocks  # set while registered
        # Invariant: a block id is a key here iff its ref_cnt is 0. OrderedDict gives O(1)
        # removal from the middle (a prefix hit on a free block) and at both ends.
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._cached: dict[int, int] = {}  # block hash -> block id (used or free)

    # ---- counts -------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        """Blocks `get_new_blocks` may hand out (cached-but-free ones included)."""
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        """Blocks with ref_cnt > 0."""
        return self.num_blocks - len(self._free)

    def is_free(self, block_id: int) -> bool:
        return self.ref_cnt[block_id] == 0

    # ---- allocation ---------------------------------------------------------------------

    def get_new_blocks(self, n: int) -> list[int]:
        """Take `n` blocks off the front of the free list, each with ref_cnt 1 and no hash.

        Raises ValueError when fewer than `n` are free: callers check `num_free_blocks`.
        """
        if n > len(self._free):
            raise ValueError(f"asked for {n} blocks, only {len(self._free)} free")
        out = []
        for _ in range(n):
            block_id, _ = self._free.popitem(last=False)
            self._evict(block_id)
            self.ref_cnt[block_id] = 1
            out.append(block_id)
        return out

    def touch(self, block_ids: Iterable[int]) -> None:
        """Take one more reference on each block (a prefix hit); revives free ones."""
        for block_id in block_ids:
            if self.ref_cnt[block_id] == 0:
                del self._free[block_id]
            self.ref_cnt[block_id] += 1

    def free_blocks(self, block_ids: Iterable[int]) -> None:
        """Drop one reference on each block, in the given order (pass a request's blocks
        reversed so its tail is evicted first). Blocks reaching 0 join the free list."""
        for block_id in block_ids:
            if self.ref_cnt[block_id] <= 0:
                raise ValueError(f"block {block_id} freed more often than taken")
            self.ref_cnt[block_id] -= 1
            if self.ref_cnt[block_id] == 0:
                self._free[block_id] = None
                if self.block_hash[block_id] is None:
                    self._free.move_to_end(block_id, last=False)

    # ---- prefix cache -------------------------------------------------------------------

    def get_cached_block(self, block_hash: int) -> int | None:
        """The block registered under `block_hash` (used or free), or None."""
        return self._cached.get(block_hash)

    def cache_block(self, block_id: int, block_hash: int) -> bool:
        """Register a full, computed block under its hash. Returns False (and changes
        nothing) if caching is off, the block already has a hash, or another block already
        holds this hash (two requests computed the same prefix at once: keep the first)."""
        if not self.enable_caching or self.block_hash[block_id] is not None:
            return False
        if block_hash in self._cached:
            return False
        self.block_hash[block_id] = block_hash
        self._cached[block_hash] = block_id
        return True

    def reset_prefix_cache(self) -> bool:
        """Forget every hash. Only when no block is in use (live requests' hash bookkeeping
        would go stale otherwise); returns whether it reset."""
        if self.num_used_blocks:
            return False
        self._cached.clear()
        self.block_hash = [None] * self.num_blocks
        return True

    def _evict(self, block_id: int) -> None:
        block_hash = self.block_hash[block_id]
        if block_hash is not None:
            del self._cached[block_hash]
            self.block_hash[block_id] = None

    # ---- checks (tests) -----------------------------------------------------------------

    def free_block_ids(self) -> list[int]:
        """The free list, front (evicted first) to back."""
        return list(self._free)
