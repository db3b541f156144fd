"""Decode attention that rotates its own query and writes the step's K/V (decode.NewTokens,
`TritonAttentionBackend.rotary_decode`) against the two launches it replaces:
rotary_write_kv, then decode attention. The same kernels' rounding, so on the GPU the
output and the cache are equal to the bit (without Qwen3's q/k norms, whose per-head sums
may reduce in another order: then within tolerance), and against the reference ops.
GPU, or TRITON_INTERPRET=1 on CPU (float32/float16)."""

from __future__ import annotations

import dataclasses
import os
import random

import pytest
import torch

pytest.importorskip("triton")

from tandem.kernels import kv_cache_shape, reference  # noqa: E402
from tandem.kernels.triton import TritonAttentionBackend  # noqa: E402
from tandem.kernels.triton.decode import NewTokens, decode_attention  # noqa: E402
from tandem.kernels.triton.kv_write import rotary_write_kv  # noqa: E402
from tests.model_factory import make_attn_metadata  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(DEVICE != "cuda" and not INTERPRET, reason="needs CUDA")]
DTYPES = [torch.float16] if INTERPRET else [torch.bfloat16, torch.float16]
TOL = {torch.bfloat16: 2e-2, torch.float16: 1e-2}
FP8 = torch.float8_e4m3fn


