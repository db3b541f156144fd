"""The shared-memory connector's publication rule (a receiver never reads a half-written
payload) and the merge of several engines' stats (the disaggregated server's /metrics)."""

from __future__ import annotations

import os
import uuid

import torch

from tandem.disagg.connector import KVPayload, SharedMemoryConnector
from tandem.engine.stats import EngineStats, merge_stats


def _poke(path: str, value: int) -> None:
    with open(path, "r+b") as f:
        f.write(bytes([value]))


def test_a_payload_not_yet_ready_is_left_for_the_next_poll(tmp_path):
    c = SharedMemoryConnector(uuid.uuid4().hex, str(tmp_path))
    layers = [torch.arange(2 * 3 * 4 * 2 * 8, dtype=torch.float32).reshape(2, 3, 4, 2, 8),
              torch.ones(2, 3, 4, 2, 8, dtype=torch.bfloat16)]
    c.send(KVPayload("r1", [11, 22, 2**255 + 3], layers))
    path = c._path("r1")
    _poke(path, 0)  # as while the sender is still writing
    assert c.recv("r1") is None and os.path.exists(path)
    _poke(path, 1)
    got = c.recv("r1")
    assert got is not None and got.hashes == [11, 22, 2**255 + 3]
    assert all(torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(got.layers, layers))
    assert not os.path.exists(path) and c.recv("r1") is None  # received once, then gone
    c.send(KVPayload("r1", [5], [layers[0][:, :1]]))  # the id can be sent again
    assert c.recv("r1").hashes == [5]


def test_a_file_being_created_is_not_read(tmp_path):
    c = SharedMemoryConnector(uuid.uuid4().hex, str(tmp_path))
    path = c._path("r2")
    open(path, "wb").close()  # created, not yet sized
    assert c.recv("r2") is None
    with open(path, "wb") as f:
        f.truncate(64)  # sized, ready byte still 0
    assert c.recv("r2") is None
    c.discard("r2")
    assert not os.path.exists(path)


def _stats(running: int, used: int, total: int, gen: int, per_pos: tuple) -> EngineStats:
    return EngineStats(step=1, num_prefill_tokens=0, num_decode_tokens=running,
                       num_running=running, num_waiting=1, num_kv_blocks_used=used,
                       num_kv_blocks_total=total, kv_cache_usage=used / total,
                       prefix_cache_queries=10, prefix_cache_hits=4, num_preemptions=0,
                       prompt_tokens_total=100, generation_tokens_total=gen,
                       spec_accepted_per_position=per_pos)


def test_merged_stats_add_up_and_usage_is_over_all_blocks():
    m = merge_stats([_stats(2, 10, 100, 7, (3,)), _stats(5, 90, 100, 1, (1, 2))])
    assert (m.num_running, m.num_waiting, m.generation_tokens_total) == (7, 2, 8)
    assert m.kv_cache_usage == 0.5 and m.prefix_cache_hit_rate == 0.4
    assert m.spec_accepted_per_position == (4, 2)
