"""The quantized matmuls on CUDA against their PyTorch references (kernels/reference/quant.py):
int8 and int4 (symmetric and asymmetric) weight-only GEMV and GEMM over decode and prefill
shapes, the per-token FP8 quantizer, FP8 W8A8 through torch._scaled_mm, the FP8 decode GEMVs
(tensor-core fp8_dot_gemv: rows, shapes off the blocks, configs, split-K in CUDA graphs; and
the cast kernel), and a quantized model on CUDA (CUDA graphs, async scheduling) against the
same model on the CPU reference."""

from __future__ import annotations

import pytest
import torch

from tandem.kernels import ops
from tandem.kernels.reference import quant

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

SHAPES = [(1, 512, 512), (1, 4096, 4096), (3, 1536, 512), (8, 6144, 4096), (9, 512, 1024),
          (33, 4096, 512), (200, 1024, 4096), (1, 14336, 4096), (2, 4096, 14336)]


@pytest.mark.parametrize("m,n,k", SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_int8_weight_only_matches_reference(m, n, k, dtype):
    g = torch.Generator(device="cuda").manual_seed(m * n + k)
    w = torch.randn(n, k, device="cuda", generator=g)
    q, s = quant.quantize_int8(w)
    x = torch.randn(m, k, device="cuda", dtype=dtype, generator=g)
    bias = torch.randn(n, device="cuda", dtype=dtype, generator=g)
    ref = quant.int8_linear(x.float(), q, s, bias.float())
    out = ops.int8_linear(x, q, s, bias)
    assert out.dtype == dtype and out.shape == (m, n)
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())


@pytest.mark.parametrize("m,n,k", SHAPES)
@pytest.mark.parametrize("symmetric", [True, False])
def test_int4_weight_only_matches_reference(m, n, k, symmetric):
    g = torch.Generator(device="cuda").manual_seed(m + n * k)
    w = torch.randn(n, k, device="cuda", generator=g)
    packed, s, z = quant.quantize_int4(w, 128, symmetric)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=g)
    ref = quant.int4_linear(x.float(), packed, s, z, 128)
    out = ops.int4_linear(x, packed, s, z, 128)
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())


def test_fp8_per_token_quantizer_and_scaled_mm():
    from tandem.kernels.triton.quant_gemm import quantize_fp8_per_token
    g = torch.Generator(device="cuda").manual_seed(3)
    for m, k in [(1, 4096), (7, 512), (300, 14336)]:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=g)
        q, s = quantize_fp8_per_token(x)
        rq, rs = quant.quantize_fp8(x)
        torch.testing.assert_close(s, rs)
        assert (q.float() - rq.float()).abs().max() <= rq.float().abs().max() * 2**-3
    w = torch.randn(1024, 512, device="cuda", generator=g)
    wq, ws = quant.quantize_fp8(w)
    for m in (1, 16, 129):
        x = torch.randn(m, 512, device="cuda", dtype=torch.bfloat16, generator=g)
        ref = quant.fp8_linear(x.float(), wq, ws)
        out = ops.fp8_linear(x, wq, ws)
        torch.testing.assert_close(out.float(), ref, rtol=3e-2, atol=3e-2 * ref.abs().max().item())


