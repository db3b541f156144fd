"""`KVCacheManager`: which KV blocks each request holds, and prefix-cache lookups.

A request's block list covers its token positions in order; position `pos` lives in
`blocks[pos // block_size]` at offset `pos % block_size`:

    block_size = 4, num_computed_tokens = 10, 3 new tokens scheduled
    tokens   | 0  1  2  3 | 4  5  6  7 | 8  9  10 11 | 12 .. |
    blocks   |    b5      |    b2      |    b9       |  b0   |
             full, hashed  full, hashed  computing     new block for pos 12

Prefix caching identifies a FULL block by a chained hash,

    hash_i = sha256(hash_{i-1} (32 bytes, or none for block 0) || tokens of block i as
                    little-endian int64), read as a 256-bit int

so equal hashes mean equal tokens in the block and everything before it. The hash is a
name that means the same in every process and every run (Python's `hash()` is salted per
process): routing and disaggregation name blocks by it across processes and machines. A block is registered once all its tokens are computed
(`cache_full_blocks`); a new request with the same leading blocks reuses them
(`get_computed_blocks` + `allocate_slots`) and computes only the rest.

Prefix-cache stats are in TOKENS and counted once per request, at its first successful
allocation (recognised by `request.num_cached_tokens == -1`; the scheduler sets it right
after): queries += the request's num_tokens, hits += tokens served from the cache.
Re-admissions after preemption are not counted; requests that skip the lookup (prefix
caching off, prompt_logprobs asked) are not counted either.
"""

from __future__ import annotations

import hashlib
import sys
from array import array
from collections.abc import Sequence

from tandem.kv_cache.block_pool import BlockPool
from tandem.request import Request


def hash_block_tokens(parent_hash: int | None, tokens: Sequence[int]) -> int:
    """The chained hash of one full block (see the module docstring); stable everywhere."""
    digest = hashlib.sha256(_parent_bytes(parent_hash) + _packed(tokens)).digest()
    return int.from_bytes(digest, "little")


def hash_blocks(parent_hash: int | None, tokens: Sequence[int], block_size: int
                ) -> list[int]:
    """The chained hashes of the full blocks of `tokens` (block 0 chained to parent_hash),
    each equal to hash_block_tokens of that block: the tokens are packed once, so an 8k
    prompt's 512 blocks cost ~1 ms rather than ~10."""
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    data, step = _packed(tokens), 8 * block_size
    parent = _parent_bytes(parent_hash)
    hashes: list[int] = []
    for start in range(0, len(data) - step + 1, step):
        parent = hashlib.sha256(parent + data[start:start + step]).digest()
        hashes.append(int.from_bytes(parent, "little"))
    return hashes


def _parent_bytes(parent_hash: int | None) -> bytes:
    return b"" if parent_hash is None else parent_hash.to_bytes(32, "little")


