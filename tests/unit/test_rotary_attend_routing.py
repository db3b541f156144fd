"""Which steps may run rotary, the K/V write and attention in one decode launch
(`Attention.rotary_attend` -> a backend's `rotary_decode`): decode-only steps whose rows are
distinct sequences, on a backend that has it, unless TANDEM_DECODE_ROTARY=0; the builder
marks verify steps (rows of one sequence) as not distinct. The Triton kernel itself is
tested against the two launches in tests/kernels/test_triton_decode_rotary.py."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tandem.kernels import TorchReferenceBackend, reference
from tandem.layers.attention import Attention
from tandem.outputs import ScheduledSeq, StepPlan
from tandem.request import SamplingParams
from tandem.runner import input_batch
from tandem.runner.request_state import RequestState
from tests.model_factory import make_attn_metadata

H, HKV, D, BLOCK = 4, 2, 16, 4


class FusingBackend(TorchReferenceBackend):
    """The reference, plus a rotary_decode that records its calls and answers with the
    composed ops (or declines, like a backend that cannot take the step)."""

    def __init__(self, decline: bool = False) -> None:
        self.calls = 0
        self.decline = decline

    def rotary_decode(self, positions, q, k, v, cos, sin, kv_cache, meta, scale, kv_scale,
                      q_norm, k_norm, eps):
        self.calls += 1
        if self.decline:
            return None
        q, k = reference.rotary_write_kv(positions, q, k, v, cos, sin, kv_cache,
                                         meta.slot_mapping, kv_scale, q_norm, k_norm, eps)
        return reference.paged_attention(q, kv_cache, meta, scale, k, v, kv_scale=kv_scale)


def _run(backend, meta, env=None, monkeypatch=None, fp8_attention=False):
    if env is not None:
        monkeypatch.setenv("TANDEM_DECODE_ROTARY", env)
    attn = Attention(H, D, D ** -0.5, HKV, backend)
    attn.fp8_attention = fp8_attention
    torch.manual_seed(0)
    attn.kv_cache = torch.randn(attn.kv_cache_shape(16, BLOCK))
    t = meta.num_tokens
    qkv = torch.randn(t, (H + 2 * HKV) * D)
    q = qkv[:, :H * D].view(t, H, D)
    k = qkv[:, H * D:(H + HKV) * D].view(t, HKV, D)
    v = qkv[:, (H + HKV) * D:].view(t, HKV, D)
    emb = torch.outer(torch.arange(64.0), 1.0 / 10000 ** (torch.arange(0, D, 2) / D))
    cos, sin = torch.cat([emb, emb], -1).cos(), torch.cat([emb, emb], -1).sin()
    positions = torch.tensor([s - 1 for s in meta.seq_lens_cpu])
    if meta.max_query_len > 1:
        positions = torch.arange(t)
    out = attn.rotary_attend(positions, q, k, v, cos, sin, None, meta)
    return out, attn.kv_cache


def _decode_meta(distinct: bool):
    meta = make_attn_metadata([1, 1], [7, 12], [[3, 5], [8, 1, 9]], BLOCK)
    return dataclasses.replace(meta, decode_rows_distinct=distinct)


def test_distinct_decode_rows_take_the_fused_launch(monkeypatch):
    monkeypatch.delenv("TANDEM_DECODE_ROTARY", raising=False)
    fused = FusingBackend()
    out, cache = _run(fused, _decode_meta(True))
    assert fused.calls == 1
    plain_out, plain_cache = _run(TorchReferenceBackend(), _decode_meta(True))
    torch.testing.assert_close(out, plain_out)
    torch.testing.assert_close(cache, plain_cache)


@pytest.mark.parametrize("case", ["verify rows", "prompt", "switched off", "fp8 probe",
                                  "declined"])
def test_other_steps_take_the_two_launches(monkeypatch, case):
    monkeypatch.delenv("TANDEM_DECODE_ROTARY", raising=False)
    backend = FusingBackend(decline=case == "declined")
    meta = _decode_meta(case != "verify rows")
    if case == "prompt":
        meta = dataclasses.replace(make_attn_metadata([3], [3], [[2]], BLOCK),
                                   decode_rows_distinct=True)
    out, cache = _run(backend, meta, env="0" if case == "switched off" else None,
                      monkeypatch=monkeypatch, fp8_attention=case == "fp8 probe")
    assert backend.calls == (1 if case == "declined" else 0)
    plain_out, plain_cache = _run(TorchReferenceBackend(), meta,
                                  fp8_attention=case == "fp8 probe")
    torch.testing.assert_close(out, plain_out)
    torch.testing.assert_close(cache, plain_cache)


def test_builder_marks_verify_steps_as_not_distinct():
    params = SamplingParams(temperature=0.0)
    states = {r: RequestState(r, 4, list(range(10, 20)), [0, 1, 2], params, [], (0.0,) * 7)
              for r in ("a", "b")}
    plain = StepPlan(seqs=[ScheduledSeq("a", 6, 1, True), ScheduledSeq("b", 6, 1, True)],
                     num_batched_tokens=2)
    inputs = input_batch.build_model_inputs(plain, states, BLOCK, torch.device("cpu"), {})
    assert inputs.attn_metadata.decode_rows_distinct
    verify = StepPlan(seqs=[ScheduledSeq("a", 6, 3, True, spec_token_ids=[30, 31]),
                            ScheduledSeq("b", 6, 1, True)], num_batched_tokens=4)
    inputs = input_batch.build_model_inputs(verify, states, BLOCK, torch.device("cpu"), {})
    assert inputs.attn_metadata.max_query_len == 1  # verify rows are one-token queries
    assert not inputs.attn_metadata.decode_rows_distinct
