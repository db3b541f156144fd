"""Linear layers that own their weight loaders.

Checkpoints store q/k/v and gate/up as separate tensors; tandem fuses them into one matmul.
Each layer knows where a checkpoint shard lands in its merged weight, so the model's
`load_weights` only maps names:

    QKVLinear.weight          rows: | q: num_heads*head_dim | k: kv*head_dim | v: kv*head_dim |
    MergedColumnLinear.weight rows: | gate: intermediate    | up: intermediate |

Names follow vLLM (ColumnParallelLinear, RowParallelLinear, ...) without the "Parallel":
there is no tensor parallelism yet, but when it comes it enters here, in the loaders, and
the models do not change. Every parameter carries `weight_loader(param, loaded[, shard_id])`
and, for merged ones, `shard_ids` (the shards a complete load must have seen).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from tandem.layers import cpu_gemm


def copy_checked(dst: torch.Tensor, src: torch.Tensor) -> None:
    """dst.copy_(src) after a shape check whose error names both shapes."""
    if dst.shape != src.shape:
        raise ValueError(f"shape mismatch: expected {tuple(dst.shape)}, got {tuple(src.shape)}")
    with torch.no_grad():
        dst.copy_(src)


def default_weight_loader(param: torch.Tensor, loaded: torch.Tensor) -> None:
    copy_checked(param.data, loaded)


class Linear(nn.Module):
    """y = x W^T (+ b), weight replicated (vLLM's ReplicatedLinear)."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False) -> None:
        super().__init__()
        self.input_size, self.output_size = input_size, output_size
        self.weight = nn.Parameter(torch.empty(output_size, input_size), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(output_size), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)
        self.packed: torch.Tensor | None = None  # oneDNN copy of weight on CPU (cpu_gemm.py)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        default_weight_loader(param, loaded)

    def process_weights_after_loading(self) -> None:
        self.packed = cpu_gemm.pack_weight(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (..., input_size) -> (..., output_size)
        return cpu_gemm.linear(x, self.weight, self.packed, self.bias)


class ColumnLinear(Linear):
    """Output features split across ranks under tensor parallelism (one rank for now)."""


class RowLinear(Linear):
    """Input features split across ranks under tensor parallelism (o_proj, down_proj)."""


class MergedColumnLinear(ColumnLinear):
    """Several column linears over the same input in one matmul (gate_up_proj: shards 0, 1)."""

    def __init__(self, input_size: int, output_sizes: Sequence[int], bias: bool = False) -> None:
        super().__init__(input_size, sum(output_sizes), bias)
        self.output_sizes = list(output_sizes)
        for param in self.parameters(recurse=False):
            param.shard_ids = tuple(range(len(self.output_sizes)))

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor,
                      shard_id: int | None = None) -> None:
        if shard_id is None:  # an already-merged checkpoint tensor
            default_weight_loader(param, loaded)
            return
        offset = sum(self.output_sizes[:shard_id])
        copy_checked(param.data.narrow(0, offset, self.output_sizes[shard_id]), loaded)


class QKVLinear(ColumnLinear):
    """q, k and v projections in one matmul; output = | q | k | v | along the last dim."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int,
                 bias: bool = False) -> None:
        self.q_size, self.kv_size = num_heads * head_dim, num_kv_heads * head_dim
        super().__init__(hidden_size, self.q_size + 2 * self.kv_size, bias)
        self.head_dim, self.num_heads, self.num_kv_heads = head_dim, num_heads, num_kv_heads
        for param in self.parameters(recurse=False):
            param.shard_ids = ("q", "k", "v")

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor,
                      shard_id: str | None = None) -> None:
        if shard_id is None:
            default_weight_loader(param, loaded)
            return
        offset, size = {"q": (0, self.q_size), "k": (self.q_size, self.kv_size),
                        "v": (self.q_size + self.kv_size, self.kv_size)}[shard_id]
        copy_checked(param.data.narrow(0, offset, size), loaded)

    def split(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(T, q_size + 2*kv_size) -> q (T, q_size), k (T, kv_size), v (T, kv_size)."""
        return qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
