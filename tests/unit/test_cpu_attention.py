"""Parity of the CPU backend's C decode kernel with the PyTorch reference (and a naive loop)."""

from __future__ import annotations

import random

import pytest
import torch

from tandem.kernels import get_attention_backend
from tandem.kernels.cpu import CpuAttentionBackend, load_library, paged_decode
from tandem.kernels.reference import paged_attention
from tandem.kernels.reference.attention import decode_batch
from tests.unit.test_reference_attention import naive_attention, random_batch

needs_kernel = pytest.mark.skipif(load_library() is None, reason="no C compiler")


def test_cpu_device_prefers_cpu_backend() -> None:
    assert isinstance(get_attention_backend("cpu"), CpuAttentionBackend)


@needs_kernel
@pytest.mark.parametrize("head_dim", [64, 80, 128])
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("block_size", [1, 16, 32])
def test_decode_kernel_matches_reference(head_dim: int, group: int, block_size: int) -> None:
    rng = random.Random(head_dim * 100 + group * 10 + block_size)
    torch.manual_seed(rng.randrange(1 << 30))
    num_kv_heads = 2
    lens = [1, block_size, block_size + 1] + [rng.randint(1, 700) for _ in range(9)]
    meta, cache = random_batch(rng, [(1, n) for n in lens], block_size, num_kv_heads, head_dim)
    query = torch.randn(len(lens), num_kv_heads * group, head_dim)
    seqs, starts = list(range(len(lens))), list(range(len(lens) + 1))
    want = torch.full_like(query, float("nan"))
    got = torch.full_like(query, float("nan"))
    decode_batch(query, cache, meta, 0.1, seqs, starts, want)
    paged_decode(query, cache, meta, 0.1, seqs, starts, got)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)


@needs_kernel
@pytest.mark.parametrize("threads", [1, 5])
@pytest.mark.parametrize("group", [1, 4, 64])
def test_items_of_many_kv_heads_match_reference(threads: int, group: int) -> None:
    """Whole sequences a work item (tandem_heads_per_item: 2+ sequences a thread) and one
    KV head an item give the reference's result; both shapes run here."""
    lib = load_library()
    rng = random.Random(threads * 1000 + group)
    torch.manual_seed(rng.randrange(1 << 30))
    num_kv_heads = 4
    lens = [rng.randint(1, 300) for _ in range(9)]
    nkh = lib.tandem_heads_per_item(len(lens), num_kv_heads, group, threads)
    assert nkh == (1 if threads == 5 or group == 64 else 4)  # 9 sequences: 2+ a thread at 1
    meta, cache = random_batch(rng, [(1, n) for n in lens], 16, num_kv_heads, 64)
    query = torch.randn(len(lens), num_kv_heads * group, 64)
    seqs, starts = list(range(len(lens))), list(range(len(lens) + 1))
    want = torch.full_like(query, float("nan"))
    got = torch.full_like(query, float("nan"))
    decode_batch(query, cache, meta, 0.1, seqs, starts, want)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)  # the kernel's team: omp_get_max_threads
    try:
        paged_decode(query, cache, meta, 0.1, seqs, starts, got)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)


def test_heads_per_item_rule() -> None:
    lib = load_library()
    if lib is None:
        pytest.skip("no C compiler")
    assert lib.tandem_heads_per_item(3, 2, 4, 2) == 1  # fewer than 2 sequences a thread
    assert lib.tandem_heads_per_item(4, 2, 4, 2) == 2
    assert lib.tandem_heads_per_item(48, 8, 8, 2) == 8  # 64 query heads: all
    assert lib.tandem_heads_per_item(48, 8, 16, 2) == 4  # at most 64 query heads
    assert lib.tandem_heads_per_item(48, 6, 16, 2) == 3  # a divisor of num_kv_heads
    assert lib.tandem_heads_per_item(48, 2, 64, 2) == 1


@needs_kernel
def test_mixed_batch_through_backend_matches_naive() -> None:
    """Decodes interleaved with chunks: only the decodes go to the kernel, at their rows."""
    rng = random.Random(7)
    torch.manual_seed(7)
    seqs = [(1, 37), (5, 40), (1, 1), (3, 3), (1, 300), (2, 19)]
    meta, cache = random_batch(rng, seqs, 16, 2, 64)
    query = torch.randn(sum(q for q, _ in seqs), 8, 64)
    got = CpuAttentionBackend().forward(query, cache, meta, 0.125)
    torch.testing.assert_close(got.double(), naive_attention(query, cache, meta, 0.125),
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got, paged_attention(query, cache, meta, 0.125),
                               atol=2e-5, rtol=1e-5)


def test_unsupported_dtype_falls_back_to_reference() -> None:
    rng = random.Random(3)
    meta, cache = random_batch(rng, [(1, 50), (1, 9)], 16, 2, 64, dtype=torch.bfloat16)
    query = torch.randn(2, 4, 64, dtype=torch.bfloat16)
    got = torch.empty_like(query)
    want = torch.empty_like(query)
    paged_decode(query, cache, meta, 0.125, [0, 1], [0, 1, 2], got)
    decode_batch(query, cache, meta, 0.125, [0, 1], [0, 1, 2], want)
    assert torch.equal(got, want)