@pytest.mark.parametrize("m,n,k", [s for s in SHAPES if s[0] <= 8 and s[2] % 512 == 0])
@pytest.mark.parametrize("decode", ["dot", "cast"])
def test_fp8_gemv_quantizes_x_in_kernel(m, n, k, decode, monkeypatch):
    """The decode GEMV (either kernel) quantizes x per row itself: bit-identical to quantizing
    first with _fp8_rows_kernel, and close to the reference W8A8 linear."""
    from tandem.kernels.triton import quant_gemm
    from tandem.kernels.triton.quant_gemm import fp8_gemv, quantize_fp8_per_token
    monkeypatch.setattr(quant_gemm, "FP8_DECODE", decode)
    g = torch.Generator(device="cuda").manual_seed(n + k + m)
    wq, ws = quant.quantize_fp8(torch.randn(n, k, device="cuda", generator=g))
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=g) * 3
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16, generator=g)
    fused = fp8_gemv(x, None, wq, ws, bias, torch.bfloat16, quantize_x=True)
    xq, xs = quantize_fp8_per_token(x)
    assert torch.equal(fused, fp8_gemv(xq, xs, wq, ws, bias, torch.bfloat16))
    ref = quant.fp8_linear(x.float(), wq, ws, bias.float())
    torch.testing.assert_close(ops.fp8_linear(x, wq, ws, bias).float(), ref, rtol=3e-2,
                               atol=3e-2 * ref.abs().max().item())


def _fp8_case(m: int, n: int, k: int, dtype: torch.dtype, bias: bool, seed: int = 0):
    """x (m, k) dtype, e4m3 weights (n, k) with their scales, an optional bias."""
    g = torch.Generator(device="cuda").manual_seed(seed or m * 7919 + n * 31 + k)
    wq, ws = quant.quantize_fp8(torch.randn(n, k, device="cuda", generator=g))
    x = (torch.randn(m, k, device="cuda", generator=g) * 3).to(dtype)
    b = torch.randn(n, device="cuda", generator=g).to(dtype) if bias else None
    return x, wq, ws, b


def _check_fp8_dot(x, wq, ws, b, config=None):
    """fp8_dot_gemv three ways: (1) on x quantized by the reference, against the reference's
    own product of the same e4m3 values (only the sums and the output rounding differ);
    (2) quantizing x in the kernel: bit-identical to quantize_fp8_per_token then (1)'s kernel;
    (3) that against the reference W8A8 linear (x's e4m3 rounding may differ by a step where
    x / scale is an exact tie: the kernels multiply by the reciprocal)."""
    from tandem.kernels.triton.fp8_gemv import fp8_dot_gemv
    from tandem.kernels.triton.quant_gemm import quantize_fp8_per_token
    m, n, dtype = x.shape[0], wq.shape[0], x.dtype
    bf = b.float() if b is not None else 0.0
    xq, xs = quant.quantize_fp8(x.float())
    exact = (xq.double() @ wq.double().t()) * xs[:, None].double() * ws[None, :].double() + bf
    out = fp8_dot_gemv(xq, xs, wq, ws, b, dtype, config)
    assert out.dtype == dtype and out.shape == (m, n)
    torch.testing.assert_close(out.double(), exact, rtol=1e-2,
                               atol=2e-3 * exact.abs().max().item())
    fused = fp8_dot_gemv(x, None, wq, ws, b, dtype, config)
    rq, rs = quantize_fp8_per_token(x)
    assert torch.equal(fused, fp8_dot_gemv(rq, rs, wq, ws, b, dtype, config))
    ref = quant.fp8_linear(x.float(), wq, ws, b.float() if b is not None else None)
    torch.testing.assert_close(fused.float(), ref, rtol=3e-2, atol=3e-2 * ref.abs().max().item())


