"""The greedy argmax kernel against torch.argmax: first index of the maximum, across part
boundaries, ties, bf16 and fp32, rows of -inf, strided rows (a vocabulary slice)."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("rows,vocab", [(1, 128256), (7, 1000), (300, 32000), (2, 5),
                                        (65, 151936)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_argmax_rows_matches_torch(rows, vocab, dtype):
    from tandem.kernels.triton.sampling import argmax_rows
    g = torch.Generator(device="cuda").manual_seed(rows * vocab)
    x = torch.randn(rows, vocab, device="cuda", generator=g).to(dtype)
    assert torch.equal(argmax_rows(x), x.argmax(-1))
    # ties across parts: the maximum at several places, the first one wins
    x[:, :] = -1.0
    picks = torch.randint(0, vocab, (rows, 3), device="cuda", generator=g)
    x.scatter_(1, picks, 5.0)
    assert torch.equal(argmax_rows(x), x.argmax(-1))
    x[0] = float("-inf")
    assert argmax_rows(x)[0].item() == 0 == x.argmax(-1)[0].item()


def test_argmax_of_a_vocabulary_slice_and_nan():
    from tandem.kernels.triton.sampling import argmax_rows
    padded = torch.randn(4, 5000, device="cuda")
    x = padded[:, :4097]  # the sampler slices the padded vocabulary off
    assert torch.equal(argmax_rows(x), x.argmax(-1))
    x = torch.randn(2, 9000, device="cuda")
    x[1, 8001] = float("nan")
    assert argmax_rows(x)[1].item() == 8001 == x.argmax(-1)[1].item()
