"""Pre-quantized checkpoints in the compressed-tensors format (what llm-compressor writes),
loaded without flags: config.json's `quantization_config` becomes a `QuantPolicy` whose
methods create the checkpoint's own tensors, so each layer's weight loader copies them as
stored, and converts them to tandem's kernel layout after loading (losslessly):

    float-quantized, FP8 W8A8 per channel (dynamic per-token activations)
        weight e4m3 (N, K), weight_scale float32 (N, 1)    -> Fp8LinearMethod's buffers
    pack-quantized, INT4 W4A16 group-wise, symmetric or asymmetric
        weight_packed int32 (N, K/8): value i at bits 4i, offset by 8
        weight_scale (N, K/G), weight_shape (2,) (ignored)  -> Int4WeightOnlyMethod's:
        the int32 words viewed as bytes are exactly its (N, K/2) nibble pairs
        asymmetric: weight_zero_point int32 (ceil(N/8), K/G), packed down the OUTPUT
        dimension (word w of column g holds rows 8w..8w+7, row 8w+i at bits 4i), offset
        by 8 like the weights. Unpacked at load (a packed word spans 8 rows, which no
        row shard could cut) to uint8 (N, K/G): zp + 8, tandem's `zeros` as they are,
        since (q - zp) * s = ((q + 8) - (zp + 8)) * s
    pack-quantized, INT4 W4A16 per channel (strategy "channel"): the same with one group
        spanning each row, weight_scale (N, 1) (zero points (ceil(N/8), 1)), whole on
        every rank; after loading each row's scale (and zero point) is repeated over the
        groups of the kernels' group size (128, or 64 or 32 where K is not a multiple),
        which is exact: the group-wise kernels then serve it unchanged
    kv_cache_scheme, FP8 e4m3 with one static scale per tensor
        model.layers.N.self_attn.k_scale, .v_scale (one value each) -> the runner's
        per-layer KV spec (`checkpoint_kv_scales`; kv_cache_dtype auto becomes fp8, as
        in vLLM); not model parameters, so the model's loader skips them

Anything else (other bit widths, static activation scales, per-head KV scales, g_idx) is
refused at load with the field that is not supported.
"""

from __future__ import annotations

import logging
import math
import re
import sys
from typing import Any

import torch
from torch import nn

from tandem.quantization.methods import Fp8LinearMethod, Int4WeightOnlyMethod
from tandem.quantization.policy import NONE, QuantPolicy

logger = logging.getLogger(__name__)

CT_FP8 = "ct_fp8_channel"
_CT_INT4 = re.compile(r"ct_int4(_asym)?_(?:g(\d+)|ch)")
_KV_SCALE = re.compile(r"(?:^|\.)layers\.(\d+)\.self_attn\.([kv])_scale$")


def _param(layer: nn.Module, name: str, shape: tuple[int, ...], dtype: torch.dtype,
           split_input: bool = True) -> nn.Parameter:
    """A checkpoint tensor as a parameter (filled by the layer's weight loader).
    split_input=False: whole on every rank under row parallelism (per-output scales)."""
    p = nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)
    p.split_input = split_input
    layer.register_parameter(name, p)
    return p


def _little_endian() -> None:
    if sys.byteorder != "little":  # the bytes of a word would come in reverse
        raise RuntimeError("pack-quantized checkpoints need a little-endian host")


