"""FusedMoE's bookkeeping without a process group: where each rank's experts come from
(tensor vs expert parallel), the loader's checks, and the expert-parallel config's rules."""

from __future__ import annotations

import logging

import pytest
import torch

from tandem.config import ParallelConfig
from tandem.distributed.expert_dispatch import local_ids
from tandem.distributed.parallel import ParallelContext
from tandem.layers.moe import FusedMoE

E, H, I = 4, 8, 6


def _experts(rank: int, ep: bool) -> tuple[FusedMoE, list[torch.Tensor]]:
    layer = FusedMoE(E, 2, H, I, "model.layers.0.mlp.experts",
                     ParallelContext(rank, 2, expert_parallel=ep))
    full = [torch.randn(2 * I + H, max(H, I)) for _ in range(E)]  # per expert: w1 w3 w2
    return layer, full


def _load(layer: FusedMoE, full: list[torch.Tensor]) -> None:
    for e, t in enumerate(full):
        layer.weight_loader(None, t[:I, :H], "w1", e)
        layer.weight_loader(None, t[I:2 * I, :H], "w3", e)
        layer.weight_loader(None, t[2 * I:, :I], "w2", e)


def test_tensor_parallel_splits_every_expert():
    layer, full = _experts(1, ep=False)
    assert layer.w13_weight.shape == (E, 2 * (I // 2), H)
    assert layer.w2_weight.shape == (E, H, I // 2)
    _load(layer, full)
    assert layer.is_loaded()
    e = 3  # rank 1: the second half of the gate rows, of the up rows, of w2's columns
    assert torch.equal(layer.w13_weight[e, :3], full[e][3:I, :H])
    assert torch.equal(layer.w13_weight[e, 3:], full[e][I + 3:2 * I, :H])
    assert torch.equal(layer.w2_weight[e], full[e][2 * I:, 3:I])


def test_expert_parallel_keeps_whole_experts_of_its_own():
    layer, full = _experts(1, ep=True)
    assert (layer.num_local_experts, layer.expert_start) == (2, 2)
    assert layer.w13_weight.shape == (2, 2 * I, H)
    _load(layer, full[:3])
    assert not layer.is_loaded()  # expert 3 not seen yet
    _load(layer, full)
    assert layer.is_loaded()
    assert torch.equal(layer.w13_weight[1, :I], full[3][:I, :H])  # local 1 = expert 3
    assert torch.equal(layer.w2_weight[0], full[2][2 * I:, :I])
    ids = torch.tensor([[0, 3], [2, 1]])
    assert local_ids(ids, 2, 2).tolist() == [[-1, 1], [0, -1]]


def test_loader_errors_name_the_problem():
    layer, _ = _experts(0, ep=False)
    with pytest.raises(ValueError, match="expert 4 out of range"):
        layer.weight_loader(None, torch.zeros(I, H), "w1", 4)
    with pytest.raises(ValueError, match="shape mismatch"):
        layer.weight_loader(None, torch.zeros(H, H), "w1", 0)
    with pytest.raises(ValueError, match="unknown expert shard"):
        layer.weight_loader(None, torch.zeros(I, H), "w9", 0)
    with pytest.raises(ValueError, match="not divisible"):
        FusedMoE(3, 2, H, I, "x", ParallelContext(0, 2, expert_parallel=True))


def test_expert_parallel_config_rules():
    with pytest.raises(ValueError, match="expert_dispatch must be one of"):
        ParallelConfig(expert_dispatch="nccl")
    with pytest.raises(ValueError, match="needs enable_expert_parallel"):
        ParallelConfig(expert_dispatch="alltoall")
    ParallelConfig(tensor_parallel_size=2, enable_expert_parallel=True,
                   expert_dispatch="alltoall")


def test_expert_parallel_on_a_dense_model_is_said(tmp_path, caplog):
    from tandem.models.loader import load_model
    from tests.model_factory import make_tiny_model
    path = make_tiny_model(tmp_path, "LlamaForCausalLM")
    with caplog.at_level(logging.WARNING):
        load_model(path, torch.float32, "cpu", parallel=ParallelContext(0, 1,
                                                                        expert_parallel=True))
    assert "enable_expert_parallel has no effect" in caplog.text


def test_one_rank_leaves_the_slots_for_the_next_norm():
    """reduce=False on one rank: the K weighted expert outputs as PartialSums, whose sum is
    the reduced output, and RMSNorm's residual add over them equals the norm of the sum."""
    from tandem.layers.norm import PartialSums, RMSNorm
    torch.manual_seed(0)
    layer = FusedMoE(E, 2, H, I, "model.layers.0.mlp.experts", ParallelContext(0, 1))
    _load(layer, [torch.randn(2 * I + H, max(H, I)) for _ in range(E)])
    x = torch.randn(5, H)
    weights = torch.rand(5, 2)
    ids = torch.tensor([[0, 1], [2, 3], [1, 3], [0, 2], [3, -1]], dtype=torch.int32)
    full = layer(x, weights, ids)
    slots = layer(x, weights, ids, reduce=False)
    assert isinstance(full, torch.Tensor) and isinstance(slots, PartialSums)
    assert slots.terms.shape == (5, 2, H)
    assert torch.equal(slots.terms[4, 1], torch.zeros(H))  # the -1 slot adds nothing
    torch.testing.assert_close(slots.sum(), full, atol=1e-6, rtol=1e-6)
    norm = RMSNorm(H, 1e-6)
    norm.weight.data.uniform_(0.5, 1.5)
    residual = torch.randn(5, H)
    got, got_res = norm(slots, residual)
    want, want_res = norm(slots.sum(), residual)
    assert torch.equal(got_res, want_res) and torch.equal(got, want)
