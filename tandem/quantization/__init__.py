"""Quantization, chosen layer by layer.

    policy.py    QuantPolicy: which method each linear layer gets, by its module path
                 (`quantization="int4"` for every decoder linear, or a policy JSON file)
    methods.py   the LinearMethods: Fp8LinearMethod (W8A8), Int8WeightOnlyMethod (W8A16),
                 Int4WeightOnlyMethod (W4A16, group-wise); each quantizes a loaded
                 bf16/fp32 weight in process_weights_after_loading and applies it through
                 kernels/ops (Triton on CUDA, the PyTorch references in
                 kernels/reference/quant.py elsewhere)

A layer asks `linear_method_for(prefix, quant)` (layers/linear_method.py) at construction;
nothing rewrites a model after load.
"""

from tandem.quantization.policy import QuantPolicy

__all__ = ["QuantPolicy"]
