"""How many KV blocks fit, and the pool itself.

    bytes per block = 2 (K and V) x layers x block_size x kv_heads x head_dim x dtype bytes

CUDA: after the weights are loaded, one profiling forward at the largest step the scheduler
can plan (max_num_batched_tokens tokens, max_num_seqs sampled rows) measures peak activation
memory; the pool takes what `gpu_memory_utilization` leaves. CPU: a fixed memory budget.
`num_kv_blocks` overrides both.
"""

from __future__ import annotations

import torch

from tandem.config import CacheConfig


def kv_block_bytes(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                   dtype: torch.dtype) -> int:
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * num_layers * block_size * num_kv_heads * head_dim * elem


def num_blocks_for(cache: CacheConfig, block_bytes: int, device: torch.device,
                   peak_bytes: int = 0) -> int:
    """Pool size in blocks. `peak_bytes`: profiled peak (weights + activations) on CUDA."""
    if cache.num_kv_blocks is not None:
        return cache.num_kv_blocks
    if device.type == "cuda":
        _, total = torch.cuda.mem_get_info(device)
        budget = int(total * cache.gpu_memory_utilization) - peak_bytes
        if budget <= 0:
            raise ValueError(
                f"no memory left for the KV cache: gpu_memory_utilization="
                f"{cache.gpu_memory_utilization} of {total / 2**30:.1f} GiB is "
                f"{total * cache.gpu_memory_utilization / 2**30:.1f} GiB, but weights and "
                f"activations peak at {peak_bytes / 2**30:.1f} GiB")
        return budget // block_bytes
    return int(cache.cpu_kv_cache_gib * 2**30) // block_bytes


def allocate_kv_caches(num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                       head_dim: int, dtype: torch.dtype, device: torch.device
                       ) -> list[torch.Tensor]:
    """One tensor per layer: (2, num_blocks, block_size, num_kv_heads, head_dim)."""
    pool = torch.zeros(num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim,
                       dtype=dtype, device=device)
    return list(pool.unbind(0))
