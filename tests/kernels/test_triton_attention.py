"""Parity of the Triton attention kernels with the PyTorch reference (the spec).

GPU tests: skipped without CUDA, unless TRITON_INTERPRET=1 (Triton's CPU interpreter), which
runs the small cases on CPU in float32/float16 (the interpreter has no bfloat16 dot).
Every case draws fresh random inputs; block tables are shuffled, and every cache slot that
no sequence's context covers holds NaN, so a read past a context shows up in the output.
The reference runs in float32 on the same device on a NaN-free copy of the cache.
"""

from __future__ import annotations

import os
import random

import pytest
import torch

pytest.importorskip("triton")

from tandem.kernels import get_attention_backend, kv_cache_shape, reference  # noqa: E402
from tandem.kernels.triton import (TritonAttentionBackend, decode_attention,  # noqa: E402
                                   prefill_attention, write_kv)
from tests.model_factory import make_attn_metadata  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(DEVICE != "cuda" and not INTERPRET, reason="needs CUDA")]
DTYPES = [torch.float16] if INTERPRET else [torch.bfloat16, torch.float16]
TOL = {torch.bfloat16: 2e-2, torch.float16: 1e-2, torch.float32: 2e-4}
SHORT = 300 if INTERPRET else 3000  # longest context of the random batches
long_case = pytest.mark.skipif(INTERPRET, reason="too slow for the interpreter")


def make_batch(rng: random.Random, seqs: list[tuple[int, int]], block_size: int,
               num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype):
    """seqs: (query_len, seq_len) pairs -> meta, cache, query, key, value on DEVICE.

    The step's key/value are written into their slots; every other slot in a context holds
    random 'earlier' K/V, and slots outside all contexts hold NaN.
    """
    need = [-(-s // block_size) for _, s in seqs]
    num_blocks = sum(need) + 4
    pool = list(range(num_blocks))
    rng.shuffle(pool)
    tables = [[pool.pop() for _ in range(n)] for n in need]
    meta = make_attn_metadata([q for q, _ in seqs], [s for _, s in seqs], tables, block_size,
                              DEVICE)
    shape = kv_cache_shape(num_blocks, block_size, num_kv_heads, head_dim)
    cache = torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)
    flat = cache.view(2, -1, num_kv_heads, head_dim)
    for (_, s_len), table in zip(seqs, tables):
        slots = [table[p // block_size] * block_size + p % block_size for p in range(s_len)]
        idx = torch.tensor(slots, device=DEVICE)
        flat[:, idx] = torch.randn(2, s_len, num_kv_heads, head_dim, device=DEVICE).to(dtype)
    num_tokens = meta.num_tokens
    wide = torch.randn(num_tokens, num_heads + 8, head_dim, device=DEVICE).to(dtype)
    query = wide[:, 4:4 + num_heads]  # a strided view, as a fused QKV projection gives
    key = torch.randn(num_tokens, num_kv_heads, head_dim, device=DEVICE).to(dtype)
    value = torch.randn(num_tokens, num_kv_heads, head_dim, device=DEVICE).to(dtype)
    reference.write_kv(key, value, cache, meta.slot_mapping)
    return meta, cache, query, key, value


def check(out: torch.Tensor, query, cache, meta, scale, dtype) -> None:
    ref = reference.paged_attention(query.float(), torch.nan_to_num(cache).float(), meta, scale)
    assert out.shape == query.shape and out.dtype == query.dtype
    assert torch.isfinite(out).all()
    tol = TOL[dtype]
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)


def run_backend(seqs, *, block_size=16, num_heads=8, num_kv_heads=2, head_dim=64,
                dtype=torch.float16, seed=0, pass_fresh=True):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    meta, cache, query, key, value = make_batch(rng, seqs, block_size, num_heads,
                                                num_kv_heads, head_dim, dtype)
    scale = head_dim ** -0.5
    backend = TritonAttentionBackend()
    out = backend.forward(query, cache, meta, scale, key if pass_fresh else None,
                          value if pass_fresh else None)
    check(out, query, cache, meta, scale, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 4, 8])
def test_decode_batch(dtype, head_dim, group) -> None:
    rng = random.Random(head_dim + group)
    lens = [1, 16, 17, rng.randint(2, SHORT), rng.randint(2, SHORT), SHORT]
    rng.shuffle(lens)
    run_backend([(1, n) for n in lens], block_size=16 if group != 4 else 32,
                num_heads=2 * group, num_kv_heads=2, head_dim=head_dim, dtype=dtype,
                seed=group)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim,group,block_size", [(64, 1, 16), (128, 4, 32),
                                                       (128, 8, 16), (64, 4, 32)])
