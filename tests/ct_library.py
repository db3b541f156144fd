"""What the compressed-tensors library itself makes of a checkpoint: the reference that
tandem's loading of pack-quantized INT4 is checked against (tests/unit/test_ct_*.py,
test_gptq.py). Import only where the library is installed (pytest.importorskip first)."""

from __future__ import annotations

import torch


def library_weights(out: str, args) -> dict[str, torch.Tensor]:
    """module name -> the float weight the library's own decompressor gives back for the
    pack-quantized tensors in out/model.safetensors, under QuantizationArgs `args`."""
    from compressed_tensors.compressors.pack_quantized import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme
    from safetensors.torch import load_file
    stored = load_file(f"{out}/model.safetensors")
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    weights = {}
    for key in stored:
        if key.endswith(".weight_packed"):
            name = key[: -len(".weight_packed")]
            parts = {p: stored[f"{name}.{p}"] for p in (
                "weight_packed", "weight_scale", "weight_shape", "weight_zero_point")
                if f"{name}.{p}" in stored}
            weights[name] = PackedQuantizationCompressor.decompress(parts, scheme)["weight"]
    return weights
