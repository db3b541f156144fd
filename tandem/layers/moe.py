"""Mixture of experts: a router picks `top_k` of `num_experts` SwiGLU experts per token and
mixes their outputs by the router's weights (vLLM's `FusedMoE`, same parameter names).

    router_logits = gate(x)                               (T, E)   ReplicatedLinear
    topk_weights, topk_ids = select_experts(logits, K)    (T, K) float32, (T, K) int32
    out = ops.fused_moe(x, w13, w2, topk_weights, topk_ids)   (T, H)
        out[t] = sum_k w[t,k] * W2[e] (silu(W1[e] x[t]) * (W3[e] x[t])),  e = ids[t,k]

Weights, stacked per expert (checkpoints store each expert's w1/w3/w2, or gate_proj/up_proj/
down_proj, as separate tensors; `weight_loader(param, loaded, shard_id, expert_id)` puts
each in place):

    w13_weight (E_local, 2 * I_rank, H):  | gate (w1) rows | up (w3) rows |
    w2_weight  (E_local, H, I_rank)

Parallelism over the tensor-parallel group (tp ranks; attention stays tensor parallel, so
every rank holds every token's hidden state after o_proj's all-reduce):

    tensor parallel  every expert on every rank, its intermediate size split: I_rank = I/tp;
                     each rank's (T, H) is a partial sum over its I slice
    expert parallel  (enable_expert_parallel) rank r owns experts [r E/tp, (r+1) E/tp) whole:
                     E_local = E/tp, I_rank = I; ids of other ranks' experts become -1
                     (skipped), so each rank's (T, H) is the sum over its own experts

Tensor parallelism ends with one all-reduce of (T, H). Expert parallelism's token exchange
is `ParallelConfig.expert_dispatch` (distributed/expert_dispatch.py): an all-reduce of
every rank's partial sums (the tokens are already on every rank), or an all-to-all of the
tokens to their experts' ranks and back. It reads E/tp whole experts per rank rather than E
thin slices (fewer, larger matmuls), and needs no divisibility of I by tp.

Quantization: the experts stay in the model dtype (the seam is `FusedMoE.method`; the
quantization policy's linear methods apply to the attention, the router stays unquantized).
"""

from __future__ import annotations

import torch
from torch import nn

from tandem.distributed.expert_dispatch import dispatch
from tandem.distributed.parallel import ParallelContext
from tandem.kernels import ops
from tandem.layers.linear import copy_checked
from tandem.layers.norm import PartialSums


