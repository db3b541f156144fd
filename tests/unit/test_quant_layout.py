"""The weight layout and arithmetic the quantized Triton kernels (kernels/triton/quant_gemm.py)
rely on, checked on CPU in PyTorch: the int32 view of the reference layouts (no repacking),
and the subnormal decode (a code masked in place and read as a float32) being exact.

With TRITON_INTERPRET=1 and triton importable, the kernels themselves also run here on CPU
against kernels/reference/quant.py (float16 activations: the interpreter has no bf16 dot)."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from tandem.kernels.reference import quant


def _codes_int4(packed: torch.Tensor) -> torch.Tensor:
    n = packed.shape[0]
    return torch.stack([packed & 0xF, packed >> 4], dim=2).reshape(n, -1).to(torch.int32)


def test_int32_words_of_the_reference_layouts():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 256, generator=g)
    packed, _, _ = quant.quantize_int4(w, 128)
    words = packed.view(torch.int32)  # (N, K/8): nibble i of word j = q[8j + i]
    assert words.shape == (6, 32)
    q = _codes_int4(packed)
    for i in range(8):
        assert torch.equal((words >> (4 * i)) & 0xF, q[:, i::8])
    q8, _ = quant.quantize_int8(w)
    words8 = q8.view(torch.int32)  # (N, K/4): byte b of word j = q[4j + b]
    flipped = words8 ^ -0x7F7F7F80  # 0x80808080: signed byte q -> code q + 128
    for b in range(4):
        assert torch.equal(((flipped >> (8 * b)) & 0xFF) - 128, q8[:, b::4].to(torch.int32))


def _decode(words: torch.Tensor, bits: int, i: int) -> tuple[torch.Tensor, int]:
    """Code i of each word as the kernels read it: masked in place (shifted down first when
    it ends above bit 23) and viewed as a float32, the subnormal c 2^(p-149); and p."""
    shift = 12 if bits == 4 else 16
    p = bits * i if bits * (i + 1) <= 23 else bits * i - shift
    src = words if bits * (i + 1) <= 23 else words >> shift
    return (src & (((1 << bits) - 1) << p)).view(torch.float32), p


@pytest.mark.parametrize("bits", [4, 8])
def test_subnormal_decode_is_exact(bits):
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(5, 512, generator=g)
    x = torch.randn(512, generator=g).to(torch.bfloat16).float()
    # zero and small activations stay exact (products are normal floats while |x| > 2^-73;
    # below that they round to subnormals: errors under 2^-149 in units of 2^-49)
    x[3], x[7] = 0.0, 2.0 ** -70
    if bits == 4:
        packed, _, _ = quant.quantize_int4(w, 128)
        words, codes = packed.view(torch.int32), _codes_int4(packed)
    else:
        q8, _ = quant.quantize_int8(w)
        words = q8.view(torch.int32) ^ -0x7F7F7F80
        codes = q8.to(torch.int32) + 128
    per = 32 // bits
    for i in range(per):
        c, p = _decode(words, bits, i)
        assert torch.equal(c.double() * 2.0 ** (149 - p), codes[:, i::per].double())
        # gemv: c 2^(p-149) * x 2^(100-p) = c x 2^-49, one rounding-free product
        xi = x[i::per]
        prod = c * (xi * 2.0 ** (100 - p))
        assert torch.equal(prod.double(), codes[:, i::per].double() * xi.double() * 2.0 ** -49)
        # gemm: c 2^(p-149) 2^(127-p) - z 2^-22 = (c - z) 2^-22, exact for any zero point
        z = torch.randint(0, 16, (5, 1), generator=g).float()
        deq = c * 2.0 ** (127 - p) - z * 2.0 ** -22
        assert torch.equal(deq.double(), (codes[:, i::per].double() - z.double()) * 2.0 ** -22)


_INTERPRET = (os.environ.get("TRITON_INTERPRET") == "1"
              and importlib.util.find_spec("triton") is not None)


@pytest.mark.skipif(not _INTERPRET, reason="needs TRITON_INTERPRET=1 and triton")
@pytest.mark.parametrize("method", ["int4", "int4_asym", "int8"])
@pytest.mark.parametrize("m,n,k", [(1, 40, 512), (3, 33, 1024), (8, 16, 3584), (9, 24, 512),
                                   (40, 17, 1024)])
def test_triton_kernels_in_the_interpreter(method, m, n, k):
    from tandem.kernels.triton import quant_gemm
    g = torch.Generator().manual_seed(m * n + k)
    w = torch.randn(n, k, generator=g) + (0.4 if method == "int4_asym" else 0.0)
    x = torch.randn(m, k, generator=g).half()
    bias = torch.randn(n, generator=g).half()
    if method == "int8":
        q, s = quant.quantize_int8(w)
        z, bits, deq = None, 8, quant.dequantize_int8(q, s)
    else:
        q, s, z = quant.quantize_int4(w, 128, method == "int4")
        bits, deq = 4, quant.dequantize_int4(q, s, z, 128)
    ref = x.double() @ deq.double().t() + bias.double()
    out = quant_gemm.quant_linear(x, q, s, z, bits, 128, bias)
    assert out.dtype == torch.float16 and out.shape == (m, n)
    torch.testing.assert_close(out.double(), ref, rtol=2e-3, atol=2e-3 * ref.abs().max().item())
