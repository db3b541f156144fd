"""The Triton mixture-of-experts kernel (kernels/triton/fused_moe.py) against its PyTorch
reference (kernels/reference/moe.py): expert counts 1 to 128, top-k 1 to 8, 1 to 1000
tokens, shapes off the tile sizes and Qwen3-30B-A3B's, experts that get no token, -1 ids
(expert parallelism), bf16 and fp16, the sorted layout itself, bit-reproducibility, and
capture and replay in a CUDA graph with new inputs."""

from __future__ import annotations

import pytest
import torch

from tandem.kernels import ops
from tandem.kernels.reference.moe import fused_moe as reference

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def make(num_tokens: int, hidden: int, inter: int, num_experts: int, top_k: int, seed: int,
         dtype: torch.dtype = torch.bfloat16, unused: tuple[int, ...] = (),
         drop: float = 0.0):
    """Random weights and routing; experts in `unused` get no token, and a `drop` fraction of
    the slots is -1 (their expert lives on another rank)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(num_tokens, hidden, device="cuda", generator=g).to(dtype)
    w13 = (torch.randn(num_experts, 2 * inter, hidden, device="cuda", generator=g)
           / hidden**0.5).to(dtype)
    w2 = (torch.randn(num_experts, hidden, inter, device="cuda", generator=g)
          / inter**0.5).to(dtype)
    logits = torch.randn(num_tokens, num_experts, device="cuda", generator=g)
    logits[:, list(unused)] = float("-inf")
    topk_weights, topk_ids = torch.softmax(logits, -1).topk(top_k, dim=-1)
    topk_ids = torch.where(topk_weights > 0, topk_ids, -1)  # top_k > the usable experts
    if drop:
        gone = torch.rand(num_tokens, top_k, device="cuda", generator=g) < drop
        topk_ids = torch.where(gone, -1, topk_ids)
    return x, w13, w2, topk_weights, topk_ids.to(torch.int32)


def check(x, w13, w2, w, ids):
    out = ops.fused_moe(x, w13, w2, w, ids)
    ref = reference(x.float(), w13.float(), w2.float(), w, ids)
    assert out.dtype == x.dtype and out.shape == x.shape
    # h is rounded to x.dtype between the GEMMs (the reference keeps float32)
    torch.testing.assert_close(out.float(), ref, rtol=2e-2,
                               atol=2e-2 * max(ref.abs().max().item(), 1e-3))
    return out


@pytest.mark.parametrize("num_tokens", [1, 3, 16, 100, 1000])
@pytest.mark.parametrize("num_experts,top_k", [(1, 1), (4, 2), (8, 2), (60, 4), (128, 8)])
def test_matches_reference_off_tile_shapes(num_tokens, num_experts, top_k):
    """H 96, I 40: neither a multiple of the blocks."""
    check(*make(num_tokens, 96, 40, num_experts, top_k, seed=num_tokens * 1000 + num_experts))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("top_k", [1, 2, 4, 8])
def test_dtypes_and_top_k(dtype, top_k):
    check(*make(37, 256, 128, 16, top_k, seed=top_k, dtype=dtype))


@pytest.mark.parametrize("num_tokens", [1, 16, 100, 1000])
def test_qwen3_30b_a3b_shapes(num_tokens):
    check(*make(num_tokens, 2048, 768, 128, 8, seed=num_tokens))


@pytest.mark.parametrize("num_tokens", [1, 3, 100])
def test_experts_without_tokens(num_tokens):
    """Half the experts get nothing; their weights are NaN, so reading them would show."""
    unused = tuple(range(0, 16, 2))
    x, w13, w2, w, ids = make(num_tokens, 128, 64, 16, 4, seed=7, unused=unused)
    w13[list(unused)] = float("nan")
    w2[list(unused)] = float("nan")
    assert torch.isfinite(check(x, w13, w2, w, ids)).all()


@pytest.mark.parametrize("num_tokens", [1, 3, 100, 1000])
@pytest.mark.parametrize("drop", [0.5, 1.0])
def test_minus_one_ids_contribute_nothing(num_tokens, drop):
    x, w13, w2, w, ids = make(num_tokens, 96, 40, 8, 4, seed=num_tokens, drop=drop)
    out = check(x, w13, w2, w, ids)
    assert torch.all(out[(ids < 0).all(1)] == 0)


@pytest.mark.parametrize("num_tokens,top_k", [(1000, 2), (1, 8)])
def test_bit_reproducible(num_tokens, top_k):
    """The atomics place an expert's pairs in a different order each run; every row is
    computed on its own and the K slots are summed in a fixed order, so nothing changes."""
    x, w13, w2, w, ids = make(num_tokens, 256, 128, 64, top_k, seed=5)
    first = ops.fused_moe(x, w13, w2, w, ids)
    for _ in range(5):
        assert torch.equal(ops.fused_moe(x, w13, w2, w, ids), first)


def test_one_token_direct_path_equals_the_sorted_layout():
    """The one-token path (no layout: block p is pair p) equals the sorted layout's rows bit
    for bit: the same tiles, the same K slots summed in the same order. Under a CUDA graph,
    replayed twice."""
    from tandem.kernels.triton import fused_moe as fm
    x, w13, w2, w, ids = make(1, 2048, 768, 128, 8, seed=21, drop=0.25)
    cfg = fm.moe_config(8, 128, 2048, 768)
    x2 = torch.cat([x, x])  # two tokens: the sorted layout, then sum_slots
    both = fm.fused_moe(x2, w13, w2, torch.cat([w, w]), torch.cat([ids, ids]), config=cfg)
    fm.fused_moe(x, w13, w2, w, ids, config=cfg)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fm.fused_moe(x, w13, w2, w, ids, config=cfg)
    for _ in range(2):
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out[0], both[0])


@pytest.mark.parametrize("block_m", [16, 64])
def test_align_layout(block_m):
    """Each pair sits once in its expert's run, runs start on block boundaries, padding
    holds the sentinel T*K, and the block count stays under the bound."""
    from tandem.kernels.triton.fused_moe import moe_align
    num_experts = 32
    _, _, _, _, ids = make(200, 16, 16, num_experts, 4, seed=block_m, unused=(3, 9),
                           drop=0.2)
    sorted_ids, block_expert, num_rows = moe_align(ids, num_experts, block_m)
    n, rows = ids.numel(), int(num_rows)
    flat = torch.where(ids.reshape(-1) < 0, num_experts, ids.reshape(-1).long()).cpu()
    s, be = sorted_ids.long().cpu(), block_expert.long().cpu()
    assert rows % block_m == 0 and rows <= s.numel() and torch.all(s[rows:] == n)
    assert torch.all(be[rows // block_m:] == num_experts + 1)
    real = s[:rows] < n
    assert sorted(s[:rows][real].tolist()) == list(range(n))
    expert_of_row = be[:rows // block_m].repeat_interleave(block_m)
    assert torch.equal(flat[s[:rows][real]], expert_of_row[real])
    assert be[:rows // block_m].diff().ge(0).all()  # runs in expert order
    assert 3 not in be.tolist() and 9 not in be.tolist()


@pytest.mark.parametrize("num_tokens,one_launch", [(8, "auto"), (1, "0"), (1, "1")])
def test_cuda_graph_replay_with_new_inputs(monkeypatch, num_tokens, one_launch):
    """Decode runs in CUDA graphs: capture once, copy new tokens and routing in, replay
    (one token in one launch: its counters must be zeroed again by every replay)."""
    monkeypatch.setenv("TANDEM_MOE_ONE_LAUNCH", one_launch)
    x, w13, w2, w, ids = make(num_tokens, 256, 128, 16, 4, seed=11, drop=0.25)
    static = [x.clone(), w.clone(), ids.clone()]
    ops.fused_moe(static[0], w13, w2, static[1], static[2])  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.fused_moe(static[0], w13, w2, static[1], static[2])
    for seed in (12, 13, 14):
        nx, _, _, nw, nids = make(num_tokens, 256, 128, 16, 4, seed=seed,
                                  drop=0.25 * (seed - 12))
        for dst, src in zip(static, (nx, nw, nids)):
            dst.copy_(src)
        graph.replay()
        torch.cuda.synchronize()
        ref = reference(nx.float(), w13.float(), w2.float(), nw, nids)
        torch.testing.assert_close(out.float(), ref, rtol=2e-2,
                                   atol=2e-2 * ref.abs().max().item())


@pytest.mark.parametrize("t,e,k,renorm", [(1, 128, 8, True), (5, 8, 2, True), (300, 60, 4, False),
                                          (3, 16, 1, False), (7, 256, 8, True)])
def test_select_experts_matches_reference(t, e, k, renorm):
    from tandem.kernels.reference.moe import select_experts as ref_select
    from tandem.kernels.triton.fused_moe import select_experts
    g = torch.Generator(device="cuda").manual_seed(t * e + k)
    logits = torch.randn(t, e, device="cuda", generator=g)
    w, ids = select_experts(logits, k, renorm)
    rw, rids = ref_select(logits, k, renorm)
    assert ids.dtype == torch.int32 and w.dtype == torch.float32
    assert torch.equal(ids, rids)  # float32 random logits: no ties
    torch.testing.assert_close(w, rw, rtol=1e-5, atol=1e-6)
    # bf16 logits tie often; which of two equal experts comes first is arbitrary (topk's
    # order differs too), but the weights and the chosen experts' probabilities agree
    half = logits.to(torch.bfloat16)
    w, ids = select_experts(half, k, renorm)
    rw, rids = ref_select(half, k, renorm)
    torch.testing.assert_close(w, rw, rtol=1e-5, atol=1e-6)
    probs = torch.softmax(half.float(), -1)
    torch.testing.assert_close(probs.gather(1, ids.long()), probs.gather(1, rids.long()))


@pytest.mark.parametrize("t,k,e,block_m", [(1, 8, 128, 16), (8, 8, 128, 16), (3, 2, 8, 16),
                                           (16, 4, 60, 32), (2, 8, 128, 64)])
def test_one_launch_align_equals_the_three_launch_one(monkeypatch, t, k, e, block_m):
    """Below SMALL_ALIGN_PAIRS one program aligns: the same runs, block experts and rows
    (the order within a run may differ: compared as sets)."""
    from tandem.kernels.triton import fused_moe as fm
    g = torch.Generator(device="cuda").manual_seed(t + e)
    ids = torch.stack([torch.randperm(e, device="cuda", generator=g)[:k] for _ in range(t)])
    ids[0, -1] = -1  # an expert on another rank
    ids = ids.to(torch.int32)
    small = fm.moe_align(ids, e, block_m)
    monkeypatch.setattr(fm, "SMALL_ALIGN_PAIRS", 0)
    big = fm.moe_align(ids, e, block_m)
    assert torch.equal(small[1], big[1]) and torch.equal(small[2], big[2])
    for b in range(small[1].numel()):
        rows = slice(b * block_m, (b + 1) * block_m)
        assert sorted(small[0][rows].tolist()) == sorted(big[0][rows].tolist())


@pytest.mark.parametrize("num_experts,top_k,hidden,inter,config", [
    (1, 1, 96, 40, None), (16, 4, 96, 40, None), (16, 4, 96, 40, (16, 32, 16, 16, 4, 2)),
    (128, 8, 2048, 768, None), (128, 8, 2048, 768, (16, 256, 64, 128, 8, 3)),
    (8, 2, 4096, 1408, None), (8, 2, 4096, 1408, (64, 128, 128, 64, 4, 4))])
def test_one_launch_matches_reference(num_experts, top_k, hidden, inter, config):
    """moe_one (gate/up and down in one launch, kernels/triton/moe_one.py): each of K
    slots against the reference, shapes off the tiles and many tiny tiles (many tickets),
    calls in a row with -1 slots; the counters are zero again after every call."""
    from tandem.kernels.triton.moe_one import _sync_buffer, moe_one
    for seed in range(3):
        x, w13, w2, w, ids = make(1, hidden, inter, num_experts, top_k, seed=seed,
                                  drop=0.3 * seed)
        out = moe_one(x, w13, w2, w, ids, config)
        ref = reference(x.float(), w13.float(), w2.float(), w, ids, reduce=False)
        ref = ref.reshape(top_k, hidden)
        assert out.shape == (top_k, hidden) and out.dtype == x.dtype
        torch.testing.assert_close(out.float(), ref, rtol=2e-2,
                                   atol=2e-2 * max(ref.abs().max().item(), 1e-3))
        assert torch.all(out[ids[0] < 0] == 0)
        assert torch.count_nonzero(_sync_buffer(x.device)).item() == 0


@pytest.mark.parametrize("shape", [(2048, 768, 128, 8), (1024, 14336, 8, 2)])
def test_one_launch_against_two_launches(monkeypatch, shape):
    """ops.fused_moe for one token in one launch (TANDEM_MOE_ONE_LAUNCH=1) and in two (=0):
    within bf16 rounding of each other, summed or not. On a 132-SM H200 auto takes one
    launch for the second shape (Mixtral's 896 gate/up tiles) and two for the first
    (Qwen3-30B-A3B's 192)."""
    from tandem.kernels.triton.moe_one import one_launch_pays
    hidden, inter, num_experts, top_k = shape
    x, w13, w2, w, ids = make(1, hidden, inter, num_experts, top_k, seed=31, drop=0.25)
    if torch.cuda.get_device_properties(0).multi_processor_count == 132:
        assert one_launch_pays(top_k, inter, x.device) == (inter > 768)
    monkeypatch.setenv("TANDEM_MOE_ONE_LAUNCH", "1")
    one = ops.fused_moe(x, w13, w2, w, ids)
    one_slots = ops.fused_moe(x, w13, w2, w, ids, reduce=False)
    monkeypatch.setenv("TANDEM_MOE_ONE_LAUNCH", "0")
    two = ops.fused_moe(x, w13, w2, w, ids)
    two_slots = ops.fused_moe(x, w13, w2, w, ids, reduce=False)
    assert one_slots.shape == two_slots.shape == (1, top_k, hidden)
    for a, b in ((one, two), (one_slots, two_slots)):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2,
                                   atol=1e-2 * b.abs().max().item())