def test_fp8_cast_gemv_half_products():
    """W8A8 with fp16 products and sums of eight (_float_tile with HALF) against the
    float32 path of the same kernel and against the exact product of the same e4m3 values,
    x e4m3 from the reference quantizer or quantized in the kernel, with a bias;
    weight-only is refused."""
    from tandem.kernels.triton import quant_gemm
    for n, k, cfg in [(6144, 4096, (16, 512, 4)), (4096, 14336, (16, 1024, 8)),
                      (28672, 4096, (16, 512, 4)), (300, 1024, (8, 1024, 4))]:
        x, wq, ws, b = _fp8_case(1, n, k, torch.bfloat16, True)
        xq, xs = quant.quantize_fp8(x.float())
        exact = (xq.float() * xs[:, None]) @ (wq.float() * ws[:, None]).t() + b.float()
        for args, kw in [((xq, xs), {}), ((x, None), {"quantize_x": True})]:
            f32 = quant_gemm.fp8_cast_gemv(*args, wq, ws, b, torch.float32, (*cfg, False), **kw)
            f16 = quant_gemm.fp8_cast_gemv(*args, wq, ws, b, torch.float32, (*cfg, True), **kw)
            scale = exact.abs().max().item()
            torch.testing.assert_close(f16, f32, rtol=0, atol=2e-3 * scale)
            if not kw:  # the same e4m3 x as `exact`
                torch.testing.assert_close(f16, exact, rtol=0, atol=2e-3 * scale)
    with pytest.raises(ValueError, match="W8A8"):
        quant_gemm.fp8_cast_gemv(x, None, wq, ws, b, torch.bfloat16, (8, 1024, 4, True))