def test_mixed_batch(dtype, head_dim, group, block_size) -> None:
    rng = random.Random(block_size * group)
    seqs = [(1, rng.randint(1, SHORT)),
            (rng.randint(2, 40), rng.randint(41, SHORT)),  # chunk after a cached prefix
            (rng.randint(2, 200), None),  # a fresh prompt
            (1, rng.randint(1, 60)),
            (block_size + 3, 2 * block_size + 5),  # starts and ends mid-block
            (rng.randint(130, 260), rng.randint(261, SHORT))]  # several query tiles
    seqs = [(q, s if s is not None else q) for q, s in seqs]
    rng.shuffle(seqs)  # decodes anywhere in the batch
    run_backend(seqs, block_size=block_size, num_heads=2 * group, num_kv_heads=2,
                head_dim=head_dim, dtype=dtype, seed=head_dim)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pass_fresh", [True, False])
def test_fresh_prefills(dtype, pass_fresh) -> None:
    """Prompts with nothing cached: k/v read from this step's rows, or from the cache."""
    run_backend([(150, 150), (2, 2), (67, 67), (257, 257)], num_heads=8, num_kv_heads=2,
                head_dim=128, dtype=dtype, block_size=32, pass_fresh=pass_fresh)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim,group", [(64, 4), (128, 4)])
def test_fresh_prefill_tensor_descriptors(dtype, head_dim, group) -> None:
    """Hopper: a fresh batch's tiles fetched through tensor descriptors (TMA) give what the
    pointer loads give, with q/k/v strided views of one fused QKV row and prompts whose
    last tiles run into the next prompt's rows (and, for the last, past every row)."""
    from tandem.kernels.triton.prefill import tma_fits
    rng = random.Random(head_dim)
    torch.manual_seed(head_dim)
    seqs = [(q, q) for q in (131, 2, 300, 64, 257)]
    meta, cache, _, _, _ = make_batch(rng, seqs, 16, 2 * group, 2, head_dim, dtype)
    heads, kv_heads, t = 2 * group, 2, meta.num_tokens
    qkv = torch.randn(t, heads + 2 * kv_heads, head_dim, device=DEVICE).to(dtype)
    query, key, value = qkv[:, :heads], qkv[:, heads:heads + 2], qkv[:, heads + 2:]
    if not tma_fits(query, key, value):
        pytest.skip("tensor descriptors need a Hopper GPU and Triton's TensorDescriptor")
    outs = []
    for tma in (True, False):
        out = torch.full_like(query, float("nan"))
        prefill_attention(query, cache, out, meta.query_start_loc, meta.seq_lens,
                          meta.block_tables, head_dim ** -0.5, max_query_len=300, key=key,
                          value=value, tma=tma)
        outs.append(out)
    torch.testing.assert_close(outs[0], outs[1], atol=2e-3, rtol=0)  # same tiles, same math
    fresh_cache = torch.zeros_like(cache)  # the reference reads K/V from a cache
    reference.write_kv(key, value, fresh_cache, meta.slot_mapping)
    check(outs[0], query, fresh_cache, meta, head_dim ** -0.5, dtype)
    # Prompt 0's last tiles read prompt 1's rows: non-finite K/V there must not reach it
    qkv[131:133, heads:heads + 2] = float("inf")
    qkv[131:133, heads + 2:] = float("nan")
    poisoned = torch.full_like(query, float("nan"))
    prefill_attention(query, cache, poisoned, meta.query_start_loc, meta.seq_lens,
                      meta.block_tables, head_dim ** -0.5, max_query_len=300, key=key,
                      value=value, tma=True)
    others = torch.ones(t, dtype=torch.bool, device=DEVICE)
    others[131:133] = False
    assert torch.equal(poisoned[others], outs[0][others])
    with pytest.raises(ValueError, match="fresh"):  # tma on a paged (non-fresh) batch
        prefill_attention(query, cache, poisoned, meta.query_start_loc, meta.seq_lens,
                          meta.block_tables, head_dim ** -0.5, max_query_len=300, tma=True)


def test_float32() -> None:
    run_backend([(1, 200), (37, 90), (1, 33), (70, 70)], num_heads=4, num_kv_heads=4,
                head_dim=64, dtype=torch.float32)