def _packed(tokens: Sequence[int]) -> memoryview:
    """The tokens as little-endian int64 bytes (int64 on every platform CPython supports)."""
    packed = array("q", tokens)
    if sys.byteorder != "little":
        packed.byteswap()
    return memoryview(packed).cast("B")


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks, enable_prefix_caching)
        self._blocks: dict[str, list[int]] = {}  # request id -> block ids, in position order
        # Chained hashes of the request's full blocks, computed lazily (a prefix of the
        # request's blocks; may run ahead of what is registered).
        self._hashes: dict[str, list[int]] = {}
        # How many of the request's leading blocks `cache_full_blocks` has dealt with
        # (registered, or found already registered to another block).
        self._num_cached_blocks: dict[str, int] = {}
        self.prefix_cache_queries = 0  # cumulative tokens looked up (see module docstring)
        self.prefix_cache_hits = 0  # cumulative tokens served from the cache

    # ---- queries ------------------------------------------------------------------------

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def usage(self) -> float:
        """Fraction of blocks held by live requests (cached-but-free blocks count as free)."""
        return self.pool.num_used_blocks / self.pool.num_blocks

    def block_table(self, request_id: str) -> list[int]:
        """The request's block ids (the live list: copy it before handing it out)."""
        return self._blocks.get(request_id, [])

    def _uses_prefix_cache(self, request: Request) -> bool:
        # prompt_logprobs needs logits at every prompt position, so nothing may be skipped.
        return self.enable_prefix_caching and request.sampling_params.prompt_logprobs is None

    def _block_hash(self, request: Request, index: int) -> int:
        """Chained hash of the request's full block `index`, extending the hash list (the
        missing blocks up to `index` hashed in one pass)."""
        hashes = self._hashes.setdefault(request.request_id, [])
        if len(hashes) <= index:
            bs = self.block_size
            hashes += hash_blocks(hashes[-1] if hashes else None,
                                  request.token_ids(len(hashes) * bs, (index + 1) * bs), bs)
        return hashes[index]

    def get_computed_blocks(self, request: Request) -> tuple[list[int], int]:
        """Longest cached prefix of the request, in full blocks: (block ids, num tokens).

        Only the first num_tokens - 1 tokens are looked up: the last one is always
        computed, because its logits are what the next step samples from. Takes no
        reference: pass the blocks to `allocate_slots` in the same schedule call.
        """
        if not self._uses_prefix_cache(request):
            return [], 0
        hit: list[int] = []
        lookup = (request.num_tokens - 1) // self.block_size
        if lookup:  # all at once: cache_full_blocks registers these same blocks later
            self._block_hash(request, lookup - 1)
        for i in range(lookup):
            block_id = self.pool.get_cached_block(self._block_hash(request, i))
            if block_id is None:
                break
            hit.append(block_id)
        return hit, len(hit) * self.block_size

    # ---- allocation ---------------------------------------------------------------------

    def allocate_slots(self, request: Request, num_new_tokens: int,
                       computed_blocks: Sequence[int] = ()) -> bool:
        """Grow the request's block list to cover num_computed_tokens (plus the hit, for a
        fresh request with `computed_blocks`) + num_new_tokens positions.

        Returns False, changing nothing, when the free list is too short. Does not move
        request.num_computed_tokens: the scheduler does.
        """
        rid = request.request_id
        blocks = self._blocks.get(rid, [])
        if computed_blocks and (blocks or request.num_computed_tokens):
            raise ValueError(f"request {rid}: prefix hit on a request that already has blocks")
        num_tokens = (request.num_computed_tokens + len(computed_blocks) * self.block_size
                      + num_new_tokens)
        num_needed = -(-num_tokens // self.block_size) - len(blocks) - len(computed_blocks)
        if num_needed <= 0 and not computed_blocks and rid in self._blocks:
            return True  # most decode steps: the last block has room
        # A hit block sitting in the free list is about to leave it via touch().
        num_revived = sum(1 for b in computed_blocks if self.pool.is_free(b))
        if num_needed > self.pool.num_free_blocks - num_revived:
            return False
        if rid not in self._blocks:
            if request.num_cached_tokens == -1 and self._uses_prefix_cache(request):
                self.prefix_cache_queries += request.num_tokens
                self.prefix_cache_hits += len(computed_blocks) * self.block_size
            self._blocks[rid] = blocks
            self._num_cached_blocks[rid] = len(computed_blocks)
        # touch first: get_new_blocks must not evict the hit blocks we are about to use.
        self.pool.touch(computed_blocks)
        blocks.extend(computed_blocks)
        if num_needed > 0:
            blocks.extend(self.pool.get_new_blocks(num_needed))
        return True

    def cache_full_blocks(self, request: Request, num_computed: int | None = None) -> None:
        """Register every block now fully computed: covered by `num_computed` tokens whose
        K/V a finished step wrote (default: num_computed_tokens). Incremental: O(newly
        full blocks) per call."""
        rid = request.request_id
        if not self._uses_prefix_cache(request) or rid not in self._blocks:
            return
        blocks = self._blocks[rid]
        # Computed and known: with async scheduling a block may already be scheduled
        # through a token that is still being sampled (its id unknown, so not hashable).
        computed = request.num_computed_tokens if num_computed is None else num_computed
        known = min(computed, request.num_tokens)
        num_full = min(known // self.block_size, len(blocks))
        if num_full > self._num_cached_blocks[rid]:
            self._block_hash(request, num_full - 1)  # the new full blocks in one pass
        for i in range(self._num_cached_blocks[rid], num_full):
            # False when another request registered the same content first: this copy
            # simply stays unregistered and is recycled when freed.
            self.pool.cache_block(blocks[i], self._block_hash(request, i))
        self._num_cached_blocks[rid] = max(self._num_cached_blocks[rid], num_full)

    # ---- KV transfer between engines (disagg/): blocks named by their hashes ------------

    def prompt_block_hashes(self, token_ids: Sequence[int]) -> list[int]:
        """The chained hashes of the full blocks a request with this prompt looks up
        (`get_computed_blocks`: the first len - 1 tokens)."""
        full = (len(token_ids) - 1) // self.block_size * self.block_size
        return hash_blocks(None, token_ids[:full], self.block_size)

    def cached_prefix(self, hashes: Sequence[int]) -> int:
        """How many of the leading `hashes` this pool holds (a transfer skips them)."""
        n = 0
        while n < len(hashes) and self.pool.get_cached_block(hashes[n]) is not None:
            n += 1
        return n

    def is_cached(self, block_hash: int) -> bool:
        return self.pool.get_cached_block(block_hash) is not None

    def pin_cached(self, hashes: Sequence[int]) -> list[int]:
        """The blocks of `hashes`, held (not evictable) until `unpin`; ValueError if one is
        not cached."""
        ids = [self.pool.get_cached_block(h) for h in hashes]
        if any(b is None for b in ids):
            raise ValueError("a block to pin is not in the prefix cache")
        self.pool.touch(ids)
        return ids

    def unpin(self, block_ids: Sequence[int]) -> None:
        self.pool.free_blocks(block_ids)

    def allocate_for_import(self, n: int) -> list[int] | None:
        """n free blocks to receive a transfer into (held), or None if the pool is short."""
        if n > self.pool.num_free_blocks:
            return None
        return self.pool.get_new_blocks(n)

    def commit_import(self, block_ids: Sequence[int], hashes: Sequence[int]) -> None:
        """Filled blocks join the prefix cache under their hashes and are released, so the
        request they came for finds them as a prefix hit."""
        for b, h in zip(block_ids, hashes, strict=True):
            self.pool.cache_block(b, h)
        self.pool.free_blocks(reversed(list(block_ids)))

    def free(self, request: Request) -> None:
        """Release the request's blocks (tail first: evicted before the shared head) and
        forget it. Registered blocks stay findable until evicted. Idempotent."""
        rid = request.request_id
        self.pool.free_blocks(reversed(self._blocks.pop(rid, [])))
        self._hashes.pop(rid, None)
        self._num_cached_blocks.pop(rid, None)

    def reset_prefix_cache(self) -> bool:
        """Drop every cached hash; only possible while no request holds blocks."""
        return self.pool.reset_prefix_cache()
