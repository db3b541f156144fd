"""The carried RMSNorm in the batch-1 GEMVs (kernels/triton/carried_norm.py, gemv.py,
quant_gemm.py) against the reference (kernels/reference/carried_norm.py), for bf16/fp16,
int8, int4 and FP8 W8A8 weights; and the chain (models/norm_chain.py) against the plain
layers on CUDA, eager and in the engine's CUDA graph. GPU only."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
pytest.importorskip("triton")

from tandem.kernels import ops  # noqa: E402
from tandem.kernels.reference import carried_norm as ref  # noqa: E402
from tandem.kernels.reference import quant  # noqa: E402
from tandem.kernels.reference.elementwise import rms_norm  # noqa: E402
from tandem.kernels.triton import quant_gemm  # noqa: E402
from tandem.kernels.triton.gemv import gemv  # noqa: E402
from tandem.models import norm_chain  # noqa: E402


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _weights(kind: str, n: int, k: int, g: torch.Generator, dtype: torch.dtype):
    """(run(x, bias, add) on the kernel, reference(x, bias, dtype): the same product through
    kernels/reference/carried_norm.py)."""
    w = torch.randn(n, k, device="cuda", generator=g) / k**0.5
    if kind == "fp8":  # W8A8: the kernel quantizes x itself
        q, s = quant.quantize_fp8(w)
        return ((lambda x, b, add: quant_gemm.fp8_cast_gemv(x, None, q, s, b, dtype,
                                                            quantize_x=True, add=add)),
                (lambda x, b, dt: ref.fp8_linear(x, q, s, b, dt)))
    if kind == "dense":
        wd = w.to(dtype)
    elif kind == "int8":
        q, s = quant.quantize_int8(w)
        wd = quant.dequantize_int8(q, s)
    else:
        q, s, z = quant.quantize_int4(w, 128, kind == "int4")
        wd = quant.dequantize_int4(q, s, z, 128)
    reference = (lambda x, b, dt: ref.linear(x, wd, b, dt))
    if kind == "dense":
        return (lambda x, b, add: gemv(x, wd, b, add=add)), reference
    if kind == "int8":
        return (lambda x, b, add: quant_gemm.int_gemv(x, q, s, None, 8, 0, b, add=add)), \
            reference
    return (lambda x, b, add: quant_gemm.int_gemv(x, q, s, z, 4, 128, b, add=add)), reference


KINDS = ["dense", "int8", "int4", "int4_asym", "fp8"]
SHAPES = [(4096, 4096), (6144, 4096), (4096, 14336), (1536, 512)]  # (N, K)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("dtype,bias", [(torch.bfloat16, False), (torch.float16, True)])
def test_producer_epilogue_matches_the_reference(kind, n, k, dtype, bias):
    g = torch.Generator(device="cuda").manual_seed(n + k)
    run, _ = _weights(kind, n, k, g, dtype)
    x = torch.randn(1, k, device="cuda", generator=g).to(dtype)
    b = torch.randn(n, device="cuda", generator=g).to(dtype) if bias else None
    res = torch.randn(1, n, device="cuda", generator=g).to(dtype)
    nw = (1 + 0.1 * torch.randn(n, device="cuda", generator=g)).to(dtype)
    add = ref.AddNorm(res, nw, 1e-5, amax=True)  # max |xn| too, as for an FP8 consumer
    y = run(x, b, None)  # the same kernel's plain output: same sums, same order
    row, s = run(x, b, add)
    want_row, want_s = ref.add_norm(y, add)
    assert torch.equal(s, want_s) and torch.equal(row.x, want_row.x)
    assert row.sumsq.dtype == torch.float32 and row.sumsq.numel() > 1  # one a program
    torch.testing.assert_close(row.sumsq.sum(), want_row.sumsq.sum(), rtol=1e-5, atol=0)
    assert row.amax.shape == row.sumsq.shape and torch.equal(row.amax.max(), want_row.amax[0])
    assert row.eps == 1e-5
    row0, s0 = run(x, b, ref.AddNorm(res, nw, 1e-5))  # not asked: no maxima
    assert row0.amax is None and torch.equal(row0.x, row.x) and torch.equal(s0, s)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("dtype,bias", [(torch.bfloat16, True), (torch.float16, False)])
def test_consumer_scale_matches_the_reference_and_the_plain_norm(kind, n, k, dtype, bias):
    g = torch.Generator(device="cuda").manual_seed(3 * n + k)
    run, reference = _weights(kind, n, k, g, dtype)
    s = (torch.randn(1, k, device="cuda", generator=g) * 3).to(dtype)
    nw = (1 + 0.1 * torch.randn(k, device="cuda", generator=g)).to(dtype)
    b = torch.randn(n, device="cuda", generator=g).to(dtype) if bias else None
    # partial sums and maxima as a producer leaves them: 37 programs' worth, not a power of 2
    xn = (s.float() * nw.float()).to(dtype)
    sumsq = torch.stack([c.sum() for c in s.float().pow(2).reshape(-1).chunk(37)])
    amax = torch.stack([c.abs().max() for c in xn.float().reshape(-1).chunk(37)])
    row = ref.NormedRow(xn, sumsq, 1e-5, amax)
    got = run(row, b, None)
    want = reference(row, b, dtype)
    # fp8: the kernel's e4m3 of x is the reference's but at exact ties (to_e4m3)
    assert got.dtype == dtype and _rel(got, want) < (5e-3 if kind == "fp8" else 2e-3)
    # the norm as a kernel would; fp8: e4m3 codes of xn and of the normed row can differ
    # by a step where the two bf16 roundings straddle a rounding point (~2% of the output)
    plain = reference(rms_norm(s, nw, 1e-5), b, dtype)
    assert _rel(got, plain) < (4e-2 if kind == "fp8" else 1e-2)
    if kind == "fp8":  # the producer's maxima, or a pass over xn: the same scale, bit for bit
        assert torch.equal(got, run(ref.NormedRow(xn, sumsq, 1e-5), b, None))


def test_ops_route_one_cuda_row_to_the_kernels_and_the_rest_to_the_reference():
    g = torch.Generator(device="cuda").manual_seed(1)
    w = (torch.randn(512, 512, device="cuda", generator=g) / 16).to(torch.bfloat16)
    q, sc = quant.quantize_int8(w.float())
    res = torch.randn(1, 512, device="cuda", generator=g).to(torch.bfloat16)
    nw = torch.ones(512, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(1, 512, device="cuda", generator=g).to(torch.bfloat16)
    add = ref.AddNorm(res, nw, 1e-6)
    row, _ = ops.carried_linear(x, w, None, add)
    assert row.sumsq.numel() > 1  # the kernel's partial sums
    row_i, _ = ops.carried_int_linear(x, q, sc, None, 8, 0, None, add)
    assert row_i.sumsq.numel() > 1
    cpu_row, _ = ops.carried_linear(x.cpu(), w.cpu(), None, ref.AddNorm(res.cpu(), nw.cpu(),
                                                                         1e-6))
    assert cpu_row.sumsq.numel() == 1  # the reference
    assert _rel(cpu_row.x, row.x.cpu()) < 1e-2


def _decode_logits(model, monkeypatch, chain: str, block_size: int = 16):
    from tests.model_factory import make_attn_metadata
    monkeypatch.setenv("TANDEM_NORM_CHAIN", chain)
    dtype = model.model.embed_tokens.weight.dtype
    for layer in model.attention_layers():
        layer.kv_cache = torch.zeros(layer.kv_cache_shape(8, block_size), dtype=dtype,
                                     device="cuda")
    table = [6, 2, 5]
    out = []
    with torch.no_grad():
        meta = make_attn_metadata([9], [9], [table], block_size, "cuda")
        model(torch.tensor([3, 17, 99, 4, 250, 8, 61, 12, 140], device="cuda"),
              torch.arange(9, device="cuda"), meta)
        for step, tok in enumerate([11, 42, 7, 300, 5, 19]):
            n = 10 + step
            meta = make_attn_metadata([1], [n], [table], block_size, "cuda")
            hidden = model(torch.tensor([tok], device="cuda"),
                           torch.tensor([n - 1], device="cuda"), meta)
            out.append(model.compute_logits(hidden))
    return torch.cat(out).float(), [a.kv_cache.clone() for a in model.attention_layers()]


@pytest.mark.parametrize("arch,kw", [("LlamaForCausalLM", {}),
                                     ("Qwen2ForCausalLM", {}),
                                     ("Qwen3ForCausalLM", dict(head_dim=64))])
@pytest.mark.parametrize("method", [None, "int8", "int4"])
def test_chain_decode_matches_the_plain_layers_on_cuda(tmp_path, monkeypatch, arch, kw, method):
    from tandem.models.loader import load_model
    from tandem.quantization.policy import QuantPolicy
    from tests.model_factory import make_tiny_model
    path = make_tiny_model(tmp_path, arch, hidden_size=256, num_heads=4, num_kv_heads=2,
                           intermediate_size=512, num_layers=3, **kw)
    model = load_model(path, torch.bfloat16, "cuda", quant=QuantPolicy.parse(method))
    one = torch.tensor([5], device="cuda")
    monkeypatch.delenv("TANDEM_NORM_CHAIN", raising=False)
    assert norm_chain.applies(model.model, one) == (method is not None)  # quantized only
    monkeypatch.setenv("TANDEM_NORM_CHAIN", "all")
    assert norm_chain.applies(model.model, one)
    assert not norm_chain.applies(model.model, torch.tensor([5, 6], device="cuda"))
    plain, plain_kv = _decode_logits(model, monkeypatch, "0")
    got, got_kv = _decode_logits(model, monkeypatch, "1")
    assert _rel(got, plain) < 2e-2
    assert (got.argmax(-1) == plain.argmax(-1)).float().mean() >= 5 / 6
    assert max(_rel(a, b) for a, b in zip(got_kv, plain_kv)) < 2e-2


@pytest.mark.parametrize("arch,kw", [("LlamaForCausalLM", {}),
                                     ("Qwen2ForCausalLM", {}),
                                     ("Qwen3ForCausalLM", dict(head_dim=128))])
def test_fp8_chain_decode_is_as_close_to_bf16_as_the_plain_fp8_layers(tmp_path, monkeypatch,
                                                                      arch, kw):
    """FP8 W8A8 through the kernels (every K a multiple of 512: the one-row cast kernel, the
    producers' epilogues and maxima, no amax pass in qkv / gate_up): xn quantizes rather than
    the normed row, so the chain is held to the plain FP8 layers' distance from bf16
    (tests/unit/test_norm_chain.py says why)."""
    from tandem.models.loader import load_model
    from tandem.quantization.policy import QuantPolicy
    from tests.model_factory import make_tiny_model
    path = make_tiny_model(tmp_path, arch, hidden_size=512, num_heads=4, num_kv_heads=2,
                           intermediate_size=1024, num_layers=3, **kw)
    base, base_kv = _decode_logits(load_model(path, torch.bfloat16, "cuda"), monkeypatch, "0")
    model = load_model(path, torch.bfloat16, "cuda", quant=QuantPolicy.parse("fp8"))
    monkeypatch.delenv("TANDEM_NORM_CHAIN", raising=False)
    assert norm_chain.applies(model.model, torch.tensor([5], device="cuda"))
    # widths the cast kernel cannot take (K = 256) keep the plain layers (_scaled_mm)
    narrow = make_tiny_model(tmp_path / "narrow", arch, hidden_size=256, num_heads=4,
                             num_kv_heads=2, intermediate_size=512, num_layers=2, **kw)
    narrow_model = load_model(narrow, torch.bfloat16, "cuda", quant=QuantPolicy.parse("fp8"))
    assert not norm_chain.chainable(narrow_model.model)
    plain, plain_kv = _decode_logits(model, monkeypatch, "0")
    got, got_kv = _decode_logits(model, monkeypatch, "1")
    assert _rel(got, plain) < 0.12
    assert _rel(got, base) < 1.2 * _rel(plain, base)
    assert (max(_rel(a, b) for a, b in zip(got_kv, base_kv))
            < 1.2 * max(_rel(a, b) for a, b in zip(plain_kv, base_kv)))


@pytest.mark.parametrize("method", [None, "int4", "fp8"])
def test_engine_graph_replays_the_chain_exactly(tmp_path, monkeypatch, method):
    """Greedy decoding through the engine's batch-1 CUDA graph with the chain gives the same
    tokens and logprobs as the chain run eagerly (deterministic partial sums, no state left
    between replays); the chain against the plain layers is the test above."""
    from tandem import LLM, SamplingParams
    from tests.model_factory import make_tiny_model
    monkeypatch.setenv("TANDEM_NORM_CHAIN", "all")
    path = make_tiny_model(tmp_path, "LlamaForCausalLM", hidden_size=512, num_heads=4,
                           num_kv_heads=2, intermediate_size=1024, num_layers=3)
    # 16 and 32 tokens: the sizes of two prefill graphs, so that the prompts run the same
    # kernels eagerly (a padded prefill can take another int4 kernel: 7 rows a GEMV, 16 a GEMM)
    prompts = [[(7 * i + 3) % 500 for i in range(16)], [(11 * i + 5) % 500 for i in range(32)]]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=3)
    outs = {}
    for eager in (True, False):
        llm = LLM(path, dtype="bfloat16", max_model_len=256, max_num_seqs=1,
                  quantization=method, enforce_eager=eager)
        assert norm_chain.chainable(llm.engine.runner.model.model)
        outs[eager] = [(o.outputs[0].token_ids, o.outputs[0].logprobs)
                       for o in llm.generate(prompts, params, use_tqdm=False)]
        del llm
        torch.cuda.empty_cache()
    assert outs[True] == outs[False]