def unpack_zero_points(packed: torch.Tensor) -> torch.Tensor:
    """Pack-quantized INT4 zero points as stored, int32 (ceil(N/8), K/G), -> uint8
    (8 * ceil(N/8), K/G) holding zp + 8. Rows past N (N not a multiple of 8) are the
    packer's padding; the layer's loader then refuses the shape, naming the tensor."""
    if packed.dtype != torch.int32 or packed.dim() != 2:
        raise ValueError(f"packed zero points must be 2-D int32, got {packed.dtype} "
                         f"{tuple(packed.shape)}")
    _little_endian()
    words = packed.t().contiguous().view(torch.uint8)  # (K/G, 4R): byte j of word w holds
    # rows 8w + 2j (low nibble) and 8w + 2j + 1 (high)
    rows = torch.stack((words & 0xF, words >> 4), dim=-1).reshape(words.shape[0], -1)
    return rows.t().contiguous()  # (8R, K/G)


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
    """group_size None: per channel (one scale a row, whatever K is)."""

    def __init__(self, group_size: int | None, symmetric: bool = True) -> None:
        super().__init__(group_size or 128, symmetric)
        self.per_channel = group_size is None
        self.name = (f"ct_int4{'' if symmetric else '_asym'}_"
                     + ("ch" if self.per_channel else f"g{group_size}"))
        if self.per_channel:
            self.weight_bits = 4.0  # + 32 (8) bits a row

    def create_weights(self, layer: nn.Module, output_size: int, input_size: int) -> None:
        if input_size % 8:
            raise ValueError(f"{layer.prefix}: input size {input_size} per rank is not a "
                             f"multiple of 8 (eight INT4 values a packed word)")
        if not self.per_channel and input_size % self.group_size:
            raise ValueError(f"{layer.prefix}: input size {input_size} per rank is not a "
                             f"multiple of the checkpoint's group size {self.group_size}")
        groups = 1 if self.per_channel else input_size // self.group_size
        split = not self.per_channel  # a row's one scale is whole on every rank
        _param(layer, "weight_packed", (output_size, input_size // 8), torch.int32)
        _param(layer, "weight_scale", (output_size, groups), torch.float32, split_input=split)
        if not self.symmetric:  # unpacked before the loader cuts it (load_weights)
            zp = _param(layer, "weight_zero_point", (output_size, groups), torch.uint8,
                        split_input=split)
            zp.from_checkpoint = unpack_zero_points

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        _little_endian()
        packed = layer.weight_packed.data.contiguous()
        scale = layer.weight_scale.data.float()
        zeros = None if self.symmetric else layer.weight_zero_point.data
        if self.per_channel:  # the same scale over every group of a row: exact
            k = packed.shape[1] * 8
            self.group_size = next((g for g in (128, 64, 32) if k % g == 0), k)
            scale = scale.repeat_interleave(k // self.group_size, dim=1).contiguous()
            if zeros is not None:
                zeros = zeros.repeat_interleave(k // self.group_size, dim=1).contiguous()
        del layer.weight_packed, layer.weight_scale
        if zeros is not None:
            del layer.weight_zero_point
        layer.register_buffer("qweight", packed.view(torch.uint8), persistent=False)
        layer.register_buffer("scales", scale, persistent=False)
        layer.register_buffer("zeros", zeros, persistent=False)


def make_checkpoint_method(name: str):
    """The method for a compressed-tensors layer name (CT_FP8, ct_int4[_asym]_gG, or
    ct_int4[_asym]_ch per channel), or None."""
    if name == CT_FP8:
        return CompressedFp8Method()
    m = _CT_INT4.fullmatch(name)
    if m is None:
        return None
    return CompressedInt4Method(int(m.group(2)) if m.group(2) else None,
                                symmetric=m.group(1) is None)


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
    if (w.get("type") == "int" and w.get("num_bits") == 4
            and w.get("strategy") in ("group", "channel")
            and fmt in (None, "pack-quantized") and not acts):
        if w.get("actorder") == "group":
            raise ValueError(f"{where}.weights.actorder 'group' (a weight_g_idx "
                             f"permutation of the groups) is not supported")
        asym = "" if w.get("symmetric", True) else "_asym"
        if w["strategy"] == "channel":
            return f"ct_int4{asym}_ch"
        return f"ct_int4{asym}_g{int(w['group_size'])}"
    raise ValueError(f"{where}: weights {w} (format {fmt}) are not supported; tandem loads "
                     f"FP8 per-channel W8A8 and pack-quantized INT4 W4A16 group-wise or per "
                     f"channel")


def kv_cache_scheme(hf_config: dict[str, Any]) -> dict[str, Any] | None:
    """A compressed-tensors checkpoint's `kv_cache_scheme`, or None; ValueError naming the
    field for what tandem's FP8 KV cache cannot hold (one e4m3 scale per layer for K and
    one for V, as vLLM reads them)."""
    qc = hf_config.get("quantization_config") or {}
    if qc.get("quant_method") != "compressed-tensors":
        return None
    kv = qc.get("kv_cache_scheme")
    if not kv:
        return None
    where = "quantization_config.kv_cache_scheme"
    if kv.get("type") != "float" or kv.get("num_bits") != 8:
        raise ValueError(f"{where}: type {kv.get('type')!r}, num_bits {kv.get('num_bits')} "
                         f"is not supported; tandem's KV cache is FP8 (type float, "
                         f"num_bits 8)")
    if kv.get("strategy", "tensor") not in (None, "tensor"):
        raise ValueError(f"{where}.strategy {kv['strategy']!r} is not supported; tandem "
                         f"keeps one K and one V scale per layer (strategy 'tensor')")
    if kv.get("dynamic"):
        raise ValueError(f"{where}.dynamic {kv['dynamic']!r} is not supported; the scales "
                         f"must be static (stored in the checkpoint)")
    if not kv.get("symmetric", True):
        raise ValueError(f"{where}.symmetric false (KV zero points) is not supported")
    return kv


def policy_from_config(hf_config: dict[str, Any]) -> QuantPolicy | None:
    """The policy of a compressed-tensors checkpoint's linear layers, or None if it is not
    one or quantizes none of them (a KV-cache scheme alone: `checkpoint_kv_scales`)."""
    qc = hf_config.get("quantization_config")
    if not qc:
        return None
    if qc.get("quant_method") != "compressed-tensors":
        raise ValueError(f"checkpoint quantization {qc.get('quant_method')!r} is not "
                         f"supported; tandem loads compressed-tensors checkpoints")
    kv_cache_scheme(hf_config)  # ValueError for a KV scheme tandem cannot hold
    groups = qc.get("config_groups") or {}
    if not groups:
        return None
    rules: list[tuple[str, str]] = []
    ignored = qc.get("ignore") or []
    for target in ignored:
        rules.append((_pattern(target), NONE))
    default = NONE
    for name, group in groups.items():
        method = _method_of({"format": qc.get("format"), **group},
                            f"quantization_config.config_groups.{name}")
        for target in group.get("targets") or []:
            if target == "Linear":
                default = method
                if not any(_pattern(t) in ("lm_head", "re:.*lm_head") for t in ignored):
                    rules.append(("lm_head", method))  # the head is a Linear too
            else:
                rules.append((_pattern(target), method))
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


def checkpoint_kv_scales(model_config, num_layers: int) -> list[tuple[float, float]] | None:
    """Each layer's (k_scale, v_scale) when the checkpoint's config has a `kv_cache_scheme`
    (None without one): the scalars llm-compressor stores as
    model.layers.N.self_attn.k_scale / v_scale, read straight from the safetensors files
    (the KV pool's, not a layer's). With load_format 'dummy' there are none: 1.0."""
    from safetensors import safe_open

    from tandem.models.loader import read_hf_config, safetensors_files
    if kv_cache_scheme(read_hf_config(model_config.model)) is None:
        return None
    if model_config.load_format == "dummy":
        logger.warning("load_format 'dummy': the kv_cache_scheme's FP8 KV cache runs with "
                       "scales 1.0")
        return [(1.0, 1.0)] * num_layers
    found: dict[tuple[int, str], float] = {}
    for path in safetensors_files(model_config.model):
        with safe_open(path, framework="pt", device="cpu") as f:
            for name in f.keys():
                m = _KV_SCALE.search(name)
                if m is not None:
                    found[int(m.group(1)), m.group(2)] = _scale(f.get_tensor(name), name)
    missing = [f"model.layers.{i}.self_attn.{kv}_scale" for i in range(num_layers)
               for kv in "kv" if (i, kv) not in found]
    if missing:
        raise ValueError(f"the checkpoint's kv_cache_scheme needs a K and a V scale for "
                         f"every layer; missing {len(missing)}: {missing[:4]}")
    return [(found[i, "k"], found[i, "v"]) for i in range(num_layers)]


def _scale(t: torch.Tensor, name: str) -> float:
    if t.numel() != 1:
        raise ValueError(f"{name}: shape {tuple(t.shape)}; tandem takes one KV scale per "
                         f"tensor (kv_cache_scheme strategy 'tensor')")
    value = t.float().item()
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name}: KV scale {value} is not a positive number")
    return value