def _tables(d: int, max_pos: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    emb = torch.cat([torch.outer(torch.arange(max_pos, dtype=torch.float32), inv)] * 2, -1)
    return emb.cos().to(DEVICE), emb.sin().to(DEVICE)


def _step(seq_lens: list[int], h: int, hkv: int, d: int, dtype: torch.dtype, cache_dtype,
          norm: bool, seed: int, block_size: int = 16):
    """A decode step: one new token per sequence at position len - 1, its q/k/v strided
    views of one QKV output; the cache holds every earlier position (NaN elsewhere, so a
    read of a slot nobody wrote shows)."""
    rng = random.Random(seed)
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    need = [-(-s // block_size) for s in seq_lens]
    num_blocks = sum(need) + 2
    pool = list(range(num_blocks))
    rng.shuffle(pool)
    tables = [[pool.pop() for _ in range(n)] for n in need]
    meta = make_attn_metadata([1] * len(seq_lens), seq_lens, tables, block_size, DEVICE)
    meta = dataclasses.replace(meta, decode_rows_distinct=True)
    cache = torch.full(kv_cache_shape(num_blocks, block_size, hkv, d), float("nan"),
                       device=DEVICE)
    flat = cache.view(2, -1, hkv, d)
    for s_len, table in zip(seq_lens, tables):
        slots = torch.tensor([table[p // block_size] * block_size + p % block_size
                              for p in range(s_len - 1)], device=DEVICE, dtype=torch.long)
        flat[:, slots] = torch.randn(2, s_len - 1, hkv, d, device=DEVICE, generator=g)
    kv_scale = (1.0, 1.0)
    if cache_dtype == FP8:
        kv_scale = (0.02, 0.03)
        cache[0] /= kv_scale[0]
        cache[1] /= kv_scale[1]
    cache = cache.to(cache_dtype)
    t = len(seq_lens)
    qkv = (torch.randn(t, (h + 2 * hkv) * d, device=DEVICE, generator=g)).to(dtype)
    positions = torch.tensor([s - 1 for s in seq_lens], device=DEVICE)
    weights = None
    if norm:
        weights = tuple((1 + 0.2 * torch.randn(d, device=DEVICE, generator=g)).to(dtype)
                        for _ in range(2))
    return meta, cache, qkv, positions, kv_scale, weights


def _views(qkv, h, hkv, d):
    t = qkv.shape[0]
    return (qkv[:, :h * d].view(t, h, d), qkv[:, h * d:(h + hkv) * d].view(t, hkv, d),
            qkv[:, (h + hkv) * d:].view(t, hkv, d))


CASES = [  # seq_lens, heads, kv heads, head dim
    ([300, 1, 17, 129], 8, 2, 64),  # several partitions; a one-token sequence
    ([5, 64, 33], 6, 3, 32),
    ([200], 32, 8, 128),
    ([1, 130, 257, 16], 4, 4, 64),  # no GQA; the last position opening a new block
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_equals_rotary_write_then_decode(dtype, norm, fp8, case) -> None:
    seq_lens, h, hkv, d = CASES[case]
    if fp8 and INTERPRET:
        pytest.skip("the interpreter has no e4m3")
    meta, cache, qkv, positions, kv_scale, weights = _step(
        seq_lens, h, hkv, d, dtype, FP8 if fp8 else dtype, norm, seed=case * 4 + norm)
    cos, sin = _tables(d)
    qw, kw = weights or (None, None)
    scale = d ** -0.5

    # the two launches it replaces
    split_cache, split_qkv = cache.clone(), qkv.clone()
    q, k, v = _views(split_qkv, h, hkv, d)
    rotary_write_kv(positions, q, k, v, cos, sin, split_cache, meta.slot_mapping, kv_scale,
                    qw, kw, 1e-6)
    split_out = torch.empty_like(q)
    decode_attention(q, split_cache, split_out, meta.query_start_loc, meta.seq_lens,
                     meta.block_tables, scale, max_seq_len=max(seq_lens), kv_scale=kv_scale)

    fused_cache, fused_qkv = cache.clone(), qkv.clone()
    q, k, v = _views(fused_qkv, h, hkv, d)
    fused_out = torch.empty_like(q)
    decode_attention(q, fused_cache, fused_out, meta.query_start_loc, meta.seq_lens,
                     meta.block_tables, scale, max_seq_len=max(seq_lens), kv_scale=kv_scale,
                     new=NewTokens(positions, k, v, meta.slot_mapping, cos, sin, qw, kw, 1e-6))
    assert torch.equal(fused_qkv, qkv)  # read only: q and k are rotated in registers
    assert torch.isfinite(fused_out).all()
    if norm:
        tol = TOL[dtype]
        torch.testing.assert_close(fused_out.float(), split_out.float(), atol=tol, rtol=tol)
        torch.testing.assert_close(fused_cache.float().nan_to_num(),
                                   split_cache.float().nan_to_num(), atol=tol, rtol=tol)
        assert torch.equal(fused_cache.float().isnan(), split_cache.float().isnan())
    else:
        assert torch.equal(fused_cache.view(torch.uint8), split_cache.view(torch.uint8))
        assert torch.equal(fused_out, split_out)

    # and the reference ops: norms, rotary, write, attention
    ref_cache, ref_qkv = cache.clone(), qkv.clone()
    q, k, v = _views(ref_qkv, h, hkv, d)
    q, k = reference.rotary_write_kv(positions, q, k, v, cos, sin, ref_cache,
                                     meta.slot_mapping, kv_scale, qw, kw, 1e-6)
    # (the reference reads whole blocks: no NaN in the slots past a context)
    deq = ref_cache.float()
    if fp8:
        deq[0] *= kv_scale[0]
        deq[1] *= kv_scale[1]
    ref = reference.paged_attention(q.float(), torch.nan_to_num(deq), meta, scale)
    tol = 4 * TOL[dtype] if fp8 else TOL[dtype]
    torch.testing.assert_close(fused_out.float(), ref.float(), atol=tol, rtol=tol)


def test_backend_declines_what_it_cannot_fuse() -> None:
    """Rows of one sequence (a verify step), prompts and tiny heads go the two-launch way."""
    seq_lens, h, hkv, d = [40, 41], 4, 2, 64
    meta, cache, qkv, positions, kv_scale, _ = _step(seq_lens, h, hkv, d, torch.float16,
                                                     torch.float16, False, seed=7)
    cos, sin = _tables(d)
    q, k, v = _views(qkv, h, hkv, d)
    backend = TritonAttentionBackend()
    args = (positions, q, k, v, cos, sin, cache)
    rest = (d ** -0.5, kv_scale, None, None, 1e-6)
    assert backend.rotary_decode(*args, meta, *rest) is not None
    verify = dataclasses.replace(meta, decode_rows_distinct=False)
    assert backend.rotary_decode(*args, verify, *rest) is None
    prompt = dataclasses.replace(meta, max_query_len=2)
    assert backend.rotary_decode(*args, prompt, *rest) is None


@pytest.mark.skipif(DEVICE != "cuda", reason="the engine on CUDA")
@pytest.mark.parametrize("arch,kw", [("LlamaForCausalLM", {}),
                                     ("Qwen3ForCausalLM", dict(head_dim=64))])
def test_engine_decodes_alike_either_way(tmp_path, monkeypatch, arch, kw):
    """Greedy decoding of a batch (up to 4 sequences a step) through the engine's CUDA
    graphs, and eagerly, with rotary and the K/V write inside the decode launch and launched
    apart (TANDEM_DECODE_ROTARY=0): the same tokens; the same logprobs too where no
    per-head norm can round otherwise (Llama)."""
    import gc

    from tandem import LLM, SamplingParams
    from tests.model_factory import make_tiny_model
    path = make_tiny_model(tmp_path, arch, hidden_size=256, num_heads=4, num_kv_heads=2,
                           intermediate_size=512, num_layers=3, **kw)
    prompts = [[(7 * i + 3 * j) % 500 + 1 for i in range(5 + 9 * j)] for j in range(6)]
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, logprobs=2)
    outs = {}
    for fused in ("1", "0"):
        for eager in (False, True):
            monkeypatch.setenv("TANDEM_DECODE_ROTARY", fused)
            llm = LLM(path, dtype="bfloat16", max_model_len=256, max_num_seqs=4,
                      enforce_eager=eager)
            graphs = llm.engine.runner.graphs
            assert (graphs is None) == eager and (eager or not graphs.verify_rows)
            outs[fused, eager] = [(o.outputs[0].token_ids, o.outputs[0].logprobs)
                                  for o in llm.generate(prompts, params, use_tqdm=False)]
            del llm, graphs
            gc.collect()
            torch.cuda.empty_cache()
    for eager in (False, True):
        got, apart = outs["1", eager], outs["0", eager]
        if arch == "LlamaForCausalLM":
            assert got == apart, eager
        else:
            same = sum(a[0] == b[0] for a, b in zip(got, apart))
            assert same >= len(prompts) - 1, (eager, got, apart)