@pytest.mark.parametrize("m", range(1, 9))
@pytest.mark.parametrize("n,k", [(100, 300), (130, 2100), (64, 4096)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [False, True])
def test_fp8_dot_gemv_matches_reference(m, n, k, dtype, bias):
    """The tensor-core FP8 decode GEMV at its default configs, 1-8 rows, N and K off the
    blocks (100 x 300, 130 x 2100) and on them, with and without bias."""
    _check_fp8_dot(*_fp8_case(m, n, k, dtype, bias))


@pytest.mark.parametrize("m,n,k", [(1, 6144, 4096), (1, 4096, 4096), (8, 28672, 4096),
                                   (1, 4096, 14336), (3, 4096, 14336), (1, 128256, 4096)])
def test_fp8_dot_gemv_llama_shapes(m, n, k):
    """Llama-3.1-8B's qkv, o, gate_up, down and lm_head at their default configs (split-K on
    o and down)."""
    _check_fp8_dot(*_fp8_case(m, n, k, torch.bfloat16, True))


def _dot_configs():
    from tandem.kernels.triton.fp8_gemv import Fp8DotConfig as C
    return [C(), C(block_k=128, num_stages=6), C(block_k=512, num_stages=3, prefetch_k=1024),
            C(split_k=2), C(split_k=3, prefetch_k=0), C(split_k=8, block_k=128),
            C(block_n=128, num_warps=8), C(block_n=128, block_k=128, num_warps=8, split_k=4),
            C(block_n=128, num_warps=4, num_stages=3, split_k=2)]


@pytest.mark.parametrize("i", range(9))
@pytest.mark.parametrize("m,n,k", [(1, 200, 1000), (6, 256, 2048)])
def test_fp8_dot_gemv_configs(i, m, n, k):
    """Every tile shape the sweep (scripts/bench_quant_gemv.py) may pick, split-K included
    (split 8 of 1000 = 8 tiles of 128: one split past K, all-zero partials)."""
    _check_fp8_dot(*_fp8_case(m, n, k, torch.bfloat16, True), config=_dot_configs()[i])


def test_fp8_dot_gemv_split_k_is_deterministic_and_graph_safe():
    """Split-K sums partials in split order whichever program finishes last (the same bits
    every run), and its counters are back at zero after each launch: a CUDA graph of split
    launches of two shapes back to back, replayed, matches the eager calls."""
    from tandem.kernels.triton.fp8_gemv import Fp8DotConfig, fp8_dot_gemv
    cfg = Fp8DotConfig(split_k=4)
    x, wq, ws, b = _fp8_case(2, 4096, 4096, torch.bfloat16, True, seed=5)
    x2, wq2, ws2, _ = _fp8_case(2, 1000, 4096, torch.bfloat16, False, seed=6)
    first = fp8_dot_gemv(x, None, wq, ws, b, torch.bfloat16, cfg)
    for _ in range(3):
        assert torch.equal(fp8_dot_gemv(x, None, wq, ws, b, torch.bfloat16, cfg), first)
    fp8_dot_gemv(x2, None, wq2, ws2, None, torch.bfloat16, cfg)  # compiled ahead of capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = fp8_dot_gemv(x, None, wq, ws, b, torch.bfloat16, cfg)
        y2 = fp8_dot_gemv(x2, None, wq2, ws2, None, torch.bfloat16, cfg)
    g = torch.Generator(device="cuda").manual_seed(9)
    for _ in range(3):
        x.copy_(torch.randn(x.shape, device="cuda", generator=g).to(x.dtype))
        x2.copy_(torch.randn(x2.shape, device="cuda", generator=g).to(x2.dtype))
        graph.replay()
        assert torch.equal(y, fp8_dot_gemv(x, None, wq, ws, b, torch.bfloat16, cfg))
        assert torch.equal(y2, fp8_dot_gemv(x2, None, wq2, ws2, None, torch.bfloat16, cfg))


def test_fp8_gemv_dispatch(monkeypatch):
    """fp8_gemv: W8A8 decode on the dot kernel when FP8_DECODE is "dot" (or "auto", the
    default, with more than one row), the cast kernel with "cast", "auto" at one row, or an
    explicit (cast) config, and fp8 weight-only always on the cast kernel."""
    from tandem.kernels.triton import quant_gemm
    from tandem.kernels.triton.fp8_gemv import fp8_dot_gemv
    x, wq, ws, b = _fp8_case(4, 1024, 2048, torch.bfloat16, True, seed=11)
    args = (x, None, wq, ws, b, torch.bfloat16)
    dot = fp8_dot_gemv(*args)
    cast = quant_gemm.fp8_cast_gemv(*args, quantize_x=True)
    monkeypatch.setattr(quant_gemm, "FP8_DECODE", "dot")
    assert torch.equal(quant_gemm.fp8_gemv(*args, quantize_x=True), dot)
    assert torch.equal(quant_gemm.fp8_gemv(*args, (16, 512, 4), quantize_x=True),
                       quant_gemm.fp8_cast_gemv(*args, (16, 512, 4), quantize_x=True))
    monkeypatch.setattr(quant_gemm, "FP8_DECODE", "cast")
    assert torch.equal(quant_gemm.fp8_gemv(*args, quantize_x=True), cast)
    monkeypatch.setattr(quant_gemm, "FP8_DECODE", "auto")  # 4 rows: dot; 1 row: cast
    assert torch.equal(quant_gemm.fp8_gemv(*args, quantize_x=True), dot)
    one = (x[:1], None, wq, ws, b, torch.bfloat16)
    assert torch.equal(quant_gemm.fp8_gemv(*one, quantize_x=True),
                       quant_gemm.fp8_cast_gemv(*one, quantize_x=True))
    ref = quant.fp8_linear(x.float(), wq, ws, b.float())
    for out in (dot, cast):
        torch.testing.assert_close(out.float(), ref, rtol=3e-2,
                                   atol=3e-2 * ref.abs().max().item())
    monkeypatch.setattr(quant_gemm, "FP8_DECODE", "dot")
    weight_only = quant_gemm.fp8_gemv(*args)  # x not quantized
    exact = x.float() @ (wq.float() * ws[:, None]).t() + b.float()
    torch.testing.assert_close(weight_only.float(), exact, rtol=2e-2,
                               atol=2e-2 * exact.abs().max().item())


@pytest.mark.parametrize("method", ["int8", "int4", "int4_asym", "fp8"])
def test_quantized_model_on_cuda_matches_reference_kernels(tmp_path, method, monkeypatch):
    """The same quantized bf16 model on CUDA twice: through the Triton / _scaled_mm kernels
    (CUDA graphs, async scheduling) and through the PyTorch references; only the kernels
    differ."""
    import gc

    from tandem import LLM, SamplingParams
    from tests.model_factory import make_tiny_model
    path = make_tiny_model(tmp_path, "LlamaForCausalLM", hidden_size=512,
                           intermediate_size=1024, num_heads=8, num_kv_heads=2)
    prompts = [list(range(5, 40)), [7, 8, 9], list(range(100, 180))]
    lp = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
    sizes = dict(device="cuda", dtype="bfloat16", quantization=method, num_kv_blocks=256)
    with monkeypatch.context() as patch:
        patch.setattr(ops, "quant_gemm", None)  # every quantized linear on its reference
        ref_llm = LLM(path, enforce_eager=True, **sizes)
        ref = ref_llm.generate(prompts, lp, use_tqdm=False)
    del ref_llm
    gc.collect()
    fast_llm = LLM(path, **sizes)
    assert fast_llm.engine.runner.graphs is not None
    fast = fast_llm.generate(prompts, lp, use_tqdm=False)
    # bf16 outputs, different summation orders. FP8 re-quantizes every activation, so a
    # one-ulp bf16 difference upstream can move a value by a whole e4m3 step (6%) in the
    # next layer: single positions then differ by up to ~0.5 nats on this random model
    # (measured on the H200), so FP8 is held to the mean and a looser maximum.
    diffs = [abs(ea[tok].logprob - eb[tok].logprob) - 0.02 * abs(ea[tok].logprob)
             for a, b in zip(ref, fast)
             for ea, eb in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:])
             for tok in ea]
    if method == "fp8":
        assert sum(diffs) / len(diffs) < 0.05 and max(diffs) < 0.6, max(diffs)
    else:
        assert max(diffs) < 0.05, max(diffs)
    # decode through the CUDA graphs (the GEMV path)
    outs = fast_llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=16,
                                                     ignore_eos=True), use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == 16 for o in outs)


