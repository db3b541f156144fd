"""Build a model from a Hugging Face-format directory and fill its weights.

    model_dir/config.json -> model_class_for -> construct on the target device and dtype
    -> safetensors tensors, streamed one at a time -> model.load_weights -> completeness check

The model is constructed directly on its device (`with torch.device(device)`) with the
target default dtype, so a GPU load never stages the whole model in host memory and never
pays for an init it will overwrite (parameters start uninitialized). "dummy" weights are
random (seeded) and need only config.json.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator

import torch
from safetensors import safe_open
from torch import nn

from tandem.distributed.parallel import ParallelContext
from tandem.kernels import get_attention_backend
from tandem.quantization.policy import QuantPolicy
from tandem.models.registry import model_class_for

logger = logging.getLogger(__name__)


def read_hf_config(model_dir: str) -> dict:
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no config.json in model directory {model_dir!r}")
    with open(path) as f:
        return json.load(f)


def load_model(model_dir: str, dtype: torch.dtype, device: torch.device | str,
               load_format: str = "auto", seed: int = 0,
               parallel: ParallelContext | None = None,
               quant: QuantPolicy | None = None) -> nn.Module:
    """The model for `model_dir`, in eval mode, on `device` with floating weights in `dtype`;
    under tensor parallelism, this rank's shard of every layer (`parallel`); quantized
    where `quant` says (after loading, by each layer's method)."""
    if load_format not in ("auto", "safetensors", "dummy"):
        raise ValueError(f"unsupported load_format {load_format!r}; use auto, safetensors or dummy")
    hf_config = read_hf_config(model_dir)
    cls = model_class_for(hf_config)
    device = torch.device(device)
    files = [] if load_format == "dummy" else safetensors_files(model_dir)
    with torch.device(device), _default_dtype(dtype), torch.no_grad():
        model = cls(hf_config, attn_backend=get_attention_backend(device), parallel=parallel,
                    quant=quant)
        if load_format == "dummy":
            init_dummy_weights(model, seed)
        else:
            loaded = model.load_weights(_stream(files, dtype))
            check_complete(model, loaded)
        for module in model.modules():  # e.g. pack weights for the CPU matmul
            if hasattr(module, "process_weights_after_loading"):
                module.process_weights_after_loading()
    if parallel is not None and parallel.expert_parallel and not hasattr(cls, "moe_args"):
        logger.warning("enable_expert_parallel has no effect: %s has no experts",
                       cls.__name__)
    return model.eval()


def safetensors_files(model_dir: str) -> list[str]:
    """Shard paths from model.safetensors.index.json, else model.safetensors, else *.safetensors."""
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        files = [os.path.join(model_dir, name) for name in sorted(set(weight_map.values()))]
        absent = [p for p in files if not os.path.isfile(p)]
        if absent:
            raise FileNotFoundError(f"shards listed in {index} are missing: {absent}")
        return files
    single = os.path.join(model_dir, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    files = sorted(os.path.join(model_dir, n) for n in os.listdir(model_dir)
                   if n.endswith(".safetensors"))
    if not files:
        found = sorted(os.listdir(model_dir))
        raise FileNotFoundError(f"no safetensors files in {model_dir!r} (found {found[:10]}); "
                                "only the safetensors format is supported")
    return files


def _stream(files: list[str], dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs, one tensor in host memory at a time. 16/32-bit floats are cast
    to `dtype` here (halving host memory for fp32 checkpoints); anything else (FP8 weights,
    packed integers) stays as stored, and float32 scales of quantized layers are cast only
    by the copy into their float32 parameters."""
    for path in files:
        with safe_open(path, framework="pt", device="cpu") as f:
            for name in f.keys():
                tensor = f.get_tensor(name)
                if tensor.dtype in _WIDE_FLOATS and "_scale" not in name:
                    tensor = tensor.to(dtype)
                yield name, tensor


_WIDE_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def check_complete(model: nn.Module, loaded: set[str]) -> None:
    missing = [name for name, _ in model.named_parameters() if name not in loaded]
    if missing:
        raise ValueError(f"checkpoint is missing {len(missing)} tensor(s) for parameters: "
                         f"{missing[:5]}{' ...' if len(missing) > 5 else ''}")


def init_dummy_weights(model: nn.Module, seed: int) -> None:
    """Seeded random weights: N(0, 0.02) for matrices, ones for norms, zeros for biases."""
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 0.02, generator=gen)
            elif "norm" in name:
                param.fill_(1.0)
            else:
                param.zero_()


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)
