"""The mixture-of-experts MLP in plain PyTorch: the spec for kernels/triton/fused_moe.py, and
what runs on CPU.

Each token t was routed (by the layer, outside this file) to K experts with weights:

    out[t] = sum_k topk_weights[t, k] * w2[e] @ (silu(gate_e x[t]) * up_e x[t])
             e = topk_ids[t, k],  gate_e = w13[e, :I],  up_e = w13[e, I:]

    w13 (E, 2I, H)   rows [0, I) are gate_proj, rows [I, 2I) up_proj (HF's order)
    w2  (E, H, I)    down_proj

An id of -1 means "this expert lives on another rank" (expert parallelism passes local ids
or -1): the slot contributes nothing. Sums are float32 throughout (the intermediate too);
the result is cast to x.dtype once.

The loop runs over experts, not tokens: the (token, slot) pairs are grouped by expert with a
stable sort, and each expert that received any does one gather, two matmuls and one
index_add. That is E small GEMMs instead of T*K matrix-vector products, fast enough for the
CPU engine's tiny models.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def select_experts(router_logits: torch.Tensor, top_k: int, renormalize: bool
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The routing: softmax over the experts (float32), the top_k of each row, renormalized
    to sum to 1 if asked (Mixtral always; Qwen's norm_topk_prob). (T, E) -> (weights (T, K)
    float32, ids (T, K) int32)."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids.to(torch.int32)


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, reduce: bool = True) -> torch.Tensor:
    """x (T, H); w13 (E, 2I, H); w2 (E, H, I); topk_weights (T, K) float; topk_ids (T, K)
    int in [-1, E) -> (T, H) in x.dtype, summed in float32; reduce=False: each pair's
    weighted output unsummed, (T, K, H) (zero for a -1 id)."""
    num_tokens, hidden = x.shape
    num_experts, inter = w13.shape[0], w13.shape[1] // 2
    top_k = topk_ids.shape[1]
    rows = num_tokens if reduce else num_tokens * top_k
    out = torch.zeros(rows, hidden, dtype=torch.float32, device=x.device)
    ids = topk_ids.reshape(-1).long()  # (T*K,), pair p = t*K + k
    weights = topk_weights.reshape(-1).float()
    # -1 sorts last as a pretend expert E, then is never visited
    expert_of_pair = torch.where(ids >= 0, ids, num_experts)
    pairs = torch.argsort(expert_of_pair, stable=True)  # pairs grouped by expert
    counts = torch.bincount(expert_of_pair, minlength=num_experts + 1).tolist()
    start = 0
    for e in range(num_experts):
        n = counts[e]
        if n == 0:
            continue
        p = pairs[start:start + n]  # (n,) the pairs routed to e
        start += n
        tok = p // top_k
        xe = x.index_select(0, tok).float()  # (n, H)
        gate_up = xe @ w13[e].float().t()  # (n, 2I)
        h = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]  # (n, I)
        y = (h @ w2[e].float().t()) * weights[p, None]  # (n, H)
        out.index_add_(0, tok if reduce else p, y)
    if not reduce:
        return out.view(num_tokens, top_k, hidden).to(x.dtype)
    return out.to(x.dtype)


def fused_moe_dense(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                    topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    """fused_moe without host syncs (every expert over every token, weighted by the routing,
    zero where unrouted): E times the work, but capturable in a CUDA graph; for the dtypes
    the Triton kernel does not take (float32 on CUDA)."""
    num_experts, inter = w13.shape[0], w13.shape[1] // 2
    xf = x.float()
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
    for e in range(num_experts):
        weight = (topk_weights.float() * (topk_ids == e)).sum(dim=1, keepdim=True)  # (T, 1)
        gate_up = xf @ w13[e].float().t()
        h = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]
        out += (h @ w2[e].float().t()) * weight
    return out.to(x.dtype)
