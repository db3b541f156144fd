"""Expert parallelism's token exchange: how a MoE layer's tokens reach the ranks that own
their experts, and how the experts' outputs come back (layers/moe.py's FusedMoE calls one).

Attention is tensor parallel, so after o_proj's all-reduce every rank holds every token's
hidden state. Two ways to finish the layer (`ParallelConfig.expert_dispatch`):

    allreduce  every rank runs its own experts on every token routed to them (others' ids
               are -1) and one all-reduce of (T, H) sums the ranks. The dispatch is free
               (the tokens are there); the combine moves ~2 (N-1)/N x T x H per rank (a
               reduce-scatter and an all-gather). Fixed shapes: runs in CUDA graphs.
    alltoall   rank r takes the r-th slice of the tokens, sends each token once to every
               rank owning one of its experts (all_to_all, with the top-k ids and weights
               of that rank's experts), each rank runs its experts on what arrived, the
               outputs go back the same way (all_to_all), are summed per token, and an
               all-gather of the slices makes (T, H) whole again. Moves ~T x H (N-1)/N each
               way plus the all-gather, and needs the sizes on the host (a sync): eager
               steps only; a step being captured into a CUDA graph uses allreduce.

    rank r's slice  [r*ceil(T/N), (r+1)*ceil(T/N))   (the last ones may be short or empty)
    send to rank d  the slice's tokens with an expert on d, ids made local to d, else -1

Both compute each (token, expert) pair exactly once, on the expert's owner; they differ only
in what crosses the link. scripts/bench_ep_dispatch.py times them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from tandem.config import EXPERT_DISPATCH
from tandem.distributed.parallel import ParallelContext

# (x, topk_weights, local topk_ids with -1 for other ranks' experts) -> (rows, H) partial
LocalExperts = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def local_ids(topk_ids: torch.Tensor, start: int, count: int) -> torch.Tensor:
    """Global expert ids -> ids among this rank's [start, start + count), others -1."""
    local = topk_ids - start
    return torch.where((local >= 0) & (local < count), local, torch.full_like(local, -1))


def allreduce_dispatch(parallel: ParallelContext, experts: LocalExperts, x: torch.Tensor,
                       weights: torch.Tensor, ids: torch.Tensor, start: int, count: int
                       ) -> torch.Tensor:
    return parallel.all_reduce(experts(x, weights, local_ids(ids, start, count)))


def alltoall_dispatch(parallel: ParallelContext, experts: LocalExperts, x: torch.Tensor,
                      weights: torch.Tensor, ids: torch.Tensor, start: int, count: int
                      ) -> torch.Tensor:
    n, rank, group = parallel.tp_size, parallel.tp_rank, parallel.group
    t, h = x.shape
    per = -(-t // n)
    lo, hi = min(rank * per, t), min((rank + 1) * per, t)
    xs, ws, ids_s = x[lo:hi], weights[lo:hi], ids[lo:hi]  # my slice
    owner = ids_s // count  # (rows, K): the rank of each slot's expert
    # rows to each rank d (a token once per rank, however many of its experts live there)
    rows = [torch.nonzero((owner == d).any(dim=1)).flatten() for d in range(n)]
    send_rows = torch.cat(rows)
    send_counts = torch.tensor([len(r) for r in rows], dtype=torch.int64, device=x.device)
    send_ids = torch.cat([local_ids(ids_s[r], d * count, count) for d, r in enumerate(rows)])
    # one float32 tensor for a row's K weights and K ids (ids < 2^24 are exact)
    meta = torch.cat([ws[send_rows].float(), send_ids.float()], dim=1)
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts, group=group)
    sc, rc = send_counts.tolist(), recv_counts.tolist()
    recv_x = x.new_empty(sum(rc), h)
    recv_meta = meta.new_empty(sum(rc), meta.shape[1])
    dist.all_to_all_single(recv_x, xs[send_rows].contiguous(), rc, sc, group=group)
    dist.all_to_all_single(recv_meta, meta, rc, sc, group=group)
    k = ids.shape[1]
    y = (experts(recv_x, recv_meta[:, :k], recv_meta[:, k:].to(ids.dtype)) if sum(rc)
         else recv_x)  # (sum rc, H)
    back = x.new_empty(sum(sc), h)
    dist.all_to_all_single(back, y.contiguous(), sc, rc, group=group)
    mine = torch.zeros(per, h, dtype=torch.float32, device=x.device)
    mine.index_add_(0, send_rows, back.float())
    parts = [torch.empty_like(mine) for _ in range(n)]
    dist.all_gather(parts, mine, group=group)
    return torch.cat(parts)[:t].to(x.dtype)


def dispatch(name: str) -> Callable[..., torch.Tensor]:
    if name not in EXPERT_DISPATCH:
        raise ValueError(f"expert_dispatch must be one of {EXPERT_DISPATCH}, got {name!r}")
    return allreduce_dispatch if name == "allreduce" else alltoall_dispatch
