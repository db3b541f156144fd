"""How many KV blocks fit, and the pool itself, from a per-layer KV-cache spec.

    spec: per layer, the cache dtype (the model's, or float8_e4m3fn with kv_cache_dtype=fp8
          unless the layer is in kv_cache_dtype_skip_layers) and its (k_scale, v_scale):
          1.0, calibrated by the runner, or a checkpoint's own (then fp8 under "auto" too)
    bytes per block = sum over layers of 2 (K and V) x block_size x kv_heads x head_dim
                      x that layer's dtype bytes

CUDA: after the weights are loaded, one profiling forward at the largest step the scheduler
can plan (max_num_batched_tokens tokens, max_num_seqs sampled rows) measures peak activation
memory; the pool takes what `gpu_memory_utilization` leaves, and a pool larger than the
device's free memory is refused with a ValueError. CPU: a fixed memory budget.
`num_kv_blocks` overrides both.
"""

from __future__ import annotations

import torch

from dataclasses import dataclass

from tandem.config import CacheConfig


@dataclass(frozen=True, slots=True)
class LayerKVSpec:
    dtype: torch.dtype  # what the layer's cache holds
    kv_scale: tuple[float, float] = (1.0, 1.0)  # FP8: cached = K / k_scale, V / v_scale


def kv_cache_spec(cache: CacheConfig, num_layers: int, model_dtype: torch.dtype,
                  checkpoint_scales: list[tuple[float, float]] | None = None
                  ) -> list[LayerKVSpec]:
    """checkpoint_scales: each layer's (k_scale, v_scale) from a checkpoint that quantized
    its KV cache (compressed-tensors kv_cache_scheme). Like vLLM, kv_cache_dtype "auto"
    then means the checkpoint's choice, FP8 with those scales; "fp8" takes them too; the
    model dtype by name (bfloat16, ...) keeps the cache unquantized anyway."""
    name = cache.kv_cache_dtype
    if name not in ("auto", "fp8", "fp8_e4m3") and getattr(torch, name) != model_dtype:
        raise ValueError(f"kv_cache_dtype {name} is not the model dtype "
                         f"({str(model_dtype).removeprefix('torch.')}): the cache holds the "
                         f"model dtype (auto, or its name) or fp8")
    fp8 = name in ("fp8", "fp8_e4m3") or (name == "auto" and checkpoint_scales is not None)
    skip = cache.skip_layers()
    bad = [i for i in skip if not 0 <= i < num_layers]
    if bad:
        raise ValueError(f"kv_cache_dtype_skip_layers names layers {bad} of a model with "
                         f"{num_layers}")
    if checkpoint_scales is not None and len(checkpoint_scales) != num_layers:
        raise ValueError(f"{len(checkpoint_scales)} KV scales for {num_layers} layers")
    scales = checkpoint_scales or [(1.0, 1.0)] * num_layers
    return [LayerKVSpec(model_dtype) if not fp8 or i in skip
            else LayerKVSpec(torch.float8_e4m3fn, scales[i]) for i in range(num_layers)]


def kv_block_bytes(spec: list[LayerKVSpec], block_size: int, num_kv_heads: int,
                   head_dim: int) -> int:
    return sum(2 * block_size * num_kv_heads * head_dim
               * torch.empty((), dtype=s.dtype).element_size() for s in spec)


def num_blocks_for(cache: CacheConfig, block_bytes: int, device: torch.device,
                   peak_bytes: int = 0) -> int:
    """Pool size in blocks. `peak_bytes`: profiled peak (weights + activations) on CUDA."""
    if cache.num_kv_blocks is not None:
        return cache.num_kv_blocks
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        budget = int(total * cache.gpu_memory_utilization) - peak_bytes
        if budget <= 0:
            raise ValueError(
                f"no memory left for the KV cache: gpu_memory_utilization="
                f"{cache.gpu_memory_utilization} of {total / 2**30:.1f} GiB is "
                f"{total * cache.gpu_memory_utilization / 2**30:.1f} GiB, but weights and "
                f"activations peak at {peak_bytes / 2**30:.1f} GiB")
        # free: the driver's, plus what torch holds cached but unused in this process
        free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        if budget > free:  # held by other processes or engines (as vLLM, an error, not OOM)
            raise ValueError(
                f"the KV cache needs {budget / 2**30:.1f} GiB (gpu_memory_utilization="
                f"{cache.gpu_memory_utilization} of {total / 2**30:.1f} GiB, less "
                f"{peak_bytes / 2**30:.1f} GiB of weights and activations), but only "
                f"{free / 2**30:.1f} GiB of the device is free: other processes or engines "
                f"hold the rest. Lower gpu_memory_utilization or set num_kv_blocks")
        return budget // block_bytes
    return int(cache.cpu_kv_cache_gib * 2**30) // block_bytes


def allocate_kv_caches(num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                       head_dim: int, dtype: torch.dtype | list[LayerKVSpec],
                       device: torch.device) -> list[torch.Tensor]:
    """One tensor per layer: (2, num_blocks, block_size, num_kv_heads, head_dim), of one
    dtype or each layer's spec's."""
    spec = dtype if isinstance(dtype, list) else [LayerKVSpec(dtype)] * num_layers
    return [torch.zeros(2, num_blocks, block_size, num_kv_heads, head_dim, dtype=s.dtype,
                        device=device) for s in spec]


def read_blocks(kv_caches: list[torch.Tensor], block_ids: list[int]) -> list[torch.Tensor]:
    """A copy of blocks `block_ids` of every layer, on the pool's device: per layer (2, n,
    block_size, num_kv_heads, head_dim) in the layer's dtype (the pool is block-addressable
    along dim 1). For KV transfer between engines (disagg/): the connector copies it on."""
    if not kv_caches:
        return []
    idx = torch.tensor(block_ids, dtype=torch.long, device=kv_caches[0].device)
    return [cache.index_select(1, idx) for cache in kv_caches]


def write_blocks(kv_caches: list[torch.Tensor], block_ids: list[int],
                 layers: list[torch.Tensor]) -> None:
    """Fill blocks `block_ids` of every layer from `read_blocks`' output (checked: the
    same layer count, block shape and dtypes)."""
    if len(layers) != len(kv_caches):
        raise ValueError(f"KV of {len(layers)} layers for a pool of {len(kv_caches)}")
    idx = torch.tensor(block_ids, dtype=torch.long, device=kv_caches[0].device)
    for i, (cache, data) in enumerate(zip(kv_caches, layers)):
        want = (2, len(block_ids), *cache.shape[2:])
        if tuple(data.shape) != want or data.dtype != cache.dtype:
            raise ValueError(f"layer {i}: KV blocks {tuple(data.shape)} {data.dtype}, "
                             f"the pool takes {want} {cache.dtype}")
        cache.index_copy_(1, idx, data.to(cache.device, non_blocking=True))