@pytest.mark.parametrize("method", ["int8", "int4", "int4_asym", "fp8_weight_only"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_many_rows_dequantize_then_cublas_exactly_as_the_reference(method, dtype):
    """From DEQUANT_MIN_ROWS rows the weight is dequantized into x's dtype and cuBLAS does
    the matmul: the reference's own computation, so equal to the bit; the dequantized
    weight equals the reference's, N and K off the kernel's tiles included."""
    from tandem.kernels.triton import quant_gemm
    g = torch.Generator(device="cuda").manual_seed(7)
    n, k = 1000, 1536  # 1000 rows: not a multiple of the 16-row tiles
    w = torch.randn(n, k, device="cuda", generator=g)
    if method == "int8":
        q, s, z, bits = *quant.quantize_int8(w), None, 8
        ref_w = quant.dequantize_int8(q, s)
    elif method == "fp8_weight_only":
        q, s, z, bits = *quant.quantize_fp8(w), None, 8
        ref_w = q.float() * s[:, None]
    else:
        q, s, z = quant.quantize_int4(w, 128, method == "int4")
        bits, ref_w = 4, quant.dequantize_int4(q, s, z, 128)
    assert torch.equal(quant_gemm.dequantize(q, s, z, bits, 128, dtype), ref_w.to(dtype))
    bias = torch.randn(n, device="cuda", dtype=dtype, generator=g)
    for m in (quant_gemm.DEQUANT_MIN_ROWS, 700):
        x = torch.randn(m, k, device="cuda", dtype=dtype, generator=g)
        out = quant_gemm.quant_linear(x, q, s, z, bits, 128, bias)
        assert torch.equal(out, torch.nn.functional.linear(x, ref_w.to(dtype), bias))
    x = torch.randn(quant_gemm.DEQUANT_MIN_ROWS - 1, k, device="cuda", dtype=dtype, generator=g)
    fused = quant_gemm.quant_linear(x, q, s, z, bits, 128, bias)  # one row fewer: the GEMM
    ref = torch.nn.functional.linear(x.float(), ref_w, bias.float())
    torch.testing.assert_close(fused.float(), ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())
