"""Parity of the reference paged attention with a naive per-token loop, and write_kv."""

from __future__ import annotations

import random

import pytest
import torch

from tandem.kernels import (AttentionBackend, TorchReferenceBackend, get_attention_backend,
                            kv_cache_shape)
from tandem.kernels.reference import paged_attention, write_kv
from tests.model_factory import make_attn_metadata


def naive_attention(query, kv_cache, meta, scale):
    """One query row at a time: gather its visible positions slot by slot, softmax, sum."""
    block_size, num_kv_heads = kv_cache.shape[2], kv_cache.shape[3]
    group = query.shape[1] // num_kv_heads
    out = torch.zeros(query.shape, dtype=torch.float64)
    row = 0
    for i, (q_len, s_len) in enumerate(zip(meta.query_lens_cpu, meta.seq_lens_cpu)):
        table = meta.block_tables[i].tolist()
        for j in range(q_len):
            pos = s_len - q_len + j
            blocks = [table[p // block_size] for p in range(pos + 1)]
            offsets = [p % block_size for p in range(pos + 1)]
            k = kv_cache[0][blocks, offsets].double()  # (pos+1, Hkv, D)
            v = kv_cache[1][blocks, offsets].double()
            for h in range(query.shape[1]):
                scores = k[:, h // group] @ query[row, h].double() * scale
                out[row, h] = torch.softmax(scores, 0) @ v[:, h // group]
            row += 1
    return out


def random_batch(rng: random.Random, seqs: list[tuple[int, int]], block_size: int,
                 num_kv_heads: int, head_dim: int, dtype=torch.float32):
    """seqs: (query_len, seq_len) pairs. Blocks are handed out from a shuffled pool."""
    need = [-(-s_len // block_size) for _, s_len in seqs]
    pool = list(range(sum(need) + 3))
    rng.shuffle(pool)
    tables = [[pool.pop() for _ in range(n)] for n in need]
    meta = make_attn_metadata([q for q, _ in seqs], [s for _, s in seqs], tables, block_size)
    cache = torch.randn(kv_cache_shape(sum(need) + 3, block_size, num_kv_heads, head_dim),
                        dtype=dtype)  # stands in for K/V cached by earlier steps
    return meta, cache


DEVICES = ["cpu"] + [pytest.param("cuda", marks=pytest.mark.gpu)] * torch.cuda.is_available()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("head_dim", [32, 64, 128])
@pytest.mark.parametrize("group", [1, 4, 8])
def test_mixed_batch_matches_naive(head_dim: int, group: int, device: str) -> None:
    rng = random.Random(head_dim * 10 + group)
    torch.manual_seed(head_dim + group)
    num_kv_heads, block_size = 2, rng.choice([4, 8, 16])
    seqs = [(1, rng.randint(1, 40)), (rng.randint(2, 13), rng.randint(14, 50)),  # chunk mid-block
            (1, rng.randint(1, 40)), (rng.randint(2, 9), None), (1, 1)]
    seqs = [(q, s if s is not None else q) for q, s in seqs]  # a fresh prefill
    meta, cache = random_batch(rng, seqs, block_size, num_kv_heads, head_dim)
    num_tokens = meta.num_tokens
    query = torch.randn(num_tokens, num_kv_heads * group, head_dim)
    key = torch.randn(num_tokens, num_kv_heads, head_dim)
    value = torch.randn(num_tokens, num_kv_heads, head_dim)
    write_kv(key, value, cache, meta.slot_mapping)
    expected = naive_attention(query, cache, meta, head_dim ** -0.5)
    meta_dev = make_attn_metadata(meta.query_lens_cpu, meta.seq_lens_cpu,
                                  meta.block_tables.tolist(), block_size, device)
    out = paged_attention(query.to(device), cache.to(device), meta_dev, head_dim ** -0.5)
    assert out.shape == query.shape and out.device.type == device
    torch.testing.assert_close(out.double().cpu(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("seqs", [
    [(1, 5), (1, 17), (1, 1), (1, 33)],  # decodes only
    [(7, 7)],  # one prefill from scratch
    [(5, 21), (3, 3)],  # chunked prefill starting mid-block, plus a fresh one
    [(16, 32), (8, 8), (1, 9)],  # chunk exactly one block, aligned
])
def test_batch_shapes(seqs: list[tuple[int, int]]) -> None:
    rng = random.Random(0)
    meta, cache = random_batch(rng, seqs, 8, 1, 64)  # MQA
    query = torch.randn(meta.num_tokens, 4, 64)
    out = paged_attention(query, cache, meta, 0.125)
    torch.testing.assert_close(out.double(), naive_attention(query, cache, meta, 0.125),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_close_to_naive(dtype: torch.dtype) -> None:
    rng = random.Random(1)
    meta, cache = random_batch(rng, [(1, 30), (6, 20), (4, 4)], 4, 2, 64, dtype=dtype)
    query = torch.randn(meta.num_tokens, 8, 64, dtype=dtype)
    out = paged_attention(query, cache, meta, 0.125)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), naive_attention(query, cache, meta, 0.125),
                               atol=2e-2, rtol=2e-2)


def test_write_kv_scatters_to_slots() -> None:
    cache = torch.zeros(kv_cache_shape(4, 4, 2, 8))
    key, value = torch.randn(3, 2, 8), torch.randn(3, 2, 8)
    slots = torch.tensor([13, 2, 7])  # block 3 offset 1, block 0 offset 2, block 1 offset 3
    write_kv(key, value, cache, slots)
    torch.testing.assert_close(cache[0, 3, 1], key[0])
    torch.testing.assert_close(cache[1, 0, 2], value[1])
    torch.testing.assert_close(cache[0, 1, 3], key[2])
    assert cache.abs().sum(dim=(-1, -2)).count_nonzero() == 6  # 3 K rows + 3 V rows, no others


def test_backend_dispatch() -> None:
    backend = get_attention_backend("torch")
    assert isinstance(backend, TorchReferenceBackend) and isinstance(backend, AttentionBackend)
    for arg in ("cpu", torch.device("cpu")):  # the reference with the C decode kernel
        backend = get_attention_backend(arg)
        assert backend.name == "cpu" and isinstance(backend, AttentionBackend)
    try:  # CUDA prefers the Triton backend where triton imports, else the reference
        import triton  # noqa: F401
        expected = "triton"
    except ImportError:
        expected = "torch"
    assert get_attention_backend("cuda:0").name == expected
    with pytest.raises(ValueError, match="unknown attention backend"):
        get_attention_backend("no-such-backend")


def test_e4m3_rows_scales_each_row_to_its_own_amax() -> None:
    from tandem.kernels.reference.attention import e4m3_rows
    torch.manual_seed(0)
    q = torch.randn(6, 4, 64) * torch.tensor([1e-3, 1.0, 30.0, 1e3]).view(1, 4, 1)
    q[0, 0] = 0.0  # an all-zero row stays zero (no 0/0)
    r = e4m3_rows(q)
    assert r.dtype == q.dtype and torch.equal(r[0, 0], torch.zeros(64))
    amax = q.abs().amax(-1)
    torch.testing.assert_close(r.abs().amax(-1), amax, rtol=1e-6, atol=0)  # 448 is exact
    # 3 mantissa bits: within 2^-4 of each value, relative to its row's amax (values below
    # the e4m3 normal range, 2^-6 of 448 / amax, lose more but stay within that bound)
    assert ((r - q).abs() <= amax[..., None] * 2.0 ** -4).all()
    assert (r - q).abs().max() > 0  # it does round


def test_fp8_cache_prefill_rounds_query_rows_decodes_do_not() -> None:
    """Over an FP8 cache the reference's chunks (prefill) attend with Q rounded to e4m3 a
    row at a time, as the Triton FP8 prefill kernel computes; decode rows keep Q."""
    from tandem.kernels.reference.attention import e4m3_rows
    rng = random.Random(3)
    torch.manual_seed(3)
    seqs = [(1, 23), (9, 30), (12, 12)]
    meta, cache = random_batch(rng, seqs, 8, 2, 64)
    kv_scale = (0.5, 0.25)
    cache8 = torch.empty(cache.shape, dtype=torch.float8_e4m3fn)
    cache8[0], cache8[1] = (cache[0] / kv_scale[0]).to(cache8.dtype), \
        (cache[1] / kv_scale[1]).to(cache8.dtype)
    deq = torch.stack([cache8[0].float() * kv_scale[0], cache8[1].float() * kv_scale[1]])
    query = torch.randn(meta.num_tokens, 8, 64)
    out = paged_attention(query, cache8, meta, 0.125, kv_scale=kv_scale)
    decode_rows, chunk_rows = slice(0, 1), slice(1, meta.num_tokens)
    exact = naive_attention(query, deq, meta, 0.125)
    rounded = naive_attention(e4m3_rows(query), deq, meta, 0.125)
    torch.testing.assert_close(out[decode_rows].double(), exact[decode_rows],
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[chunk_rows].double(), rounded[chunk_rows],
                               atol=1e-5, rtol=1e-5)
    assert (out[chunk_rows].double() - exact[chunk_rows]).abs().max() > 1e-4
