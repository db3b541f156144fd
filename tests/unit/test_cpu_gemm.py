"""The packed-panel matmul of float32 CPU linears (layers/cpu_gemm.py, kernels/cpu/gemm.c)
against torch.nn.functional.linear, its spec: every row count up to past one row block,
input widths off the vector width, outputs ending in a partial panel, two-segment
(gate/up) weights, bias; and a layer's forward at decode and prefill sizes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tandem.kernels.cpu import load_library
from tandem.layers import cpu_gemm

needs_kernel = pytest.mark.skipif(load_library() is None, reason="no C compiler")


def _packed(weight: torch.Tensor, nseg: int = 1) -> cpu_gemm.PackedWeight:
    packed = cpu_gemm.pack_weight(weight, nseg)
    assert packed is not None and packed.kind == "panels"
    return packed


@needs_kernel
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 7, 11, 12, 13, 24, 25, 48, 100, 256, 700])
@pytest.mark.parametrize("in_features, out_features", [(64, 96), (40, 70), (129, 33),
                                                        (512, 768)])
def test_linear_matches_f_linear(rows: int, in_features: int, out_features: int) -> None:
    g = torch.Generator().manual_seed(rows * 1000 + in_features + out_features)
    x = torch.randn(rows, in_features, generator=g)
    w = torch.randn(out_features, in_features, generator=g)
    got = cpu_gemm.linear(x, w, _packed(w))
    torch.testing.assert_close(got, F.linear(x, w), atol=1e-4 * in_features ** 0.5,
                               rtol=1e-4)


@needs_kernel
@pytest.mark.parametrize("rows", [1, 13, 200])
def test_row_blocks_and_threads(rows: int) -> None:
    """Inputs wide enough for several row blocks (each within 512 KB), on 1 and 2
    threads, into a three-dimensional input and back."""
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(2, rows, 1536, generator=g)
    w = torch.randn(200, 1536, generator=g)
    want = F.linear(x, w)
    for threads in (1, 2):
        saved = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            got = cpu_gemm.linear(x, w, _packed(w))
        finally:
            torch.set_num_threads(saved)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, atol=2e-3, rtol=1e-4)


@needs_kernel
@pytest.mark.parametrize("half", [32, 50])
def test_two_segments_and_bias(half: int) -> None:
    """A gate/up weight packs each half into whole panels; outputs keep [gate | up] order,
    and the bias lands on the right columns, padding or not."""
    g = torch.Generator().manual_seed(half)
    x = torch.randn(9, 64, generator=g)
    w = torch.randn(2 * half, 64, generator=g)
    b = torch.randn(2 * half, generator=g)
    packed = _packed(w, nseg=2)
    assert packed.nseg == 2 and packed.seg == half
    width = load_library().tandem_panel_width()
    assert packed.tensor.shape == (2 * -(-half // width), 64, width)
    torch.testing.assert_close(cpu_gemm.linear(x, w, packed, b), F.linear(x, w, b),
                               atol=1e-3, rtol=1e-4)


@needs_kernel
@pytest.mark.parametrize("rows, half", [(1, 32), (13, 50), (300, 96), (1100, 40)])
def test_silu_mul_matches_reference(rows: int, half: int) -> None:
    """silu(gate) * up stored by the matmul (the MLP's path) equals F.linear, then
    silu * mul; a weight that is not two-segment panels gets None (the caller's cue)."""
    g = torch.Generator().manual_seed(rows + half)
    x = torch.randn(rows, 64, generator=g)
    w = torch.randn(2 * half, 64, generator=g) * 0.3
    gate, up = F.linear(x, w).chunk(2, dim=-1)
    got = cpu_gemm.linear_silu_mul(x, _packed(w, nseg=2))
    torch.testing.assert_close(got, F.silu(gate) * up, atol=1e-4, rtol=1e-4)
    assert cpu_gemm.linear_silu_mul(x, _packed(w)) is None  # one segment
    assert cpu_gemm.linear_silu_mul(x.double(), _packed(w, nseg=2)) is None


def test_pack_panels_layout() -> None:
    """Panel p holds output rows p * width .. + width, transposed; padding rows zero."""
    w = torch.arange(10 * 3, dtype=torch.float32).view(10, 3)
    panels = cpu_gemm.pack_panels(w, 4)
    assert panels.shape == (3, 3, 4)
    assert torch.equal(panels[1], w[4:8].t())
    assert torch.equal(panels[2, :, :2], w[8:].t()) and not panels[2, :, 2:].any()
    two = cpu_gemm.pack_panels(w, 4, nseg=2)  # halves of 5 rows: 2 panels each
    assert two.shape == (4, 3, 4)
    assert torch.equal(two[2], w[5:9].t()) and torch.equal(two[3, :, 0], w[9])


@needs_kernel
def test_layer_forward_at_decode_and_prefill_sizes(tmp_path) -> None:
    """A float32 CPU linear packs its weight (a merged gate/up in two segments) and its
    forward equals F.linear on the original weight, whole or in row slices."""
    from tandem.layers.linear import MergedColumnParallelLinear
    layer = MergedColumnParallelLinear(64, [48, 48], prefix="mlp.gate_up_proj")
    with torch.no_grad():
        layer.weight.copy_(torch.randn(96, 64))
    layer.process_weights_after_loading()
    assert layer.packed is not None and layer.packed.nseg == 2
    x = torch.randn(1100, 64)
    act = layer.method.apply_silu_mul(layer, x)
    gate, up = F.linear(x, layer.weight).chunk(2, dim=-1)
    torch.testing.assert_close(act, F.silu(gate) * up, atol=1e-4, rtol=1e-4)
    big = layer(x)
    small = torch.cat([layer(x[:100]), layer(x[100:])])
    torch.testing.assert_close(big, small, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(big, F.linear(x, layer.weight), atol=1e-4, rtol=1e-4)


def test_kernels_build_where_there_is_a_compiler() -> None:
    """The kernel tests skip without a C compiler; with one, a build failure (a source
    error) must fail here rather than skip them all."""
    import os
    import shutil
    from tandem import envs
    if not envs.cpu_kernels_enabled():
        pytest.skip("TANDEM_CPU_KERNELS=0")
    if shutil.which(os.environ.get("CC", "cc")) is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler")
    assert load_library() is not None
