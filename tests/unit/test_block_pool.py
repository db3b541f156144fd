"""BlockPool: ref counts, free-list (eviction) order, the hash map of the prefix cache."""

from __future__ import annotations

import pytest

from tandem.kv_cache import BlockPool


def test_new_blocks_come_from_the_front_with_ref_one():
    pool = BlockPool(4, enable_caching=True)
    assert pool.get_new_blocks(3) == [0, 1, 2]
    assert [pool.ref_cnt[b] for b in range(4)] == [1, 1, 1, 0]
    assert (pool.num_used_blocks, pool.num_free_blocks) == (3, 1)
    with pytest.raises(ValueError):
        pool.get_new_blocks(2)
    assert pool.num_free_blocks == 1  # a failed request takes nothing


def test_free_appends_hashed_blocks_and_prepends_unhashed_ones():
    pool = BlockPool(5, enable_caching=True)
    blocks = pool.get_new_blocks(4)  # [0, 1, 2, 3]; free list [4]
    pool.cache_block(0, 100)
    pool.cache_block(1, 101)
    pool.free_blocks(reversed(blocks))  # the request's tail first
    # Unhashed 3, 2 are worthless: reused first. Hashed 1 then 0: the tail is evicted first.
    assert pool.free_block_ids() == [2, 3, 4, 1, 0]
    assert pool.num_used_blocks == 0


def test_freed_hashed_block_stays_findable_until_reallocated():
    pool = BlockPool(2, enable_caching=True)
    (b,) = pool.get_new_blocks(1)
    assert pool.cache_block(b, 42)
    pool.free_blocks([b])
    assert pool.get_cached_block(42) == b  # free but still a hit
    pool.get_new_blocks(1)  # the unhashed block 1 goes first
    assert pool.get_cached_block(42) == b
    assert pool.get_new_blocks(1) == [b]  # eviction drops the hash
    assert pool.get_cached_block(42) is None
    assert pool.block_hash[b] is None


def test_touch_revives_a_free_cached_block_and_shares_a_used_one():
    pool = BlockPool(3, enable_caching=True)
    (b,) = pool.get_new_blocks(1)
    pool.cache_block(b, 7)
    pool.touch([b])  # second user
    assert pool.ref_cnt[b] == 2
    pool.free_blocks([b])
    assert pool.ref_cnt[b] == 1 and b not in pool.free_block_ids()
    pool.free_blocks([b])
    assert b in pool.free_block_ids()
    pool.touch([b])  # a prefix hit on a free block takes it off the free list
    assert pool.ref_cnt[b] == 1 and b not in pool.free_block_ids()
    assert pool.num_free_blocks == 2


def test_cache_block_keeps_the_first_block_for_a_hash():
    pool = BlockPool(3, enable_caching=True)
    a, b = pool.get_new_blocks(2)
    assert pool.cache_block(a, 5)
    assert not pool.cache_block(b, 5)  # computed concurrently: b stays unregistered
    assert not pool.cache_block(a, 6)  # a block has one hash
    assert pool.get_cached_block(5) == a and pool.block_hash[b] is None


def test_caching_disabled_registers_nothing():
    pool = BlockPool(2, enable_caching=False)
    (b,) = pool.get_new_blocks(1)
    assert not pool.cache_block(b, 1)
    assert pool.get_cached_block(1) is None


def test_double_free_raises():
    pool = BlockPool(2, enable_caching=True)
    (b,) = pool.get_new_blocks(1)
    pool.free_blocks([b])
    with pytest.raises(ValueError):
        pool.free_blocks([b])


def test_reset_prefix_cache_only_when_idle():
    pool = BlockPool(2, enable_caching=True)
    (b,) = pool.get_new_blocks(1)
    pool.cache_block(b, 9)
    assert not pool.reset_prefix_cache()
    pool.free_blocks([b])
    assert pool.reset_prefix_cache()
    assert pool.get_cached_block(9) is None and pool.block_hash[b] is None
