"""Which steps CudaGraphRunner replays (the decision runs on the host, so it is checked on
the CPU; the replays themselves are tests/gpu/test_engine_cuda.py's)."""

from __future__ import annotations

import pytest
import torch

from tandem.runner.cuda_graph import CudaGraphRunner
from tandem.runner.input_batch import ModelInputs
from tests.model_factory import make_attn_metadata


def _runner(max_batch=8, max_model_len=1024, max_prefill_tokens=8192) -> CudaGraphRunner:
    return CudaGraphRunner(torch.nn.Identity(), max_batch, max_model_len, 16, 99,
                           torch.device("cpu"), max_prefill_tokens=max_prefill_tokens)


@pytest.mark.parametrize("max_prefill,max_len,want", [
    (8192, 1024, [16, 32, 64, 128, 256, 512]), (100, 4096, [16, 32, 64, 100]),
    (1, 1024, []), (8192, 8, [8]), (512, 4096, [16, 32, 64, 128, 256, 512]),
    (300, 200, [16, 32, 64, 128, 200])])
def test_prefill_sizes(max_prefill, max_len, want):
    runner = _runner(max_model_len=max_len, max_prefill_tokens=max_prefill)
    assert runner.prefill_sizes == want
    # the static buffers hold the largest graph of either kind
    assert runner.input_ids.numel() >= max([runner.sizes[-1], *want])


def _inputs(query_lens: list[int], seq_lens: list[int]) -> ModelInputs:
    tables = [list(range(-(-s // 16))) for s in seq_lens]
    meta = make_attn_metadata(query_lens, seq_lens, tables, 16)
    t = meta.num_tokens
    return ModelInputs(torch.zeros(t, dtype=torch.int64), torch.zeros(t, dtype=torch.int64),
                       meta, list(range(len(query_lens))), torch.zeros(1, dtype=torch.int64),
                       [])


@pytest.mark.parametrize("query_lens,seq_lens,want", [
    ([1], [40], True),  # a decode
    ([1] * 8, [9] * 8, True),  # the largest decode batch
    ([1] * 9, [9] * 9, False),  # past it
    ([2], [2], True), ([512], [600], True),  # one sequence's chunk, prefix or not
    ([513], [513], False),  # longer than the largest prefill graph
    ([5, 1], [5, 30], False), ([5, 7], [5, 7], False)])  # mixed and batched prefills: eager
def test_which_steps_replay(query_lens, seq_lens, want):
    assert _runner().can_run(_inputs(query_lens, seq_lens)) == want


def test_no_prefill_graphs_when_none_fit():
    assert not _runner(max_prefill_tokens=1).can_run(_inputs([5], [5]))
