"""The quantized LinearMethods. Each is chosen for one layer at construction; the layer
loads its full-precision shard as usual (its own weight loader), then
`process_weights_after_loading` quantizes it (round to nearest) and drops the original:

    Fp8LinearMethod        weight_q e4m3 (N, K), weight_scale (N,)        8 bits/weight
    Int8WeightOnlyMethod   qweight int8 (N, K), scales (N,)               8
    Int4WeightOnlyMethod   qweight uint8 (N, K/2), scales (N, K/G),       4 (+ 32/G for the
                           zeros uint8 (N, K/G) if asymmetric               scale, +8/G zeros)

`apply` goes through kernels/ops, which picks the Triton kernel or `torch._scaled_mm` on
CUDA and the PyTorch reference (kernels/reference/quant.py) elsewhere.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from tandem import envs
from tandem.kernels import ops
from tandem.kernels.reference import quant
from tandem.kernels.reference.carried_norm import AddNorm, NormedRow
from tandem.layers.linear_method import LinearMethod


def _take_weight(layer: nn.Module) -> torch.Tensor:
    """The loaded full-precision weight, removed from the layer (a tied embedding keeps its
    own reference)."""
    weight = layer.weight.data
    del layer.weight
    return weight


class Fp8LinearMethod(LinearMethod):
    """W8A8: e4m3 weights with per-output-channel scales; activations per token at run time."""

    name, weight_bits = "fp8", 8.0
    carried_amax = True

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        wq, scale = quant.quantize_fp8(_take_weight(layer))
        layer.register_buffer("weight_q", wq, persistent=False)
        layer.register_buffer("weight_scale", scale, persistent=False)

    def apply(self, layer: nn.Module, x: torch.Tensor,
              bias: torch.Tensor | None = None) -> torch.Tensor:
        return ops.fp8_linear(x, layer.weight_q, layer.weight_scale, bias)

    def carries_norm(self, layer: nn.Module) -> bool:
        # The carried GEMV is the cast kernel: TANDEM_FP8_DECODE=dot keeps the plain layers,
        # and so does a CUDA weight that kernel cannot take (the plain path's _scaled_mm
        # beats the reference's dequantized matmul there). On the CPU both are references.
        wq = layer.weight_q
        return envs.fp8_decode() != "dot" and (not wq.is_cuda or ops.fp8_row_kernel(wq))

    def apply_carried(self, layer: nn.Module, x: torch.Tensor | NormedRow,
                      bias: torch.Tensor | None = None, add: AddNorm | None = None
                      ) -> torch.Tensor | tuple[NormedRow, torch.Tensor]:
        return ops.carried_fp8_linear(x, layer.weight_q, layer.weight_scale, bias, add)


class Int8WeightOnlyMethod(LinearMethod):
    """W8A16: int8 weights, per-output-channel scales; the matmul runs in the activation
    dtype after dequantizing in the kernel's inner loop."""

    name, weight_bits = "int8", 8.0

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        q, scale = quant.quantize_int8(_take_weight(layer))
        layer.register_buffer("qweight", q, persistent=False)
        layer.register_buffer("scales", scale, persistent=False)

    def apply(self, layer: nn.Module, x: torch.Tensor,
              bias: torch.Tensor | None = None) -> torch.Tensor:
        return ops.int8_linear(x, layer.qweight, layer.scales, bias)

    def carries_norm(self, layer: nn.Module) -> bool:
        return layer.qweight.dtype == torch.int8  # not fp8 weight-only's e4m3

    def apply_carried(self, layer: nn.Module, x: torch.Tensor | NormedRow,
                      bias: torch.Tensor | None = None, add: AddNorm | None = None
                      ) -> torch.Tensor | tuple[NormedRow, torch.Tensor]:
        return ops.carried_int_linear(x, layer.qweight, layer.scales, None, 8, 0, bias, add)


class Int4WeightOnlyMethod(LinearMethod):
    """W4A16, group-wise along the input dimension (group_size 128), symmetric or with
    zero points."""

    def __init__(self, group_size: int = 128, symmetric: bool = True) -> None:
        self.group_size, self.symmetric = group_size, symmetric
        self.name = ("int4" if symmetric else "int4_asym") + (
            f"_g{group_size}" if group_size != 128 else "")
        self.weight_bits = 4.0 + 32.0 / group_size + (0.0 if symmetric else 8.0 / group_size)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        packed, scale, zeros = quant.quantize_int4(_take_weight(layer), self.group_size,
                                                   self.symmetric)
        layer.register_buffer("qweight", packed, persistent=False)
        layer.register_buffer("scales", scale, persistent=False)
        layer.register_buffer("zeros", zeros, persistent=False)

    def apply(self, layer: nn.Module, x: torch.Tensor,
              bias: torch.Tensor | None = None) -> torch.Tensor:
        return ops.int4_linear(x, layer.qweight, layer.scales, layer.zeros, self.group_size,
                               bias)

    def carries_norm(self, layer: nn.Module) -> bool:
        return True

    def apply_carried(self, layer: nn.Module, x: torch.Tensor | NormedRow,
                      bias: torch.Tensor | None = None, add: AddNorm | None = None
                      ) -> torch.Tensor | tuple[NormedRow, torch.Tensor]:
        return ops.carried_int_linear(x, layer.qweight, layer.scales, layer.zeros, 4,
                                      self.group_size, bias, add)


class Fp8WeightOnlyMethod(Int8WeightOnlyMethod):
    """e4m3 weights, per-channel scales, activations left as they are (what `fp8` costs
    minus its activation quantization: the sensitivity map's activation probe)."""

    name, weight_bits = "fp8_weight_only", 8.0

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        q, scale = quant.quantize_fp8(_take_weight(layer))
        layer.register_buffer("qweight", q, persistent=False)
        layer.register_buffer("scales", scale, persistent=False)


def make_method(name: str) -> LinearMethod:
    """A fresh method object for one layer (names: policy.is_method)."""
    if name == "fp8":
        return Fp8LinearMethod()
    if name == "fp8_weight_only":
        return Fp8WeightOnlyMethod()
    if name == "int8":
        return Int8WeightOnlyMethod()
    m = re.fullmatch(r"int4(_asym)?(?:_g(\d+))?", name)
    if m:
        return Int4WeightOnlyMethod(int(m.group(2) or 128), symmetric=m.group(1) is None)
    if name.startswith("ct_"):  # a compressed-tensors checkpoint's own layout
        from tandem.quantization.compressed_tensors import make_checkpoint_method
        method = make_checkpoint_method(name)
        if method is not None:
            return method
    raise ValueError(f"unknown quantization method {name!r}")
