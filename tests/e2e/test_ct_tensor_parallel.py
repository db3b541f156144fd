"""A compressed-tensors checkpoint with asymmetric INT4 linears and FP8 KV scales under
tensor parallelism on CPU (two gloo worker processes): the unpacked zero points split
with the output rows (column-parallel) or with the input groups (row-parallel), and every
rank reads the same KV scales, so TP=2 greedy-decodes what TP=1 does. Per-channel INT4
too: a row's one scale and zero point are whole on both ranks of a row-parallel layer."""

from __future__ import annotations

import pytest

from tandem import LLM
from tests.unit.test_ct_asym_kv_scales import SIZES, _int4_asym, _outputs, _src, _write

pytest.importorskip("compressed_tensors")
pytestmark = pytest.mark.slow


def _tp2_matches_tp1(out: str) -> None:
    expected = [tokens for tokens, _ in _outputs(LLM(out, **SIZES))]
    tp2 = LLM(out, tensor_parallel_size=2, **SIZES)
    try:
        assert [tokens for tokens, _ in _outputs(tp2)] == expected
    finally:
        tp2.engine.shutdown()


def test_tp2_asymmetric_int4_with_kv_scales_matches_tp1(tmp_path):
    src, out = _src(tmp_path, hidden_size=256), str(tmp_path / "ckpt")  # 128 inputs/rank
    _write(src, out, int4_asym=True, kv=True)
    _tp2_matches_tp1(out)


def test_tp2_per_channel_int4_matches_tp1(tmp_path):
    src, out = _src(tmp_path, hidden_size=256), str(tmp_path / "ckpt")
    _write(src, out, int4_asym=False, kv=False, args=_int4_asym(channel=True))
    _tp2_matches_tp1(out)


def test_tp2_gptq_checkpoint_with_a_quantized_head_matches_tp1(tmp_path):
    """`tandem quant gptq --lm-head`: the head's packed codes and scales are cut by
    vocabulary rows on each rank like the weight they replace."""
    from tandem.cli import main
    from tests.model_factory import make_tiny_model
    from tests.unit.test_gptq import _calibration_files
    src = make_tiny_model(tmp_path / "src", hidden_size=256, intermediate_size=512,
                          num_heads=4, num_kv_heads=2, tie_word_embeddings=True)
    out = str(tmp_path / "gptq")
    assert main(["quant", "gptq", "--model", src, "--out", out, "--lm-head", "--window",
                 "128", "--max-tokens", "1024", "--no-progress",
                 _calibration_files(tmp_path)]) == 0
    _tp2_matches_tp1(out)
