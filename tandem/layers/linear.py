"""Linear layers that know their name and rank, and own their weight loaders (vLLM's names).

Under tensor parallelism (tp ranks) each layer holds one shard, cut by its own loader from
the full checkpoint tensor; models never see the split:

    ColumnParallelLinear   W (out, in) -> rows [r*out/tp, (r+1)*out/tp): output split,
                           no communication (the next row-parallel layer consumes it)
    RowParallelLinear      W (out, in) -> columns [r*in/tp, ...): input split; partial
                           outputs summed by one all-reduce (bias added once, after it)
    QKVParallelLinear      | q heads/tp | k heads/tp | v heads/tp | per rank; with fewer kv
                           heads than ranks each kv head is replicated on tp/kv ranks
    MergedColumnParallelLinear  | gate/tp | up/tp | per rank (gate_up_proj)
    ReplicatedLinear       the whole weight on every rank

Checkpoints store q/k/v and gate/up as separate tensors that the merged layers fuse into
one matmul; `weight_loader(param, loaded, shard_id)` knows where each lands. Every
parameter carries `weight_loader(param, loaded[, shard_id])` and, for merged ones,
`shard_ids` (the shards a complete load must have seen). Each layer's `LinearMethod`
(layers/linear_method.py) is picked at construction from its `prefix`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from tandem.distributed.parallel import ParallelContext
from tandem.kernels import ops
from tandem.layers.linear_method import linear_method_for
from tandem.quantization.policy import QuantPolicy


def copy_checked(dst: torch.Tensor, src: torch.Tensor) -> None:
    """dst.copy_(src) after a shape check whose error names both shapes."""
    if dst.shape != src.shape:
        raise ValueError(f"shape mismatch: expected {tuple(dst.shape)}, got {tuple(src.shape)}")
    with torch.no_grad():
        dst.copy_(src)


def default_weight_loader(param: torch.Tensor, loaded: torch.Tensor) -> None:
    copy_checked(param.data, loaded)


def _rows(param: torch.Tensor, loaded: torch.Tensor, rows: int, start: int, size: int
          ) -> torch.Tensor:
    """loaded[start:start + size] along dim 0, after checking that `loaded` is the whole
    checkpoint tensor: `rows` rows, and the rest of `param`'s shape."""
    expected = (rows, *param.shape[1:])
    if tuple(loaded.shape) != expected:
        raise ValueError(f"shape mismatch: expected {expected}, got {tuple(loaded.shape)}")
    return loaded.narrow(0, start, size)


