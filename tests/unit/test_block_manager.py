"""KVCacheManager: allocation, chained-hash prefix hits, sharing, eviction, stats."""

from __future__ import annotations

from tandem.kv_cache import KVCacheManager
from tandem.request import Request, SamplingParams

BS = 4


def make_request(rid: str, prompt: list[int], **params) -> Request:
    return Request(rid, prompt, SamplingParams(**params))


def compute(kv: KVCacheManager, request: Request, n: int | None = None) -> list[int]:
    """Admit (with prefix lookup) and compute the whole prompt, as the scheduler would."""
    hit, num_hit = kv.get_computed_blocks(request)
    n = request.num_tokens - num_hit if n is None else n
    assert kv.allocate_slots(request, n, hit)
    if request.num_cached_tokens == -1:
        request.num_cached_tokens = num_hit
    request.num_computed_tokens = num_hit + n
    kv.cache_full_blocks(request)
    return hit


def test_allocation_covers_the_tokens():
    kv = KVCacheManager(8, BS, enable_prefix_caching=False)
    r = make_request("a", list(range(9)))
    assert kv.allocate_slots(r, 9)
    assert len(kv.block_table("a")) == 3  # ceil(9 / 4)
    r.num_computed_tokens = 9
    assert kv.allocate_slots(r, 3)  # positions 9..11 still fit in block 2
    assert len(kv.block_table("a")) == 3
    assert kv.allocate_slots(r, 4)
    assert len(kv.block_table("a")) == 4
    assert kv.usage == 4 / 8


def test_shared_prefix_is_reused_and_ref_counted():
    kv = KVCacheManager(16, BS, enable_prefix_caching=True)
    a = make_request("a", list(range(14)))  # 3 full blocks + 2 tokens
    compute(kv, a)
    b = make_request("b", list(range(12)) + [90, 91, 92])  # shares a's first 3 blocks
    hit = compute(kv, b)
    assert hit == kv.block_table("a")[:3] == kv.block_table("b")[:3]
    assert b.num_cached_tokens == 12
    for blk in hit:
        assert kv.pool.ref_cnt[blk] == 2
    assert kv.block_table("a")[3] != kv.block_table("b")[3]
    kv.free(a)  # b still holds the shared blocks: nothing it uses becomes free
    assert all(kv.pool.ref_cnt[blk] == 1 for blk in hit)
    assert not set(kv.block_table("b")) & set(kv.pool.free_block_ids())


def test_full_hit_leaves_the_last_token_to_compute():
    kv = KVCacheManager(8, BS, enable_prefix_caching=True)
    compute(kv, make_request("a", list(range(8))))  # exactly 2 full blocks
    b = make_request("b", list(range(8)))
    hit, num_hit = kv.get_computed_blocks(b)
    assert num_hit == 4 and len(hit) == 1  # only the first 7 tokens are looked up
    c = make_request("c", list(range(9)))
    assert kv.get_computed_blocks(c)[1] == 8


def test_hash_is_chained_so_equal_blocks_after_different_prefixes_miss():
    kv = KVCacheManager(8, BS, enable_prefix_caching=True)
    compute(kv, make_request("a", [1, 2, 3, 4, 5, 6, 7, 8, 0]))
    b = make_request("b", [9, 9, 9, 9, 5, 6, 7, 8, 0])  # block 1 equal, block 0 not
    assert kv.get_computed_blocks(b) == ([], 0)


def test_stats_count_tokens_once_per_request():
    kv = KVCacheManager(16, BS, enable_prefix_caching=True)
    a = make_request("a", list(range(10)))
    compute(kv, a)
    b = make_request("b", list(range(10)))
    compute(kv, b)
    assert (kv.prefix_cache_queries, kv.prefix_cache_hits) == (20, 8)
    # Re-admission after preemption (num_cached_tokens already known) is not counted.
    kv.free(b)
    b.num_computed_tokens = 0
    compute(kv, b)
    assert (kv.prefix_cache_queries, kv.prefix_cache_hits) == (20, 8)


def test_prompt_logprobs_and_disabled_caching_skip_the_lookup():
    kv = KVCacheManager(16, BS, enable_prefix_caching=True)
    compute(kv, make_request("a", list(range(10))))
    b = make_request("b", list(range(10)), prompt_logprobs=1)
    assert kv.get_computed_blocks(b) == ([], 0)
    compute(kv, b)
    assert (kv.prefix_cache_queries, kv.prefix_cache_hits) == (10, 0)
    off = KVCacheManager(16, BS, enable_prefix_caching=False)
    compute(off, make_request("a", list(range(10))))
    assert off.get_computed_blocks(make_request("b", list(range(10)))) == ([], 0)
    assert off.pool.block_hash == [None] * 16


def test_failed_allocation_has_no_side_effects():
    kv = KVCacheManager(4, BS, enable_prefix_caching=True)
    a = make_request("a", list(range(9)))
    compute(kv, a)  # 3 blocks, 2 hashed
    kv.free(a)  # all free; 2 hashed ones at the back
    b = make_request("b", list(range(8)) + list(range(50, 62)))  # 5 blocks, 2 of them hits
    hit, num_hit = kv.get_computed_blocks(b)
    assert num_hit == 8
    free_before = kv.pool.free_block_ids()
    assert not kv.allocate_slots(b, 12, hit)  # 2 revived + 3 new > 4 free
    assert kv.pool.free_block_ids() == free_before
    assert kv.block_table("b") == [] and kv.prefix_cache_queries == 9


