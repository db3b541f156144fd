"""Pre-quantized checkpoints in the compressed-tensors format (what llm-compressor writes),
loaded without flags: config.json's `quantization_config` becomes a `QuantPolicy` whose
methods create the checkpoint's own tensors, so each layer's weight loader copies them as
stored, and converts them to tandem's kernel layout after loading (losslessly):

    float-quantized, FP8 W8A8 per channel (dynamic per-token activations)
        weight e4m3 (N, K), weight_scale float32 (N, 1)    -> Fp8LinearMethod's buffers
    pack-quantized, INT4 W4A16 group-wise, symmetric
        weight_packed int32 (N, K/8): value i at bits 4i, offset by 8
        weight_scale (N, K/G), weight_shape (2,) (ignored)  -> Int4WeightOnlyMethod's:
        the int32 words viewed as bytes are exactly its (N, K/2) nibble pairs

Anything else (asymmetric zero points, other bit widths, static activation scales) is
refused at load with the field that is not supported.
"""

from __future__ import annotations

import re
import sys
from typing import Any

import torch
from torch import nn

from tandem.quantization.methods import Fp8LinearMethod, Int4WeightOnlyMethod
from tandem.quantization.policy import NONE, QuantPolicy

CT_FP8 = "ct_fp8_channel"
_CT_INT4 = re.compile(r"ct_int4_g(\d+)")


def _param(layer: nn.Module, name: str, shape: tuple[int, ...], dtype: torch.dtype,
           split_input: bool = True) -> None:
    """A checkpoint tensor as a parameter (filled by the layer's weight loader).
    split_input=False: whole on every rank under row parallelism (per-output scales)."""
    p = nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)
    p.split_input = split_input
    layer.register_parameter(name, p)


class CompressedFp8Method(Fp8LinearMethod):
    name = CT_FP8

    def create_weights(self, layer: nn.Module, output_size: int, input_size: int) -> None:
        _param(layer, "weight", (output_size, input_size), torch.float8_e4m3fn)
        _param(layer, "weight_scale", (output_size, 1), torch.float32, split_input=False)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        wq, scale = layer.weight.data, layer.weight_scale.data.float().reshape(-1)
        del layer.weight, layer.weight_scale
        layer.register_buffer("weight_q", wq, persistent=False)
        layer.register_buffer("weight_scale", scale, persistent=False)


class CompressedInt4Method(Int4WeightOnlyMethod):
    def __init__(self, group_size: int) -> None:
        super().__init__(group_size, symmetric=True)
        self.name = f"ct_int4_g{group_size}"

    def create_weights(self, layer: nn.Module, output_size: int, input_size: int) -> None:
        if input_size % self.group_size:
            raise ValueError(f"{layer.prefix}: input size {input_size} per rank is not a "
                             f"multiple of the checkpoint's group size {self.group_size}")
        _param(layer, "weight_packed", (output_size, input_size // 8), torch.int32)
        _param(layer, "weight_scale", (output_size, input_size // self.group_size),
               torch.float32)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        packed = layer.weight_packed.data.contiguous()
        if sys.byteorder != "little":  # the bytes of a word would come in reverse
            raise RuntimeError("pack-quantized checkpoints need a little-endian host")
        scale = layer.weight_scale.data.float()
        del layer.weight_packed, layer.weight_scale
        layer.register_buffer("qweight", packed.view(torch.uint8), persistent=False)
        layer.register_buffer("scales", scale, persistent=False)
        layer.register_buffer("zeros", None, persistent=False)


def make_checkpoint_method(name: str):
    """The method for a compressed-tensors layer name (CT_FP8, ct_int4_gG), or None."""
    if name == CT_FP8:
        return CompressedFp8Method()
    m = _CT_INT4.fullmatch(name)
    return CompressedInt4Method(int(m.group(1))) if m else None


def _method_of(group: dict[str, Any], where: str) -> str:
    w = group.get("weights") or {}
    acts = group.get("input_activations")
    fmt = group.get("format")
    if (w.get("type") == "float" and w.get("num_bits") == 8 and w.get("strategy") == "channel"
            and w.get("symmetric", True)):
        if acts and not (acts.get("dynamic") and acts.get("strategy") == "token"):
            raise ValueError(f"{where}: FP8 with static or non-per-token activation scales "
                             f"is not supported")
        return CT_FP8
    if (w.get("type") == "int" and w.get("num_bits") == 4 and w.get("strategy") == "group"
            and fmt in (None, "pack-quantized") and not acts):
        if not w.get("symmetric", True):
            raise ValueError(f"{where}: asymmetric INT4 (zero points) is not supported yet")
        return f"ct_int4_g{int(w['group_size'])}"
    raise ValueError(f"{where}: weights {w} (format {fmt}) are not supported; tandem loads "
                     f"FP8 per-channel W8A8 and pack-quantized INT4 W4A16 group-wise")


def policy_from_config(hf_config: dict[str, Any]) -> QuantPolicy | None:
    """The policy of a compressed-tensors checkpoint, or None if it is not one."""
    qc = hf_config.get("quantization_config")
    if not qc:
        return None
    if qc.get("quant_method") != "compressed-tensors":
        raise ValueError(f"checkpoint quantization {qc.get('quant_method')!r} is not "
                         f"supported; tandem loads compressed-tensors checkpoints")
    rules: list[tuple[str, str]] = []
    ignored = qc.get("ignore") or []
    for target in ignored:
        rules.append((_pattern(target), NONE))
    default = NONE
    for name, group in (qc.get("config_groups") or {}).items():
        method = _method_of({"format": qc.get("format"), **group},
                            f"quantization_config.config_groups.{name}")
        for target in group.get("targets") or []:
            if target == "Linear":
                if not any(_pattern(t) in ("lm_head", "re:.*lm_head") for t in ignored):
                    raise ValueError("a quantized lm_head is not supported yet (the "
                                     "checkpoint's 'ignore' does not list lm_head)")
                default = method
            else:
                rules.append((_pattern(target), method))
    if qc.get("kv_cache_scheme"):
        raise ValueError("quantization_config.kv_cache_scheme: a quantized KV cache is not "
                         "supported yet")
    return QuantPolicy(default, tuple(rules), source="compressed-tensors")


def _pattern(target: str) -> str:
    """A compressed-tensors target (a module name, or "re:REGEX") as a policy pattern."""
    if target.startswith("re:"):
        return "re:" + target[3:]
    return target


def quant_policy(model_config) -> QuantPolicy | None:
    """The policy a model is served with: `quantization` as given, or a pre-quantized
    checkpoint's own (compressed-tensors), never both."""
    from tandem.models.loader import read_hf_config
    checkpoint = policy_from_config(read_hf_config(model_config.model))
    if checkpoint is not None and model_config.quantization not in (None, NONE):
        raise ValueError(f"the checkpoint is already quantized (compressed-tensors); drop "
                         f"quantization={model_config.quantization!r}")
    if checkpoint is not None and model_config.load_format == "dummy":
        raise ValueError("load_format 'dummy' cannot make a quantized checkpoint's tensors")
    return checkpoint or QuantPolicy.parse(model_config.quantization)