def test_decode_partition_counts_and_padding_rows() -> None:
    """Any partition count gives the same result (1: direct write, no merge); a seq_len-0
    (padding) row gives zeros, not NaN."""
    rng = random.Random(3)
    meta, cache, query, _, _ = make_batch(rng, [(1, 40), (1, 1000)], 16, 8, 2, 64,
                                          torch.float16)
    padded = torch.tensor([40, 0], dtype=torch.int32, device=DEVICE)
    for num_parts in (1, 3, 8, 40):
        out = torch.full_like(query, float("nan"))
        decode_attention(query, cache, out, meta.query_start_loc, meta.seq_lens,
                         meta.block_tables, 0.125, max_seq_len=1000, num_parts=num_parts)
        check(out, query, cache, meta, 0.125, torch.float16)
        out = torch.full_like(query, float("nan"))
        decode_attention(query, cache, out, meta.query_start_loc, padded, meta.block_tables,
                         0.125, max_seq_len=1000, num_parts=num_parts)
        assert (out[1] == 0).all() and torch.isfinite(out[0]).all()


@pytest.mark.skipif(INTERPRET, reason="counts compiled variants (none in the interpreter)")
@pytest.mark.parametrize("kv", ["bf16", "fp8"])
def test_decode_one_variant_for_any_partition_count(kv) -> None:
    """One partition (direct write) and many (scratch, merge) run the same compiled kernel,
    for either cache dtype: a second variant used to compile mid-run when a long run's mixed
    steps first met one (the scratch's dtype; later, FP8 stages chosen by partition count)."""
    from tandem.kernels.triton.decode import _decode_kernel
    rng = random.Random(5)
    meta, cache, query, _, _ = make_batch(rng, [(1, 300), (1, 70)], 16, 8, 2, 64,
                                          torch.bfloat16)
    if kv == "fp8":  # scale 1: the values are N(0, 1); NaN slots stay NaN
        cache = cache.to(torch.float8_e4m3fn)
    seq_ids = torch.tensor([1, 0], dtype=torch.int32, device=DEVICE)

    def variants() -> int:
        return sum(len(c[0]) for c in _decode_kernel.device_caches.values())

    counts = []
    for num_parts in (4, 1, 2):
        out = torch.full_like(query, float("nan"))
        decode_attention(query, cache, out, meta.query_start_loc, meta.seq_lens,
                         meta.block_tables, 0.125, max_seq_len=300, num_parts=num_parts,
                         seq_ids=seq_ids)
        check(out, query, cache.float(), meta, 0.125, torch.bfloat16)
        counts.append(variants())
    assert counts[0] == counts[1] == counts[2]


@pytest.mark.parametrize("group", [1, 4])
def test_decode_merge_rounds(group) -> None:
    """The last partition merges in rounds of `merge` partitions (loads issued together):
    one partition a round, two, and the default width, over 1-16 partitions of 64 tokens,
    give the reference's result."""
    rng = random.Random(11 + group)
    meta, cache, query, _, _ = make_batch(rng, [(1, 1000), (1, 130), (1, 64), (1, 700)], 16,
                                          2 * group, 2, 64, torch.float16)
    for merge in (1, 2, None):
        out = torch.full_like(query, float("nan"))
        decode_attention(query, cache, out, meta.query_start_loc, meta.seq_lens,
                         meta.block_tables, 0.125, max_seq_len=1000, num_parts=16,
                         min_part=64, merge=merge)
        check(out, query, cache, meta, 0.125, torch.float16)


@pytest.mark.parametrize("config,prefetch", [((64, 64, 4, 2), True), ((64, 32, 4, 2), False),
                                             ((32, 128, 4, 2), True)])
def test_prefill_tiles_and_table_prefetch(config, prefetch) -> None:
    """Other tile shapes, and the block-table prefetch, on chunks after cached prefixes."""
    rng = random.Random(5)
    seqs = [(37, 301), (100, 100), (70, 133)]
    meta, cache, query, _, _ = make_batch(rng, seqs, 16, 8, 2, 64, torch.float16)
    out = torch.full_like(query, float("nan"))
    prefill_attention(query, cache, out, meta.query_start_loc, meta.seq_lens, meta.block_tables,
                      0.125, max_query_len=100, config=config, prefetch_table=prefetch)
    check(out, query, cache, meta, 0.125, torch.float16)
    for dconfig in [(32, 4, 2), (128, 2, 3)]:
        dmeta, cache, query, _, _ = make_batch(rng, [(1, 700), (1, 90)], 32, 8, 2, 64,
                                               torch.float16)
        out = torch.full_like(query, float("nan"))
        decode_attention(query, cache, out, dmeta.query_start_loc, dmeta.seq_lens,
                         dmeta.block_tables, 0.125, max_seq_len=700, config=dconfig)
        check(out, query, cache, dmeta, 0.125, torch.float16)


