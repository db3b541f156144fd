"""How a linear layer stores and applies its weight: one `LinearMethod` per layer, chosen
when the layer is constructed (vLLM's quant_method), never by rewriting a model later.

    layer.__init__   method = linear_method_for(prefix, device, dtype)
                     method.create_weights(layer, output_size_per_rank, input_size_per_rank)
    loading          the layer's weight_loader fills the parameters (layers/linear.py)
    after loading    method.process_weights_after_loading(layer)
    forward          method.apply(layer, x, bias)

Methods here: `UnquantizedLinearMethod` (F.linear, or the Triton GEMV for one row on
CUDA) and `CpuPackedLinearMethod` (float32 on CPU: a second copy of the weight packed
once for decode-sized matmuls; see layers/cpu_gemm.py for why); the quantized ones are in
tandem/quantization/methods.py, picked by the model's `QuantPolicy`.
"""

from __future__ import annotations

import torch
from torch import nn

from tandem.kernels import ops
from tandem.kernels.reference.carried_norm import AddNorm, NormedRow
from tandem.layers import cpu_gemm
from tandem.quantization.policy import QuantPolicy


class LinearMethod:
    """The interface: create parameters, post-process them after loading, apply."""

    # apply_carried quantizes its input row per token (FP8 W8A8): a carried norm's producer
    # leaves max |xn| for it (kernels/reference/carried_norm.py)
    carried_amax = False

    def create_weights(self, layer: nn.Module, output_size: int, input_size: int) -> None:
        """Register `layer.weight` (output_size, input_size) for this rank's shard."""
        layer.weight = nn.Parameter(torch.empty(output_size, input_size), requires_grad=False)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        pass

    def apply(self, layer: nn.Module, x: torch.Tensor,
              bias: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def apply_silu_mul(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        """silu(gate) * up of a merged gate/up layer without bias in one pass, or None
        where this method has no such path (the caller applies, then SiluAndMul)."""
        return None

    def carries_norm(self, layer: nn.Module) -> bool:
        """Whether `apply_carried` works for this layer (models/norm_chain.py)."""
        return False

    def apply_carried(self, layer: nn.Module, x: torch.Tensor | NormedRow,
                      bias: torch.Tensor | None = None, add: AddNorm | None = None
                      ) -> torch.Tensor | tuple[NormedRow, torch.Tensor]:
        """`apply` for one row with an RMSNorm carried through (kernels/reference/
        carried_norm.py): x a NormedRow and/or `add` -> (NormedRow, new residual)."""
        raise NotImplementedError


class UnquantizedLinearMethod(LinearMethod):
    def apply(self, layer: nn.Module, x: torch.Tensor,
              bias: torch.Tensor | None = None) -> torch.Tensor:
        return ops.linear(x, layer.weight, bias)

    def carries_norm(self, layer: nn.Module) -> bool:
        return True

    def apply_carried(self, layer: nn.Module, x: torch.Tensor | NormedRow,
                      bias: torch.Tensor | None = None, add: AddNorm | None = None
                      ) -> torch.Tensor | tuple[NormedRow, torch.Tensor]:
        return ops.carried_linear(x, layer.weight, bias, add)


class CpuPackedLinearMethod(LinearMethod):
    """float32 on CPU: short-and-wide decode matmuls through a packed copy (cpu_gemm)."""

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        sizes = getattr(layer, "output_sizes", None)  # a merged gate/up: two equal halves
        nseg = 2 if sizes is not None and len(sizes) == 2 and sizes[0] == sizes[1] else 1
        layer.packed = cpu_gemm.pack_weight(layer.weight, nseg)

    def apply(self, layer: nn.Module, x: torch.Tensor,
              bias: torch.Tensor | None = None) -> torch.Tensor:
        return cpu_gemm.linear(x, layer.weight, getattr(layer, "packed", None), bias)

    def apply_silu_mul(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        return cpu_gemm.linear_silu_mul(x, getattr(layer, "packed", None))


def linear_method_for(prefix: str, quant: QuantPolicy | None = None,
                      device: torch.device | None = None,
                      dtype: torch.dtype | None = None) -> LinearMethod:
    """The method of the layer named `prefix` (e.g. model.layers.3.mlp.down_proj): the
    quantization policy's, if it names one, else the best unquantized one for weights on
    `device` in `dtype` (default: the ones the loader constructs under)."""
    name = quant.method_for(prefix) if quant is not None else None
    if name is not None:
        from tandem.quantization.methods import make_method
        return make_method(name)
    device = device or torch.get_default_device()
    dtype = dtype or torch.get_default_dtype()
    if device.type == "cpu" and dtype == torch.float32 and cpu_gemm.available():
        return CpuPackedLinearMethod()
    return UnquantizedLinearMethod()