class LinearBase(nn.Module):
    """y = x W^T (+ b) over this rank's shard: (..., input_size_per_rank) -> (..., out/rank)."""

    def __init__(self, input_size: int, output_size: int, bias: bool, prefix: str,
                 parallel: ParallelContext | None, input_per_rank: int,
                 output_per_rank: int, quant: QuantPolicy | None = None) -> None:
        super().__init__()
        self.prefix = prefix  # module path, e.g. model.layers.3.mlp.down_proj
        self.parallel = parallel or ParallelContext.single()
        self.input_size, self.output_size = input_size, output_size  # unsharded
        self.input_size_per_rank, self.output_size_per_rank = input_per_rank, output_per_rank
        self.method = linear_method_for(prefix, quant)
        self.method.create_weights(self, output_per_rank, input_per_rank)
        for param in self.parameters(recurse=False):  # the method's (quantized checkpoints
            param.weight_loader = self.weight_loader  # name several), each cut here
        if bias:
            self.bias = nn.Parameter(torch.empty(output_per_rank), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        default_weight_loader(param, loaded)

    def process_weights_after_loading(self) -> None:
        self.method.process_weights_after_loading(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.method.apply(self, x, self.bias)


class ReplicatedLinear(LinearBase):
    def __init__(self, input_size: int, output_size: int, bias: bool = False, prefix: str = "",
                 parallel: ParallelContext | None = None,
                 quant: QuantPolicy | None = None) -> None:
        super().__init__(input_size, output_size, bias, prefix, parallel, input_size,
                         output_size, quant)


class ColumnParallelLinear(LinearBase):
    """Output features split across ranks; each rank keeps its slice of the output."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False, prefix: str = "",
                 parallel: ParallelContext | None = None,
                 quant: QuantPolicy | None = None) -> None:
        parallel = parallel or ParallelContext.single()
        out = parallel.shard(output_size, f"{prefix} output size")
        super().__init__(input_size, output_size, bias, prefix, parallel, input_size, out, quant)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        n = param.shape[0]
        copy_checked(param.data, _rows(param, loaded, self.output_size,
                                       self.parallel.tp_rank * n, n))


class RowParallelLinear(LinearBase):
    """Input features split across ranks (o_proj, down_proj); one all-reduce sums them."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False, prefix: str = "",
                 parallel: ParallelContext | None = None,
                 quant: QuantPolicy | None = None) -> None:
        parallel = parallel or ParallelContext.single()
        inp = parallel.shard(input_size, f"{prefix} input size")
        super().__init__(input_size, output_size, bias, prefix, parallel, inp, output_size,
                         quant)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        # The bias, and per-output-channel scales (split_input False), are whole on every
        # rank; everything else is split along its input (last) dimension.
        if param.dim() == 1 or not getattr(param, "split_input", True):
            default_weight_loader(param, loaded)
            return
        n = param.shape[1]
        expected = (param.shape[0], n * self.parallel.tp_size)
        if tuple(loaded.shape) != expected:
            raise ValueError(f"shape mismatch: expected {expected}, got {tuple(loaded.shape)}")
        copy_checked(param.data, loaded.narrow(1, self.parallel.tp_rank * n, n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.parallel.tp_size == 1:
            return self.method.apply(self, x, self.bias)
        out = self.parallel.all_reduce(self.method.apply(self, x))
        return out if self.bias is None else out + self.bias


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel linears over one input in one matmul (gate_up_proj: 0, 1)."""

    def __init__(self, input_size: int, output_sizes: Sequence[int], bias: bool = False,
                 prefix: str = "", parallel: ParallelContext | None = None,
                 quant: QuantPolicy | None = None) -> None:
        parallel = parallel or ParallelContext.single()
        self.output_sizes = list(output_sizes)
        for i, size in enumerate(self.output_sizes):
            parallel.shard(size, f"{prefix} output shard {i}")
        super().__init__(input_size, sum(output_sizes), bias, prefix, parallel, quant)
        for param in self.parameters(recurse=False):
            param.shard_ids = tuple(range(len(self.output_sizes)))

    def forward(self, x: torch.Tensor, silu_mul: bool = False) -> torch.Tensor:
        """x W^T (+ bias); with `silu_mul` (two halves, gate | up): silu(gate) * up, in one
        pass where the method has one (the CPU's packed matmul stores the product)."""
        if not silu_mul:
            return self.method.apply(self, x, self.bias)
        act = self.method.apply_silu_mul(self, x) if self.bias is None else None
        return act if act is not None else ops.silu_and_mul(self.method.apply(self, x, self.bias))

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor,
                      shard_id: int | None = None) -> None:
        if shard_id is None:  # an already-merged checkpoint tensor: load it shard by shard
            if loaded.shape[0] != self.output_size:
                raise ValueError(f"shape mismatch: expected {self.output_size} rows, "
                                 f"got {tuple(loaded.shape)}")
            for i, part in enumerate(loaded.split(self.output_sizes, dim=0)):
                self.weight_loader(param, part, i)
            return
        tp, rank = self.parallel.tp_size, self.parallel.tp_rank
        size = self.output_sizes[shard_id] // tp
        offset = sum(self.output_sizes[:shard_id]) // tp
        copy_checked(param.data.narrow(0, offset, size),
                     _rows(param, loaded, self.output_sizes[shard_id], rank * size, size))


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections in one matmul; output = | q | k | v | of this rank's heads."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int,
                 bias: bool = False, prefix: str = "",
                 parallel: ParallelContext | None = None,
                 quant: QuantPolicy | None = None) -> None:
        parallel = parallel or ParallelContext.single()
        tp = parallel.tp_size
        self.num_heads = parallel.shard(num_heads, f"{prefix} num_attention_heads")
        if num_kv_heads >= tp:
            self.num_kv_heads = parallel.shard(num_kv_heads, f"{prefix} num_key_value_heads")
            self.kv_head_start = parallel.tp_rank * self.num_kv_heads
        elif tp % num_kv_heads:
            raise ValueError(f"{prefix}: tensor_parallel_size ({tp}) must divide or be a "
                             f"multiple of num_key_value_heads ({num_kv_heads})")
        else:  # fewer kv heads than ranks: each kv head lives on tp / num_kv_heads ranks
            self.num_kv_heads = 1
            self.kv_head_start = parallel.tp_rank // (tp // num_kv_heads)
        self.head_dim = head_dim
        self.q_size = self.num_heads * head_dim  # per rank
        self.kv_size = self.num_kv_heads * head_dim  # per rank
        self.total_sizes = {"q": num_heads * head_dim, "k": num_kv_heads * head_dim,
                            "v": num_kv_heads * head_dim}
        LinearBase.__init__(self, hidden_size, sum(self.total_sizes.values()), bias, prefix,
                            parallel, hidden_size, self.q_size + 2 * self.kv_size, quant)
        for param in self.parameters(recurse=False):
            param.shard_ids = ("q", "k", "v")

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor,
                      shard_id: str | None = None) -> None:
        if shard_id is None:  # an already-merged checkpoint tensor
            if loaded.shape[0] != self.output_size:
                raise ValueError(f"shape mismatch: expected {self.output_size} rows, "
                                 f"got {tuple(loaded.shape)}")
            parts = loaded.split(list(self.total_sizes.values()), dim=0)
            for sid, part in zip(("q", "k", "v"), parts):
                self.weight_loader(param, part, sid)
            return
        d = self.head_dim
        if shard_id == "q":
            dst, start = (0, self.q_size), self.parallel.tp_rank * self.q_size
        else:
            offset = self.q_size + (self.kv_size if shard_id == "v" else 0)
            dst, start = (offset, self.kv_size), self.kv_head_start * d
        copy_checked(param.data.narrow(0, *dst),
                     _rows(param, loaded, self.total_sizes[shard_id], start, dst[1]))

    def split(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(T, q_size + 2*kv_size) -> q (T, q_size), k (T, kv_size), v (T, kv_size)."""
        return qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