@long_case
def test_long_decode_32k() -> None:
    run_backend([(1, 32768)], num_heads=32, num_kv_heads=8, head_dim=128,
                dtype=torch.bfloat16, seed=7)


@long_case
def test_long_prefill_8k() -> None:
    """One 8k prompt (fresh rows), then a 1.5k chunk after a 6.5k cached prefix."""
    run_backend([(8192, 8192)], num_heads=32, num_kv_heads=8, head_dim=128,
                dtype=torch.bfloat16, seed=8)
    run_backend([(1500, 8000), (1, 5000)], num_heads=32, num_kv_heads=8, head_dim=128,
                dtype=torch.bfloat16, seed=9)


@pytest.mark.parametrize("dtype", DTYPES + [torch.float32])
def test_write_kv_exact(dtype) -> None:
    torch.manual_seed(0)
    num_blocks, block_size, num_kv_heads, head_dim = 12, 16, 4, 64
    shape = kv_cache_shape(num_blocks, block_size, num_kv_heads, head_dim)
    base = torch.randn(shape, device=DEVICE).to(dtype)
    slots = torch.randperm(num_blocks * block_size, device=DEVICE)[:37]
    kv = torch.randn(37, 3 * num_kv_heads, head_dim, device=DEVICE).to(dtype)
    key, value = kv[:, :num_kv_heads], kv[:, num_kv_heads:2 * num_kv_heads]  # strided views
    expected, got = base.clone(), base.clone()
    reference.write_kv(key, value, expected, slots)
    write_kv(key, value, got, slots)
    assert torch.equal(got, expected)
    skipped = torch.where(torch.arange(37, device=DEVICE) % 3 == 0, -1, slots)
    got = base.clone()
    write_kv(key, value, got, skipped)  # negative slot: padding row, nothing written
    keep = skipped >= 0
    reference.write_kv(key[keep], value[keep], expected := base.clone(), skipped[keep])
    assert torch.equal(got, expected)


def test_cuda_prefers_triton() -> None:
    assert isinstance(get_attention_backend("cuda"), TritonAttentionBackend)
    assert get_attention_backend("triton").name == "triton"


@pytest.mark.parametrize("fp8_query", [True, False], ids=["fp8-qk", "fp16-qk"])
@pytest.mark.parametrize("head_dim,group", [(64, 4), (128, 8)])
def test_fp8_kv_cache_matches_reference(head_dim, group, fp8_query, monkeypatch) -> None:
    """An e4m3 cache with per-layer scales: the Triton write stores the reference's bytes,
    and decode + chunks (cached prefix, fresh prompts: read from the cache, not the rows)
    dequantize as the reference does (slots outside the contexts hold NaN bytes, which
    masked rows must not let in); chunks take Q K^T in e4m3 as the reference rounds Q, or
    (FP8_PREFILL_QUERY off) both keep Q."""
    monkeypatch.setattr(reference.attention, "FP8_PREFILL_QUERY", fp8_query)
    rng = random.Random(head_dim)
    torch.manual_seed(head_dim)
    seqs = [(1, rng.randint(1, SHORT)), (rng.randint(2, 40), rng.randint(41, SHORT)),
            (1, 33), (150, 150), (16, 37)]
    meta, cache, query, key, value = make_batch(rng, seqs, 16, 2 * group, 2, head_dim,
                                                torch.bfloat16)
    kv_scale = (0.011, 0.023)
    q8 = torch.empty(cache.shape, dtype=torch.float8_e4m3fn, device=DEVICE)
    flat = cache.view(2, -1, 2, head_dim)
    q8.view(2, -1, 2, head_dim)[0] = (flat[0].float() / kv_scale[0]).clamp(-448, 448).to(
        torch.float8_e4m3fn)
    q8.view(2, -1, 2, head_dim)[1] = (flat[1].float() / kv_scale[1]).clamp(-448, 448).to(
        torch.float8_e4m3fn)
    ref_cache = q8.clone()
    reference.write_kv(key, value, ref_cache, meta.slot_mapping, kv_scale)
    write_kv(key, value, q8, meta.slot_mapping, kv_scale)
    assert torch.equal(q8.view(torch.uint8), ref_cache.view(torch.uint8))
    scale = head_dim ** -0.5
    out = TritonAttentionBackend().forward(query, q8, meta, scale, key, value, kv_scale)
    ref = reference.paged_attention(query.float(), torch.nan_to_num(q8.float()).to(
        torch.float8_e4m3fn), meta, scale, kv_scale=kv_scale)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)