def test_revived_hit_blocks_are_not_counted_as_free_twice():
    kv = KVCacheManager(3, BS, enable_prefix_caching=True)
    a = make_request("a", list(range(8)) + [0])
    compute(kv, a)
    kv.free(a)
    b = make_request("b", list(range(8)) + [1, 2, 3, 4, 5])  # 2 hits + 2 new blocks
    hit, _ = kv.get_computed_blocks(b)
    assert len(hit) == 2 and kv.num_free_blocks == 3
    assert not kv.allocate_slots(b, 5, hit)  # 3 free, but 2 of those are the hits
    assert kv.allocate_slots(b, 4, hit)  # 2 hits + 1 new
    assert sorted(kv.block_table("b")) == [0, 1, 2]


def test_lru_eviction_takes_the_tail_first_and_least_recent_first():
    kv = KVCacheManager(6, BS, enable_prefix_caching=True)
    a = make_request("a", list(range(12)) + [0])  # 3 full blocks + 1
    compute(kv, a)
    a_blocks = list(kv.block_table("a"))
    kv.free(a)
    # Needs 3 new blocks: the unhashed one and 2 empty ones first, none of a's cached blocks.
    compute(kv, make_request("x", list(range(100, 111))))
    assert kv.get_computed_blocks(make_request("p", list(range(13))))[1] == 12
    # One more block must evict a's LAST full block, keeping its first two as hits.
    kv.allocate_slots(make_request("y", [7]), 1)
    assert kv.get_computed_blocks(make_request("q", list(range(13)))) == (a_blocks[:2], 8)


def test_concurrently_computed_duplicate_stays_unregistered():
    kv = KVCacheManager(8, BS, enable_prefix_caching=True)
    a, b = make_request("a", list(range(5))), make_request("b", list(range(5)))
    for r in (a, b):  # both admitted before either is cached
        assert kv.allocate_slots(r, 5, kv.get_computed_blocks(r)[0])
        r.num_computed_tokens = 5
    kv.cache_full_blocks(a)
    kv.cache_full_blocks(b)
    a0, b0 = kv.block_table("a")[0], kv.block_table("b")[0]
    assert kv.pool.block_hash[a0] is not None and kv.pool.block_hash[b0] is None
    kv.free(a)
    kv.free(b)
    assert kv.pool.num_free_blocks == 8


def test_cache_full_blocks_registers_generated_tokens_incrementally():
    kv = KVCacheManager(8, BS, enable_prefix_caching=True)
    a = make_request("a", [1, 2, 3])
    compute(kv, a)
    assert all(h is None for h in kv.pool.block_hash)
    for tok in (4, 5):  # decode: the output completes block 0
        a.output_token_ids.append(tok)
        assert kv.allocate_slots(a, 1)
        a.num_computed_tokens += 1
        kv.cache_full_blocks(a)
    b = make_request("b", [1, 2, 3, 4, 5, 6])
    assert kv.get_computed_blocks(b) == ([kv.block_table("a")[0]], 4)


def test_free_is_idempotent_and_reset_needs_idle_pool():
    kv = KVCacheManager(4, BS, enable_prefix_caching=True)
    a = make_request("a", list(range(6)))
    compute(kv, a)
    assert not kv.reset_prefix_cache()
    kv.free(a)
    kv.free(a)
    assert kv.num_free_blocks == 4 and kv.usage == 0.0
    assert kv.reset_prefix_cache()
    assert kv.get_computed_blocks(make_request("b", list(range(6)))) == ([], 0)


def test_bulk_block_hashes_equal_the_chained_definition():
    """hash_blocks (one pass over a prompt) names each block as the module docstring
    defines it: sha256(parent's 32 bytes || the block's tokens as little-endian int64)."""
    import hashlib

    from tandem.kv_cache.block_manager import hash_block_tokens, hash_blocks
    tokens = [(7919 * i) % 151_000 for i in range(4 * 5 + 3)]  # 5 full blocks and a tail
    expected, parent = [], b""
    for b in range(5):
        block = b"".join(t.to_bytes(8, "little") for t in tokens[4 * b:4 * b + 4])
        parent = hashlib.sha256(parent + block).digest()
        expected.append(int.from_bytes(parent, "little"))
    assert hash_blocks(None, tokens, 4) == expected
    assert hash_blocks(expected[1], tokens[8:], 4) == expected[2:]
    assert hash_block_tokens(expected[0], tokens[4:8]) == expected[1]
    kv = KVCacheManager(num_blocks=16, block_size=4, enable_prefix_caching=True)
    assert kv.prompt_block_hashes(tokens[:21]) == expected  # lookups stop before the last token
    assert kv.prompt_block_hashes(tokens[:20]) == expected[:4]


def test_hash_of_an_empty_block_and_bad_block_sizes():
    import hashlib

    import pytest

    from tandem.kv_cache.block_manager import hash_block_tokens, hash_blocks
    assert hash_block_tokens(None, []) == int.from_bytes(hashlib.sha256(b"").digest(), "little")
    assert hash_block_tokens(5, []) == int.from_bytes(
        hashlib.sha256((5).to_bytes(32, "little")).digest(), "little")
    assert hash_blocks(None, [1, 2, 3], 4) == []  # no full block
    for bad in (0, -4):
        with pytest.raises(ValueError, match="block_size"):
            hash_blocks(None, [1, 2, 3, 4], bad)
