"""Sizing of the decode GEMVs' L2 prefetch (kernels/triton/pdl.py): what the resident
programs ask of L2 at once stays within the budget, never past the rows, in whole lines."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from tandem.kernels.triton import pdl  # noqa: E402

# Llama-3.1-8B decode GEMVs, bf16 (programs, rows a program, warps, bytes a row left after
# the first tile) and int8 (4 rows, K/4 words in tiles of 256 or 512 words)
CASES = [(1536, 4, 8, 6144), (1024, 4, 8, 4096), (7168, 4, 8, 6144), (256, 16, 8, 26624),
         (1536, 4, 2, 3072), (7168, 4, 1, 3072), (1024, 4, 4, 2048), (1, 2, 8, 0)]


@pytest.mark.parametrize("programs,rows,warps,left", CASES)
@pytest.mark.parametrize("sms", [132, 16])
def test_prefetch_within_budget_and_rows(monkeypatch, programs, rows, warps, left, sms):
    monkeypatch.setattr(pdl, "_num_sms", lambda index: sms)
    pdl._prefetch_bytes.cache_clear()
    nbytes, lines = pdl._prefetch_bytes(0, programs, rows, warps, left)
    resident = min(programs, sms * min(pdl.MAX_PROGRAMS_PER_SM, pdl.MAX_WARPS_PER_SM // warps))
    assert 0 <= nbytes <= left and nbytes % 128 == 0
    assert resident * rows * nbytes <= pdl.L2_PREFETCH_BUDGET
    if nbytes:
        assert lines * 128 >= nbytes > (lines // 2) * 128 and lines & (lines - 1) == 0
        # the budget binds or the whole row is asked for
        assert nbytes + 128 > left or resident * rows * (nbytes + 128) > pdl.L2_PREFETCH_BUDGET
    else:
        assert lines == 0
    pdl._prefetch_bytes.cache_clear()


def test_prefetch_off_without_pdl_or_when_disabled(monkeypatch):
    x = torch.zeros(4)  # CPU: no PDL, so no prefetch whatever the sizes
    assert pdl.l2_prefetch_bytes(x, 1024, 4, 8, 4096) == (0, 0)
    monkeypatch.setenv("TANDEM_L2_PREFETCH", "0")
    monkeypatch.setattr(pdl, "launch_options", lambda t: {"PDL": True, "launch_pdl": True})
    assert pdl.l2_prefetch_bytes(x, 1024, 4, 8, 4096) == (0, 0)
    monkeypatch.setenv("TANDEM_L2_PREFETCH", "1")
    monkeypatch.setattr(pdl, "_prefetch_bytes", lambda *a: (4096, 32))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert pdl.l2_prefetch_bytes(x, 1024, 4, 8, 4096) == (4096, 32)