def select_experts(router_logits: torch.Tensor, top_k: int, renormalize: bool
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over the experts (float32), then the top_k of each row, renormalized to sum
    to 1 if asked (Mixtral always; Qwen's norm_topk_prob). -> (weights (T, K) float32,
    ids (T, K) int32). One fused launch on CUDA."""
    return ops.select_experts(router_logits, top_k, renormalize)


class UnquantizedFusedMoEMethod:
    """Experts in the model dtype: the stacked weights and the fused kernel (or reference)."""

    def create_weights(self, layer: FusedMoE, num_experts: int, hidden: int,
                       intermediate: int) -> None:
        layer.w13_weight = nn.Parameter(torch.empty(num_experts, 2 * intermediate, hidden),
                                        requires_grad=False)
        layer.w2_weight = nn.Parameter(torch.empty(num_experts, hidden, intermediate),
                                       requires_grad=False)

    def apply(self, layer: FusedMoE, x: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, reduce: bool = True) -> torch.Tensor:
        return ops.fused_moe(x, layer.w13_weight, layer.w2_weight, topk_weights, topk_ids,
                             reduce=reduce)


class FusedMoE(nn.Module):
    """The experts of one layer (no router: the model owns it, since routing differs by
    architecture). forward(x (T, H), topk_weights, topk_ids over all E experts) -> (T, H),
    already combined over the ranks."""

    def __init__(self, num_experts: int, top_k: int, hidden_size: int, intermediate_size: int,
                 prefix: str = "", parallel: ParallelContext | None = None) -> None:
        super().__init__()
        self.prefix = prefix
        self.parallel = parallel = parallel or ParallelContext.single()
        self.num_experts, self.top_k = num_experts, top_k
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        if parallel.expert_parallel:
            self.num_local_experts = parallel.shard(num_experts, f"{prefix} num_experts")
            self.expert_start = parallel.tp_rank * self.num_local_experts
            self.intermediate_per_rank = intermediate_size
        else:
            self.num_local_experts, self.expert_start = num_experts, 0
            self.intermediate_per_rank = parallel.shard(intermediate_size,
                                                        f"{prefix} moe intermediate size")
        self.method = UnquantizedFusedMoEMethod()
        self.method.create_weights(self, self.num_local_experts, hidden_size,
                                   self.intermediate_per_rank)
        for param in (self.w13_weight, self.w2_weight):
            param.weight_loader = self.weight_loader
        # (expert, shard) pairs loaded so far: complete once every local expert has all three
        self._loaded: set[tuple[int, str]] = set()

    # ---- loading ------------------------------------------------------------------------

    def is_local(self, expert_id: int) -> bool:
        return self.expert_start <= expert_id < self.expert_start + self.num_local_experts

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str,
                      expert_id: int) -> None:
        """One expert's checkpoint tensor: shard_id "w1" (gate, (I, H)), "w3" (up, (I, H))
        or "w2" (down, (H, I)). Other ranks' experts (expert parallelism) are skipped."""
        if not 0 <= expert_id < self.num_experts:
            raise ValueError(f"expert {expert_id} out of range: the layer has "
                             f"{self.num_experts} experts")
        if shard_id not in ("w1", "w2", "w3"):
            raise ValueError(f"unknown expert shard {shard_id!r}")
        self._loaded.add((expert_id, shard_id))
        if not self.is_local(expert_id):
            return
        e = expert_id - self.expert_start
        n, rank = self.intermediate_per_rank, 0 if self.parallel.expert_parallel else (
            self.parallel.tp_rank)
        h, i = self.hidden_size, self.intermediate_size
        if shard_id == "w2":
            if tuple(loaded.shape) != (h, i):
                raise ValueError(f"shape mismatch: expected {(h, i)}, got {tuple(loaded.shape)}")
            copy_checked(self.w2_weight.data[e], loaded.narrow(1, rank * n, n))
            return
        if tuple(loaded.shape) != (i, h):
            raise ValueError(f"shape mismatch: expected {(i, h)}, got {tuple(loaded.shape)}")
        dst = self.w13_weight.data[e].narrow(0, 0 if shard_id == "w1" else n, n)
        copy_checked(dst, loaded.narrow(0, rank * n, n))

    def load_stacked(self, name: str, loaded: torch.Tensor) -> None:
        """A checkpoint that already stacks the experts (transformers' fused layout):
        gate_up_proj (E, 2I, H) or down_proj (E, H, I)."""
        i = self.intermediate_size
        for e in range(loaded.shape[0]):
            if name == "gate_up_proj":
                self.weight_loader(self.w13_weight, loaded[e, :i], "w1", e)
                self.weight_loader(self.w13_weight, loaded[e, i:], "w3", e)
            else:
                self.weight_loader(self.w2_weight, loaded[e], "w2", e)

    def is_loaded(self) -> bool:
        return len(self._loaded) == 3 * self.num_experts

    # ---- forward ------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                reduce: bool = True) -> torch.Tensor | PartialSums:
        """-> (T, H); with reduce=False on one rank, possibly PartialSums (the kernel's K
        weighted expert outputs, for the next RMSNorm to sum: layers/norm.py)."""
        p = self.parallel
        if p.tp_size == 1:
            out = self.method.apply(self, x, topk_weights, topk_ids, reduce=reduce)
            return PartialSums(out) if out.dim() == 3 else out
        if not p.expert_parallel:
            return p.all_reduce(self.method.apply(self, x, topk_weights, topk_ids))
        # all-to-all needs the sizes on the host: never inside a CUDA-graph capture
        name = ("allreduce" if x.is_cuda and torch.cuda.is_current_stream_capturing()
                else p.expert_dispatch)
        return dispatch(name)(p, self._local_experts, x, topk_weights, topk_ids,
                              self.expert_start, self.num_local_experts)

    def _local_experts(self, x: torch.Tensor, topk_weights: torch.Tensor,
                       topk_ids: torch.Tensor) -> torch.Tensor:
        return self.method.apply(self, x, topk_weights, topk_ids)
